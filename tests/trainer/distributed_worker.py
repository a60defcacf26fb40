"""One worker of a distributed training test, started by torch.distributed's launcher (or alone).

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.trainer.distributed_worker \
        MODEL_DIR OUTPUT_DIR SPEC_JSON [KILL_AT_STEP]

Trains on the keyword task through `deeptune_trainer.training.train` as a FineTuneJob's pod would
(the model loaded sharded for fsdp), and rank 0 writes the losses it logged to OUTPUT_DIR/losses.json.
KILL_AT_STEP stands in for a pod killed mid-run: every worker exits at once after that step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, TrainerCallback, TrainerControl, TrainerState

from deeptune.api.finetunejob import FineTuneJobSpec
from deeptune.api.trainer import TrainerConfig, TrainerPaths
from deeptune_trainer.distributed import World, end_worker
from deeptune_trainer.modeling import load_for_training
from deeptune_trainer.synthetic import as_samples, keyword_rows
from deeptune_trainer.training import train

LOSSES = "losses.json"
KILLED_EXIT_CODE = 9


class KillAfter(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        if state.global_step == self.step:
            os._exit(KILLED_EXIT_CODE)


def main(model_dir: str, output_dir: str, spec_json: str, kill_at: str = "0") -> None:
    torch.set_num_threads(1)
    world = World.from_env()
    spec = FineTuneJobSpec.model_validate(json.loads(spec_json))
    paths = TrainerPaths(output_dir=output_dir, base_model=model_dir)
    config = TrainerConfig(name="test", spec=spec, paths=paths)
    loaded = load_for_training(config, world)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    callbacks = [KillAfter(int(kill_at))] if int(kill_at) else []
    result = train(
        loaded.model,
        tokenizer,
        as_samples(keyword_rows(160, seed=1)),
        [],
        spec=spec,
        output_dir=output_dir,
        precision="fp32",
        callbacks=callbacks,
        log=lambda _: None,
        world=world,
    )
    if world.is_main:
        losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
        record = {"losses": losses, "resumedFrom": result.resumed_from, "worldSize": world.size}
        (Path(output_dir) / LOSSES).write_text(json.dumps(record))
    end_worker(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
