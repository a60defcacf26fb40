"""What a FineTuneJob's run used: node- and GPU-seconds of every trainer pod (each attempt, retries
included) from the pods' own start and finish times, and an estimated cost where the operator is
given prices.

A pod's seconds run from `status.startTime` (the kubelet took it: the node and its GPUs are held from
then on, image pulls included) to its trainer container's `finishedAt`. A finished attempt is recorded
once and stays when its pod is deleted; a running one shows when it started and counts nothing yet,
so status does not change on every pass.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from deeptune.api.finetunejob import Attempt, Usage

GPU_SUFFIX = "/gpu"
"""Extended resources that are GPUs end so: nvidia.com/gpu, amd.com/gpu."""

Obj = dict[str, Any]


def _gpus(pod: Obj) -> tuple[str | None, int]:
    """The GPU resource the pod asks for and how many (limits: GPUs are not overcommitted)."""
    total, name = 0, None
    for container in pod.get("spec", {}).get("containers", []):
        for resource, quantity in ((container.get("resources") or {}).get("limits") or {}).items():
            if resource.endswith(GPU_SUFFIX):
                name, total = resource, total + int(quantity)
    return name, total


def _finished_at(pod: Obj) -> str | None:
    """When the pod's last container ended (None while one runs)."""
    statuses = pod.get("status", {}).get("containerStatuses") or []
    ended = [(s.get("state") or {}).get("terminated", {}).get("finishedAt") for s in statuses]
    if not ended or any(at is None for at in ended):
        return None
    return max(str(at) for at in ended)


def attempt(pod: Obj) -> Attempt | None:
    """One pod as an attempt; None for a pod that never started (no node held)."""
    started = pod.get("status", {}).get("startTime")
    if not started:
        return None
    finished = _finished_at(pod)
    resource, gpus = _gpus(pod)
    seconds = None
    if finished:  # RFC 3339, which fromisoformat reads since Python 3.11
        held = dt.datetime.fromisoformat(finished) - dt.datetime.fromisoformat(started)
        seconds = max(0, round(held.total_seconds()))
    return Attempt(
        pod=pod["metadata"]["name"],
        node=pod.get("spec", {}).get("nodeName"),
        started=started,
        finished=finished,
        seconds=seconds,
        gpu_resource=resource,
        gpus=gpus,
        gpu_seconds=None if seconds is None else seconds * gpus,
    )


def account(previous: Usage | None, pods: list[Obj], prices: Mapping[str, float]) -> Usage | None:
    """Every attempt known before or seen now (a finished one as first recorded), with the totals of
    the finished ones and, where every GPU resource used has a price per hour, their estimated cost.
    Attempts are not capped: the Job's backoffLimit (at most 100) and nodes (64) bound them."""
    known = {a.pod: a for a in (previous.attempts if previous else [])}
    for pod in pods:
        seen = attempt(pod)
        if seen is not None and (seen.pod not in known or known[seen.pod].seconds is None):
            known[seen.pod] = seen
    if not known:
        return None
    attempts = sorted(known.values(), key=lambda a: (a.started or "", a.pod))
    done = [a for a in attempts if a.seconds is not None]
    return Usage(
        attempts=attempts,
        node_seconds=sum(a.seconds or 0 for a in done),
        gpu_seconds=sum(a.gpu_seconds or 0 for a in done),
        estimated_cost=_cost(done, prices),
    )


def _cost(done: list[Attempt], prices: Mapping[str, float]) -> float | None:
    if not prices:
        return None
    total = 0.0
    for a in done:
        if a.gpus and a.gpu_resource not in prices:
            return None  # a GPU without a price: an estimate would be too low
        total += (a.gpu_seconds or 0) / 3600 * prices.get(a.gpu_resource or "", 0.0)
    return round(total, 4)


def newly_finished(previous: Usage | None, current: Usage | None) -> list[Attempt]:
    """Attempts finished since the last status: what the usage counters add."""
    before = {a.pod for a in (previous.attempts if previous else []) if a.seconds is not None}
    return [a for a in (current.attempts if current else []) if a.seconds is not None and a.pod not in before]
