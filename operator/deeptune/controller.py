"""One controller per kind: workers that reconcile keys from a work queue, a periodic resync, and a
supervisor that restarts what crashes and says whether the controller is healthy.

Every trigger — the kind's own watch events, its children's, a background check that found something
new, the periodic resync — only queues the object's key; the same `reconcile` function handles it,
whatever queued it (level-based, as controller-runtime's controllers are). A slow reconcile holds
one worker, not the others; a key is never reconciled twice at once (see `deeptune.workqueue`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from deeptune.observability import RECONCILE_ERRORS, RESYNCS, TASK_RESTARTS, measured
from deeptune.workqueue import WorkQueue

LOG = logging.getLogger(__name__)

RESTART_DELAY = 1.0
Reconcile = Callable[[str], Awaitable["float | None"]]
"""Reconcile one key; a number asks for another reconcile after that many seconds."""


@dataclass
class Health:
    """What the liveness probe reports for one controller."""

    kind: str
    queued: int
    processing: int
    seconds_since_progress: float
    restarts: int
    healthy: bool


@dataclass
class Controller:
    kind: str
    reconcile: Reconcile
    keys: Callable[[], Iterable[str]]
    """Every key the controller knows (the kind's objects, from the cache): what a resync queues."""
    resync_interval: float
    workers: int = 8
    stall_after: float = 120.0
    """Seconds with keys queued and no reconcile finished after which the controller is unhealthy."""
    queue: WorkQueue = field(default_factory=WorkQueue)
    restarts: int = field(default=0, init=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False)
    _progress_at: float = field(default=0.0, init=False)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the controller will run on: keys can be queued from then on, also while
        another replica leads (they wait, deduplicated, for this one's turn)."""
        self._loop = loop

    def enqueue(self, key: str | None) -> None:
        """Queue a key for reconcile. Safe from any thread (kopf runs sync handlers in threads)."""
        if key is None or self._loop is None:
            return
        if _running_loop() is self._loop:
            self.queue.add(key)
        else:
            self._loop.call_soon_threadsafe(self.queue.add, key)

    async def run(self) -> None:
        """Reconcile until cancelled: workers and the resync, each restarted if it crashes."""
        self._loop = asyncio.get_running_loop()
        self._progress_at = self._loop.time()
        makers: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {"resync": self._resync}
        makers.update({f"worker-{n}": self._work for n in range(self.workers)})
        tasks: dict[asyncio.Task[None], str] = {
            self._loop.create_task(make(), name=f"{self.kind} {name}"): name for name, make in makers.items()
        }
        try:
            while True:
                finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    name = tasks.pop(task)
                    error = task.exception()
                    LOG.error("%s %s stopped (%r); restarting it", self.kind, name, error, exc_info=error)
                    self.restarts += 1
                    TASK_RESTARTS.labels(self.kind, name.split("-")[0]).inc()
                    await asyncio.sleep(RESTART_DELAY)  # a task that fails at once must not spin
                    tasks[self._loop.create_task(makers[name](), name=f"{self.kind} {name}")] = name
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def health(self) -> Health:
        """Healthy unless keys wait and no reconcile has finished for `stall_after` seconds (every
        worker stuck), or the controller is not running while it should."""
        loop = self._loop
        since = loop.time() - self._progress_at if loop is not None else 0.0
        waiting = len(self.queue) > 0
        return Health(
            kind=self.kind,
            queued=len(self.queue),
            processing=self.queue.processing,
            seconds_since_progress=round(since, 1),
            restarts=self.restarts,
            healthy=not (waiting and since > self.stall_after),
        )

    async def _resync(self) -> None:
        while True:
            for key in list(self.keys()):
                self.queue.add(key)
            RESYNCS.labels(self.kind).inc()
            self._mark_progress_if_idle()
            await asyncio.sleep(self.resync_interval)

    def _mark_progress_if_idle(self) -> None:
        """An idle controller (nothing queued, nothing running) is making all the progress there is."""
        if self._loop is not None and not len(self.queue) and not self.queue.processing:
            self._progress_at = self._loop.time()

    async def _work(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                with measured(self.kind, "reconcile"):
                    again = await self.reconcile(key)
            except (ApiException, HTTPError, OSError) as error:  # the API server restarting, a 409...
                delay = self.queue.add_failed(key)
                RECONCILE_ERRORS.labels(self.kind).inc()
                LOG.warning("%s %s: %s; retrying in %.1fs", self.kind, key, _describe(error), delay)
            except Exception:  # one object's failure must not stop the others: retried after a backoff
                delay = self.queue.add_failed(key)
                RECONCILE_ERRORS.labels(self.kind).inc()
                LOG.exception("%s %s: reconcile failed; retrying in %.1fs", self.kind, key, delay)
            else:
                self.queue.forget(key)
                if again is not None:
                    self.queue.add_after(key, again)
            finally:
                self.queue.done(key)
                assert self._loop is not None
                self._progress_at = self._loop.time()


def _describe(error: Exception) -> str:
    if isinstance(error, ApiException):
        return f"the API server answered {error.status} {error.reason}"
    return f"{type(error).__name__}: {error}"


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
