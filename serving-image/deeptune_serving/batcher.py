"""The token source of continuous batching: transformers' `ContinuousBatchingManager`, as new tokens.

`ContinuousEngine` (engine.py) queues requests, admits them and turns tokens into text; what it needs
from the model is a `Batcher`: add a request, cancel one, and the tokens generated since last asked.
`ManagerBatcher` is that, over a manager in this process; `batcher_process.BatcherProcess` is the same
over a manager in a process of its own, which is how the server runs it.

The manager takes the argmax of every row; `sampling.py` makes that argmax a draw from each sampled
request's own temperature and top_p, and leaves greedy requests (temperature 0) as they are.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from deeptune_serving import sampling
from deeptune_serving.generation import Generator, Prompt

PAGE_SIZE = 32
"""Tokens per KV-cache page: small pages waste little on short requests."""
CPU_CONTEXT_CAP = 4096
"""Tokens of KV cache per running request on CPU, at most (the model's context when shorter)."""


@dataclass(frozen=True)
class TokenStep:
    """What one request produced since it was last reported."""

    request_id: str
    tokens: tuple[int, ...]
    """Its new tokens, in order."""
    finished: bool = False
    """The model ended it (eos or its token limit): no more steps come for it."""
    error: str | None = None
    """Why generating it failed; it is over."""


class GenerationStoppedError(RuntimeError):
    """The model can no longer generate (its loop or its process ended): every request is lost."""


class Batcher(Protocol):
    """A model generating for many requests at once, each joining and leaving at any step."""

    capacity: int
    """Requests it generates for at once, at most: the engine admits no more."""

    def add(self, request_id: str, prompt: Prompt) -> None: ...

    def cancel(self, request_id: str) -> None:
        """Stop generating for a request; steps still on their way for it may come."""

    def steps(self, timeout: float) -> list[TokenStep]:
        """The steps ready now, waiting up to `timeout` seconds for the first; GenerationStoppedError once the
        model cannot generate any more."""

    def close(self) -> None: ...


class ManagerBatcher:
    """transformers' continuous batching (paged KV cache, chunked prefill) over a model in this process."""

    def __init__(self, generator: Generator, capacity: int) -> None:
        self.capacity = capacity
        self._eos_ids = generator.eos_ids
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
                num_blocks=capacity * math.ceil(per_request / PAGE_SIZE) if on_cpu else None,
                max_batch_tokens=min(per_request, 2048) if on_cpu else None,
                max_requests_per_batch=capacity,
                per_request_processors=True,
            ),
        )
        self._reported: dict[str, int] = {}
        """Tokens already reported, by request still generating (the manager reports them all each time)."""
        self._refused: deque[TokenStep] = deque()
        """Requests the manager would not take, to be reported with the next steps."""
        sampling.install(self._manager)
        with torch.inference_mode():
            self._manager.start()

    def add(self, request_id: str, prompt: Prompt) -> None:
        settings = prompt.sampling
        self._reported[request_id] = 0
        try:
            self._manager.add_request(
                prompt.ids,
                request_id=request_id,
                max_new_tokens=settings.max_new_tokens,
                streaming=True,
                eos_token_id=self._eos_ids,
                temperature=0.0 if settings.greedy else settings.temperature,
                top_p=1.0 if settings.greedy else settings.top_p,
            )
        except Exception as error:  # this request's alone: the others go on
            self._reported.pop(request_id, None)
            refusal = f"generation failed: {type(error).__name__}: {error}"
            self._refused.append(TokenStep(request_id, (), error=refusal))

    def cancel(self, request_id: str) -> None:
        self._reported.pop(request_id, None)
        self._manager.cancel_request(request_id)

    def steps(self, timeout: float) -> list[TokenStep]:
        found: list[TokenStep] = []
        while self._refused:
            found.append(self._refused.popleft())
        output = self._manager.get_result(timeout=0 if found else timeout)
        while output is not None:
            if (step := self._step(output)) is not None:
                found.append(step)
            output = self._manager.get_result(timeout=0)
        if not found and not self._manager.is_running():
            fatal = self._manager.background_thread_status.fatal_error
            raise GenerationStoppedError(f"the generation loop stopped: {fatal or 'closed'}")
        return found

    def _step(self, output: Any) -> TokenStep | None:
        """The request's new tokens; None for one cancelled (its late outputs are dropped)."""
        reported = self._reported.get(output.request_id)
        if reported is None:
            return None
        ended = bool(output.error) or output.is_finished()
        if ended:
            self._reported.pop(output.request_id, None)
        else:
            self._reported[output.request_id] = len(output.generated_tokens)
        tokens = tuple(output.generated_tokens[reported:])
        error = f"generation failed: {output.error}" if output.error else None
        return TokenStep(output.request_id, tokens, finished=ended, error=error)

    def close(self) -> None:
        self._manager.stop(block=True, timeout=30)
