"""A run over two pods: an Indexed Job whose pods find each other by DNS, meet at pod 0's rendezvous
and train as one; a pod killed mid-run fails the gang, the Job replaces it, and the new gang resumes
from the newest complete checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deeptune_trainer.training import COMPLETE_MARKER
from tests.cluster.harness import Cluster, Process, wait_for
from tests.cluster.test_finetunejob_training import NAME, follow, kill_trainers, tiny_manifest

pytestmark = [pytest.mark.cluster, pytest.mark.trainer]
PODS = 2


def two_pod_manifest(namespace: str, **hyperparameters: Any) -> dict[str, Any]:
    manifest = tiny_manifest(namespace, perDeviceBatchSize=8, **hyperparameters)  # global batch 16
    manifest["spec"]["distributed"] = {"nodes": PODS}
    return manifest


def _pod_logs(cluster: Cluster, namespace: str, index: int) -> list[str]:
    """The trainer logs of the pods of one index, oldest first."""
    found = (cluster.state_dir / "node-agent" / "pods").glob(
        f"{namespace}_{NAME}-train-{index}-*/trainer.log"
    )
    return [log.read_text() for log in sorted(found, key=lambda log: log.stat().st_mtime)]


def test_two_pods_rendezvous_and_train_as_one(
    operator: Process, crds: Cluster, namespace: str, tiny_volumes: dict[str, Path]
) -> None:
    crds.apply(two_pod_manifest(namespace))
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
    if crds.local:
        (first,) = _pod_logs(crds, namespace, 0)
        assert f"starting 1 worker processes on each of {PODS} pods" in first
        assert "step 120/120" in first
        (second,) = _pod_logs(crds, namespace, 1)
        assert "step " not in second  # rank 0 alone reports


def test_a_killed_pod_is_replaced_and_the_gang_resumes_from_its_checkpoint(
    operator: Process, crds: Cluster, namespace: str, tiny_volumes: dict[str, Path]
) -> None:
    if not crds.local:
        pytest.skip("kills the trainer processes through the local node agent")
    steps, interval = 600, 20
    crds.apply(two_pod_manifest(namespace, maxSteps=steps, checkpointSteps=interval))
    checkpoints = tiny_volumes["deeptune-output"] / NAME / "checkpoints"
    wait_for(
        "the second complete checkpoint",
        (checkpoints / f"checkpoint-{2 * interval}" / COMPLETE_MARKER).is_file,
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
