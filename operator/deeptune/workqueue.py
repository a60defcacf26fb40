"""A work queue of object keys, with the guarantees of client-go's workqueue that a level-based
reconciler relies on.

- A key is queued at most once however often it is added (ten events → one reconcile).
- A key is never handed to two workers at once: one added while being reconciled is queued again
  when that reconcile is done, so the change that added it is not missed.
- A failed key comes back after an exponential backoff (per key, reset by a success), and a key can
  ask to come back later (`add_after`), so retries neither spin nor block other keys.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

BASE_DELAY = 0.5
MAX_DELAY = 60.0


class WorkQueue:
    """Keys waiting for a reconcile. Used from one event loop; `get` waits for a key."""

    def __init__(self, base_delay: float = BASE_DELAY, max_delay: float = MAX_DELAY) -> None:
        self._queued: OrderedDict[str, None] = OrderedDict()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()
        """Keys added while being processed: queued again by `done`."""
        self._failures: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._nonempty = asyncio.Event()
        self._base_delay, self._max_delay = base_delay, max_delay

    def __len__(self) -> int:
        return len(self._queued)

    @property
    def processing(self) -> int:
        return len(self._processing)

    def add(self, key: str) -> None:
        """Queue the key (a no-op if it is queued already; once more after its reconcile if that is
        running)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self._processing:
            self._dirty.add(key)
            return
        if key not in self._queued:
            self._queued[key] = None
            self._nonempty.set()

    def add_after(self, key: str, delay: float) -> None:
        """Queue the key in `delay` seconds, unless something queues it sooner."""
        if delay <= 0:
            self.add(key)
            return
        if key in self._queued or key in self._timers:
            return
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._fire, key)

    def add_failed(self, key: str) -> float:
        """Queue a key whose reconcile failed, after its backoff; returns that delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = min(self._max_delay, self._base_delay * 2**failures)
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        """The key's reconcile succeeded: its next failure starts from the base delay again."""
        self._failures.pop(key, None)

    async def get(self) -> str:
        """The next key, marked as being processed until `done`."""
        while not self._queued:
            self._nonempty.clear()
            await self._nonempty.wait()
        key, _ = self._queued.popitem(last=False)
        self._processing.add(key)
        return key

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)
