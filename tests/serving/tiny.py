"""A tiny fine-tuned model to serve: a random-weight Llama, LoRA-trained for a few seconds on the keyword
task, saved as the trainer saves it (base model, `adapter/`, `merged/`).

Served answers can then be checked for being right, not just for being text: the fine-tuned model
answers held-out prompts with the keyword's phrase, the base model does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deeptune.api.finetunejob import FineTuneJobSpec
from deeptune.api.trainer import ArtifactPaths
from deeptune_trainer.data.sample import Message, Sample
from deeptune_trainer.synthetic import ROTATED_ANSWERS, keyword_rows, tokenizer_texts

TRAIN_SPEC = {
    "baseModel": {"pvc": {"claimName": "models", "path": "tiny"}},
    "dataset": {"source": {"inline": [{"prompt": "unused", "completion": "unused"}]}},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
    "hyperparameters": {
        "learningRate": 1e-2,
        "maxSteps": 120,
        "perDeviceBatchSize": 16,
        "gradientAccumulationSteps": 1,
        "maxSeqLength": 64,
        "warmupRatio": 0.1,
        "checkpointSteps": 1000,
        "gradientCheckpointing": False,
    },
    "output": {"pvc": {"claimName": "out"}, "mergeAdapter": True},
}
"""The trainer tests' CPU-sized LoRA run on the keyword task, with the merged model saved too."""


@dataclass(frozen=True)
class TinyModels:
    """The three directories a ModelDeployment can serve from, and held-out prompts with their answers."""

    base: Path
    adapter: Path
    merged: Path
    questions: list[str]
    """Held-out user messages as a user writes them (`topic: ...`)."""
    prompts: list[str]
    """The same as the chat template renders them (`<|begin|>User: topic: ...\\n\\nAssistant:`)."""
    answers: list[str]
    """What the fine-tuned model should answer (the served text starts with a space, as trained)."""
    rotated: Path | None = None
    """A second adapter on the same base, trained on ROTATED_ANSWERS (when asked for)."""

    @property
    def rotated_answers(self) -> list[str]:
        return [ROTATED_ANSWERS[answer] for answer in self.answers]


def _samples(rows: list[dict[str, str]]) -> list[Sample]:
    return [
        Sample(messages=(Message("user", r["prompt"]), Message("assistant", r["completion"])), line=i + 1)
        for i, r in enumerate(rows)
    ]


def _fine_tune(base: Path, rows: list[dict[str, str]], run_dir: Path) -> ArtifactPaths:
    """LoRA-train `base` on `rows` and save what the trainer saves under `run_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deeptune_trainer.artifacts import save_model_artifacts
    from deeptune_trainer.training import train

    spec = FineTuneJobSpec.model_validate(TRAIN_SPEC)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    result = train(
        model,
        tokenizer,
        _samples(rows),
        [],
        spec=spec,
        output_dir=run_dir,
        precision="fp32",
        log=lambda _: None,
    )
    paths = save_model_artifacts(
        result.model, tokenizer, spec, run_dir, lambda: AutoModelForCausalLM.from_pretrained(base)
    )
    assert paths.adapter and paths.merged
    return paths


def build_tiny_models(
    out_dir: Path, held_out: int = 32, head_dim: int | None = None, rotated: bool = False
) -> TinyModels:
    """Build, fine-tune and save the tiny model under `out_dir` (a few seconds on one CPU core);
    `head_dim` 32 makes one vLLM can serve on CPU; `rotated` also trains a second adapter."""
    from transformers import AutoTokenizer

    from deeptune_trainer.formatting import render_prompt
    from deeptune_trainer.tinymodels import build_tiny_model

    base = build_tiny_model("llama", out_dir / "base", tokenizer_texts(), head_dim=head_dim)
    train_rows = keyword_rows(160, seed=1)
    paths = _fine_tune(base, train_rows, out_dir / "run")
    other = None
    if rotated:
        rows = [{**row, "completion": ROTATED_ANSWERS[row["completion"]]} for row in train_rows]
        other = out_dir / "rotated" / str(_fine_tune(base, rows, out_dir / "rotated").adapter)
    held = _samples(keyword_rows(held_out, seed=2, exclude={row["prompt"] for row in train_rows}))
    tokenizer = AutoTokenizer.from_pretrained(base)
    return TinyModels(
        base=base,
        adapter=out_dir / "run" / str(paths.adapter),
        merged=out_dir / "run" / str(paths.merged),
        questions=[sample.messages[0].content for sample in held],
        prompts=[render_prompt(sample, tokenizer) for sample in held],
        answers=[sample.target for sample in held],
        rotated=other,
    )
