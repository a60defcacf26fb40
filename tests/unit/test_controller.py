"""The work queue's guarantees and the controller around it: dedupe, one reconcile per key at a time,
backoff, resync, supervision, health; the status writer's read-your-writes; spec verdicts; samples
fetched in the background. (The whole operator against a real API server: tests/cluster.)"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from deeptune.api.finetunejob import FineTuneJobSpec, parse_spec
from deeptune.controller import Controller
from deeptune.samples import Samples
from deeptune.statuswriter import StatusWriter, _Written
from deeptune.verdicts import Invalid, SpecVerdicts
from deeptune.workqueue import WorkQueue
from tests.unit.test_finetunejob_model import MINIMAL

Obj = dict[str, Any]


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=20))


# --- the work queue ---------------------------------------------------------------------------


def test_a_key_added_many_times_is_queued_once() -> None:
    async def scenario() -> None:
        queue = WorkQueue()
        for key in ("a", "b", "a", "a", "b"):
            queue.add(key)
        assert len(queue) == 2
        assert [await queue.get(), await queue.get()] == ["a", "b"]

    run(scenario)


def test_a_key_added_while_processed_comes_back_after_and_not_before() -> None:
    async def scenario() -> None:
        queue = WorkQueue()
        queue.add("a")
        key = await queue.get()
        queue.add("a")  # a change arrives while "a" is being reconciled
        assert len(queue) == 0, "never handed to a second worker while the first has it"
        queue.done(key)
        assert len(queue) == 1 and await queue.get() == "a"

    run(scenario)


def test_failures_back_off_exponentially_and_a_success_resets_them() -> None:
    async def scenario() -> None:
        queue = WorkQueue(base_delay=0.01, max_delay=0.04)
        delays = [queue.add_failed("a") for _ in range(4)]
        assert delays == [0.01, 0.02, 0.04, 0.04]
        queue.forget("a")
        assert queue.add_failed("a") == 0.01
        assert await queue.get() == "a"  # it does come back

    run(scenario)


def test_a_later_add_is_overtaken_by_an_add_now() -> None:
    async def scenario() -> None:
        queue = WorkQueue()
        queue.add_after("a", 3600)
        assert len(queue) == 0
        queue.add("a")
        assert await queue.get() == "a"
        queue.done("a")
        await asyncio.sleep(0.01)
        assert len(queue) == 0, "the cancelled delayed add does not fire later"

    run(scenario)


# --- the controller ---------------------------------------------------------------------------


def controller(reconcile: Callable[[str], Awaitable[float | None]], keys: list[str], **kw: Any) -> Controller:
    return Controller("Test", reconcile, lambda: keys, resync_interval=kw.pop("resync", 3600), **kw)


def test_one_slow_reconcile_does_not_hold_up_the_others() -> None:
    """Head-of-line blocking (issue 12, fault 7): a reconcile stuck on one object holds one worker."""
    done: list[str] = []
    stuck = asyncio.Event()

    async def reconcile(key: str) -> None:
        if key == "slow":
            await stuck.wait()
        done.append(key)

    async def scenario() -> None:
        ctl = controller(reconcile, ["slow", *(f"k{n}" for n in range(20))], workers=4)
        task = asyncio.create_task(ctl.run())
        while len(done) < 20:
            await asyncio.sleep(0.01)
        assert "slow" not in done
        stuck.set()
        while "slow" not in done:
            await asyncio.sleep(0.01)
        task.cancel()

    run(scenario)


def test_an_enqueued_key_is_reconciled_without_waiting_for_the_resync() -> None:
    seen: list[str] = []

    async def reconcile(key: str) -> None:
        seen.append(key)

    async def scenario() -> None:
        ctl = controller(reconcile, [])
        task = asyncio.create_task(ctl.run())
        await asyncio.sleep(0.01)
        await asyncio.to_thread(ctl.enqueue, "from-a-thread")  # kopf's sync handlers run in threads
        ctl.enqueue("from-the-loop")
        while len(seen) < 2:
            await asyncio.sleep(0.01)
        assert sorted(seen) == ["from-a-thread", "from-the-loop"]
        task.cancel()

    run(scenario)


def test_a_failed_reconcile_is_retried_and_a_requeue_asked_for_comes_back() -> None:
    calls: list[str] = []

    async def reconcile(key: str) -> float | None:
        calls.append(key)
        if key == "flaky" and calls.count("flaky") == 1:
            raise RuntimeError("the API server is restarting")
        if key == "later" and calls.count("later") == 1:
            return 0.01
        return None

    async def scenario() -> None:
        ctl = controller(reconcile, ["flaky", "later"])
        ctl.queue = WorkQueue(base_delay=0.01)
        task = asyncio.create_task(ctl.run())
        while calls.count("flaky") < 2 or calls.count("later") < 2:
            await asyncio.sleep(0.01)
        task.cancel()

    run(scenario)


def test_a_crashed_task_is_restarted_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing supervised the old status loop (issue 12, fault 10): an exception outside a visit
    ended status for every object."""
    monkeypatch.setattr("deeptune.controller.RESTART_DELAY", 0.0)
    seen: list[str] = []
    keys_calls = 0

    def keys() -> list[str]:
        nonlocal keys_calls
        keys_calls += 1
        if keys_calls == 1:
            raise RuntimeError("the cache broke once")
        return ["a"]

    async def reconcile(key: str) -> None:
        seen.append(key)

    async def scenario() -> None:
        ctl = Controller("Test", reconcile, keys, resync_interval=3600, workers=1)
        task = asyncio.create_task(ctl.run())
        while not seen:
            await asyncio.sleep(0.01)
        assert ctl.restarts == 1 and ctl.health().restarts == 1
        task.cancel()

    run(scenario)


def test_health_fails_when_keys_wait_and_nothing_finishes() -> None:
    forever = asyncio.Event()

    async def reconcile(key: str) -> None:
        await forever.wait()

    async def scenario() -> None:
        ctl = controller(reconcile, ["a", "b"], workers=1, stall_after=0.05)
        task = asyncio.create_task(ctl.run())
        await asyncio.sleep(0.01)
        assert ctl.health().healthy
        await asyncio.sleep(0.1)
        health = ctl.health()
        assert not health.healthy and health.queued == 1 and health.processing == 1
        forever.set()
        await asyncio.sleep(0.01)
        assert ctl.health().healthy
        task.cancel()

    run(scenario)


# --- the status writer's read-your-writes -------------------------------------------------------


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


def test_a_reconcile_sees_its_own_write_until_the_watch_delivers_it() -> None:
    writer = StatusWriter("FineTuneJob", "finetunejobs")
    written = {**ftj(version="12"), "status": {"phase": "Pending"}}
    writer._written["u1"] = _Written(after=written, keys=frozenset({"phase"}))
    assert writer.current(ftj(version="10")) is written  # the watch still shows version 10
    annotated = ftj(version="11")  # another writer's version from before ours
    annotated["metadata"]["annotations"] = {"example.com/touched": "yes"}
    assert writer.current(annotated) is written
    delivered = {**ftj(version="12"), "status": {"phase": "Pending"}}
    assert writer.current(delivered) is delivered and "u1" not in writer._written


def test_a_newer_version_than_the_write_ends_it() -> None:
    writer = StatusWriter("FineTuneJob", "finetunejobs")
    written = {**ftj(version="12"), "status": {"phase": "Pending"}}
    for newer in (
        {**ftj(version="14"), "status": {"phase": "Pending"}},  # the watch skipped 12 (a relist)
        ftj(version="13", generation=2),  # a spec change after our write
    ):
        writer._written["u1"] = _Written(after=written, keys=frozenset({"phase"}))
        assert writer.current(newer) is newer and "u1" not in writer._written


def test_an_older_generation_is_not_taken_for_the_write() -> None:
    """Issue 12, fault 9: the generation was compared with `!=`, so a version from before a spec
    change (generation 1, delivered late) counted as newer than a write made at generation 2."""
    writer = StatusWriter("FineTuneJob", "finetunejobs")
    written = {**ftj(version="20", generation=2), "status": {"phase": "Running"}}
    writer._written["u1"] = _Written(after=written, keys=frozenset({"phase"}))
    older = ftj(version="15", generation=1)
    assert writer.current(older) is written


# --- spec verdicts ------------------------------------------------------------------------------


def test_a_spec_is_parsed_once_per_generation() -> None:
    calls: list[Obj] = []

    def parse(spec: Obj) -> FineTuneJobSpec:
        calls.append(spec)
        return parse_spec(spec)

    verdicts = SpecVerdicts(parse)
    first = verdicts.get(ftj())
    assert isinstance(first, FineTuneJobSpec)
    assert verdicts.get(ftj()) is first and len(calls) == 1
    verdicts.get(ftj(generation=2))
    assert len(calls) == 2
    verdicts.forget("u1")
    verdicts.get(ftj(generation=2))
    assert len(calls) == 3


def test_an_invalid_spec_names_the_field_and_a_rejection_sticks_to_its_generation() -> None:
    verdicts = SpecVerdicts(parse_spec)
    bad = verdicts.get(ftj(spec={**MINIMAL, "lora": {"rank": -1}}))
    assert isinstance(bad, Invalid) and "spec.lora.rank" in bad.message
    verdicts.reject(ftj(), "the API server rejected a child: nope")
    assert verdicts.get(ftj()) == Invalid("the API server rejected a child: nope")
    assert isinstance(verdicts.get(ftj(generation=2)), FineTuneJobSpec)  # a changed spec is judged anew


# --- samples ------------------------------------------------------------------------------------


def test_a_sample_is_fetched_in_the_background_and_news_is_announced_once() -> None:
    fetched: list[str] = []
    news: list[str] = []
    release = asyncio.Event()

    async def fetch(target: str) -> str:
        fetched.append(target)
        await release.wait()
        return f"metrics of {target}"

    async def scenario() -> None:
        samples: Samples[str, str] = Samples(fetch, max_age=0.0, timeout=5, on_news=news.append)
        assert samples.latest("u1", "10.0.0.1") is None, "the reconcile does not wait for the pod"
        await asyncio.sleep(0.01)
        assert samples.latest("u1", "10.0.0.1") is None and fetched == ["10.0.0.1"], "one fetch at a time"
        release.set()
        while not news:
            await asyncio.sleep(0.01)
        assert samples.latest("u1", "10.0.0.1") == "metrics of 10.0.0.1"
        while len(fetched) < 2:  # stale at once (max_age 0): fetched again, the same, no news
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        assert news == ["u1"]
        assert samples.latest("u1", "10.0.0.2") is None, "another pod's sample is not this one's"
        samples.forget("u1")

    run(scenario)


def test_a_hanging_check_times_out_without_holding_up_others() -> None:
    news: list[str] = []

    async def fetch(target: str) -> str | None:
        if target == "hangs":
            await asyncio.Event().wait()
        return "ok"

    async def scenario() -> None:
        samples: Samples[str, str] = Samples(
            fetch, max_age=60, timeout=0.05, on_news=news.append, concurrency=1
        )
        samples.latest("a", "hangs")
        samples.latest("b", "answers")
        while samples.latest("b", "answers") != "ok":
            await asyncio.sleep(0.01)
        assert samples.latest("a", "hangs") is None

    run(scenario)
