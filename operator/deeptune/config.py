"""Operator-wide settings, read once from the environment (the Helm chart sets these variables)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from deeptune.builders.finetunejob import DEFAULT_TRAINER_IMAGE, ChildSettings


@dataclass(frozen=True)
class Settings:
    builder: ChildSettings = field(default_factory=ChildSettings)
    status_interval: float = 5.0
    """Seconds between resyncs (every object reconciled from the cache; writes only on change), and
    the age at which a running trainer's metrics are scraped again."""
    workers: int = 8
    """Reconciles in flight at once, per kind."""
    scrape_timeout: float = 2.0
    probe_interval: float = 30.0
    """Seconds between the operator's tritonclient checks of one ModelDeployment's serving pod."""
    probe_timeout: float = 20.0
    """Seconds one check (health, then a one-token inference) may take; a busy CPU model is slow."""
    metrics_port: int = 8080
    liveness_port: int = 8081
    namespaces: tuple[str, ...] = ()
    """Namespaces to watch; empty means the whole cluster."""
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}")
    """This replica's name in the leader Lease (the chart: the pod's name, which a restarted
    container keeps, so it takes its own Lease back at once)."""
    lease_namespace: str = "default"
    lease_name: str = "deeptune-operator"
    gpu_hour_prices: Mapping[str, float] = field(default_factory=dict)
    """Price of one GPU-hour by resource name (`nvidia.com/gpu=2.5`): FineTuneJobs' estimated cost."""


def _labels(text: str) -> dict[str, str]:
    """`a=1,b=2` → {"a": "1", "b": "2"}."""
    pairs = (item.partition("=") for item in text.split(",") if item)
    return {key: value for key, _, value in pairs}


def from_environment(env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    namespaces = tuple(ns for ns in env.get("DEEPTUNE_WATCH_NAMESPACES", "").split(",") if ns)
    return Settings(
        builder=ChildSettings(
            trainer_image=env.get("DEEPTUNE_TRAINER_IMAGE", DEFAULT_TRAINER_IMAGE),
            image_pull_policy=env.get("DEEPTUNE_IMAGE_PULL_POLICY", "IfNotPresent"),
            operator_namespace=env.get("DEEPTUNE_OPERATOR_NAMESPACE", ""),
            operator_labels=_labels(env.get("DEEPTUNE_OPERATOR_POD_LABELS", "")),
        ),
        status_interval=float(env.get("DEEPTUNE_STATUS_INTERVAL", "5")),
        scrape_timeout=float(env.get("DEEPTUNE_SCRAPE_TIMEOUT", "2")),
        probe_interval=float(env.get("DEEPTUNE_PROBE_INTERVAL", "30")),
        probe_timeout=float(env.get("DEEPTUNE_PROBE_TIMEOUT", "20")),
        metrics_port=int(env.get("DEEPTUNE_METRICS_PORT", "8080")),
        liveness_port=int(env.get("DEEPTUNE_LIVENESS_PORT", "8081")),
        namespaces=namespaces,
        workers=int(env.get("DEEPTUNE_WORKERS", "8")),
        identity=env.get("DEEPTUNE_OPERATOR_IDENTITY") or Settings().identity,
        lease_namespace=env.get("DEEPTUNE_OPERATOR_NAMESPACE") or "default",
        lease_name=env.get("DEEPTUNE_LEASE_NAME", "deeptune-operator"),
        gpu_hour_prices=_prices(env.get("DEEPTUNE_GPU_HOUR_PRICES", "")),
    )


def _prices(text: str) -> dict[str, float]:
    """`nvidia.com/gpu=2.5,amd.com/gpu=1.9` → prices by resource; a bad one stops the operator at
    start, naming it, rather than costing runs wrongly."""
    prices = {}
    for resource, price in _labels(text).items():
        try:
            prices[resource] = float(price)
        except ValueError:
            raise ValueError(f"DEEPTUNE_GPU_HOUR_PRICES: {resource}={price!r} is not a number") from None
    return prices
