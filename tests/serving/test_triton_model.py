"""model.py's request handling in-process: one generate call per batch, errors kept to their request.

Triton's own `triton_python_backend_utils` (pure Python, from the wheel) supplies the helpers; the
three classes its stub injects at runtime (Tensor, InferenceResponse, TritonError) are stood in for
by minimal classes with the same constructor arguments.
"""

from __future__ import annotations

import importlib
import json
import sys
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from deeptune.serving.repository import ModelLocation, model_parameters
from tests.serving.conftest import cpu_spec
from tests.serving.tiny import TinyModels


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Response:
    def __init__(self, output_tensors: list[_Tensor] | None = None, error: Any = None) -> None:
        self.output_tensors, self.error = output_tensors or [], error


class _Error:
    def __init__(self, message: str) -> None:
        self.message = message


class _Request:
    def __init__(self, prompts: list[str], **optional: np.ndarray) -> None:
        text = np.array([[p.encode()] for p in prompts], dtype=np.object_)
        self._inputs = [_Tensor("text_input", text), *(_Tensor(k, v) for k, v in optional.items())]

    def inputs(self) -> list[_Tensor]:
        return self._inputs


@pytest.fixture
def model_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    pytriton = pytest.importorskip("pytriton")
    monkeypatch.syspath_prepend(f"{pytriton.__path__[0]}/tritonserver/backends/python")
    utils = importlib.import_module("triton_python_backend_utils")
    for name, stand_in in (("Tensor", _Tensor), ("InferenceResponse", _Response), ("TritonError", _Error)):
        monkeypatch.setattr(utils, name, stand_in, raising=False)
    monkeypatch.delitem(sys.modules, "deeptune.serving.model", raising=False)
    return importlib.import_module("deeptune.serving.model")


def _texts(response: _Response) -> list[str]:
    (tensor,) = response.output_tensors
    assert tensor.name() == "text_output"
    return [item.decode() for item in tensor.as_numpy().reshape(-1)]


def test_all_requests_of_an_execute_share_one_generate_call(
    model_module: ModuleType, tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = model_parameters(cpu_spec(), ModelLocation(model=str(tiny_models.merged)))
    config = {"parameters": {key: {"string_value": value} for key, value in params.items()}}
    model = model_module.TritonPythonModel()
    model.initialize(
        {"model_config": json.dumps(config), "model_instance_kind": "CPU", "model_instance_device_id": "0"}
    )
    calls: list[int] = []
    generate = model._generator.generate

    def counting(prompts: list[Any], on_text: Any = None) -> list[str]:
        calls.append(len(prompts))
        return generate(prompts, on_text)

    monkeypatch.setattr(model._generator, "generate", counting)
    p = tiny_models.prompts
    responses = model.execute(
        [
            _Request([p[0]]),
            _Request([p[1]], temperature=np.array([[9.0]], dtype=np.float32)),
            _Request([p[2], p[3]], max_new_tokens=np.array([[1], [8]], dtype=np.int32)),
            _Request([p[4]], top_p=np.array([[1.0], [1.0]], dtype=np.float32)),
        ]
    )
    assert calls == [3]  # the two bad requests are left out, the three good prompts generate together
    assert [t.strip() for t in _texts(responses[0])] == tiny_models.answers[:1]
    assert responses[1].error.message == "temperature must be between 0 and 5, got 9"
    short, full = _texts(responses[2])
    assert full.strip() == tiny_models.answers[3] and len(short) <= len(tiny_models.answers[2]) + 1
    assert responses[3].error.message == "top_p has 2 values for 1 prompts: give one, or one per prompt"
