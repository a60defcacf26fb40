"""Two operators against one API server, as `replicas: 2` runs them: one leads (holds the Lease)
and reconciles, the other only watches; one Job per FineTuneJob, one status writer, no Event twice;
the follower takes over when the leader is killed, and at once when it stops cleanly."""

from __future__ import annotations

import collections
import json
import signal
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import harness
from tests.cluster.harness import Cluster, Process, wait_for
from tests.cluster.test_faults import UidWatch
from tests.cluster.test_reconcile_faults import nowhere

pytestmark = pytest.mark.cluster
LEASE = "two-replicas"


def metrics(process: Process) -> dict[str, float]:
    """The operator's counters and gauges summed over their labels (empty while it does not answer)."""
    try:
        url = f"http://127.0.0.1:{process.ports['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=2) as page:
            text = page.read().decode()
    except OSError:
        return {}
    totals: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return dict(totals)


def leads(process: Process) -> bool:
    return metrics(process).get("deeptune_operator_leader") == 1.0


def health(process: Process) -> dict[str, object]:
    url = f"http://127.0.0.1:{process.ports['liveness']}/healthz"
    with urllib.request.urlopen(url, timeout=5) as page:
        return dict(json.loads(page.read())["operator"])


@pytest.fixture
def replicas(crds: Cluster) -> Iterator[dict[str, Process]]:
    started: dict[str, Process] = {}

    def start(identity: str) -> Process:
        started[identity] = harness.start_operator(
            crds, identity=identity, log_name=f"{identity}.log", lease=LEASE
        )
        return started[identity]

    start("replica-a")
    wait_for("replica-a to lead", lambda: leads(started["replica-a"]), 60, interval=0.2)
    start("replica-b")
    wait_for("replica-b to answer", lambda: metrics(started["replica-b"]), 60, interval=0.2)
    started["start"] = start  # type: ignore[assignment]
    yield started
    for process in started.values():
        if isinstance(process, Process):
            process.stop()


def test_one_leader_reconciles_and_the_other_takes_over(
    replicas: dict[str, Process], crds: Cluster, namespace: str
) -> None:
    a, b = replicas["replica-a"], replicas["replica-b"]
    jobs = UidWatch(crds, "jobs", namespace, "deeptune.dev/finetunejob")
    try:
        names = [f"run-{n}" for n in range(3)]
        for name in names:
            crds.apply(nowhere(name, namespace))
        for name in names:
            wait_for(f"{name} Pending", lambda name=name: (crds.get("ftj", name, namespace) or {}).get(
                "status", {}).get("phase") == "Pending", 60)  # fmt: skip
        assert not leads(b) and health(b)["leading"] is False
        assert metrics(b).get("deeptune_operator_status_writes_total", 0) == 0, "the follower wrote status"
        assert metrics(b).get("deeptune_operator_reconciles_total", 0) == 0
        assert metrics(a)["deeptune_operator_status_writes_total"] >= len(names)

        a.popen.send_signal(signal.SIGKILL)  # the leader dies without handing the Lease back
        a.popen.wait()
        killed = time.monotonic()
        wait_for("replica-b to lead", lambda: leads(b), 60, interval=0.2)
        takeover = time.monotonic() - killed
        crds.apply(nowhere("after", namespace))
        wait_for(
            "the Job of a run made after the failover", lambda: crds.get("job", "after-train", namespace), 60
        )

        replicas["start"]("replica-a")  # type: ignore[operator]  # back, as a follower now
        wait_for("replica-a to answer", lambda: metrics(replicas["replica-a"]), 60, interval=0.2)
        assert not leads(replicas["replica-a"])
        b.popen.send_signal(signal.SIGTERM)  # a clean stop hands the Lease back
        stopped = time.monotonic()
        wait_for("replica-a to lead again", lambda: leads(replicas["replica-a"]), 30, interval=0.2)
        handover = time.monotonic() - stopped
        b.popen.wait(timeout=30)

        assert len(jobs.uids()) == len(names) + 1, "one Job per FineTuneJob, whoever led"
        for name in [*names, "after"]:
            reasons = collections.Counter(
                e["reason"] for e in harness.events_for(crds, "FineTuneJob", name, namespace)
            )
            assert reasons["JobCreated"] == 1 and reasons["Pending"] == 1, (name, reasons)
        assert handover < takeover
        print(f"FIGURES two replicas: failover after SIGKILL {takeover:.1f}s, after SIGTERM {handover:.1f}s")
    finally:
        jobs.stop()
