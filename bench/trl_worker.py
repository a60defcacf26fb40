"""One configuration of bench/versus_trl.py: TRL's SFTTrainer as its documentation sets it up for
prompt/completion data.

    python bench/trl_worker.py RUN_JSON

Packing (TRL's default best-fit-decreasing strategy, padding-free: position ids restart per example),
loss on the completion only, LoRA through `peft_config`; everything else as the run file says, the
same numbers our trainer gets. Writes the measurement to the run's `result` path.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss import peak_rss_bytes
from step_clock import StepClock, worker_record  # bench/step_clock.py


def main(run_file: str) -> None:
    run = json.loads(Path(run_file).read_text())
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    before_load = peak_rss_bytes()
    rows = json.loads(Path(run["rows"]).read_text())
    tokenizer = AutoTokenizer.from_pretrained(run["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(run["model_dir"], dtype=torch.float32)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            max_length=run["max_length"],
            packing=True,
            completion_only_loss=True,
            per_device_train_batch_size=run["batch_size"],
            gradient_accumulation_steps=1,
            max_steps=run["steps"],
            learning_rate=run["learning_rate"],
            lr_scheduler_type="cosine",
            warmup_steps=run["warmup_ratio"],
            weight_decay=run["weight_decay"],
            seed=run["seed"],
            gradient_checkpointing=False,
            logging_steps=run["logging_steps"],
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            include_num_input_tokens_seen="non_padding",
        )
        lora = LoraConfig(
            r=run["lora_r"],
            lora_alpha=run["lora_alpha"],
            lora_dropout=0.0,
            target_modules=run["lora_targets"],
            task_type="CAUSAL_LM",
        )
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[clock],
        )
        trainer.train()
    record = worker_record(
        clock, run["warmup_steps"], trainer.state.log_history, before_load, f"trl {trl.__version__}"
    )
    Path(run["result"]).write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
