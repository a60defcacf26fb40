"""The faults issue 12 found in the old reconcile path, each on the real API server: a finished run
trained again or its outcome erased by a TTL, a Job deleted while Pending never made again, spec
fields accepted and ignored, a foreign Job of our name reported as "being created" forever, serving
children deleted or edited by hand left so. And every transition reaching status with the periodic
resync off (the old index functions queued a visit before kopf stored the change)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.cluster import harness
from tests.cluster.harness import Cluster, Process, finetunejob, modeldeployment, wait_for
from tests.cluster.test_faults import UidWatch
from tests.cluster.test_finetunejob_training import tiny_manifest
from tests.unit.test_finetunejob_model import MINIMAL

pytestmark = pytest.mark.cluster
FTJ_LABEL = "deeptune.dev/finetunejob"
NOWHERE = {"resources": {"gpu": 0, "nodeSelector": {"deeptune.dev/test-pool": "none"}}}
"""A spec whose pod no node takes: the run stays Pending for as long as a test needs."""


@pytest.fixture(scope="module")
def no_resync_operator(crds: Cluster) -> Iterator[Process]:
    """The operator with its periodic resync an hour apart: whatever reaches status in these tests
    got there from the watch event that announced it, not from a later pass."""
    process = harness.start_operator(crds, status_interval=3600)
    yield process
    process.stop()


def status_of(cluster: Cluster, name: str, namespace: str, kind: str = "finetunejob") -> dict[str, Any]:
    return (cluster.get(kind, name, namespace) or {}).get("status") or {}


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def nowhere(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return finetunejob(name, namespace, {**MINIMAL, **NOWHERE, **spec})


def test_a_job_deleted_while_pending_is_made_again(
    no_resync_operator: Process, crds: Cluster, namespace: str
) -> None:
    """Fault 3 (the status stayed JobNotCreated until a restart), with no resync to cover for it."""
    jobs = UidWatch(crds, "jobs", namespace, FTJ_LABEL)
    try:
        crds.apply(nowhere("waits", namespace))
        first = wait_for("the Job", lambda: crds.get("job", "waits-train", namespace), 60)
        wait_for("Pending", lambda: status_of(crds, "waits", namespace).get("phase") == "Pending", 30)
        crds.kubectl("delete", "job", "waits-train", "-n", namespace, "--wait=false")

        def recreated() -> bool:
            job = crds.get("job", "waits-train", namespace)
            return bool(job and job["metadata"]["uid"] != first["metadata"]["uid"])

        wait_for("a new Job", recreated, 60, interval=0.5)
        assert len(jobs.uids()) == 2
    finally:
        jobs.stop()


def test_suspend_and_backoff_limit_reach_the_job_and_the_rest_is_immutable(
    no_resync_operator: Process, crds: Cluster, namespace: str
) -> None:
    """Fault 4: env, image, imagePullPolicy, imagePullSecrets, earlyStopping and backoffLimit were
    mutable and ignored. backoffLimit now reaches the Job; the others are refused by the API server."""
    crds.apply(nowhere("tuned", namespace))
    wait_for("the Job", lambda: crds.get("job", "tuned-train", namespace), 60)
    crds.kubectl("patch", "ftj", "tuned", "-n", namespace, "--type=merge", "-p",
                 json.dumps({"spec": {"backoffLimit": 9, "suspend": True}}))  # fmt: skip

    def job_spec() -> dict[str, Any]:
        return dict((crds.get("job", "tuned-train", namespace) or {}).get("spec") or {})

    wait_for(
        "backoffLimit and suspend on the Job",
        lambda: job_spec().get("backoffLimit") == 9 and job_spec().get("suspend"),
        30,
    )
    wait_for("Suspended", lambda: status_of(crds, "tuned", namespace).get("phase") == "Suspended", 30)
    for change in (
        {"env": [{"name": "A", "value": "b"}]},
        {"image": "example.com/other:1"},
        {"imagePullPolicy": "Always"},
        {"imagePullSecrets": [{"name": "regcred"}]},
        {"earlyStopping": {"patience": 2}},
    ):
        refused = crds.kubectl("patch", "ftj", "tuned", "-n", namespace, "--type=merge", "-p",
                               json.dumps({"spec": change}), check=False)  # fmt: skip
        field = next(iter(change))
        assert refused.returncode != 0, f"{field} changed after creation"
        assert f"{field} is immutable" in refused.stderr, refused.stderr


def test_a_job_of_our_name_that_is_not_ours_is_reported_and_then_replaced(
    no_resync_operator: Process, crds: Cluster, namespace: str
) -> None:
    """Fault 5: status said "the trainer Job is being created" forever."""
    foreign = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "taken-train", "namespace": namespace},
        "spec": {
            "suspend": True,
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}
            },
        },
    }
    crds.apply(foreign)
    crds.apply(nowhere("taken", namespace))

    def conflict() -> dict[str, Any]:
        ready = condition(status_of(crds, "taken", namespace), "Ready")
        return ready if ready.get("reason") == "JobConflict" else {}

    ready = wait_for("JobConflict", conflict, 30)
    assert "not ours" in ready["message"] and "taken-train" in ready["message"]
    reasons = [e["reason"] for e in harness.events_for(crds, "FineTuneJob", "taken", namespace)]
    assert reasons.count("JobConflict") == 1
    crds.kubectl("delete", "job", "taken-train", "-n", namespace, "--wait=true")

    def ours() -> bool:
        job = crds.get("job", "taken-train", namespace) or {}
        return any(
            ref.get("kind") == "FineTuneJob" for ref in job.get("metadata", {}).get("ownerReferences") or []
        )

    wait_for("the operator's own Job", ours, 60)


def test_a_short_ttl_cannot_erase_or_repeat_a_finished_run(
    no_resync_operator: Process,
    crds: Cluster,
    namespace: str,
    trainer_pods: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    """Faults 1 and 2: with ttlSecondsAfterFinished 0 the Job (and the pod holding the trainer's
    summary) could go before the outcome reached status: the run was trained again, or Succeeded
    with no output, and a failure's reason became JobRemoved."""
    jobs = UidWatch(crds, "jobs", namespace, FTJ_LABEL)
    try:
        manifest = tiny_manifest(namespace, maxSteps=20)
        manifest["spec"]["ttlSecondsAfterFinished"] = 0
        crds.apply(trainer_pods(manifest))
        name = manifest["metadata"]["name"]
        final = wait_for(
            "Succeeded",
            lambda: (s := status_of(crds, name, namespace)).get("phase") == "Succeeded" and s,
            300,
        )
        assert final["output"]["adapterPath"] == "adapter" and final["evalResults"]["fineTuned"]
        wait_for("the TTL to remove the Job", lambda: crds.get("job", f"{name}-train", namespace) is None, 60)
        assert condition(status_of(crds, name, namespace), "Ready")["reason"] == "Succeeded"
        assert len(jobs.uids()) == 1, "trained once"

        broken = tiny_manifest(namespace, maxSteps=20)
        broken["metadata"]["name"] = "broken"
        broken["spec"]["ttlSecondsAfterFinished"] = 0
        broken["spec"]["dataset"]["source"]["pvc"]["path"] = "missing.jsonl"
        crds.apply(trainer_pods(broken))
        wait_for("Failed", lambda: status_of(crds, "broken", namespace).get("phase") == "Failed", 300)
        wait_for("the TTL to remove the Job", lambda: crds.get("job", "broken-train", namespace) is None, 60)
        after = status_of(crds, "broken", namespace)
        assert condition(after, "Failed")["reason"] == after["lastFailure"]["reason"] == "DatasetNotFound"
        assert "missing.jsonl" in condition(after, "Failed")["message"]
    finally:
        jobs.stop()


def test_serving_children_deleted_or_edited_by_hand_are_put_back(
    no_resync_operator: Process, crds: Cluster, namespace: str
) -> None:
    """Fault 12: only a deleted Deployment was re-applied."""
    spec = {
        "model": {"merged": {"pvc": {"claimName": "nowhere", "path": "m"}}},
        "resources": {"gpu": 0, "nodeSelector": {"deeptune.dev/test-pool": "none"}},
        "autoscaling": {"enabled": True, "maxReplicas": 2},
    }
    crds.apply(modeldeployment("srv", namespace, spec))
    original = wait_for("the Deployment", lambda: crds.get("deployment", "srv-triton", namespace), 60)
    wait_for("the HPA", lambda: crds.get("hpa", "srv-triton", namespace), 30)
    for kind, name in (("service", "srv-triton"), ("configmap", "srv-repository"), ("hpa", "srv-triton")):
        crds.kubectl("delete", kind, name, "-n", namespace, "--wait=true")
        wait_for(
            f"the {kind} back", lambda kind=kind, name=name: crds.get(kind, name, namespace), 30, interval=0.5
        )
    image = original["spec"]["template"]["spec"]["containers"][0]["image"]
    crds.kubectl("set", "image", "deployment/srv-triton", "triton=example.com/edited:1", "-n", namespace)

    def restored() -> bool:
        deployment = crds.get("deployment", "srv-triton", namespace) or {}
        return bool(deployment["spec"]["template"]["spec"]["containers"][0]["image"] == image)

    wait_for("the Deployment's image back", restored, 30, interval=0.5)
