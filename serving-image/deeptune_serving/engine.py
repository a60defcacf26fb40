"""Continuous batching: many requests generating at once, each leaving the batch when it is done.

With static batching (`Generator.generate`) every request of a batch waits for the longest one, and a
request that arrives during a batch waits for the whole batch. Here requests join and leave the
running batch at every decoding step (transformers' continuous batching, behind a `Batcher`:
batcher.py), so a short answer is sent as soon as it is done. `submit` queues a checked prompt here, at
most the batcher's capacity are handed to it at once (so the queue, its bound and its timeout are this
engine's, exactly), and one dispatcher thread turns the batcher's tokens into text for each request's
listener. Seeds are not per request (the sampling noise comes from one generator): a seeded request is
answered, but not reproducibly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from deeptune_serving.batcher import Batcher, GenerationStoppedError, TokenStep
from deeptune_serving.generation import Completion, Prompt, Prompter, RequestError, TextAssembler

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
    """Handed to the batcher (at most its capacity are at once); until then it waits here."""


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
        prompter: Prompter,
        batcher: Batcher,
        max_waiting: int,
        queue_timeout: float = 60.0,
        *,
        check_interval: float = POLL_SECONDS,
        on_load: Callable[[Load], None] | None = None,
        on_stopped: Callable[[str], None] | None = None,
    ) -> None:
        """`check_interval`: how often to look for requests cancelled by their client or waiting past
        the queue timeout (asking Triton about a client is a round trip to the server process), and to
        tell `on_load` how many requests wait and run. `on_stopped` hears why, once the model can no
        longer generate (every request then ends with that reason, and new ones are refused)."""
        self._prompter = prompter
        self._batcher = batcher
        self._max_waiting = max_waiting
        self._queue_timeout = queue_timeout
        self._check_interval = check_interval
        self._on_load = on_load
        self._on_stopped = on_stopped
        self._running: dict[str, _Running] = {}
        """Every request not finished yet, admitted or waiting, in arrival order."""
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._stopped: str | None = None
        """Why the model cannot generate any more, once it cannot."""
        self._counter = 0
        self._dispatcher = threading.Thread(target=self._dispatch, name="deeptune-dispatch", daemon=True)
        self._dispatcher.start()

    def submit(self, prompt: Prompt, listener: Listener) -> None:
        """Queue a checked prompt; RequestError when the queue is full (the caller should retry later)
        or the model cannot generate any more."""
        settings = prompt.sampling
        with self._lock:
            if self._stopped is not None:
                raise RequestError(self._stopped)
            waiting = sum(not running.admitted for running in self._running.values())
            if waiting >= self._max_waiting:
                raise RequestError(
                    f"exceeds the maximum queue size of {self._max_waiting} waiting requests "
                    "(spec.batching.maxQueueSize): retry later"
                )
            self._counter += 1
            stops = (*self._prompter.stop_sequences, *settings.stop)
            assembler = TextAssembler(
                self._prompter.tokenizer, settings.max_new_tokens, stops, self._prompter.eos_ids
            )
            self._running[f"r{self._counter}"] = _Running(prompt, listener, assembler, time.monotonic())
        self._admit()

    def _admit(self) -> None:
        """Hand waiting requests to the batcher, oldest first, while it has room."""
        with self._lock:
            admitted = sum(running.admitted for running in self._running.values())
            chosen = []
            for request_id, running in self._running.items():
                if admitted >= self._batcher.capacity:
                    break
                if not running.admitted:
                    running.admitted, admitted = True, admitted + 1
                    chosen.append((request_id, running.prompt))
        for request_id, prompt in chosen:
            self._batcher.add(request_id, prompt)

    def _dispatch(self) -> None:
        checked = time.monotonic()
        while not self._stopping.is_set():
            try:
                steps = self._batcher.steps(POLL_SECONDS)
            except GenerationStoppedError as stopped:
                self._stop(str(stopped))
                return
            for step in steps:
                self._deliver(step)
            # Not after every step: they come one per request and decoding step. Checking after each
            # made 32 streams 3x slower (bench/llm_serving.py).
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

    def _deliver(self, step: TokenStep) -> None:
        with self._lock:
            running = self._running.get(step.request_id)
        if running is None:  # finished early (a stop sequence) or cancelled: late steps are dropped
            return
        if step.error:
            self._finish(step.request_id, Completion(error=step.error))
            return
        assembler = running.assembler
        for token in step.tokens:
            if delta := assembler.push(token):
                running.listener.on_text(delta)
        if step.finished and (delta := assembler.finish()):
            running.listener.on_text(delta)
        if assembler.done:
            completion = Completion(
                text=assembler.text,
                prompt_tokens=len(running.prompt.ids),
                completion_tokens=assembler.tokens,
                finish_reason=assembler.finish_reason,
            )
            self._finish(step.request_id, completion, cancel=not step.finished)

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
        if cancel and running.admitted and self._stopped is None:
            self._batcher.cancel(request_id)
        running.listener.on_done(completion)
        self._admit()

    def _stop(self, reason: str) -> None:
        """The model cannot generate any more: end every request with the reason, refuse new ones."""
        message = f"{reason}: the server must be restarted"
        with self._lock:
            self._stopped = message
            left, self._running = list(self._running.values()), {}
        for running in left:
            running.listener.on_done(Completion(error=message))
        if self._on_stopped is not None:
            self._on_stopped(message)

    def close(self) -> None:
        """Stop generating; requests still running end with an error."""
        self._stopping.set()
        self._dispatcher.join(timeout=10)
        self._batcher.close()
        with self._lock:
            left, self._running = list(self._running.values()), {}
        for running in left:
            running.listener.on_done(Completion(error="the model is being unloaded"))
