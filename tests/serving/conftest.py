"""Fixtures of the serving tests: the tiny fine-tuned model, the wheel's Triton, specs for serving it."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from deeptune.api.modeldeployment import ModelDeploymentSpec
from tests.serving.tiny import TinyModels, build_tiny_models
from tests.serving.wheel_server import WheelTriton, install

CPU_SPEC: dict[str, Any] = {
    "model": {"merged": {"pvc": {"claimName": "out", "path": "run/merged"}}},
    "resources": {"gpu": 0},
    "generation": {"maxNewTokens": 8},
}
"""A ModelDeployment spec that serves on CPU; the model's directory comes from a ModelLocation."""


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


def cpu_spec(**overrides: Any) -> ModelDeploymentSpec:
    """CPU_SPEC with camelCase overrides merged in, e.g. `cpu_spec(streaming=True)`."""
    return ModelDeploymentSpec.model_validate(_merge(CPU_SPEC, overrides))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    import torch

    torch.set_num_threads(1)  # a 2-core machine shared with other suites: tiny models gain nothing from more
    return build_tiny_models(tmp_path_factory.mktemp("tiny-served"))


@pytest.fixture(scope="session")
def wheel_triton(tmp_path_factory: pytest.TempPathFactory) -> WheelTriton:
    pytest.importorskip("pytriton", reason="the serving extra (nvidia-pytriton) is not installed")
    return install(tmp_path_factory.mktemp("triton"))
