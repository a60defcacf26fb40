"""What instruction perturbation is for, measured: a model trained with it keeps its score when the
held-out questions are asked in words it never saw (framings outside the built-in pools, typos); the
same model trained without it loses a third of it."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from peft import PeftModel

from deeptune.api.finetunejob import FineTuneJobSpec
from deeptune.api.trainer import TrainerConfig, TrainerPaths
from deeptune_trainer.data.perturbation import InstructionPerturber
from deeptune_trainer.evaluation import evaluate
from deeptune_trainer.modeling import load_model
from deeptune_trainer.run import run
from deeptune_trainer.synthetic import as_samples, keyword_rows
from tests.trainer.conftest import TINY_SPEC, _merge

pytestmark = pytest.mark.trainer

UNSEEN_FRAMINGS = [
    "Hey there, {text} - any idea?",
    "{text}\n(asking for a friend)",
    "Tell me: {text}",
    "So, {text}, right?",
    "Hello! {text} Cheers.",
    "{text} -- need this today",
]
"""How the held-out questions are asked: none of these is among the built-in openings and closings."""


def exact_match(
    tmp_path: Path, model_dir: Path, augmentation: dict[str, Any] | None, held_out: dict[str, list]
) -> dict[str, float]:
    """Train on the keyword task (with `augmentation`), then score each held-out set."""
    train = keyword_rows(240, seed=1)
    dataset: dict[str, Any] = {
        "source": {"inline": train},
        "validation": {"source": {"inline": held_out["asked as trained"]}},
    }
    if augmentation:
        dataset["augmentation"] = augmentation
    spec = FineTuneJobSpec.model_validate(
        _merge(TINY_SPEC, {
            "dataset": dataset,
            # Framings and context sentences make prompts longer: room for them, or answers are cut.
            "hyperparameters": {"maxSeqLength": 160},
            "evaluation": {"metrics": ["exactMatch"], "baseline": False, "generation": {"maxNewTokens": 8}},
        })
    )  # fmt: skip
    out = tmp_path / ("with" if augmentation else "without")
    paths = TrainerPaths(output_dir=str(out), base_model=str(model_dir))
    config = TrainerConfig(name=out.name, spec=spec, paths=paths, metrics_port=0,
                           termination_message_path=str(out / "summary.json"))  # fmt: skip
    run(config, log=lambda _: None)
    loaded = load_model(spec, paths)
    model = PeftModel.from_pretrained(loaded.model, out / "adapter")
    return {
        name: evaluate(model, loaded.tokenizer, as_samples(rows), spec)["exactMatch"]
        for name, rows in held_out.items()
    }


def test_a_model_trained_with_perturbation_keeps_its_score_on_questions_asked_another_way(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    train_prompts = {row["prompt"] for row in keyword_rows(240, seed=1)}
    held_out = keyword_rows(40, seed=2, exclude=train_prompts)
    ask = InstructionPerturber(reword=True, insert_context=False, templates=UNSEEN_FRAMINGS, typos=0.1)
    rng = random.Random(5)
    reworded = [{**row, "prompt": ask(row["prompt"], rng)} for row in held_out]
    sets = {"asked as trained": held_out, "asked another way": reworded}

    without = exact_match(tmp_path, tiny_llama_dir, None, sets)
    perturbation = {"fraction": 1.0, "instructionPerturbation": {"typos": 0.1}}
    with_perturbation = exact_match(tmp_path, tiny_llama_dir, perturbation, sets)
    print({"without": without, "with": with_perturbation})  # measured: 1.0/0.675 without, 1.0/1.0 with

    assert without["asked as trained"] >= 0.9 and with_perturbation["asked as trained"] >= 0.9
    assert with_perturbation["asked another way"] >= without["asked another way"] + 0.2
