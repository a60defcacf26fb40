"""GitOps: a FineTuneJob applied from git stays in sync after the operator has worked on it.

Argo CD (and `kubectl apply`) report drift when live fields they manage differ from git. The operator
must therefore write only `status` and its own `deeptune.dev/` bookkeeping in metadata; defaults come
from the CRD schema, which the API server applies to the git manifest as well.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from tests.cluster.harness import Cluster, Process, wait_for
from tests.conftest import ROOT, load_example

pytestmark = pytest.mark.cluster
APPLIER = "argocd-controller"
"""The field manager of Argo CD's server-side apply."""
SERVER_SIDE = ("--server-side", f"--field-manager={APPLIER}", "--force-conflicts")
"""How Argo CD applies with `ServerSideApply=true`: its own manager, taking over conflicting fields."""
INSTANCE_LABEL = "app.kubernetes.io/instance"
TRACKING_ANNOTATION = "argocd.argoproj.io/tracking-id"
OWN_PREFIX = "deeptune.dev/"


def manifest(name: str, namespace: str) -> str:
    """The tiny example as Argo CD applies it: with its tracking label and annotation."""
    obj = load_example("finetune-tiny.yaml")
    obj["metadata"] = {
        "name": name,
        "namespace": namespace,
        "labels": {INSTANCE_LABEL: "finetunejobs"},
        "annotations": {TRACKING_ANNOTATION: f"finetunejobs:deeptune.dev/FineTuneJob:{namespace}/{name}"},
    }
    obj["spec"]["activeDeadlineSeconds"] = 86400  # a mutable field set in git
    return yaml.safe_dump(obj)


def reconciled(cluster: Cluster, name: str, namespace: str) -> dict[str, Any]:
    """The object once the operator has created its Job and its status timer has mirrored it."""

    def probe() -> dict[str, Any] | None:
        obj = cluster.get("finetunejob", name, namespace) or {}
        status = obj.get("status") or {}
        ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
        mirrored = ready.get("reason") not in (None, "JobNotCreated")
        seen = status.get("observedGeneration") == obj.get("metadata", {}).get("generation")
        return obj if mirrored and seen and cluster.get("job", f"{name}-train", namespace) else None

    return dict(wait_for(f"the operator to reconcile {name}", probe, timeout=60))


def foreign_fields(cluster: Cluster, name: str, namespace: str, applier: str) -> list[str]:
    """Fields owned by managers other than `applier` outside status and `deeptune.dev/` metadata."""
    shown = cluster.kubectl(
        "get", "finetunejob", name, "-n", namespace, "-o", "json", "--show-managed-fields"
    )
    found = []
    for entry in json.loads(shown.stdout)["metadata"]["managedFields"]:
        if entry["manager"] == applier:
            continue
        who = f"{entry['manager']} ({entry['operation']}, {entry.get('subresource', 'main')})"
        for key, value in entry["fieldsV1"].items():
            if key == "f:status" and entry.get("subresource") == "status":
                continue
            if key != "f:metadata":
                found.append(f"{who}: {key}")
                continue
            for part, owned in value.items():
                names = [n for n in owned if n != "."]
                ours = {
                    "f:annotations": [n for n in names if not n.startswith(f"f:{OWN_PREFIX}")],
                    "f:finalizers": [n for n in names if not n.startswith(f'v:"{OWN_PREFIX}')],
                }
                found += [f"{who}: {part} {n}" for n in ours.get(part, [part])]
    return found


def test_server_side_apply_shows_no_drift_after_the_operator_reconciled(
    operator: Process, crds: Cluster, namespace: str
) -> None:
    text = manifest("synced", namespace)
    crds.kubectl("apply", *SERVER_SIDE, "-f", "-", input=text)
    live = reconciled(crds, "synced", namespace)

    diff = crds.kubectl("diff", *SERVER_SIDE, "-f", "-", input=text, check=False)
    assert (diff.returncode, diff.stdout) == (0, ""), diff.stdout + diff.stderr
    dry_run = crds.kubectl("apply", *SERVER_SIDE, "--dry-run=server", "-o", "yaml", "-f", "-", input=text)
    predicted = yaml.safe_load(dry_run.stdout)
    assert predicted["spec"] == live["spec"]
    assert predicted["metadata"]["generation"] == live["metadata"]["generation"] == 1

    assert foreign_fields(crds, "synced", namespace, APPLIER) == []
    bookkeeping = [key for key in live["metadata"].get("annotations") or {} if key.startswith(OWN_PREFIX)]
    assert bookkeeping == [], "the operator writes status only: kopf keeps no state on the object"


def test_the_checks_catch_a_controller_that_writes_spec(crds: Cluster, namespace: str) -> None:
    """What the test above would see if the operator defaulted or rewrote a spec field."""
    text = manifest("rewritten", namespace)
    crds.kubectl("apply", *SERVER_SIDE, "-f", "-", input=text)
    rewrite = {"spec": {"backoffLimit": 5, "activeDeadlineSeconds": 7200}}
    crds.kubectl(
        "patch", "finetunejob", "rewritten", "-n", namespace, "--type", "merge",
        "--field-manager=rogue-controller", "-p", json.dumps(rewrite),
    )  # fmt: skip
    diff = crds.kubectl("diff", *SERVER_SIDE, "-f", "-", input=text, check=False)
    # Server-side diffs compare only the fields git sets: a rewritten default (backoffLimit) shows only
    # in managedFields, a rewritten field from git (activeDeadlineSeconds) in the diff as well.
    assert diff.returncode == 1 and "activeDeadlineSeconds: 7200" in diff.stdout
    changed = [
        line for line in diff.stdout.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]
    # (kopf's last-handled annotation, which holds the whole spec, may change too: not a spec line)
    assert not [line for line in changed if re.match(r"[+-]\s+backoffLimit:", line)]
    assert foreign_fields(crds, "rewritten", namespace, APPLIER) == [
        "rogue-controller (Update, main): f:spec"
    ]


def test_kubectl_apply_twice_is_unchanged(operator: Process, crds: Cluster, namespace: str) -> None:
    text = manifest("applied", namespace)
    crds.kubectl("apply", "-f", "-", input=text)
    reconciled(crds, "applied", namespace)

    again = crds.kubectl("apply", "-f", "-", input=text)
    assert again.stdout.strip() == "finetunejob.deeptune.dev/applied unchanged"
    diff = crds.kubectl("diff", "-f", "-", input=text, check=False)
    assert (diff.returncode, diff.stdout) == (0, ""), diff.stdout + diff.stderr
    assert foreign_fields(crds, "applied", namespace, "kubectl-client-side-apply") == []


def test_children_do_not_carry_argo_cd_tracking(operator: Process, crds: Cluster, namespace: str) -> None:
    """A child with the Application's tracking label or annotation would be listed as the
    Application's own resource, shown out of sync and pruned; Argo CD finds children by owner."""
    crds.kubectl("apply", *SERVER_SIDE, "-f", "-", input=manifest("owned", namespace))
    reconciled(crds, "owned", namespace)
    for kind, child in (("job", "owned-train"), ("configmap", "owned-config")):
        meta = (crds.get(kind, child, namespace) or {})["metadata"]
        assert INSTANCE_LABEL not in meta.get("labels", {}), kind
        assert TRACKING_ANNOTATION not in meta.get("annotations", {}), kind
        assert meta["ownerReferences"][0]["name"] == "owned"


def test_the_argocd_cm_snippet_merges_into_an_existing_config_map(crds: Cluster, namespace: str) -> None:
    crds.kubectl(
        "create", "configmap", "argocd-cm", "-n", namespace, "--from-literal=url=https://argocd.example"
    )
    crds.kubectl(
        "patch", "configmap", "argocd-cm", "-n", namespace, "--type", "merge",
        "--patch-file", str(ROOT / "deploy" / "argocd" / "argocd-cm.yaml"),
    )  # fmt: skip
    data = (crds.get("configmap", "argocd-cm", namespace) or {})["data"]
    assert data["url"] == "https://argocd.example"
    for kind in ("FineTuneJob", "ModelDeployment"):
        lua = (ROOT / "deploy" / "argocd" / "health" / f"{kind.lower()}.lua").read_text()
        assert data[f"resource.customizations.health.deeptune.dev_{kind}"] == lua
