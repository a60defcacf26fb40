"""Pod pieces that every DeepTune workload derives from a `ResourcesSpec` the same way.

The trainer's Job and the serving Deployment ask the cluster for resources with one spec shape, so a
field such as `resources.gpu` or `resources.nodeSelector` must mean the same thing in both.
"""

from __future__ import annotations

from deeptune.api.finetunejob import ResourcesSpec
from deeptune.builders.common import Manifest


def container_resources(res: ResourcesSpec) -> Manifest:
    """Requests and limits: memory is limited at its request (no surprise OOM kills from overcommit);
    GPUs, like every extended resource, must have requests equal to limits."""
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu:
        requests["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    if res.gpu:
        requests[res.gpu_resource_name] = limits[res.gpu_resource_name] = str(res.gpu)
    out: Manifest = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def cpu_threads(cpu: str | None) -> int | None:
    """Whole CPUs in a quantity such as `8`, `2.5` or `500m` (at least one).

    torch sizes its thread pool by the node's cores, not the pod's CPU; oversubscribed threads
    spinning against each other make CPU work many times slower, so OMP_NUM_THREADS follows this.
    """
    if not cpu:
        return None
    cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    return max(1, int(cores))


def scheduling(res: ResourcesSpec) -> Manifest:
    """Pod spec fields that place the pod: node selector, tolerations, affinity, priority."""
    pod: Manifest = {}
    if res.node_selector:
        pod["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod["tolerations"] = [t.to_wire() for t in res.tolerations]
    affinity = res.affinity.to_wire() if res.affinity else {}
    if affinity:
        pod["affinity"] = affinity
    if res.priority_class_name:
        pod["priorityClassName"] = res.priority_class_name
    return pod
