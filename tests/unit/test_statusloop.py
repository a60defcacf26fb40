"""The status loop's own logic: spec verdicts cached per generation, nudges, and not repeating a write
the watch has not delivered yet. (The loop against a real API server: tests/cluster.)"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from deeptune.api.finetunejob import FineTuneJobSpec, parse_spec
from deeptune.statusloop import Invalid, Specs, StatusLoop, StatusUpdate, _Written
from tests.unit.test_finetunejob_model import MINIMAL

Obj = dict[str, Any]


def ftj(uid: str = "u1", generation: int = 1, spec: Obj | None = None, version: str = "10") -> Obj:
    return {
        "apiVersion": "deeptune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": "a",
            "namespace": "ns",
            "uid": uid,
            "generation": generation,
            "resourceVersion": version,
        },
        "spec": copy.deepcopy(MINIMAL if spec is None else spec),
        "status": {},
    }


def test_a_spec_is_parsed_once_per_generation() -> None:
    calls: list[Obj] = []

    def parse(spec: Obj) -> FineTuneJobSpec:
        calls.append(spec)
        return parse_spec(spec)

    specs = Specs(parse)
    first = specs.get(ftj())
    assert isinstance(first, FineTuneJobSpec)
    assert specs.get(ftj()) is first and len(calls) == 1
    specs.get(ftj(generation=2))
    assert len(calls) == 2


def test_an_invalid_spec_names_the_field_and_a_rejection_sticks_to_its_generation() -> None:
    specs = Specs(parse_spec)
    bad = specs.get(ftj(spec={**MINIMAL, "lora": {"rank": -1}}))
    assert isinstance(bad, Invalid) and "spec.lora.rank" in bad.message
    specs.reject(ftj(), "the API server rejected a child: nope")
    assert specs.get(ftj()) == Invalid("the API server rejected a child: nope")
    assert isinstance(specs.get(ftj(generation=2)), FineTuneJobSpec)  # a changed spec is judged anew


def test_retain_forgets_deleted_objects() -> None:
    specs = Specs(parse_spec)
    specs.get(ftj("u1"))
    specs.get(ftj("u2"))
    calls: list[int] = []
    specs._parse = lambda spec: calls.append(1) or parse_spec(spec)  # type: ignore[method-assign]
    specs.retain({"u1"})
    specs.get(ftj("u1"))
    specs.get(ftj("u2"))
    assert calls == [1]  # only u2 was forgotten and parsed again


def _loop(visited: list[str]) -> StatusLoop:
    async def visit(obj: Obj, indexes: Any) -> StatusUpdate | None:
        visited.append(obj["metadata"]["uid"])
        return None

    return StatusLoop("FineTuneJob", "finetunejobs", "objects", visit, interval=3600)


def test_a_nudge_visits_only_that_object_at_once() -> None:
    visited: list[str] = []
    loop = _loop(visited)
    objects = {"k1": [ftj("u1")], "k2": [ftj("u2")]}

    async def scenario() -> None:
        loop.start({"objects": objects})
        await asyncio.sleep(0.05)  # the first full pass
        assert sorted(visited) == ["u1", "u2"]
        visited.clear()
        loop.nudge("k2")
        loop.nudge("gone")  # a key the index no longer has is ignored
        await asyncio.sleep(0.05)
        assert visited == ["u2"]
        assert loop._task is not None
        loop._task.cancel()

    asyncio.run(scenario())


def test_a_visit_sees_its_own_write_until_the_watch_delivers_it() -> None:
    loop = _loop([])
    indexed = ftj(version="10")
    written = {**ftj(version="12"), "status": {"phase": "Pending"}}
    loop._written["u1"] = _Written(after=written, keys=frozenset({"phase"}))
    assert loop._current(indexed) is written  # the watch still shows version 10
    # Another writer's version from before ours (kopf's annotations, version 11) is older still: a
    # visit that took it for news would write Pending again, and post its Event twice.
    annotated = ftj(version="11")
    annotated["metadata"]["annotations"] = {"deeptune.dev/last-handled-configuration": "{}"}
    assert loop._current(annotated) is written
    delivered = {**ftj(version="12"), "status": {"phase": "Pending"}}
    assert loop._current(delivered) is delivered and "u1" not in loop._written


def test_a_newer_version_than_the_write_ends_it() -> None:
    loop = _loop([])
    written = {**ftj(version="12"), "status": {"phase": "Pending"}}
    for newer in (
        {**ftj(version="14"), "status": {"phase": "Pending"}},  # the watch skipped 12 (a relist)
        ftj(version="13", generation=2),  # a spec change after our write
    ):
        loop._written["u1"] = _Written(after=written, keys=frozenset({"phase"}))
        assert loop._current(newer) is newer and "u1" not in loop._written
