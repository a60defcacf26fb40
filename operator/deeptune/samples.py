"""The latest result of a slow check of each object's pod (a trainer's metrics scrape, a serving
pod's inference probe), fetched in the background.

A reconcile never waits for a pod: it reads the newest sample, which asks for a fresh one in the
background when it is older than `max_age` (or of another pod), and the controller is told when a
sample with news arrives. So one unreachable pod costs its own check's timeout, not every other
object's reconcile; a thousand unreachable pods cost `concurrency` checks at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

LOG = logging.getLogger(__name__)
Target = TypeVar("Target", bound=Hashable)
Result = TypeVar("Result")


@dataclass(frozen=True)
class _Sample(Generic[Target, Result]):
    target: Target
    result: Result | None
    at: float


class Samples(Generic[Target, Result]):
    """Samples by object key; `fetch(target)` makes one (it must not raise for an unhealthy pod)."""

    def __init__(
        self,
        fetch: Callable[[Target], Awaitable[Result | None]],
        *,
        max_age: float,
        timeout: float,
        on_news: Callable[[str], None],
        same: Callable[[Result, Result], bool] = lambda a, b: a == b,
        concurrency: int = 32,
    ) -> None:
        self._fetch, self._max_age, self._timeout = fetch, max_age, timeout
        self._on_news, self._same = on_news, same
        self._gate = asyncio.Semaphore(concurrency)
        self._samples: dict[str, _Sample[Target, Result]] = {}
        self._fetching: dict[str, asyncio.Task[None]] = {}

    def latest(self, key: str, target: Target) -> Result | None:
        """The newest sample of `target` (None before the first); a fresh one is fetched in the
        background when this one is stale."""
        sample = self._samples.get(key)
        current = sample is not None and sample.target == target
        stale = not current or time.monotonic() - sample.at >= self._max_age  # type: ignore[union-attr]
        if stale and key not in self._fetching:
            task = asyncio.get_running_loop().create_task(self._refresh(key, target), name=f"sample {key}")
            self._fetching[key] = task
        return sample.result if current else None  # type: ignore[union-attr]

    def pending(self, key: str, target: Target) -> bool:
        """Whether `target` has no sample yet (the first is on its way: news will follow)."""
        sample = self._samples.get(key)
        return sample is None or sample.target != target

    def forget(self, key: str) -> None:
        """The object is gone, or has no pod to check any more."""
        self._samples.pop(key, None)
        task = self._fetching.pop(key, None)
        if task is not None:
            task.cancel()

    async def _refresh(self, key: str, target: Target) -> None:
        try:
            async with self._gate:
                result = await asyncio.wait_for(self._fetch(target), timeout=self._timeout)
        except TimeoutError:
            result = None
        except Exception:  # a check must not take the others down; the next one tries again
            LOG.exception("check of %s for %s failed", target, key)
            result = None
        finally:
            self._fetching.pop(key, None)
        before = self._samples.get(key)
        self._samples[key] = _Sample(target, result, time.monotonic())
        if before is None or before.target != target or not self._agree(before.result, result):
            self._on_news(key)

    def _agree(self, before: Result | None, after: Result | None) -> bool:
        if before is None or after is None:
            return before is after
        return self._same(before, after)
