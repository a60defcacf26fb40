"""The unit suite's shared fixture: the API server's side of the reconcilers, recorded instead of sent."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from deeptune import children, events
from deeptune.statuswriter import StatusWriter

Obj = dict[str, Any]


@dataclass
class Api:
    """What the reconcilers asked of the API server."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[events.Event] = field(default_factory=list)
    existing: dict[str, Obj] = field(default_factory=dict)
    """Objects by name that `create` finds already there (a 409)."""
    pods_on_server: list[Obj] = field(default_factory=list)
    """What a live list of pods answers (the cache may lag behind it, or hold what it no longer has)."""

    def named(self, verb: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == verb]

    def written(self) -> Obj:
        """The status fields the reconciles wrote, merged in order."""
        merged: Obj = {}
        for call in self.named("status"):
            merged.update(call[1])
        return merged


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    recorded = Api()

    def create(manifest: Obj, *, dry_run: bool = False) -> bool:
        recorded.calls.append(("create", manifest["kind"], manifest["metadata"]["name"], dry_run))
        existing = recorded.existing.get(manifest["metadata"]["name"])
        if existing is not None and not dry_run:
            children.check_owner(existing, manifest)
            return False
        return True

    def apply(manifest: Obj, *, dry_run: bool = False) -> tuple[str, Obj]:
        recorded.calls.append(("apply", manifest["kind"], manifest["metadata"]["name"]))
        after = copy.deepcopy(manifest)
        after["metadata"].update(
            resourceVersion="7", generation=1 if manifest["kind"] == "Deployment" else None
        )
        return "unchanged", after

    def patch_status(self: StatusWriter, obj: Obj, changes: Obj) -> Obj:
        recorded.calls.append(("status", changes))
        return {**obj, "status": {**(obj.get("status") or {}), **changes}}

    monkeypatch.setattr(children, "create", create)
    monkeypatch.setattr(children, "apply", apply)
    monkeypatch.setattr(children, "patch", lambda *a: recorded.calls.append(("patch", *a)) or {})
    monkeypatch.setattr(children, "remove", lambda *a: recorded.calls.append(("remove", *a)) or True)
    monkeypatch.setattr(
        children,
        "release",
        lambda obj, kind, fin: recorded.calls.append(("release", kind[1], obj["metadata"]["name"])) or True,
    )
    monkeypatch.setattr(
        children, "listed", lambda *a: recorded.calls.append(("list", *a)) or recorded.pods_on_server
    )
    monkeypatch.setattr(events, "post", lambda obj, event: recorded.events.append(event))
    monkeypatch.setattr(StatusWriter, "_patch", patch_status)
    yield recorded


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, Obj]:
    """What a live read of an object finds, by name."""
    found: dict[str, Obj] = {}
    monkeypatch.setattr(children, "read", lambda api_version, kind, name, namespace: found.get(name))
    return found
