"""Shared fixtures of the trainer tests: tiny local models, the keyword task
(`deeptune_trainer.synthetic`), and specs sized for CPU."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deeptune.api.finetunejob import FineTuneJobSpec
from deeptune_trainer.data.sample import Sample
from deeptune_trainer.synthetic import as_samples, keyword_rows, tokenizer_texts


@pytest.fixture(scope="session")
def keyword_task_rows() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """160 training rows and 40 held-out rows with prompts not seen in training, as dataset rows."""
    train = keyword_rows(160, seed=1)
    return train, keyword_rows(40, seed=2, exclude={row["prompt"] for row in train})


@pytest.fixture(scope="session")
def keyword_task(
    keyword_task_rows: tuple[list[dict[str, str]], list[dict[str, str]]],
) -> tuple[list[Sample], list[Sample]]:
    """The keyword task as Samples: (train, held-out)."""
    train, held_out = keyword_task_rows
    return as_samples(train), as_samples(held_out)


@pytest.fixture(scope="session")
def single_threaded_torch() -> None:
    """One thread: tiny models gain nothing from more, and on a shared 2-core machine OpenMP threads
    spinning against other processes made steps 20x slower."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, single_threaded_torch: None) -> Path:
    from deeptune_trainer.tinymodels import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), tokenizer_texts())


@pytest.fixture(scope="session")
def tiny_deepseek_dir(tmp_path_factory: pytest.TempPathFactory, single_threaded_torch: None) -> Path:
    from deeptune_trainer.tinymodels import build_tiny_model

    return build_tiny_model("deepseek_v3", tmp_path_factory.mktemp("tiny-deepseek-v3"), tokenizer_texts())


@pytest.fixture
def tiny_model_dirs(tiny_llama_dir: Path, tiny_deepseek_dir: Path) -> dict[str, Path]:
    """Both tiny models by model type, for tests parametrized over them."""
    return {"llama": tiny_llama_dir, "deepseek_v3": tiny_deepseek_dir}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


TINY_SPEC: dict[str, Any] = {
    "baseModel": {"pvc": {"claimName": "models", "path": "tiny"}},
    "dataset": {"source": {"inline": [{"prompt": "unused", "completion": "unused"}]}},
    "method": "lora",
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
    "hyperparameters": {
        "learningRate": 1e-2,
        "maxSteps": 120,
        "perDeviceBatchSize": 16,
        "gradientAccumulationSteps": 1,
        "maxSeqLength": 64,
        "warmupRatio": 0.1,
        "loggingSteps": 20,
        "checkpointSteps": 1000,
        "gradientCheckpointing": False,
    },
    "evaluation": {"generation": {"maxNewTokens": 8}, "evalSteps": 40},
    "output": {"pvc": {"claimName": "out"}},
}
"""A spec sized for CPU tests: a few seconds of training on the keyword task."""


@pytest.fixture
def tiny_spec() -> dict[str, Any]:
    """TINY_SPEC as a manifest's spec (camelCase), a fresh copy for each test."""
    return copy.deepcopy(TINY_SPEC)


@pytest.fixture
def make_spec() -> Callable[..., FineTuneJobSpec]:
    """TINY_SPEC with camelCase overrides merged in, e.g. `make_spec(method="full")`."""

    def make(**overrides: Any) -> FineTuneJobSpec:
        return FineTuneJobSpec.model_validate(_merge(TINY_SPEC, overrides))

    return make
