"""Autoscaling on the LLM's load with KEDA, against KEDA's own CRD.

KEDA's ScaledObject CRD comes from its Go module (tests/localcluster/keda_crds.sh), so the API server
checks what the operator writes with KEDA's schema and validation rules. KEDA's operator does not run
here: what it would do with a valid ScaledObject is KEDA's to test. Without the CRD the ModelDeployment
is told so in an Event; with it, the ScaledObject replaces the HPA, follows the spec, and goes when
autoscaling goes back to CPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.harness import Cluster, Process, events_for, keda_crd, modeldeployment, wait_for

pytestmark = pytest.mark.cluster
NAME = "scaled"
PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"
WAKE_UP = 'sum(rate(gateway_requests_total{route="scaled"}[1m]))'


def _spec(autoscaling: dict[str, Any]) -> dict[str, Any]:
    """A CPU deployment (the Python backend) of a model that need not exist: only children are looked at."""
    return {
        "model": {"merged": {"pvc": {"claimName": "models", "path": "none"}}},
        "resources": {"gpu": 0},
        "autoscaling": autoscaling,
    }


@pytest.fixture
def keda(crds: Cluster) -> Iterator[Path]:
    with keda_crd(crds) as crd:
        yield crd


def test_a_scaled_object_replaces_the_hpa_and_keda_missing_is_said(
    operator: Process, crds: Cluster, namespace: str, request: pytest.FixtureRequest
) -> None:
    scaling = {"prometheusAddress": PROMETHEUS, "waitingRequests": 3, "wakeUpQuery": WAKE_UP}
    crds.apply(modeldeployment(NAME, namespace, _spec({"enabled": True, "minReplicas": 0, "keda": scaling})))
    deployment = wait_for("the Deployment", lambda: crds.get("deployment", f"{NAME}-triton", namespace), 60)
    assert "replicas" not in deployment["spec"] or deployment["spec"]["replicas"] == 1  # nothing scales it
    warned = wait_for(
        "an Event saying KEDA is missing",
        lambda: [
            e
            for e in events_for(crds, "ModelDeployment", NAME, namespace)
            if e["reason"] == "KedaUnavailable"
        ],
        60,
    )
    assert "KEDA's ScaledObject kind is not installed" in warned[0]["message"]
    assert crds.get("hpa", f"{NAME}-triton", namespace) is None

    request.getfixturevalue("keda")  # KEDA installed now; a spec change makes the operator apply again
    crds.kubectl(
        "patch",
        "mdep",
        NAME,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"autoscaling": {"maxReplicas": 4}}}',
    )
    scaled = wait_for("the ScaledObject", lambda: crds.get("scaledobject", f"{NAME}-triton", namespace), 60)
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == f"{NAME}-triton"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 4)
    load, wake_up = spec["triggers"]
    assert (
        load["metadata"]["query"]
        == f'sum(deeptune_engine_requests_waiting{{namespace="{namespace}",model="{NAME}"}})'
    )
    assert wake_up["metadata"]["query"] == WAKE_UP
    owner = scaled["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("ModelDeployment", NAME, True)

    back_to_cpu = [
        {"op": "remove", "path": "/spec/autoscaling/keda"},
        {"op": "replace", "path": "/spec/autoscaling/minReplicas", "value": 1},
    ]
    crds.kubectl("patch", "mdep", NAME, "-n", namespace, "--type=json", "-p", json.dumps(back_to_cpu))
    wait_for("the HPA", lambda: crds.get("hpa", f"{NAME}-triton", namespace), 60)
    wait_for(
        "the ScaledObject to go", lambda: crds.get("scaledobject", f"{NAME}-triton", namespace) is None, 60
    )


def test_keda_refuses_what_the_operator_would_not_write(keda: Path, crds: Cluster, namespace: str) -> None:
    """KEDA's own rules hold for a hand-written ScaledObject: the schema the operator's are proved on
    is not a permissive one."""
    bad = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "bad", "namespace": namespace},
        "spec": {"scaleTargetRef": {"name": "x"}, "minReplicaCount": 5, "maxReplicaCount": 2, "triggers": []},
    }
    refused = crds.apply(bad, "--server-side", check=False)
    assert refused.returncode != 0
    assert "minReplicaCount must be less than or equal to maxReplicaCount" in refused.stderr
