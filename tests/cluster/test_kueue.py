"""FineTuneJobs queued by a real Kueue: its controller manager (built from sigs.k8s.io/kueue, run by
tests/localcluster/kueue.sh) admits Jobs against a ClusterQueue's quota of one GPU. The second run
waits, Pending/Queued, while the first trains, and starts when the first ends; Kueue alone moves a
queued Job's `suspend`, never the operator. On the local cluster the runs are the trainer image's on
the real node, whose status advertises GPUs (node.sh's DEEPTUNE_NODE_GPUS): no device reaches the
pods, and the trainer runs on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.harness import LOCALCLUSTER, Cluster, Process, log_tails, wait_for
from tests.cluster.test_finetunejob_training import tiny_manifest

pytestmark = [pytest.mark.cluster, pytest.mark.trainer]
KUEUE_SH = LOCALCLUSTER / "kueue.sh"
QUEUE = "training"
FIRST, SECOND = "first", "second"


def _kueue_sh(cluster: Cluster, command: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEEPTUNE_CLUSTER_DIR": str(cluster.state_dir)}
    return subprocess.run(
        ["bash", str(KUEUE_SH), command], check=False, env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def kueue(crds: Cluster) -> Iterator[Cluster]:
    """Kueue running against the cluster for this module: built (once, like the control plane's
    binaries) and started by kueue.sh, and stopped again at the end with its webhooks, so that the
    rest of the suite sees a cluster without Kueue (one that already ran Kueue, reused through
    DEEPTUNE_CLUSTER_DIR, keeps it). On another cluster (DEEPTUNE_TEST_KUBECONFIG), that cluster's
    Kueue."""
    if not crds.local:
        if crds.kubectl("get", "crd", "clusterqueues.kueue.x-k8s.io", check=False).returncode != 0:
            pytest.skip("KUEUE NOT TESTED: the cluster in DEEPTUNE_TEST_KUBECONFIG has no Kueue installed")
        yield crds
        return
    build = _kueue_sh(crds, "build")
    if build.returncode != 0:
        pytest.skip(
            "KUEUE NOT TESTED: Kueue's controller manager could not be built from its Go module "
            f"(tests/localcluster/kueue.sh build; needs Go and the module proxy):\n{build.stderr[-3000:]}"
        )
    if _kueue_sh(crds, "status").returncode == 0:
        yield crds
        return
    start = _kueue_sh(crds, "start")
    try:
        if start.returncode != 0:
            pytest.fail(
                f"Kueue was built but did not start (kueue.sh start):\n{start.stderr[-3000:]}"
                f"{log_tails([crds.state_dir / 'kueue.log'])}"
            )
        yield crds
    finally:
        _kueue_sh(crds, "stop")


def _queue(cluster: Cluster, namespace: str) -> str:
    """A ResourceFlavor, a ClusterQueue with a quota of one GPU (and room for everything else the
    trainer pod asks for: Kueue admits only what its ClusterQueue covers) for this namespace alone,
    and the LocalQueue QUEUE in it. Returns the ClusterQueue's name."""
    name = f"gpus-{namespace}"
    items = [
        {
            "apiVersion": "kueue.x-k8s.io/v1beta1",
            "kind": "ResourceFlavor",
            "metadata": {"name": name},
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta1",
            "kind": "ClusterQueue",
            "metadata": {"name": name},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": name,
                                "resources": [
                                    {"name": "cpu", "nominalQuota": "16"},
                                    {"name": "memory", "nominalQuota": "64Gi"},
                                    {"name": "nvidia.com/gpu", "nominalQuota": "1"},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta1",
            "kind": "LocalQueue",
            "metadata": {"name": QUEUE, "namespace": namespace},
            "spec": {"clusterQueue": name},
        },
    ]
    cluster.apply({"apiVersion": "v1", "kind": "List", "items": items})
    active = "jsonpath={.status.conditions[?(@.type=='Active')].status}"
    wait_for(
        f"ClusterQueue {name} to be active",
        lambda: cluster.kubectl("get", "clusterqueue", name, "-o", active, check=False).stdout == "True",
        60,
    )
    return name


def _manifest(namespace: str, name: str) -> dict[str, Any]:
    """examples/finetune-tiny.yaml as a short run on one GPU, queued in QUEUE."""
    manifest = tiny_manifest(namespace, maxSteps=10, checkpointSteps=10, loggingSteps=5)
    manifest["metadata"]["name"] = name
    spec = manifest["spec"]
    spec["queueName"] = QUEUE
    spec["resources"]["gpu"] = 1  # what the ClusterQueue counts; the trainer still runs on CPU here
    spec["evaluation"] = {"metrics": ["exactMatch"], "baseline": False, "maxSamples": 4}
    spec["output"]["pvc"]["path"] = name
    return manifest


def _ended(job: dict[str, Any]) -> bool:
    """Whether the Job's pod has finished (Kueue may reclaim its quota before the Job completes)."""
    status = job.get("status", {})
    return bool(status.get("succeeded") or status.get("failed") or status.get("completionTime")) or any(
        c["type"] in ("Complete", "Failed", "SuccessCriteriaMet", "FailureTarget") and c["status"] == "True"
        for c in status.get("conditions") or []
    )


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def _status(cluster: Cluster, name: str, namespace: str) -> dict[str, Any]:
    return (cluster.get("finetunejob", name, namespace) or {}).get("status") or {}


def _job(cluster: Cluster, name: str, namespace: str) -> dict[str, Any]:
    """The run's Job with its managedFields (which `kubectl get` leaves out by default); {} if none."""
    result = cluster.kubectl(
        "get", "job", f"{name}-train", "-n", namespace, "-o", "json", "--show-managed-fields", check=False
    )
    return json.loads(result.stdout) if result.returncode == 0 else {}


def _suspend_writers(job: dict[str, Any]) -> set[str]:
    """The field managers that own the Job's spec.suspend."""
    return {
        entry["manager"]
        for entry in job["metadata"].get("managedFields") or []
        if "f:suspend" in (entry.get("fieldsV1") or {}).get("f:spec", {})
    }


def test_second_run_waits_in_the_queue_until_the_first_ends(
    kueue: Cluster,
    operator: Process,
    namespace: str,
    tiny_volumes: dict[str, Path],
    trainer_pods: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    cluster = kueue
    cluster_queue = _queue(cluster, namespace)
    try:
        _run_two(cluster, operator, namespace, trainer_pods)
    finally:
        cluster.kubectl("delete", "localqueue", QUEUE, "-n", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "clusterqueue,resourceflavor", cluster_queue, "--wait=false", check=False)


def _run_two(
    cluster: Cluster, operator: Process, namespace: str, place: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    """Two one-GPU runs against a quota of one GPU, their pods placed by `place`."""
    cluster.apply(place(_manifest(namespace, FIRST)))
    job = wait_for(
        "Kueue to admit the first run's Job (suspend: false)",
        lambda: (j := _job(cluster, FIRST, namespace)) and j["spec"].get("suspend") is False and j,
        120,
        0.5,
    )
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE

    cluster.apply(place(_manifest(namespace, SECOND)))
    # While the first run holds the one GPU the second waits, Pending/Queued, its Job suspended.
    # Each round reads the second run first: when the first is still training after that, it was
    # training while the second was seen.
    queued: dict[str, Any] = {}
    said: set[str] = set()
    deadline = time.monotonic() + 600
    while True:
        second, second_job = _status(cluster, SECOND, namespace), _job(cluster, SECOND, namespace)
        first, first_job = _status(cluster, FIRST, namespace), _job(cluster, FIRST, namespace)
        if first.get("phase") in ("Succeeded", "Failed"):
            break
        if first.get("phase") == "Running" and not _ended(first_job):
            assert second.get("phase", "Pending") == "Pending", second
            if second_job:
                assert second_job["spec"]["suspend"] is True, (
                    "the second Job ran while the first held the GPU"
                )
            if _condition(second, "Ready").get("reason") == "Queued":
                queued = second
                said.add(_condition(second, "Ready")["message"])
        assert time.monotonic() < deadline, f"the first run did not finish; last status: {first}"
        time.sleep(0.5)
    assert first["phase"] == "Succeeded", first
    assert queued, "never saw the second run Queued while the first ran"
    waiting = _condition(queued, "Ready")
    assert waiting["status"] == "False"
    assert f"LocalQueue {QUEUE}" in waiting["message"], waiting
    # ... and why, in Kueue's words, from the second run's Workload.
    assert any("insufficient" in message and "nvidia.com/gpu" in message for message in said), said

    final = wait_for(
        "the second run to succeed",
        lambda: (s := _status(cluster, SECOND, namespace)).get("phase") in ("Succeeded", "Failed") and s,
        600,
        0.5,
    )
    assert final["phase"] == "Succeeded", final

    first_job, second_job = _job(cluster, FIRST, namespace), _job(cluster, SECOND, namespace)
    (first_pod,) = cluster.list("pods", namespace, f"job-name={FIRST}-train")
    finished = first_pod["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"]
    assert second_job["status"]["startTime"] >= finished, "the second run started before the first ended"
    for job in (first_job, second_job):
        name = job["metadata"]["name"]
        # Made suspended by the operator, unsuspended once by Kueue, never touched again: one spec
        # change after creation, and spec.suspend is Kueue's alone.
        assert job["metadata"]["generation"] == 2, (name, job["metadata"]["generation"])
        writers = _suspend_writers(job)
        assert writers and all(w.startswith("kueue") for w in writers), (name, writers)
    log = operator.log.read_text()
    assert f"patched Job {namespace}/" not in log, "the operator patched a queued Job"

    workloads = cluster.list("workloads.kueue.x-k8s.io", namespace)
    assert len(workloads) == 2
    assert all(_condition(w["status"], "Finished").get("status") == "True" for w in workloads)
