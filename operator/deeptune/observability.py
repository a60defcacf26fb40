"""The operator's own Prometheus metrics: reconciles, errors, durations, objects by phase."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from deeptune.api.finetunejob import Attempt

RECONCILES = Counter(
    "deeptune_operator_reconciles_total", "Reconcile handler runs.", ["kind", "handler", "result"]
)
RECONCILE_SECONDS = Histogram(
    "deeptune_operator_reconcile_duration_seconds", "Time spent in a reconcile handler.", ["kind", "handler"]
)
OBJECTS = Gauge("deeptune_operator_objects", "Custom resources by phase.", ["kind", "phase"])
RECONCILE_ERRORS = Counter(
    "deeptune_operator_reconcile_errors_total", "Reconciles that raised (retried after a backoff).", ["kind"]
)
RESYNCS = Counter("deeptune_operator_resyncs_total", "Resync passes (every known object queued).", ["kind"])
TASK_RESTARTS = Counter(
    "deeptune_operator_task_restarts_total", "Controller tasks restarted after a crash.", ["kind", "task"]
)
LEADER = Gauge("deeptune_operator_leader", "1 while this replica holds the leader Lease and reconciles.")
STATUS_WRITES = Counter(
    "deeptune_operator_status_writes_total", "Status patches (only written when something changed).", ["kind"]
)

GPU_SECONDS = Counter(
    "deeptune_gpu_seconds_total",
    "GPU-seconds of finished trainer pods (retries included), by namespace and GPU resource: show-back.",
    ["namespace", "resource"],
)
NODE_SECONDS = Counter(
    "deeptune_node_seconds_total",
    "Seconds of finished trainer pods on their nodes, by namespace.",
    ["namespace"],
)


def count_usage(namespace: str, finished: list[Attempt]) -> None:
    """Add trainer pods that finished since the last status (each is counted once: the status that
    records it is the one that was written)."""
    for attempt in finished:
        NODE_SECONDS.labels(namespace).inc(attempt.seconds or 0)
        if attempt.gpus:
            GPU_SECONDS.labels(namespace, attempt.gpu_resource or "").inc(attempt.gpu_seconds or 0)


class PhaseBook:
    """The last phase of each object, so the phase gauge counts every object exactly once."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._phases: dict[str, str] = {}
        self._seen: set[str] = set()

    def record(self, uid: str, phase: str | None) -> None:
        if phase is None:
            self._phases.pop(uid, None)
        else:
            self._phases[uid] = phase
        self._publish()

    def forget(self, uid: str) -> None:
        """The object is gone."""
        if self._phases.pop(uid, None) is not None:
            self._publish()

    def _publish(self) -> None:
        counts = Tally(self._phases.values())
        self._seen.update(counts)
        for known in self._seen:
            OBJECTS.labels(self.kind, known).set(counts.get(known, 0))


@contextmanager
def measured(kind: str, handler: str) -> Iterator[None]:
    """Count and time one handler run, labelled by its outcome."""
    started = time.perf_counter()
    result = "error"
    try:
        yield
        result = "ok"
    finally:
        RECONCILES.labels(kind, handler, result).inc()
        RECONCILE_SECONDS.labels(kind, handler).observe(time.perf_counter() - started)


def serve(port: int, registry: CollectorRegistry = REGISTRY) -> None:
    """Expose /metrics on all interfaces (the chart's metrics Service points here)."""
    start_http_server(port, registry=registry)
