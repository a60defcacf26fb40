"""The Helm chart installed into a real control plane, and the operator running with its RBAC only.

There is no image runtime for the operator's pod here, so the releases run the Deployment at
`replicas: 0` and the test runs the operator as a local process that is *the chart's
ServiceAccount*: a kubeconfig holding that account's token, and the exact environment of the
installed Deployment. Whatever the chart forgot to grant fails here as it would in a real cluster.
It serves only a `helm-*` namespace, and checks that it created the Job itself: another operator
serving that namespace (a clusterwide one) would win the race and prove nothing.

The suite's `crds` fixture applies the CRDs with `kubectl apply --server-side`; they belong to no
Helm release, so the releases here install with `crds.install=false` (as the chart's README tells
users who manage CRDs that way), and the chart's CRD template is checked with a server-side dry run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import harness
from tests.cluster.harness import Cluster, Process, free_port, log_tails, wait_for
from tests.conftest import ROOT, load_example

pytestmark = pytest.mark.cluster

CHART = ROOT / "charts" / "deeptune"
WATCHED_PREFIX = "helm-"
"""The namespaces the chart's operator serves here; no other operator may serve them (see below)."""


@dataclass
class Release:
    name: str
    namespace: str
    notes: str

    @property
    def fullname(self) -> str:
        return f"{self.name}-deeptune"

    @property
    def user(self) -> str:
        """The chart's ServiceAccount, as `kubectl --as` names it."""
        return f"system:serviceaccount:{self.namespace}:{self.fullname}"

    @property
    def lease(self) -> str:
        """The leader Lease (in the release's namespace), one per release."""
        return self.fullname

    @property
    def lease_role(self) -> str:
        return f"{self.fullname}-leader-election"


def helm(cluster: Cluster, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["helm", "--kubeconfig", str(cluster.kubeconfig), *args],
        input=input,
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
    )
    assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stderr}"
    return result


@contextmanager
def install(cluster: Cluster, namespace: str, values: dict[str, Any]) -> Iterator[Release]:
    """A release with a unique name, uninstalled afterwards (cluster-scoped RBAC included)."""
    name = f"dt-{uuid.uuid4().hex[:6]}"
    # No operator pod: nothing could run its image here, and on a real cluster it would serve the
    # test's FineTuneJobs next to the process this test starts.
    values = {"crds": {"install": False}, "replicas": 0, **values}
    result = helm(
        cluster, "install", name, str(CHART), "-n", namespace, "--values", "-", input=yaml.safe_dump(values)
    )
    release = Release(name, namespace, result.stdout)
    try:
        yield release
    finally:
        helm(cluster, "uninstall", name, "-n", namespace, "--wait", "--timeout", "120s")
        for kind in ("clusterrole", "clusterrolebinding"):
            assert cluster.kubectl("get", kind, release.fullname, check=False).returncode != 0, (
                f"{kind} left over"
            )


def can_i(cluster: Cluster, release: Release, verb: str, resource: str, *where: str) -> bool:
    result = cluster.kubectl("auth", "can-i", verb, resource, "--as", release.user, *where, check=False)
    assert result.stdout.strip() in ("yes", "no"), result.stderr
    return result.stdout.strip() == "yes"


@pytest.fixture
def watched(cluster: Cluster) -> Iterator[str]:
    """A second namespace, the one the namespaced release serves (the release lives in `namespace`)."""
    name = f"{WATCHED_PREFIX}{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def ports() -> dict[str, int]:
    return {"metrics": free_port(), "liveness": free_port()}


@pytest.fixture
def namespaced_release(
    crds: Cluster, namespace: str, watched: str, ports: dict[str, int]
) -> Iterator[Release]:
    values = {
        "watchNamespaces": [watched],
        "statusInterval": 2,
        "trainer": {"image": dict(zip(("repository", "tag"), harness.TRAINER_IMAGE.split(":"), strict=True))},
        # The operator runs as a local process here, so its ports must be free on this machine.
        "metrics": {"port": ports["metrics"]},
        "liveness": {"port": ports["liveness"]},
    }
    with install(crds, namespace, values) as release:
        yield release


def test_install_creates_the_objects(crds: Cluster, namespaced_release: Release, watched: str) -> None:
    release, name, ns = namespaced_release, namespaced_release.fullname, namespaced_release.namespace
    for kind in ("serviceaccount", "deployment", "role", "rolebinding"):
        namespace = watched if kind.startswith("role") else ns
        assert crds.get(kind, name, namespace) is not None, f"{kind} {name} in {namespace}"
    assert crds.get("service", f"{name}-metrics", ns) is not None
    assert crds.get("role", name, ns) is None  # the release's own namespace is not served
    for kind in ("role", "rolebinding"):  # but the leader Lease is there, and only there
        assert crds.get(kind, release.lease_role, ns) is not None, (kind, ns)
        assert crds.get(kind, release.lease_role, watched) is None, (kind, watched)
    for kind in ("clusterrole", "clusterrolebinding"):
        assert crds.kubectl("get", kind, name, check=False).returncode == 0, kind
    status = json.loads(helm(crds, "status", release.name, "-n", ns, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    assert "kubectl get ftj -w" in release.notes and watched in release.notes


def test_service_account_can_do_its_job_and_no_more(
    crds: Cluster, namespaced_release: Release, watched: str
) -> None:
    release = namespaced_release
    assert can_i(crds, release, "create", "jobs.batch", "-n", watched)
    assert can_i(crds, release, "patch", "finetunejobs.deeptune.dev", "--subresource=status", "-n", watched)
    assert can_i(crds, release, "create", "events", "-n", watched)
    assert can_i(crds, release, "watch", "customresourcedefinitions.apiextensions.k8s.io")
    assert can_i(crds, release, "watch", "namespaces")
    assert not can_i(crds, release, "create", "jobs.batch", "-n", release.namespace)  # not served
    assert can_i(crds, release, "delete", "jobs.batch", "-n", watched)  # a failed federation's coordinator
    for where in (["-n", watched], ["-n", release.namespace], ["--all-namespaces"]):
        for verb in ("get", "list", "watch"):
            assert not can_i(crds, release, verb, "secrets", *where), (verb, where)
    assert not can_i(crds, release, "delete", "namespaces")
    assert not can_i(crds, release, "create", "pods", "-n", watched)
    assert not can_i(crds, release, "update", "customresourcedefinitions.apiextensions.k8s.io")
    # The children it watches (kopf indexes), and the result finalizer it removes from trainer pods.
    watched_kinds = (
        "configmaps", "services", "pods", "jobs.batch", "deployments.apps",
        "horizontalpodautoscalers.autoscaling", "networkpolicies.networking.k8s.io",
    )  # fmt: skip
    for resource in watched_kinds:
        for verb in ("list", "watch"):
            assert can_i(crds, release, verb, resource, "-n", watched), (verb, resource)
            assert not can_i(crds, release, verb, resource, "-n", release.namespace), (verb, resource)
    assert can_i(crds, release, "patch", "pods", "-n", watched)
    assert not can_i(crds, release, "update", "pods", "-n", watched)
    # Leader election: its own Lease in the release's namespace, and nothing else of Leases.
    lease, other = f"leases.coordination.k8s.io/{release.lease}", "leases.coordination.k8s.io/kube-scheduler"
    for verb in ("get", "update"):
        assert can_i(crds, release, verb, lease, "-n", release.namespace), verb
        assert not can_i(crds, release, verb, other, "-n", release.namespace), verb
        assert not can_i(crds, release, verb, lease, "-n", watched), verb
        assert not can_i(crds, release, verb, other, "-n", "kube-system"), verb
    assert can_i(crds, release, "create", "leases.coordination.k8s.io", "-n", release.namespace)
    for where in (["-n", watched], ["-n", "kube-system"], ["-n", "kube-node-lease"]):
        assert not can_i(crds, release, "create", "leases.coordination.k8s.io", *where), where
    for verb in ("list", "watch", "patch", "delete", "deletecollection"):
        assert not can_i(crds, release, verb, lease, "-n", release.namespace), verb
        assert not can_i(crds, release, verb, "leases.coordination.k8s.io", "--all-namespaces"), verb


DELETABLE = {
    "horizontalpodautoscalers.autoscaling", "networkpolicies.networking.k8s.io",
    "finetunejobs.deeptune.dev", "jobs.batch",
}  # fmt: skip
"""What the operator deletes itself: a child the spec stopped asking for (ServiceMonitors too, whose
kind is not installed here, so `can-i` cannot say); a deleted FederatedFineTune's sites (FineTuneJobs
in other namespaces, where no owner reference reaches) and a failed one's coordinator Job. The rest
goes by garbage collection."""


@pytest.mark.parametrize("scope", ["watched", "all namespaces"])
def test_service_account_is_no_admin_execs_nothing_and_deletes_only_dropped_children(
    crds: Cluster, namespaced_release: Release, watched: str, scope: str
) -> None:
    release = namespaced_release
    where = ["-n", watched] if scope == "watched" else ["--all-namespaces"]
    assert not can_i(crds, release, "*", "*", *where)  # cluster-admin would say yes
    assert not can_i(crds, release, "*", "*.*", *where)
    for subresource in ("exec", "attach", "portforward"):
        assert not can_i(crds, release, "create", "pods", f"--subresource={subresource}", *where), subresource
    for verb in ("create", "update", "patch", "delete"):
        assert not can_i(crds, release, verb, "secrets", *where), verb
    for verb, resource in (
        ("impersonate", "serviceaccounts"),
        ("escalate", "roles.rbac.authorization.k8s.io"),
        ("bind", "roles.rbac.authorization.k8s.io"),
    ):
        assert not can_i(crds, release, verb, resource, *where), (verb, resource)
    assert not can_i(crds, release, "create", "serviceaccounts", "--subresource=token", *where)
    kept = (
        "modeldeployments.deeptune.dev", "pods", "configmaps", "services", "deployments.apps", "events",
        "persistentvolumeclaims", "leases.coordination.k8s.io",
    )  # fmt: skip
    for resource in kept:
        assert not can_i(crds, release, "delete", resource, *where), resource
        assert not can_i(crds, release, "deletecollection", resource, *where), resource
    for resource in DELETABLE:
        assert can_i(crds, release, "delete", resource, *where) == (scope == "watched"), resource


def test_operator_pod_meets_the_restricted_pod_security_standard(
    crds: Cluster, namespaced_release: Release
) -> None:
    """The Deployment's pod, dry-run created where Pod Security Admission enforces `restricted`."""
    release = namespaced_release
    crds.kubectl("label", "namespace", release.namespace, "pod-security.kubernetes.io/enforce=restricted")
    deployment = crds.get("deployment", release.fullname, release.namespace)
    assert deployment is not None
    template = deployment["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "pss-check",
            "namespace": release.namespace,
            "labels": template["metadata"]["labels"],
        },
        "spec": template["spec"],
    }
    result = crds.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False)
    assert result.returncode == 0, result.stderr
    assert "violate" not in result.stderr, result.stderr  # PodSecurity warnings


def service_account_kubeconfig(cluster: Cluster, release: Release, path: Path) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount (a short-lived token)."""
    token = cluster.kubectl("create", "token", release.fullname, "-n", release.namespace, "--duration=1h")
    view = json.loads(
        cluster.kubectl("config", "view", "--raw", "--minify", "--flatten", "-o", "json").stdout
    )
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": view["clusters"][0]["cluster"]}],
        "users": [{"name": release.fullname, "user": {"token": token.stdout.strip()}}],
        "contexts": [
            {
                "name": "operator",
                "context": {"cluster": "cluster", "user": release.fullname, "namespace": release.namespace},
            }
        ],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def start_chart_operator(cluster: Cluster, release: Release, kubeconfig: Path, log: Path) -> Process:
    """`python -m deeptune` with the installed Deployment's environment, as the chart's ServiceAccount."""
    deployment = cluster.get("deployment", release.fullname, release.namespace)
    assert deployment is not None
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "command" not in container and "args" not in container  # the image's `python -m deeptune`
    # This machine's Python environment, but no Kubernetes credentials or settings of its own.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("KUBE", "DEEPTUNE_"))}
    for item in container["env"]:
        if "valueFrom" in item:  # the downward API: the pod's name is the only one the chart uses
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", item
            env[item["name"]] = pod_name(release)
        else:
            env[item["name"]] = item.get("value", "")  # the API server drops an empty value
    assert env["DEEPTUNE_OPERATOR_IDENTITY"] == pod_name(release)
    env["KUBECONFIG"] = str(kubeconfig)
    return harness.start_process([sys.executable, "-m", "deeptune"], log, env)


def pod_name(release: Release) -> str:
    """The name the operator's pod would have (what the downward API gives the operator)."""
    return f"{release.fullname}-7c9d8f6b5-abcde"


def lease_holder(cluster: Cluster, release: Release) -> str | None:
    lease = cluster.get("lease", release.lease, release.namespace)
    return None if lease is None else (lease.get("spec") or {}).get("holderIdentity")


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except OSError:
        return 0, ""


def test_operator_runs_with_only_the_charts_rbac(
    crds: Cluster, namespaced_release: Release, watched: str, ports: dict[str, int], tmp_path: Path
) -> None:
    release = namespaced_release
    kubeconfig = service_account_kubeconfig(crds, release, tmp_path / "kubeconfig")
    log = tmp_path / "operator.log"
    operator = start_chart_operator(crds, release, kubeconfig, log)
    manifest = load_example("finetune-tiny.yaml")
    manifest["metadata"]["namespace"] = watched
    name = manifest["metadata"]["name"]
    try:
        # The chart's liveness probe, against the process the chart would run.
        wait_for(
            "the liveness endpoint",
            lambda: (
                operator.popen.poll() is None
                and http_get(f"http://127.0.0.1:{ports['liveness']}/healthz")[0] == 200
            ),
            60,
        )
        crds.apply(manifest)
        status = wait_for(
            "the operator to write status",
            lambda: (
                (s := (crds.get("finetunejob", name, watched) or {}).get("status") or {}).get("jobName") and s
            ),
            90,
        )
        assert status["phase"] in ("Pending", "Running", "Succeeded"), status
        assert crds.get("job", status["jobName"], watched) is not None
        # It leads through the Lease its Role allows, under its pod's name.
        assert lease_holder(crds, release) == pod_name(release)
        assert f"created Job {watched}/{status['jobName']}" in log.read_text(), (
            f"another operator created Job {status['jobName']} before the chart's operator could: it serves"
            f" {watched} too. The suite's `operator` fixture must leave {WATCHED_PREFIX}* namespaces to this"
            f" test (start it with DEEPTUNE_WATCH_NAMESPACES='!{WATCHED_PREFIX}*')."
        )
        assert crds.list("configmaps", watched, f"deeptune.dev/finetunejob={name}")
        events = json.loads(
            crds.kubectl(
                "get", "events", "-n", watched, "-o", "json",
                "--field-selector", f"involvedObject.kind=FineTuneJob,involvedObject.name={name}",
            ).stdout
        )["items"]  # fmt: skip
        assert "JobCreated" in {event["reason"] for event in events}
        metrics = http_get(f"http://127.0.0.1:{ports['metrics']}/metrics")[1]
        assert "deeptune_operator_reconciles_total" in metrics
        crds.kubectl("delete", "finetunejob", name, "-n", watched, "--wait=true", "--timeout=60s")
        # The Job and its pods carry the operator's result finalizer: they go only once it removed
        # it with a patch (of the Job, and of each pod).
        wait_for(
            "the operator to release the trainer Job and pods",
            lambda: (
                crds.get("job", status["jobName"], watched) is None
                and not any(
                    "deeptune.dev/result" in (pod["metadata"].get("finalizers") or [])
                    for pod in crds.list("pods", watched, f"job-name={status['jobName']}")
                )
            ),
            60,
        )
        assert operator.popen.poll() is None, "the operator exited"
        text = log.read_text(errors="replace")
        for complaint in ("Forbidden", "forbidden", "Not enough permissions", " 403"):
            assert complaint not in text, complaint
        operator.stop()
        assert operator.popen.returncode == 0, operator.popen.returncode
        # A clean shutdown hands the Lease back (another replica would take over at once).
        assert lease_holder(crds, release) is None
    except AssertionError as error:
        raise AssertionError(f"{error}{log_tails([log])}") from error
    finally:
        operator.stop()


def test_clusterwide_release_grants_cluster_roles(crds: Cluster, namespace: str) -> None:
    with install(crds, namespace, {}) as release:
        name = release.fullname
        roles = crds.list("roles", namespace, f"app.kubernetes.io/instance={release.name}")
        assert [role["metadata"]["name"] for role in roles] == [release.lease_role]  # leader election only
        rules = json.loads(crds.kubectl("get", "clusterrole", name, "-o", "json").stdout)["rules"]
        assert {"jobs", "finetunejobs", "customresourcedefinitions"} <= {
            r for rule in rules for r in rule["resources"]
        }
        assert "namespaces" not in {
            r for rule in rules for r in rule["resources"]
        }  # kopf does not watch them
        assert can_i(crds, release, "create", "jobs.batch", "-n", "default")
        assert can_i(crds, release, "watch", "finetunejobs.deeptune.dev", "--all-namespaces")
        assert not can_i(crds, release, "get", "secrets", "--all-namespaces")
        assert not can_i(crds, release, "delete", "namespaces")
        assert not can_i(crds, release, "create", "clusterrolebindings.rbac.authorization.k8s.io")
        assert not can_i(crds, release, "*", "*", "--all-namespaces")
        assert not can_i(crds, release, "create", "pods", "--subresource=exec", "--all-namespaces")
        for resource in ("deployments.apps", "configmaps", "pods"):
            assert not can_i(crds, release, "delete", resource, "--all-namespaces"), resource
        for resource in ("finetunejobs.deeptune.dev", "jobs.batch"):  # a federation's sites and coordinator
            assert can_i(crds, release, "delete", resource, "--all-namespaces"), resource
        for resource in ("configmaps", "services", "horizontalpodautoscalers.autoscaling"):
            assert can_i(crds, release, "watch", resource, "--all-namespaces"), resource
        assert can_i(crds, release, "patch", "pods", "-n", "default")
        assert can_i(crds, release, "update", f"leases.coordination.k8s.io/{release.lease}", "-n", namespace)
        assert not can_i(crds, release, "create", "leases.coordination.k8s.io", "-n", "default")
        assert not can_i(crds, release, "get", "leases.coordination.k8s.io", "--all-namespaces")


def test_chart_crds_are_accepted_by_the_api_server(crds: Cluster) -> None:
    """The CRD template's output, dry-run applied server-side: valid, and no change to the live CRDs."""
    rendered = subprocess.run(
        ["helm", "template", "dt", str(CHART), "--show-only", "templates/crds.yaml"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = crds.kubectl(
        "apply", "--server-side", "--dry-run=server", "--force-conflicts",
        "--field-manager=deeptune-chart-check", "-f", "-", "-o", "json",
        input=rendered,
    )  # fmt: skip
    applied = json.loads(result.stdout)
    items = applied.get("items", [applied])
    assert {item["metadata"]["name"] for item in items} == {
        doc["metadata"]["name"] for doc in yaml.safe_load_all(rendered) if doc
    }
    for item in items:
        assert item["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
