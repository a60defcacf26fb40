"""The Triton Python-backend model: text in, generated text out, for a fine-tuned causal LM.

Triton hands `execute` every request its dynamic batcher gathered; all of their prompts go through
one generate call, so batching pays off. A bad request gets its own error response and the rest of
the batch is still served. In decoupled mode (ModelDeployment `streaming`), text is sent as it is
generated, one response per piece, then an empty final one.

Settings come from config.pbtxt's `parameters` (see `deeptune.serving.repository`). This file runs
inside Triton, where `triton_python_backend_utils` exists and DeepTune does not: it imports only the
generation module the repository ships beside it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

from deeptune.serving.generation import Generator, LoadSettings, Prompt, RequestError, Sampling

Request = Any
"""A `pb_utils.InferenceRequest` (the stub defines its types at runtime, so they cannot be named)."""


def parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """config.pbtxt's `parameters { key: ... value: { string_value: ... } }` as a plain mapping."""
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


def load_settings(params: dict[str, str], args: dict[str, str]) -> LoadSettings:
    """Where the weights are (from the parameters) and on which device (from the instance Triton made)."""
    kind = args["model_instance_kind"]
    device = {"GPU": f"cuda:{args['model_instance_device_id']}", "MODEL": "auto"}.get(kind, "cpu")
    return LoadSettings(
        model=params["model"],
        adapter=params.get("adapter", ""),
        revision=params.get("revision", "main"),
        trust_remote_code=params.get("trust_remote_code", "false") == "true",
        quantization=params.get("quantization", "none"),
        device=device,
    )


def default_sampling(params: dict[str, str]) -> Sampling:
    return Sampling(
        max_new_tokens=int(params["max_new_tokens"]),
        temperature=float(params["temperature"]),
        top_p=float(params["top_p"]),
    )


def _texts(request: Request) -> list[str]:
    tensor = pb_utils.get_input_tensor_by_name(request, "text_input")
    try:
        return [item.decode("utf-8") for item in tensor.as_numpy().reshape(-1)]
    except UnicodeDecodeError as error:
        raise RequestError(f"text_input is not valid UTF-8: {error}") from error


def _per_row(request: Request, name: str, rows: int, convert: Callable[[Any], Any]) -> list[Any] | None:
    """An optional input: one value for the whole request, or one per prompt."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = [convert(value) for value in tensor.as_numpy().reshape(-1)]
    if len(values) == 1:
        return values * rows
    if len(values) != rows:
        raise RequestError(f"{name} has {len(values)} values for {rows} prompts: give one, or one per prompt")
    return values


@dataclass
class _Parsed:
    """One request's checked prompts, or why it cannot be served."""

    prompts: list[Prompt]
    error: str | None = None


TERMINATION_LOG = Path("/dev/termination-log")


def _report_load_failure(error: Exception) -> None:
    """Leave the reason in the container's termination message: Triton's own exit log is mostly
    its options table, so without this the ModelDeployment status could not say what was wrong."""
    if TERMINATION_LOG.exists():
        TERMINATION_LOG.write_text(f"{type(error).__name__}: {error}"[:4096], encoding="utf-8")


class TritonPythonModel:
    """The model object Triton's Python backend creates once per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = parameters(config)
        self._defaults = default_sampling(params)
        self._decoupled = bool(pb_utils.using_decoupled_model_transaction_policy(config))
        stop_sequences = json.loads(params.get("stop_sequences", "[]"))
        try:
            self._generator = Generator.load(load_settings(params, args), stop_sequences)
        except Exception as error:
            _report_load_failure(error)
            raise

    def _parse(self, request: Request) -> _Parsed:
        try:
            texts = _texts(request)
            if self._decoupled and len(texts) != 1:
                raise RequestError(f"streaming takes one prompt per request, got {len(texts)}")
            rows = len(texts)
            max_new = _per_row(request, "max_new_tokens", rows, int) or [self._defaults.max_new_tokens] * rows
            temperature = _per_row(request, "temperature", rows, float) or [self._defaults.temperature] * rows
            top_p = _per_row(request, "top_p", rows, float) or [self._defaults.top_p] * rows
            prompts = [
                self._generator.prompt(text, Sampling(tokens, temp, p))
                for text, tokens, temp, p in zip(texts, max_new, temperature, top_p, strict=True)
            ]
        except RequestError as error:
            return _Parsed(prompts=[], error=str(error))
        return _Parsed(prompts=prompts)

    def execute(self, requests: list[Request]) -> list[Any] | None:
        parsed = [self._parse(request) for request in requests]
        if self._decoupled:
            self._stream(requests, parsed)
            return None
        prompts = [prompt for item in parsed for prompt in item.prompts]
        try:
            texts = iter(self._generator.generate(prompts))
        except Exception as error:  # e.g. CUDA out of memory: fail this batch, keep serving
            message = f"generation failed: {type(error).__name__}: {error}"
            return [_error_response(item.error or message) for item in parsed]
        return [
            _error_response(item.error) if item.error else _text_response([next(texts) for _ in item.prompts])
            for item in parsed
        ]

    def _stream(self, requests: list[Request], parsed: list[_Parsed]) -> None:
        senders = [request.get_response_sender() for request in requests]
        served = [
            (sender, item.prompts[0]) for sender, item in zip(senders, parsed, strict=True) if not item.error
        ]
        for sender, item in zip(senders, parsed, strict=True):
            if item.error:
                sender.send(_error_response(item.error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

        def send(index: int, text: str) -> None:
            served[index][0].send(_text_response([text]))

        error: str | None = None
        try:
            self._generator.generate([prompt for _, prompt in served], on_text=send)
        except Exception as failure:  # the streams already sent stay sent; each ends with the error
            error = f"generation failed: {type(failure).__name__}: {failure}"
        for sender, _ in served:
            final = _error_response(error) if error else None
            sender.send(final, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        """Free the weights now, not at interpreter exit, so an unloaded instance gives GPU memory back."""
        del self._generator
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _text_response(texts: list[str]) -> Any:
    output = np.array([[text.encode("utf-8")] for text in texts], dtype=np.object_)
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", output)])


def _error_response(message: str) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
