"""Secrets stay in their Secret: a hub token given by reference appears nowhere the operator writes.

A FineTuneJob (the tiny example, run to the end) and a ModelDeployment take a token from a Secret
with a distinctive random value, through `baseModel.tokenSecretRef` and through an `env` entry's
`valueFrom.secretKeyRef`. Then every place the operator and its workloads write is searched for the
value, plain and base64-encoded: ConfigMaps, Events, the custom resources (status and annotations),
the Job, Deployment and pods (env only by `valueFrom.secretKeyRef`, never a `value`), the operator's
log and the trainer's logs.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.cluster import harness
from tests.cluster.harness import Cluster, Process, finetunejob, modeldeployment, wait_for
from tests.cluster.real_node import Placement
from tests.conftest import ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.trainer]

SECRET = "hub-token"
TOKEN_VARIABLES = {"HF_TOKEN", "WANDB_API_KEY"}
"""The container variables that carry the Secret's value: the hub token the operator adds for
`tokenSecretRef`, and the user's own `env` entry."""


@pytest.fixture(scope="module")
def token() -> str:
    return f"dt-leak-canary-{secrets.token_hex(16)}"


def forms(token: str) -> list[str]:
    """The token as it could leak: as is, and base64-encoded (how Secrets and binary data carry it)."""
    return [token, base64.b64encode(token.encode()).decode()]


def secret_ref(key: str = "token") -> dict[str, Any]:
    return {"secretKeyRef": {"name": SECRET, "key": key}}


@pytest.fixture
def with_secret(crds: Cluster, namespace: str, token: str) -> Iterator[str]:
    crds.kubectl("create", "secret", "generic", SECRET, "-n", namespace, f"--from-literal=token={token}")
    yield namespace


def tiny_job(namespace: str) -> dict[str, Any]:
    manifest = yaml.safe_load((ROOT / "examples" / "finetune-tiny.yaml").read_text())
    spec = manifest["spec"]
    spec["baseModel"]["tokenSecretRef"] = {"name": SECRET}
    spec["env"] = [{"name": "WANDB_API_KEY", "valueFrom": secret_ref()}]
    return finetunejob(manifest["metadata"]["name"], namespace, spec)


def deployment_spec() -> dict[str, Any]:
    """An adapter on a hub model that needs the token; no replicas, so nothing tries to download it."""
    return {
        "model": {
            "adapter": {
                "baseModel": {"name": "deepseek-ai/deepseek-llm-7b-base", "tokenSecretRef": {"name": SECRET}},
                "adapter": {"pvc": {"claimName": "deeptune-output", "path": "tiny-keywords/adapter"}},
            }
        },
        "replicas": 0,
        "resources": {"gpu": 0},
        "env": [{"name": "WANDB_API_KEY", "valueFrom": secret_ref()}],
    }


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


def token_env(workload: dict[str, Any]) -> list[dict[str, Any]]:
    """The env entries that carry the token, in a Job's or Deployment's pod template (or a pod)."""
    spec = workload["spec"].get("template", {}).get("spec", workload["spec"])
    return [var for c in containers(spec) for var in c.get("env", []) if var["name"] in TOKEN_VARIABLES]


def leaks(where: str, text: str, token: str) -> list[str]:
    return [
        f"{where} holds the token{' (base64)' if form != token else ''}"
        for form in forms(token)
        if form in text
    ]


def objects(cluster: Cluster, kind: str, namespace: str) -> list[dict[str, Any]]:
    return cluster.list(kind, namespace)


def trainer_logs(cluster: Cluster, namespace: str, finetunejob: str) -> dict[str, str]:
    """What each container of the run's pods wrote, read as a user reads it (`kubectl logs`)."""
    logs = {}
    for pod in cluster.list("pods", namespace, f"deeptune.dev/finetunejob={finetunejob}"):
        pod_name = pod["metadata"]["name"]
        for container in containers(pod["spec"]):
            read = cluster.kubectl("logs", "-n", namespace, pod_name, "-c", container["name"])
            logs[f"{pod_name}/{container['name']}"] = read.stdout
    return logs


def test_a_referenced_token_is_never_copied(
    operator: Process, crds: Cluster, with_secret: str, token: str, placement: Placement
) -> None:
    namespace = with_secret
    dirs = harness.provision_claims(crds, namespace, harness.TINY_CLAIMS)
    harness.seed_tiny_volumes(dirs)
    placement.claims(dirs)
    job = placement.finetunejob(tiny_job(namespace))
    crds.apply(job)
    crds.apply(modeldeployment("served", namespace, deployment_spec()))
    name = job["metadata"]["name"]
    final = wait_for(
        "the tiny run to finish",
        lambda: (
            (s := (crds.get("finetunejob", name, namespace) or {}).get("status") or {}).get("phase")
            in ("Succeeded", "Failed")
            and s
        ),
        timeout=600,
    )
    assert final["phase"] == "Succeeded", final  # the token reached the trainer, and it ran
    wait_for("the serving Deployment", lambda: crds.list("deployments", namespace), timeout=60)

    # The workloads take the token by reference, and only so.
    for kind in ("jobs", "deployments", "pods"):
        for workload in objects(crds, kind, namespace):
            carried = token_env(workload)
            if kind != "pods" or workload["metadata"]["labels"].get("deeptune.dev/finetunejob"):
                assert {var["name"] for var in carried} == TOKEN_VARIABLES, (kind, carried)
            for var in carried:
                assert "value" not in var and var["valueFrom"] == secret_ref(), (kind, var)

    secret = crds.get("secret", SECRET, namespace)
    assert leaks("the Secret", json.dumps(secret), token), "the search cannot find the token where it is"
    found: list[str] = []
    for kind in ("configmaps", "events", "finetunejobs", "modeldeployments", "jobs", "deployments", "pods"):
        for obj in objects(crds, kind, namespace):
            found += leaks(f"{kind}/{obj['metadata']['name']}", json.dumps(obj), token)
    found += leaks("the operator's log", (crds.state_dir / "operator.log").read_text(errors="replace"), token)
    logs = trainer_logs(crds, namespace, name)
    assert any(logs.values()), f"the trainer wrote no log: {logs}"
    for container, log in logs.items():
        found += leaks(f"the log of {container}", log, token)
    assert found == []
