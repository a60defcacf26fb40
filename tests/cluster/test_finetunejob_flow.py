"""FineTuneJob through the real control plane: operator, Job controller, scheduler. No node takes these
runs' pods (they stay Pending): what is tested here is the operator's part, which needs none."""

from __future__ import annotations

import copy
import json
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.harness import Cluster, Process, finetunejob, wait_for
from tests.unit.test_finetunejob_model import MINIMAL

pytestmark = pytest.mark.cluster


def status_of(cluster: Cluster, name: str, namespace: str) -> dict[str, Any]:
    return (cluster.get("finetunejob", name, namespace) or {}).get("status") or {}


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


def events_for(cluster: Cluster, name: str, namespace: str) -> list[dict[str, Any]]:
    selector = f"involvedObject.kind=FineTuneJob,involvedObject.name={name}"
    result = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", selector, "-o", "json")
    return list(json.loads(result.stdout)["items"])


def test_invalid_spec_is_reported_without_children(operator: Process, crds: Cluster, namespace: str) -> None:
    spec = copy.deepcopy(MINIMAL)
    spec["lora"] = {"targetModules": ["auto", "q_proj"]}  # only the model can tell this is wrong
    crds.apply(finetunejob("invalid", namespace, spec))
    status = wait_for(
        "InvalidSpec", lambda: (s := status_of(crds, "invalid", namespace)).get("phase") == "Failed" and s, 60
    )
    failed = condition(status, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert (
        failed["message"] == "spec.lora: targetModules: `auto` cannot be combined with explicit module names"
    )
    assert crds.list("jobs", namespace) == []
    warnings = wait_for(
        "a Warning event",
        lambda: [e for e in events_for(crds, "invalid", namespace) if e["type"] == "Warning"],
        30,
    )
    assert warnings[0]["reason"] == "InvalidSpec"


def test_a_job_the_api_server_refuses_is_an_invalid_spec_with_no_children(
    operator: Process, crds: Cluster, namespace: str
) -> None:
    spec = copy.deepcopy(MINIMAL)
    spec["resources"] = {"nodeSelector": {"not a label key!": "yes"}}  # the CRD cannot tell; the Job can
    crds.apply(finetunejob("refused", namespace, spec))
    status = wait_for(
        "InvalidSpec", lambda: (s := status_of(crds, "refused", namespace)).get("phase") == "Failed" and s, 60
    )
    message = condition(status, "Failed")["message"]
    assert message.startswith('the API server rejected a child: Job.batch "refused-train" is invalid')
    assert "nodeSelector" in message
    assert (
        crds.list("jobs", namespace) == []
        and crds.list("configmaps", namespace, "deeptune.dev/finetunejob") == []
    )


def test_suspend_and_resume(operator: Process, crds: Cluster, namespace: str) -> None:
    spec = copy.deepcopy(MINIMAL)
    spec["suspend"] = True
    crds.apply(finetunejob("paused", namespace, spec))
    wait_for("phase Suspended", lambda: status_of(crds, "paused", namespace).get("phase") == "Suspended", 60)
    job = crds.get("job", "paused-train", namespace)
    assert job is not None and job["spec"]["suspend"] is True
    assert crds.list("pods", namespace) == []

    crds.kubectl(
        "patch", "ftj", "paused", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    wait_for(
        "the Job to resume",
        lambda: (crds.get("job", "paused-train", namespace) or {}).get("spec", {}).get("suspend") is False,
        60,
    )
    wait_for("a trainer pod", lambda: crds.list("pods", namespace), 60)
    status = wait_for(
        "phase to leave Suspended",
        lambda: (s := status_of(crds, "paused", namespace)).get("phase") != "Suspended" and s,
        60,
    )
    assert condition(status, "Suspended")["status"] == "False"


def test_children_are_garbage_collected(operator: Process, crds: Cluster, namespace: str) -> None:
    crds.apply(finetunejob("doomed", namespace, MINIMAL))
    job = wait_for("the Job", lambda: crds.get("job", "doomed-train", namespace), 60)
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("FineTuneJob", "doomed", True)
    config = crds.get("configmap", "doomed-config", namespace)
    assert config is not None and "HF_TOKEN" not in json.dumps(config)
    crds.kubectl("delete", "ftj", "doomed", "-n", namespace)
    wait_for(
        "the Job and ConfigMap to be garbage-collected",
        lambda: (
            crds.get("job", "doomed-train", namespace) is None
            and crds.get("configmap", "doomed-config", namespace) is None
        ),
        60,
    )


def test_a_child_the_api_server_rejects_is_reported_not_retried(
    operator: Process, crds: Cluster, namespace: str
) -> None:
    spec = copy.deepcopy(MINIMAL)
    spec["resources"] = {"nodeSelector": {"not a label key!": "x"}}  # valid YAML, invalid pod spec
    crds.apply(finetunejob("rejected", namespace, spec))
    status = wait_for(
        "InvalidSpec",
        lambda: (s := status_of(crds, "rejected", namespace)).get("phase") == "Failed" and s,
        60,
    )
    failed = condition(status, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith("the API server rejected a child: Job.batch")
    assert "nodeSelector" in failed["message"]
    assert crds.list("jobs", namespace) == []


def test_operator_serves_its_metrics_and_liveness(operator: Process, crds: Cluster, namespace: str) -> None:
    crds.apply(finetunejob("counted", namespace, MINIMAL))
    wait_for("the Job", lambda: crds.get("job", "counted-train", namespace), 60)

    def get(port: str, path: str) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{operator.ports[port]}{path}", timeout=5) as page:
                return str(page.read().decode())
        except OSError:  # not listening yet
            return ""

    def scrape() -> str:
        return get("metrics", "/metrics")

    page = wait_for(
        "a counted status write", lambda: "deeptune_operator_status_writes_total" in scrape() and scrape(), 30
    )
    families = {f.name: f for f in text_string_to_metric_families(page)}
    reconciles = {
        s.labels["handler"]: s.value
        for s in families["deeptune_operator_reconciles"].samples
        if s.name.endswith("_total") and s.labels["result"] == "ok"
    }
    assert reconciles["reconcile"] >= 1
    phases = {s.labels["phase"]: s.value for s in families["deeptune_operator_objects"].samples}
    assert sum(phases.values()) >= 1
    assert families["deeptune_operator_leader"].samples[0].value == 1
    health = json.loads(wait_for("the liveness endpoint", lambda: get("liveness", "/healthz"), 30))
    report = health["operator"]
    assert report["leading"] is True and report["identity"] == "operator-0"
    kinds = {"FineTuneJob", "ModelDeployment", "FineTuneSweep", "FederatedFineTune"}
    assert {c["kind"] for c in report["controllers"]} == kinds
    assert all(c["healthy"] for c in report["controllers"])
