"""Writes what a reconcile decided about an object's status: only the fields that changed, then the
Events that tell a person about the transition, and the objects-by-phase gauge.

It also remembers each write until the watch delivers it (read-your-writes): the next reconcile of
the object may run before the cache has the written version, and must not decide (and write, and
post Events) again from the older one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from deeptune import events
from deeptune.api.base import GROUP, VERSION
from deeptune.observability import STATUS_WRITES, PhaseBook
from deeptune.status.conditions import PhasedStatus

Obj = dict[str, Any]
LOG = logging.getLogger(__name__)
PATCH_TIMEOUT = (5.0, 30.0)
"""Seconds to connect and to read a status patch: one that hangs (an API server that accepts
connections but does not answer) must not hold a worker for long."""


@dataclass(frozen=True)
class StatusUpdate:
    """What one reconcile decided: the status fields to merge-patch (None removes one), the phase for
    the objects-by-phase gauge, and the Events that tell a person about a transition."""

    changes: Obj
    phase: str | None
    events: tuple[events.Event, ...] = ()


def phase_update(previous: PhasedStatus, new: PhasedStatus, found: list[events.Event]) -> StatusUpdate:
    """For a resource whose phase ends Succeeded or Failed (a sweep, a federation): the changed
    fields, the Events found, and one more when the phase moves to an end."""
    before, after = previous.to_wire(), new.to_wire()
    changes = {key: value for key, value in after.items() if before.get(key) != value}
    ready = next(c for c in new.conditions if c.type == "Ready")
    if new.phase not in (previous.phase, "Running"):
        event = events.Event("Normal" if new.phase == "Succeeded" else "Warning", ready.reason, ready.message)
        found = [*found, event]
    return StatusUpdate(changes=changes, phase=new.phase, events=tuple(found))


@dataclass(frozen=True)
class _Written:
    """The object as our last status patch left it, until the watch delivers that version."""

    after: Obj
    keys: frozenset[str]
    """The status fields the patch set."""

    def delivered_in(self, cached: Obj) -> bool:
        """Whether the cache's version of the object is as new as our write, or newer.

        Not by comparing resourceVersions as numbers (they are opaque, and the watch may deliver
        another writer's older version first): the operator is the only writer of status, so a
        version that lacks our fields predates our write. A newer generation is a spec change made
        after it; an older one is a version from before it."""
        meta, status = cached["metadata"], cached.get("status") or {}
        after_meta, after_status = self.after["metadata"], self.after.get("status") or {}
        generation, written_generation = meta.get("generation") or 0, after_meta.get("generation") or 0
        if generation != written_generation:
            return bool(generation > written_generation)
        return meta.get("resourceVersion") == after_meta.get("resourceVersion") or all(
            status.get(key) == after_status.get(key) for key in self.keys
        )


class StatusWriter:
    """The status subresource of one kind: patches, Events, and the phase gauge."""

    def __init__(self, kind: str, plural: str) -> None:
        self.kind, self.plural = kind, plural
        self.phases = PhaseBook(kind)
        self._written: dict[str, _Written] = {}

    def current(self, cached: Obj) -> Obj:
        """The object as the cache has it, or as our own last write left it while the watch has not
        delivered that write yet."""
        uid = cached["metadata"]["uid"]
        written = self._written.get(uid)
        if written is None:
            return cached
        if not written.delivered_in(cached):
            return written.after
        del self._written[uid]
        return cached

    async def write(self, obj: Obj, update: StatusUpdate) -> bool:
        """Patch the changed fields and post the Events; False when the patch failed (the object is
        gone, or the API server unreachable: a later reconcile decides again)."""
        uid = obj["metadata"]["uid"]
        self.phases.record(uid, update.phase)
        if update.changes:
            try:
                after = await asyncio.to_thread(self._patch, obj, update.changes)
            except ApiException as error:
                if error.status == 404:  # deleted meanwhile: nothing to report on
                    return False
                raise
            STATUS_WRITES.labels(self.kind).inc()
            self._written[uid] = _Written(after={**obj, **after}, keys=frozenset(update.changes))
        for event in update.events:
            await asyncio.to_thread(events.post, obj, event)
        return True

    def forget(self, uid: str) -> None:
        """The object is gone."""
        self._written.pop(uid, None)
        self.phases.forget(uid)

    def _patch(self, obj: Obj, changes: Obj) -> Obj:
        """Merge-patch the status subresource; the object as it is after the patch."""
        meta = obj["metadata"]
        try:
            after = client.CustomObjectsApi().patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], self.plural, meta["name"], {"status": changes},
                _content_type="application/merge-patch+json", _request_timeout=PATCH_TIMEOUT,
            )  # fmt: skip
        except (HTTPError, OSError) as error:  # unreachable: the caller's retry says when
            raise ConnectionError(f"status patch of {meta['namespace']}/{meta['name']}: {error}") from error
        return dict(after)  # type: ignore[call-overload]  # the client types it as object; it is a dict
