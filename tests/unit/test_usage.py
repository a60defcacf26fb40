"""A run's usage (deeptune.status.usage): node- and GPU-seconds of every trainer pod from its own
timestamps, retries summed, finished attempts kept when their pods go, cost only with every price."""

from __future__ import annotations

from typing import Any

import kopf
import pytest
from prometheus_client import REGISTRY

from deeptune import observability
from deeptune.config import from_environment
from deeptune.registration import record_pod
from deeptune.status import usage

GPU = "nvidia.com/gpu"


def pod(name: str, started: str | None, finished: str | None = None, gpus: int = 2) -> dict[str, Any]:
    state = {"terminated": {"finishedAt": finished}} if finished else {"running": {"startedAt": started}}
    return {
        "metadata": {"name": name},
        "spec": {
            "nodeName": "gpu-node-1",
            "containers": [{"name": "trainer", "resources": {"limits": {GPU: str(gpus), "cpu": "8"}}}],
        },
        "status": {"startTime": started, "containerStatuses": [{"name": "trainer", "state": state}]},
    }


FAILED = pod("run-train-a", "2026-12-04T10:00:00Z", "2026-12-04T10:10:00Z")
RETRY = pod("run-train-b", "2026-12-04T10:10:05Z", "2026-12-04T10:40:05Z")


def test_a_retried_run_counts_both_attempts() -> None:
    used = usage.account(None, [RETRY, FAILED], {})
    assert used is not None
    assert [(a.pod, a.seconds, a.gpu_seconds) for a in used.attempts] == [
        ("run-train-a", 600, 1200),
        ("run-train-b", 1800, 3600),
    ]
    assert (used.node_seconds, used.gpu_seconds) == (2400, 4800)
    assert used.attempts[0].node == "gpu-node-1" and used.attempts[0].gpu_resource == GPU
    assert used.estimated_cost is None


def test_a_running_pod_shows_its_start_and_counts_nothing_yet() -> None:
    running = pod("run-train-b", "2026-12-04T10:10:05Z")
    used = usage.account(usage.account(None, [FAILED], {}), [FAILED, running], {})
    assert used is not None
    assert used.attempts[1].started == "2026-12-04T10:10:05Z" and used.attempts[1].seconds is None
    assert used.node_seconds == 600
    assert usage.account(None, [pod("pending", None)], {}) is None  # never started: no node held


def test_a_finished_attempt_stays_when_its_pod_is_deleted() -> None:
    first = usage.account(None, [FAILED], {})
    assert usage.account(first, [RETRY], {}) == usage.account(None, [FAILED, RETRY], {})


def test_the_cost_needs_a_price_for_every_gpu_resource_used() -> None:
    used = usage.account(None, [FAILED, RETRY], {GPU: 2.5})
    assert used is not None and used.estimated_cost == round(4800 / 3600 * 2.5, 4)
    assert usage.account(None, [FAILED], {"amd.com/gpu": 1.0}).estimated_cost is None  # type: ignore[union-attr]
    cpu_only = usage.account(
        None, [pod("cpu", "2026-12-04T10:00:00Z", "2026-12-04T10:01:00Z", gpus=0)], {GPU: 2.5}
    )
    assert cpu_only is not None and (cpu_only.gpu_seconds, cpu_only.estimated_cost) == (0, 0.0)


def test_prices_come_from_the_environment_and_a_bad_one_is_named() -> None:
    settings = from_environment({"DEEPTUNE_GPU_HOUR_PRICES": "nvidia.com/gpu=2.5,amd.com/gpu=1.9"})
    assert settings.gpu_hour_prices == {GPU: 2.5, "amd.com/gpu": 1.9}
    assert from_environment({}).gpu_hour_prices == {}
    with pytest.raises(ValueError, match=r"nvidia\.com/gpu='two' is not a number"):
        from_environment({"DEEPTUNE_GPU_HOUR_PRICES": "nvidia.com/gpu=two"})


def test_the_show_back_counters_add_each_finished_attempt_once() -> None:
    def counted() -> tuple[float, float]:
        gpu = REGISTRY.get_sample_value(
            "deeptune_gpu_seconds_total", {"namespace": "team-a", "resource": GPU}
        )
        node = REGISTRY.get_sample_value("deeptune_node_seconds_total", {"namespace": "team-a"})
        return gpu or 0.0, node or 0.0

    before = counted()
    first = usage.account(None, [FAILED, pod("run-train-b", "2026-12-04T10:10:05Z")], {})
    observability.count_usage("team-a", usage.newly_finished(None, first))
    second = usage.account(first, [FAILED, RETRY], {})
    observability.count_usage("team-a", usage.newly_finished(first, second))
    observability.count_usage("team-a", usage.newly_finished(second, second))  # a pass with no news
    after = counted()
    assert (after[0] - before[0], after[1] - before[1]) == (4800, 2400)


def test_the_operators_cache_keeps_what_usage_counts_by() -> None:
    """The cache keeps a slim copy of each trainer pod: the node and the GPU limits must be in it."""
    cached = record_pod(kopf.Body({"apiVersion": "v1", "kind": "Pod", **RETRY}))
    assert usage.attempt(cached) == usage.attempt(RETRY)
    assert cached["spec"]["containers"][0] == {
        "name": "trainer",
        "resources": RETRY["spec"]["containers"][0]["resources"],
    }
