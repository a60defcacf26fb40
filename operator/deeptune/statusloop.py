"""One task per resource kind that keeps every object's status in step with its children.

Why not a kopf timer per object: kopf guards every timer with a finalizer, so an object deleted while
no operator runs would hang in Terminating, and a thousand objects would mean a thousand timers. Here
one loop reads the kind's own kopf index (no API reads), visits every object each `interval` seconds,
and visits an object at once when an index of its children sees a change (`nudge`), so a finished Job
reaches status within a fraction of a second instead of up to a whole interval.

The loop is the only writer of status, and writes only the fields that changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from urllib3.exceptions import HTTPError

from deeptune import events
from deeptune.api.base import GROUP, VERSION, describe_validation_error
from deeptune.observability import STATUS_WRITES, PhaseBook

Obj = dict[str, Any]
Index = Mapping[Hashable, Iterable[Obj]]
"""A kopf index: key → the objects its function recorded under that key."""
Indexes = Mapping[str, Index]
"""Every kopf index of the operator, by its function's name, as kopf passes them to handlers."""
LOG = logging.getLogger(__name__)
PATCH_TIMEOUT = (5.0, 30.0)
"""Seconds to connect and to read a status patch: one that hangs (an API server that accepts
connections but does not answer) would hold up every later visit."""


@dataclass(frozen=True)
class StatusUpdate:
    """What one visit decided: the status fields to merge-patch (None removes one), the phase for the
    objects-by-phase gauge, and the Events that tell a person about a transition."""

    changes: Obj
    phase: str | None
    events: tuple[events.Event, ...] = ()


Visit = Callable[[Obj, Indexes], Awaitable[StatusUpdate | None]]
Spec = TypeVar("Spec")


class Forgetful(Protocol):
    def retain(self, uids: set[str]) -> None:
        """Drop what is kept about objects that no longer exist."""


@dataclass(frozen=True)
class Invalid:
    """Why a spec cannot run: a validation error naming the field, or the API server's refusal of a
    child built from it."""

    message: str


class Specs(Generic[Spec]):
    """Each object's spec, validated once per generation (a spec cannot change within one) rather
    than on every visit, with the verdict on it: the parsed spec, or why it is invalid."""

    def __init__(self, parse: Callable[[Obj], Spec]) -> None:
        self._parse = parse
        self._by_uid: dict[str, tuple[int | None, Spec | Invalid]] = {}

    def get(self, obj: Obj) -> Spec | Invalid:
        uid, generation = obj["metadata"]["uid"], obj["metadata"].get("generation")
        cached = self._by_uid.get(uid)
        if cached is not None and cached[0] == generation:
            return cached[1]
        try:
            verdict: Spec | Invalid = self._parse(dict(obj.get("spec") or {}))
        except ValidationError as error:
            verdict = Invalid(describe_validation_error(error))
        self._by_uid[uid] = (generation, verdict)
        return verdict

    def reject(self, obj: Obj, reason: str) -> None:
        """The API server refused a child built from this generation's spec: retrying cannot help."""
        self._by_uid[obj["metadata"]["uid"]] = (obj["metadata"].get("generation"), Invalid(reason))

    def retain(self, uids: set[str]) -> None:
        for uid in set(self._by_uid) - uids:
            del self._by_uid[uid]


@dataclass
class _Written:
    """The object as our last status patch left it, until the watch delivers that version."""

    after: Obj
    keys: frozenset[str]
    """The status fields the patch set."""

    def delivered_in(self, indexed: Obj) -> bool:
        """Whether the index's version of the object is as new as our write, or newer.

        Not by comparing resourceVersions (opaque strings, and the watch may deliver another writer's
        older version first: kopf's annotation patch of the same moment): the loop is the only writer
        of status, so a version that lacks our fields predates our write. A new generation is a spec
        change made after it."""
        meta, status = indexed["metadata"], indexed.get("status") or {}
        after_meta, after_status = self.after["metadata"], self.after.get("status") or {}
        return (
            meta.get("resourceVersion") == after_meta.get("resourceVersion")
            or meta.get("generation") != after_meta.get("generation")
            or all(status.get(key) == after_status.get(key) for key in self.keys)
        )


@dataclass
class StatusLoop:
    """Visits the objects of one kind and writes what each visit decides."""

    kind: str
    plural: str
    objects: str
    """The name of the index of the kind's own objects (records made by `record`)."""
    visit: Visit
    interval: float
    concurrency: int = 16
    """Visits in flight at once: a slow metrics scrape or probe must not hold up every other object."""
    caches: tuple[Forgetful, ...] = ()
    """Per-object memory of the visit's own, pruned after every full pass."""
    phases: PhaseBook = field(init=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False)
    _wake: asyncio.Event | None = field(default=None, init=False)
    _nudged: set[Hashable] = field(default_factory=set, init=False)
    _written: dict[str, _Written] = field(default_factory=dict, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.phases = PhaseBook(self.kind)

    def start(self, indexes: Indexes) -> None:
        """Start once, from the first handler kopf runs: kopf runs handlers only after every index
        is filled, so the loop never mistakes a not-yet-listed Job for a deleted one."""
        if self._task is None:
            running = asyncio.get_running_loop()
            self._task = running.create_task(self._run(indexes), name=f"{self.kind} status")

    def nudge(self, key: Hashable | None) -> None:
        """Visit the object with this key soon. Safe from any thread: kopf runs sync index functions in
        worker threads."""
        if self._loop is not None and key is not None:
            self._loop.call_soon_threadsafe(self._add, key)

    def _add(self, key: Hashable) -> None:
        self._nudged.add(key)
        if self._wake is not None:
            self._wake.set()

    async def _run(self, indexes: Indexes) -> None:
        objects = indexes[self.objects]
        self._loop = asyncio.get_running_loop()
        self._wake = wake = asyncio.Event()
        next_pass = self._loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=max(0.0, next_pass - self._loop.time()))
            wake.clear()
            full = self._loop.time() >= next_pass
            keys = list(objects) if full else [key for key in self._nudged if key in objects]
            self._nudged.clear()
            if full:
                next_pass = self._loop.time() + self.interval
            await self._visit_all(indexes, keys)
            if full:
                alive = {self._uid(obj) for key in keys for obj in objects.get(key, [])}
                for cache in (self.phases, *self.caches):
                    cache.retain(alive)
                for uid in set(self._written) - alive:
                    del self._written[uid]

    async def _visit_all(self, indexes: Indexes, keys: list[Hashable]) -> None:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(obj: Obj) -> None:
            async with gate:
                await self._visit_one(obj, indexes)

        objects = indexes[self.objects]
        found = [obj for key in keys for obj in objects.get(key, [])]
        await asyncio.gather(*(one(obj) for obj in found))

    @staticmethod
    def _uid(obj: Obj) -> str:
        return str(obj["metadata"]["uid"])

    def _current(self, obj: Obj) -> Obj:
        """The object as the index has it, or as our own last write left it while the watch has not
        delivered that write yet (else a quick second visit would repeat the write and its Events)."""
        written = self._written.get(self._uid(obj))
        if written is None:
            return obj
        if not written.delivered_in(obj):
            return written.after
        del self._written[self._uid(obj)]
        return obj

    async def _visit_one(self, indexed: Obj, indexes: Indexes) -> None:
        if indexed["metadata"].get("deletionTimestamp"):
            return
        obj = self._current(indexed)
        try:
            update = await self.visit(obj, indexes)
        except Exception:  # one object's surprise must not stop every other object's status
            LOG.exception("%s %s/%s: status visit failed", self.kind, *_name(obj))
            return
        if update is None:
            return
        self.phases.record(self._uid(obj), update.phase)
        if update.changes and not await self._patch(obj, update.changes):
            return
        for event in update.events:
            await asyncio.to_thread(events.post, obj, event)

    async def _patch(self, obj: Obj, changes: Obj) -> bool:
        namespace, name = _name(obj)
        try:
            after = await asyncio.to_thread(_patch_status, self.plural, namespace, name, changes)
        except ApiException as error:
            if error.status != 404:  # 404: deleted meanwhile, nothing to report on
                LOG.warning("%s %s/%s: status patch failed: %s", self.kind, namespace, name, error.reason)
            return False
        except (HTTPError, OSError) as error:  # the API server is unreachable: the next visit retries
            LOG.warning("%s %s/%s: status patch failed: %s", self.kind, namespace, name, error)
            return False
        STATUS_WRITES.labels(self.kind).inc()
        self._written[self._uid(obj)] = _Written(after={**obj, **after}, keys=frozenset(changes))
        return True


def record(body: Mapping[str, Any]) -> Obj:
    """What the index of a kind's own objects keeps of each: enough to visit it and to name it in an
    Event."""
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        **{key: dict(body.get(key) or {}) for key in ("metadata", "spec", "status")},
    }


def _patch_status(plural: str, namespace: str, name: str, changes: Obj) -> Obj:
    """Merge-patch the status subresource; the object as it is after the patch."""
    merge = "application/merge-patch+json"
    after = client.CustomObjectsApi().patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, plural, name, {"status": changes}, _content_type=merge,
        _request_timeout=PATCH_TIMEOUT,
    )  # fmt: skip
    return dict(after)  # type: ignore[call-overload]  # the client types it as object; it is a dict


def _name(obj: Obj) -> tuple[str, str]:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]
