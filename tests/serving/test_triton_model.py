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
from deeptune_serving.generation import Sampling
from tests.serving.conftest import cpu_spec
from tests.serving.tiny import TinyModels

GREEDY = Sampling(max_new_tokens=8, temperature=0.0, top_p=1.0)


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


def _strings(values: list[str]) -> np.ndarray:
    return np.array([[value.encode()] for value in values], dtype=np.object_)


class _Request:
    def __init__(self, prompts: list[str] | None = None, **optional: np.ndarray) -> None:
        given = [] if prompts is None else [_Tensor("text_input", _strings(prompts))]
        self._inputs = [*given, *(_Tensor(k, v) for k, v in optional.items())]

    def inputs(self) -> list[_Tensor]:
        return self._inputs


@pytest.fixture
def model_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    pytriton = pytest.importorskip("pytriton")
    monkeypatch.syspath_prepend(f"{pytriton.__path__[0]}/tritonserver/backends/python")
    utils = importlib.import_module("triton_python_backend_utils")
    for name, stand_in in (("Tensor", _Tensor), ("InferenceResponse", _Response), ("TritonError", _Error)):
        monkeypatch.setattr(utils, name, stand_in, raising=False)
    monkeypatch.delitem(sys.modules, "deeptune_serving.triton_model", raising=False)
    return importlib.import_module("deeptune_serving.triton_model")


def _outputs(response: _Response) -> dict[str, list[Any]]:
    assert response.error is None, response.error.message
    return {tensor.name(): tensor.as_numpy().reshape(-1).tolist() for tensor in response.output_tensors}


def _texts(response: _Response) -> list[str]:
    return [item.decode() for item in _outputs(response)["text_output"]]


def _model(model_module: ModuleType, location: ModelLocation, **spec: Any) -> Any:
    """The model with Triton's dynamic batching: `execute` answers with responses (the continuous
    engine answers through response senders, which need Triton's stub: test_openai_api.py)."""
    spec = {"batching": {"mode": "dynamic"}, **spec}
    params = model_parameters(cpu_spec(**spec), location)
    config = {"parameters": {key: {"string_value": value} for key, value in params.items()}}
    model = model_module.TritonPythonModel()
    model.initialize(
        {"model_config": json.dumps(config), "model_instance_kind": "CPU", "model_instance_device_id": "0"}
    )
    return model


def test_all_requests_of_an_execute_share_one_generate_call(
    model_module: ModuleType, tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(model_module, ModelLocation(model=str(tiny_models.merged)))
    calls: list[int] = []
    generate = model._generator.generate

    def counting(prompts: list[Any], on_text: Any = None) -> list[Any]:
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


def test_chat_messages_token_counts_and_finish_reasons(
    model_module: ModuleType, tiny_models: TinyModels
) -> None:
    model = _model(model_module, ModelLocation(model=str(tiny_models.merged)))
    chat = json.dumps([{"role": "user", "content": tiny_models.questions[0]}])
    responses = model.execute(
        [
            _Request(messages=_strings([chat])),
            _Request([tiny_models.prompts[1]], max_new_tokens=np.array([[1]], dtype=np.int32)),
            _Request([tiny_models.prompts[2]], messages=_strings([chat])),
            _Request(messages=_strings(['[{"role": "user"}]'])),
        ]
    )
    answered = _outputs(responses[0])
    assert answered["text_output"][0].decode().strip() == tiny_models.answers[0]
    assert answered["finish_reason"] == [b"stop"] and answered["completion_tokens"][0] >= 1
    assert answered["prompt_tokens"] == [len(model._generator.prompt(tiny_models.prompts[0], GREEDY).ids)]
    cut = _outputs(responses[1])
    assert (cut["finish_reason"], cut["completion_tokens"]) == ([b"length"], [1])
    assert responses[2].error.message.startswith("send text_input (a prompt) or messages")
    assert responses[3].error.message == "messages[0].content must be text"


def test_the_response_cache_refuses_sampling(model_module: ModuleType, tiny_models: TinyModels) -> None:
    model = _model(
        model_module, ModelLocation(model=str(tiny_models.merged)), responseCache={"enabled": True}
    )
    greedy, sampled = model.execute(
        [
            _Request([tiny_models.prompts[0]]),
            _Request([tiny_models.prompts[0]], temperature=np.array([[0.7]], dtype=np.float32)),
        ]
    )
    assert _texts(greedy)[0].strip() == tiny_models.answers[0]
    assert "caches responses (spec.responseCache), so it serves greedy decoding only" in sampled.error.message
