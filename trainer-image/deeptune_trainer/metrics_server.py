"""Training progress as Prometheus gauges, which the operator scrapes into `status.progress`.

The gauges live on a registry of their own (not the process-global default one), so several trainers
in one test process do not collide and the page carries only the trainer's metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from prometheus_client import CollectorRegistry, Gauge, generate_latest, start_http_server

from deeptune.api.trainer import MetricNames


@dataclass
class ProgressSnapshot:
    """Values of one progress update; None leaves a gauge as it was."""

    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    samples_per_second: float | None = None
    eta_seconds: float | None = None
    peak_memory_bytes: float | None = None


_GAUGES: dict[str, tuple[str, str]] = {
    "step": (MetricNames.STEP, "Optimizer steps done"),
    "total_steps": (MetricNames.TOTAL_STEPS, "Optimizer steps planned"),
    "epoch": (MetricNames.EPOCH, "Epochs done (fractional)"),
    "train_loss": (MetricNames.TRAIN_LOSS, "Training loss, averaged since the previous log"),
    "eval_loss": (MetricNames.EVAL_LOSS, "Loss on the validation split at the last evaluation"),
    "learning_rate": (MetricNames.LEARNING_RATE, "Current learning rate"),
    "tokens_per_second": (MetricNames.TOKENS_PER_SECOND, "Non-padding input tokens trained per second"),
    "samples_per_second": (MetricNames.SAMPLES_PER_SECOND, "Rows trained per second"),
    "eta_seconds": (MetricNames.ETA_SECONDS, "Estimated seconds until training ends"),
    "peak_memory_bytes": (MetricNames.PEAK_MEMORY_BYTES, "Peak accelerator (or process) memory in bytes"),
}


class TrainerMetrics:
    """The trainer's gauges. They start as NaN, which the operator reads as 'not reported yet'."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._gauges = {
            field: Gauge(name, help_text, registry=self.registry)
            for field, (name, help_text) in _GAUGES.items()
        }
        for gauge in self._gauges.values():
            gauge.set(math.nan)

    def serve(self, port: int) -> None:
        """Expose the gauges over HTTP on all interfaces; port 0 means not at all (tests, laptops)."""
        if port:
            start_http_server(port, registry=self.registry)

    def update(self, snapshot: ProgressSnapshot) -> None:
        for field in fields(snapshot):
            value = getattr(snapshot, field.name)
            if value is not None:
                self._gauges[field.name].set(value)

    def exposition(self) -> str:
        """The metrics page as the operator would scrape it."""
        return generate_latest(self.registry).decode()
