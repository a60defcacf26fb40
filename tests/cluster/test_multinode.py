"""A run over two pods: an Indexed Job whose pods find each other by DNS, meet at pod 0's rendezvous
and train as one; a pod killed mid-run fails the gang, the Job replaces it, and the new gang resumes
from the newest complete checkpoint. On the local cluster the pods run on the real node, in the trainer
image: they find pod 0 under the headless Service through cluster DNS (from the EndpointSlices the
controller manager writes from the kubelet's pod IPs) and meet across the pods' bridge
(torch.distributed's TCP store, then gloo)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.harness import Cluster, Process, wait_for
from tests.cluster.test_finetunejob_training import (
    NAME,
    follow,
    kill_trainers,
    newest_complete_checkpoint,
    tiny_manifest,
)

pytestmark = [pytest.mark.cluster, pytest.mark.trainer]
PODS = 2


def two_pod_manifest(namespace: str, **hyperparameters: Any) -> dict[str, Any]:
    manifest = tiny_manifest(namespace, perDeviceBatchSize=8, **hyperparameters)  # global batch 16
    manifest["spec"]["distributed"] = {"nodes": PODS}
    return manifest


def _pods(cluster: Cluster, namespace: str, index: int) -> list[dict[str, Any]]:
    """The trainer pods of one completion index, oldest first."""
    found = cluster.list("pods", namespace, f"batch.kubernetes.io/job-completion-index={index}")
    return sorted(found, key=lambda pod: pod["metadata"]["creationTimestamp"])


def _pod_logs(cluster: Cluster, namespace: str, index: int) -> list[str]:
    """The trainer logs of the pods of one completion index, oldest first."""
    return [
        cluster.kubectl("logs", "-n", namespace, pod["metadata"]["name"]).stdout
        for pod in _pods(cluster, namespace, index)
    ]


def test_two_pods_rendezvous_and_train_as_one(
    operator: Process,
    crds: Cluster,
    namespace: str,
    tiny_volumes: dict[str, Path],
    trainer_pods: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    crds.apply(trainer_pods(two_pod_manifest(namespace)))
    seen = follow(crds, namespace, timeout=600)
    final = seen[-1]
    assert final["phase"] == "Succeeded", final
    assert final["worldSize"] == PODS
    assert [(w["index"], w["phase"]) for w in final["workers"]] == [(0, "Succeeded"), (1, "Succeeded")]
    results = final["evalResults"]
    assert results["fineTuned"]["exactMatch"] > results["baseline"]["exactMatch"]
    assert (tiny_volumes["deeptune-output"] / NAME / "adapter" / "adapter_model.safetensors").is_file()
    service = crds.get("service", f"{NAME}-workers", namespace)
    assert service is not None and service["spec"]["clusterIP"] == "None"
    (pod0,), (pod1,) = _pods(crds, namespace, 0), _pods(crds, namespace, 1)
    assert pod0["spec"]["nodeName"] == pod1["spec"]["nodeName"]  # one node here: two network namespaces
    assert pod0["status"]["podIP"] != pod1["status"]["podIP"]
    (first,), (second,) = _pod_logs(crds, namespace, 0), _pod_logs(crds, namespace, 1)
    assert f"starting 1 worker processes on each of {PODS} pods" in first, first[-2000:]
    assert "step 120/120" in first
    assert "step " not in second  # rank 0 alone reports


def test_a_killed_pod_is_replaced_and_the_gang_resumes_from_its_checkpoint(
    operator: Process,
    crds: Cluster,
    namespace: str,
    tiny_volumes: dict[str, Path],
    trainer_pods: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    if not crds.local:
        pytest.skip(
            "LOUD SKIP: kills the trainer's processes on this machine, where the local cluster runs them"
        )
    steps, interval = 600, 20
    crds.apply(trainer_pods(two_pod_manifest(namespace, maxSteps=steps, checkpointSteps=interval)))
    checkpoints = tiny_volumes["deeptune-output"] / NAME / "checkpoints"
    wait_for(
        "the second complete checkpoint",
        lambda: newest_complete_checkpoint(checkpoints) >= 2 * interval,
        timeout=300,
        interval=0.05,
    )
    assert (
        kill_trainers(namespace, "JOB_COMPLETION_INDEX=1") >= 1
    )  # pod 1's launcher and worker, as a lost node
    final = follow(crds, namespace, timeout=900)[-1]
    assert final["phase"] == "Succeeded", final
    assert final["progress"]["step"] == steps
    assert final["retries"] >= 1

    first, *_, last = _pod_logs(crds, namespace, 0)  # pod 0 failed with pod 1; the Job replaced both
    assert len(_pod_logs(crds, namespace, 1)) >= 2
    killed_at = max(
        int(line.split()[1].split("/")[0]) for line in first.splitlines() if line.startswith("step ")
    )
    resumed = [line for line in last.splitlines() if "resuming from checkpoint-" in line]
    assert resumed, last[-3000:]
    checkpoint_step = int(resumed[0].rsplit("-", 1)[1])
    assert checkpoint_step >= 2 * interval
    assert killed_at - checkpoint_step <= interval + 10, (
        "lost more than a checkpoint interval (+ a logging step)"
    )
