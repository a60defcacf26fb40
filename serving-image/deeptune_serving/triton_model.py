"""The Triton Python-backend model: a prompt or chat messages in, generated text out, for a causal LM.

With continuous batching (the default, `batching.mode: continuous`) each request goes to the
`ContinuousEngine` and is answered through its response sender when it is done (or piece by piece
with `streaming`); the model is decoupled. With Triton's dynamic batching (`mode: dynamic`), `execute`
gets every request the batcher gathered and their prompts go through as few generate calls as their
settings allow; in decoupled mode (`streaming`) text is sent as it is generated, one response per
piece, then a final one with the token counts. Either way a bad request gets its own error response
and the others are still served.

Each prompt is `text_input` (a prompt as the model reads it) or `messages` (JSON chat messages, rendered
with the model's own chat template). Outputs: `text_output`, `prompt_tokens`, `completion_tokens` and
`finish_reason` (stop or length), what the OpenAI frontend needs for `usage` and `finish_reason`.

Settings come from config.pbtxt's `parameters` (see `deeptune.serving.repository`). This module runs
inside Triton, where `triton_python_backend_utils` exists; the repository's `model.py` imports it from
the serving image's `deeptune_serving` package.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

from deeptune_serving.batcher_process import BatcherProcess
from deeptune_serving.engine import (
    CANCELLED,
    RUNNING_METRIC,
    WAITING_METRIC,
    ContinuousEngine,
    Listener,
    Load,
)
from deeptune_serving.generation import (
    Completion,
    Generator,
    LoadSettings,
    Prompt,
    Prompter,
    RequestError,
    Sampling,
    chat_messages,
)

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


def _strings(request: Request, name: str) -> list[str] | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    try:
        return [item.decode("utf-8") for item in tensor.as_numpy().reshape(-1)]
    except UnicodeDecodeError as error:
        raise RequestError(f"{name} is not valid UTF-8: {error}") from error


def _stop_list(raw: str) -> tuple[str, ...]:
    """A request's `stop`: a JSON list of strings, or one plain string."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return (raw,)
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RequestError("stop must be a string or a JSON list of strings")
    return tuple(value)


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


def _report(reason: str) -> None:
    """Leave why the server stops in the container's termination message: Triton's own exit log is
    mostly its options table, so without this the ModelDeployment status could not say what was wrong."""
    if TERMINATION_LOG.exists():
        TERMINATION_LOG.write_text(reason[:4096], encoding="utf-8")


def _stop_server(reason: str) -> None:
    """The model can no longer generate (its generation process ended): stop Triton, which is this
    stub's parent, so that the container ends and is restarted with the reason in its termination
    message, rather than stay Ready answering every request with an error."""
    print(f"error: {reason}", file=sys.stderr, flush=True)
    _report(reason)
    os.kill(os.getppid(), signal.SIGTERM)


def _load_gauges(model: str, version: str) -> Callable[[Load], None]:
    """Gauges on Triton's metrics endpoint for the continuous engine's load, by model: the queue signal
    an autoscaler needs (Triton's own pending-request count stays at zero, the engine queues instead)."""
    labels = {"model": model, "version": version}
    families = [
        pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.GAUGE)
        for name, description in (
            (WAITING_METRIC, "Requests queued in DeepTune's continuous-batching engine, not generating yet"),
            (RUNNING_METRIC, "Requests generating in DeepTune's continuous-batching engine"),
        )
    ]
    waiting, running = (family.Metric(labels=labels) for family in families)

    def report(load: Load) -> None:
        waiting.set(load.waiting)
        running.set(load.running)

    report.families = families  # type: ignore[attr-defined]  # a family unreferenced is unregistered

    return report


class TritonPythonModel:
    """The model object Triton's Python backend creates once per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = parameters(config)
        self._defaults = default_sampling(params)
        self._decoupled = bool(pb_utils.using_decoupled_model_transaction_policy(config))
        self._cached = params.get("response_cache", "false") == "true"
        self._pieces = params.get("streaming", "false") == "true"
        stop_sequences = json.loads(params.get("stop_sequences", "[]"))
        limit = int(params.get("max_new_tokens_limit", "32768"))
        settings = load_settings(params, args)
        self._engine: ContinuousEngine | None = None
        self._generator: Generator | None = None
        try:
            if params.get("batching_mode") == "continuous":
                self._prompter = Prompter.load(settings, stop_sequences, limit)
                batcher = BatcherProcess(settings, int(params["max_running"]), limit)
                self._engine = ContinuousEngine(
                    self._prompter,
                    batcher,
                    int(params["max_queue_size"]),
                    float(params["queue_timeout_seconds"]),
                    on_load=_load_gauges(args["model_name"], args["model_version"]),
                    on_stopped=_stop_server,
                )
            else:
                self._generator = Generator.load(settings, stop_sequences, limit)
                self._prompter = self._generator
        except Exception as error:
            _report(f"{type(error).__name__}: {error}")
            raise

    def _parse(self, request: Request) -> _Parsed:
        try:
            return _Parsed(prompts=self._prompts(request))
        except RequestError as error:
            return _Parsed(prompts=[], error=str(error))

    def _prompts(self, request: Request) -> list[Prompt]:
        texts, messages = _strings(request, "text_input"), _strings(request, "messages")
        if (texts is None) == (messages is None):
            raise RequestError("send text_input (a prompt) or messages (chat messages as JSON), not both")
        inputs: list[str] = texts if texts is not None else messages  # type: ignore[assignment]
        if self._decoupled and len(inputs) != 1:
            raise RequestError(
                "a decoupled model (continuous batching or streaming) takes one prompt per request,"
                f" got {len(inputs)}"
            )
        rows = len(inputs)
        defaults = self._defaults
        max_new = _per_row(request, "max_new_tokens", rows, int) or [defaults.max_new_tokens] * rows
        temperature = _per_row(request, "temperature", rows, float) or [defaults.temperature] * rows
        top_p = _per_row(request, "top_p", rows, float) or [defaults.top_p] * rows
        seed = _per_row(request, "seed", rows, int) or [None] * rows
        stop = _per_row(request, "stop", rows, lambda raw: _stop_list(raw.decode("utf-8"))) or [()] * rows
        prompts = []
        for row, text in enumerate(inputs):
            sampling = Sampling(max_new[row], temperature[row], top_p[row], seed[row], stop[row])
            if self._cached and not sampling.greedy:
                raise RequestError(
                    "this deployment caches responses (spec.responseCache), so it serves greedy decoding "
                    "only: send temperature 0, or ask for a deployment without the cache"
                )
            if messages is not None:
                prompts.append(self._prompter.chat_prompt(chat_messages(text), sampling))
            else:
                prompts.append(self._prompter.prompt(text, sampling))
        return prompts

    def execute(self, requests: list[Request]) -> list[Any] | None:
        parsed = [self._parse(request) for request in requests]
        if self._engine is not None:
            for request, item in zip(requests, parsed, strict=True):
                self._submit(self._engine, request.get_response_sender(), item)
            return None
        assert self._generator is not None  # mode dynamic: the model is in this process
        if self._decoupled:
            self._stream(self._generator, requests, parsed)
            return None
        completions = iter(self._generator.generate([prompt for item in parsed for prompt in item.prompts]))
        responses = []
        for item in parsed:
            done = [next(completions) for _ in item.prompts]
            failed = item.error or next((completion.error for completion in done if completion.error), None)
            responses.append(_error_response(failed) if failed else _completion_response(done))
        return responses

    def _submit(self, engine: ContinuousEngine, sender: Any, item: _Parsed) -> None:
        """Hand one request to the continuous engine, which answers through its response sender: text
        as it is generated when streaming, else one response at the end."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        def on_text(text: str) -> None:
            if self._pieces:
                sender.send(_piece_response(text))

        def on_done(completion: Completion) -> None:
            if completion.error == CANCELLED:  # nobody to answer; Triton still needs the final flag
                sender.send(flags=final)
            elif completion.error:
                sender.send(_error_response(completion.error), flags=final)
            else:
                ended = dataclasses.replace(completion, text="") if self._pieces else completion
                sender.send(_completion_response([ended]), flags=final)

        try:
            if item.error:
                raise RequestError(item.error)
            engine.submit(item.prompts[0], Listener(on_text, on_done, sender.is_cancelled))
        except RequestError as error:
            sender.send(_error_response(str(error)), flags=final)

    def _stream(self, generator: Generator, requests: list[Request], parsed: list[_Parsed]) -> None:
        senders = [request.get_response_sender() for request in requests]
        served = [
            (sender, item.prompts[0]) for sender, item in zip(senders, parsed, strict=True) if not item.error
        ]
        for sender, item in zip(senders, parsed, strict=True):
            if item.error:
                sender.send(_error_response(item.error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

        def send(index: int, text: str) -> None:
            served[index][0].send(_piece_response(text))

        completions = generator.generate([prompt for _, prompt in served], on_text=send)
        for (sender, _), completion in zip(served, completions, strict=True):
            # The text went out in pieces; the final response adds the counts and the finish reason.
            ended = dataclasses.replace(completion, text="")
            final = _error_response(completion.error) if completion.error else _completion_response([ended])
            sender.send(final, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        """Free the weights now, not at interpreter exit, so an unloaded instance gives GPU memory back."""
        if self._engine is not None:
            self._engine.close()
        del self._generator, self._prompter
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _piece_response(text: str) -> Any:
    """A streamed piece: its text only. The counts and the finish reason come with the final response;
    the fewer tensors a piece carries, the less each token costs the stub (one piece per token)."""
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_))]
    )


def _completion_response(completions: list[Completion]) -> Any:
    """Text, token counts and finish reason of each prompt (the text empty at the end of a stream)."""
    texts = [[completion.text.encode("utf-8")] for completion in completions]
    reasons = [[completion.finish_reason.encode()] for completion in completions]
    prompt_tokens = [[completion.prompt_tokens] for completion in completions]
    completion_tokens = [[completion.completion_tokens] for completion in completions]
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("text_output", np.array(texts, dtype=np.object_)),
            pb_utils.Tensor("finish_reason", np.array(reasons, dtype=np.object_)),
            pb_utils.Tensor("prompt_tokens", np.array(prompt_tokens, dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array(completion_tokens, dtype=np.int32)),
        ]
    )


def _error_response(message: str) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
