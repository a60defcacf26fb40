"""Continuous batching: transformers' `ContinuousBatchingManager` behind the Triton model.

With static batching (`Generator.generate`) every request of a batch waits for the longest one, and a
request that arrives during a batch waits for the whole batch. Here requests join and leave the
running batch at every decoding step (a paged KV cache; prompts are prefilled in chunks beside the
decoding ones), so a short answer is sent as soon as it is done. The manager runs its own thread;
`submit` queues a checked prompt here, at most `max_running` are handed to the manager at once (so
the queue, its bound and its timeout are this engine's, exactly), and one dispatcher thread turns
the manager's outputs into text for each request's listener.

The manager takes the argmax of every row; `sampling.py` makes that argmax a draw from each sampled
request's own temperature and top_p, and leaves greedy requests (temperature 0) as they are, so they
are exact greedy decoding and cost no sampling. Seeds are not per request here (the noise comes from
one generator): a seeded request is answered, but not reproducibly.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from deeptune_serving import sampling
from deeptune_serving.generation import Completion, Generator, Prompt, RequestError, TextAssembler

PAGE_SIZE = 32
"""Tokens per KV-cache page: small pages waste little on short requests."""
CPU_CONTEXT_CAP = 4096
"""Tokens of KV cache per running request on CPU, at most (the model's context when shorter)."""
POLL_SECONDS = 0.2
CANCELLED = "cancelled: the client went away"


@dataclass(frozen=True)
class Listener:
    """Where one request's results go: text as it becomes final, then the finished completion."""

    on_text: Callable[[str], None]
    on_done: Callable[[Completion], None]
    cancelled: Callable[[], bool] = lambda: False
    """True once the client has gone away (Triton's response sender knows): generation stops."""


@dataclass
class _Running:
    prompt: Prompt
    listener: Listener
    assembler: TextAssembler
    submitted: float
    admitted: bool = False
    """Handed to the manager (at most `max_running` are at once); until then it waits here."""
    seen: int = 0
    """Generated tokens already given to the assembler."""


WAITING_METRIC = "deeptune_engine_requests_waiting"
RUNNING_METRIC = "deeptune_engine_requests_running"
"""The engine's load as Triton exports it (triton_model.py), by model: what autoscaling reads."""


@dataclass(frozen=True)
class Load:
    """Requests in the engine: what an autoscaler scales on (Triton's own queue is empty: the model
    takes every request at once and queues it here)."""

    waiting: int
    """Queued, not generating yet."""
    running: int
    """Generating."""


class ContinuousEngine:
    """A model serving many requests at once, each leaving the batch when it is done."""

    def __init__(
        self,
        generator: Generator,
        max_running: int,
        max_waiting: int,
        queue_timeout: float = 60.0,
        *,
        check_interval: float = POLL_SECONDS,
        on_load: Callable[[Load], None] | None = None,
    ) -> None:
        """`check_interval`: how often to look for requests cancelled by their client or waiting past
        the queue timeout (asking Triton about a client is a round trip to the server process), and to
        tell `on_load` how many requests wait and run."""
        self._on_load = on_load
        self._generator = generator
        self._check_interval = check_interval
        self._max_running = max_running
        self._max_waiting = max_waiting
        self._queue_timeout = queue_timeout
        model = cast(Any, generator.model)
        on_cpu = model.device.type == "cpu"
        per_request = min(generator.context or CPU_CONTEXT_CAP, CPU_CONTEXT_CAP)
        self._manager = model.init_continuous_batching(
            generation_config=GenerationConfig(
                **sampling.PLACEHOLDERS, max_new_tokens=generator.max_new_tokens_limit
            ),
            continuous_batching_config=ContinuousBatchingConfig(
                page_size=PAGE_SIZE,
                # On a GPU the manager sizes its KV cache from the memory left after the weights; on
                # CPU it would take a share of the machine's RAM, so the cache is sized here.
                num_blocks=max_running * math.ceil(per_request / PAGE_SIZE) if on_cpu else None,
                max_batch_tokens=min(per_request, 2048) if on_cpu else None,
                max_requests_per_batch=max_running,
                per_request_processors=True,
            ),
        )
        self._running: dict[str, _Running] = {}
        """Every request not finished yet, admitted or waiting, in arrival order."""
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._counter = 0
        sampling.install(self._manager)
        with torch.inference_mode():
            self._manager.start()
        self._dispatcher = threading.Thread(target=self._dispatch, name="deeptune-dispatch", daemon=True)
        self._dispatcher.start()

    def submit(self, prompt: Prompt, listener: Listener) -> None:
        """Queue a checked prompt; RequestError when the queue is full (the caller should retry later)."""
        settings = prompt.sampling
        with self._lock:
            waiting = sum(not running.admitted for running in self._running.values())
            if waiting >= self._max_waiting:
                raise RequestError(
                    f"exceeds the maximum queue size of {self._max_waiting} waiting requests "
                    "(spec.batching.maxQueueSize): retry later"
                )
            self._counter += 1
            stops = (*self._generator.stop_sequences, *settings.stop)
            assembler = TextAssembler(
                self._generator.tokenizer, settings.max_new_tokens, stops, self._generator.eos_ids
            )
            self._running[f"r{self._counter}"] = _Running(prompt, listener, assembler, time.monotonic())
        self._admit()

    def _admit(self) -> None:
        """Hand waiting requests to the manager, oldest first, while fewer than max_running run."""
        with self._lock:
            admitted = sum(running.admitted for running in self._running.values())
            chosen = []
            for request_id, running in self._running.items():
                if admitted >= self._max_running:
                    break
                if not running.admitted:
                    running.admitted, admitted = True, admitted + 1
                    chosen.append((request_id, running.prompt))
        for request_id, prompt in chosen:
            settings = prompt.sampling
            self._manager.add_request(
                prompt.ids,
                request_id=request_id,
                max_new_tokens=settings.max_new_tokens,
                streaming=True,
                eos_token_id=self._generator.eos_ids,
                temperature=0.0 if settings.greedy else settings.temperature,
                top_p=1.0 if settings.greedy else settings.top_p,
            )

    def _dispatch(self) -> None:
        checked = time.monotonic()
        while not self._stopping.is_set():
            output = self._manager.get_result(timeout=POLL_SECONDS)
            if output is not None:
                self._deliver(output)
            # Not after every output: they come one per request and step. Checking after each made
            # 32 streams 3x slower (bench/llm_serving.py).
            if time.monotonic() - checked >= self._check_interval:
                checked = time.monotonic()
                self._drop_cancelled()
                self._drop_expired()
                if self._on_load is not None:
                    self._on_load(self.load())

    def load(self) -> Load:
        with self._lock:
            running = sum(request.admitted for request in self._running.values())
            return Load(waiting=len(self._running) - running, running=running)

    def _deliver(self, output: Any) -> None:
        with self._lock:
            running = self._running.get(output.request_id)
        if running is None:  # finished early (a stop sequence) or cancelled: late outputs are dropped
            return
        if output.error:
            self._finish(output.request_id, Completion(error=f"generation failed: {output.error}"))
            return
        assembler = running.assembler
        for token in output.generated_tokens[running.seen :]:
            if delta := assembler.push(token):
                running.listener.on_text(delta)
        running.seen = len(output.generated_tokens)
        if output.is_finished() and (delta := assembler.finish()):
            running.listener.on_text(delta)
        if assembler.done:
            completion = Completion(
                text=assembler.text,
                prompt_tokens=len(running.prompt.ids),
                completion_tokens=assembler.tokens,
                finish_reason=assembler.finish_reason,
            )
            self._finish(output.request_id, completion, cancel=not output.is_finished())

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [rid for rid, running in self._running.items() if running.listener.cancelled()]
        for request_id in gone:  # still ended: Triton holds a request until its final response
            self._finish(request_id, Completion(error=CANCELLED), cancel=True)

    def _drop_expired(self) -> None:
        """Requests that waited past the queue timeout without being admitted are refused, as Triton's
        queue policy refuses the requests it holds (the engine's queue is past Triton's)."""
        deadline = time.monotonic() - self._queue_timeout
        with self._lock:
            expired = [
                request_id
                for request_id, running in self._running.items()
                if not running.admitted and running.submitted < deadline
            ]
        message = f"Request timeout expired: not started after {self._queue_timeout:g} s in the queue"
        for request_id in expired:
            self._finish(request_id, Completion(error=message))

    def _finish(self, request_id: str, completion: Completion, *, cancel: bool = False) -> None:
        with self._lock:
            running = self._running.pop(request_id, None)
        if running is None:
            return
        if cancel and running.admitted:
            self._manager.cancel_request(request_id)
        running.listener.on_done(completion)
        self._admit()

    def close(self) -> None:
        """Stop generating; requests still running end with an error."""
        self._stopping.set()
        self._dispatcher.join(timeout=10)
        self._manager.stop(block=True, timeout=30)
        with self._lock:
            left, self._running = list(self._running.values()), {}
        for running in left:
            running.listener.on_done(Completion(error="the model is being unloaded"))
