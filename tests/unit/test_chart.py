"""The Helm chart (charts/deeptune), rendered with `helm template`: what it grants, runs and installs.

Needs the `helm` binary; tests/localcluster/build.sh provides it. Without it these tests fail (they
do not skip): a chart nobody rendered is a chart nobody checked.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from deeptune import registration
from deeptune.api.finetunejob import parse_spec
from deeptune.api.trainer import METRICS_PORT
from deeptune.builders.common import Owner
from deeptune.builders.finetunejob import DEFAULT_TRAINER_IMAGE, ChildSettings, build_job
from deeptune.config import Settings, from_environment
from tests.conftest import ROOT, load_example

CHART = ROOT / "charts" / "deeptune"
RELEASE, NAMESPACE = "dt", "deeptune-system"
FULLNAME = "dt-deeptune"
LEASE_ROLE = f"{FULLNAME}-leader-election"
POD_NAME = "dt-deeptune-5d8c7b9f4-x2x7q"
"""What the downward API would give DEEPTUNE_OPERATOR_IDENTITY in a pod (see `env_of`)."""
CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())
APP_VERSION = CHART_META["appVersion"]

CUSTOM: dict[str, Any] = {
    "watchNamespaces": ["team-a", "team-b"],
    "image": {"repository": "registry.local/deeptune/operator", "tag": "1.2.3", "pullPolicy": "Always"},
    "trainer": {"image": {"repository": "registry.local/deeptune/trainer", "tag": "1.2.3-cuda"}},
    "resources": {"requests": {"cpu": "250m", "memory": "300Mi"}, "limits": {"memory": "1Gi"}},
    "statusInterval": 2.5,
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "podMonitor": {"enabled": True},
    },
}
"""Non-default values: namespaced mode, a private registry, monitors on."""

# The rules the operator needs where it serves its resources, and nothing more
# (see _helpers.tpl).
SERVED_NAMESPACE_RULES = [
    {"apiGroups": ["deeptune.dev"], "resources": ["finetunejobs"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": ["deeptune.dev"], "resources": ["modeldeployments", "finetunesweeps", "federatedfinetunes"],
     "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["deeptune.dev"],
     "resources": ["finetunejobs/status", "modeldeployments/status", "finetunesweeps/status",
                   "federatedfinetunes/status"],
     "verbs": ["get", "patch"]},
    {"apiGroups": ["deeptune.dev"],
     "resources": ["finetunejobs/finalizers", "modeldeployments/finalizers", "finetunesweeps/finalizers",
                   "federatedfinetunes/finalizers"],
     "verbs": ["update"]},
    {"apiGroups": ["batch"], "resources": ["jobs"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [""], "resources": ["configmaps", "services"],
     "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": ["apps"], "resources": ["deployments"],
     "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": ["monitoring.coreos.com"], "resources": ["servicemonitors"],
     "verbs": ["get", "create", "patch", "delete"]},
    {"apiGroups": ["keda.sh"], "resources": ["scaledobjects"], "verbs": ["get", "create", "patch", "delete"]},
    {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
]  # fmt: skip
CRD_READS = {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
             "verbs": ["get", "list", "watch"]}  # fmt: skip
NAMESPACE_WATCH = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}
LEASE_RULES = [
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [FULLNAME],
     "verbs": ["get", "update"]},
]  # fmt: skip
"""Leader election (deeptune/leadership.py): read, create, and take/renew/release by replace. Create
cannot be restricted by name; the rest is this release's Lease only."""
DELETABLE = {
    *("horizontalpodautoscalers", "servicemonitors", "networkpolicies", "scaledobjects"),
    *("finetunejobs", "jobs"),
}
"""What the operator deletes itself: an HPA, ServiceMonitor, NetworkPolicy or ScaledObject the spec no
longer asks for; a FederatedFineTune's sites once it is gone (FineTuneJobs in other namespaces, where
no owner reference reaches) and its coordinator's Job once it failed. Everything else goes by garbage
collection (owner references)."""


def helm(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("helm")
    if binary is None:
        pytest.fail(
            "`helm` is not on PATH. It is built and cached by the local cluster scripts: run\n"
            '  export PATH="$(bash tests/localcluster/build.sh --print-path):$PATH"\n'
            "(scripts/test.sh does this).",
            pytrace=False,
        )
    return subprocess.run(
        [binary, *args], input=input, capture_output=True, text=True, check=False, timeout=60
    )


def render(values: dict[str, Any] | None = None, *extra: str) -> list[dict[str, Any]]:
    result = helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--values", "-", *extra,
        input=yaml.safe_dump(values or {}),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = of_kind(docs, kind)
    return doc


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (operator,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return operator


def env_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment as the kubelet would give it: the pod's name for a downward API
    reference to metadata.name (the only one the chart makes)."""
    env = {}
    for item in container(docs)["env"]:
        if "valueFrom" in item:
            assert item["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, item
            env[item["name"]] = POD_NAME
        else:
            env[item["name"]] = item["value"]
    return env


@pytest.fixture(scope="module")
def default_docs() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def custom_docs() -> list[dict[str, Any]]:
    return render(CUSTOM)


# --- lint and schema -------------------------------------------------------------------------


@pytest.mark.parametrize("values", [{}, CUSTOM, {"replicas": 2}], ids=["defaults", "custom", "replicated"])
def test_lint_strict(values: dict[str, Any]) -> None:
    for strict in ([], ["--strict"]):
        result = helm("lint", str(CHART), *strict, "--values", "-", input=yaml.safe_dump(values))
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("setting", "named", "complaint"),
    [
        ("replicas=abc", "replicas", "Expected: integer, given: string"),
        ("replicas=-1", "replicas", "greater than or equal to 0"),
        ("imagee.tag=x", "(root)", "Additional property imagee is not allowed"),
        ("image.tagg=x", "image", "Additional property tagg is not allowed"),
        ("metrics.serviceMonitor.enable=true", "metrics.serviceMonitor", "Additional property enable"),
        ("statusInterval=soon", "statusInterval", "Expected: number, given: string"),
        ("watchNamespaces={Team_A}", "watchNamespaces.0", "Does not match pattern"),
    ],
)
def test_schema_rejects_typos_and_wrong_types(setting: str, named: str, complaint: str) -> None:
    """Helm names the offending key: in the complaint (unknown keys) or as the path (wrong types)."""
    result = helm("template", RELEASE, str(CHART), "--set", setting)
    assert result.returncode != 0, f"--set {setting} was accepted"
    assert f"- {named}:" in result.stderr and complaint in result.stderr, result.stderr


# --- CRDs ------------------------------------------------------------------------------------


def test_chart_copy_of_the_crds_is_identical_to_the_generated_ones() -> None:
    generated = {path.name: path.read_text() for path in sorted((ROOT / "crds").glob("*.yaml"))}
    copied = {path.name: path.read_text() for path in sorted((CHART / "files" / "crds").glob("*.yaml"))}
    assert generated, "no generated CRDs in crds/"
    assert copied == generated, (
        "charts/deeptune/files/crds/ differs from crds/: run `python -m deeptune.crdgen`"
        " (and delete copies of CRDs that no longer exist)"
    )


def test_rendered_crds_are_the_generated_ones_with_keep_policy(default_docs: list[dict[str, Any]]) -> None:
    rendered = {doc["metadata"]["name"]: doc for doc in of_kind(default_docs, "CustomResourceDefinition")}
    sources = [yaml.safe_load(path.read_text()) for path in sorted((ROOT / "crds").glob("*.yaml"))]
    generated = {doc["metadata"]["name"]: doc for doc in sources}
    assert rendered.keys() == generated.keys()
    for name, crd in rendered.items():
        source = generated[name]
        assert {k: v for k, v in crd.items() if k != "metadata"} == {
            k: v for k, v in source.items() if k != "metadata"
        }, name
        assert source["metadata"].get("labels", {}).items() <= crd["metadata"]["labels"].items()
        assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert crd["metadata"]["annotations"] == {
            "helm.sh/resource-policy": "keep",
            "argocd.argoproj.io/sync-options": "Prune=false,Delete=false",
        }


def test_crds_can_be_left_to_someone_else() -> None:
    assert of_kind(render({"crds": {"install": False}}), "CustomResourceDefinition") == []


# --- RBAC ------------------------------------------------------------------------------------


def rbac_docs(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield from (doc for doc in docs if doc["apiVersion"].startswith("rbac.authorization.k8s.io/"))


def lease_role(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (role,) = [doc for doc in of_kind(docs, "Role") if doc["metadata"]["name"] == LEASE_ROLE]
    return role


def served_roles(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Roles of the namespaces served (all Roles but the leader election one)."""
    return [doc for doc in of_kind(docs, "Role") if doc["metadata"]["name"] != LEASE_ROLE]


@pytest.mark.parametrize(
    "values", [{}, CUSTOM, {"replicas": 3}], ids=["clusterwide", "namespaced", "replicated"]
)
def test_rbac_has_no_wildcards_secrets_or_admin(values: dict[str, Any]) -> None:
    docs = list(rbac_docs(render(values)))
    assert docs
    for doc in docs:
        for rule in doc.get("rules", []):
            flat = [*rule.get("apiGroups", []), *rule["resources"], *rule["verbs"]]
            assert "*" not in flat, rule
            assert "secrets" not in rule["resources"], rule
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), rule
            if "delete" in rule["verbs"]:
                assert set(rule["resources"]) <= DELETABLE, rule
            assert "nonResourceURLs" not in rule
            # No subresource but the custom resources' own status and finalizers: no pods/exec,
            # pods/attach, pods/portforward, serviceaccounts/token, ...
            for resource in rule["resources"]:
                assert "/" not in resource or resource.split("/")[1] in ("status", "finalizers"), rule
            if "pods" in rule["resources"]:  # read, and patch to remove the result finalizer
                assert set(rule["verbs"]) <= {"get", "list", "watch", "patch"}, rule
            if "leases" in rule["resources"]:
                assert doc["kind"] == "Role" and doc["metadata"]["namespace"] == NAMESPACE, doc
        if "roleRef" in doc:
            assert doc["roleRef"]["name"] == doc["metadata"]["name"]
            assert doc["roleRef"]["name"] in (FULLNAME, LEASE_ROLE)
            assert doc["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]


def test_clusterwide_rbac(default_docs: list[dict[str, Any]]) -> None:
    assert served_roles(default_docs) == []
    assert [doc["metadata"]["name"] for doc in of_kind(default_docs, "RoleBinding")] == [LEASE_ROLE]
    assert one(default_docs, "ClusterRole")["rules"] == [CRD_READS, *SERVED_NAMESPACE_RULES]
    assert one(default_docs, "ClusterRoleBinding")["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": FULLNAME,
    }


def test_namespaced_rbac_has_a_role_in_each_namespace(custom_docs: list[dict[str, Any]]) -> None:
    watched = CUSTOM["watchNamespaces"]
    roles = {doc["metadata"]["namespace"]: doc for doc in served_roles(custom_docs)}
    bindings = {
        doc["metadata"]["namespace"]: doc
        for doc in of_kind(custom_docs, "RoleBinding")
        if doc["metadata"]["name"] != LEASE_ROLE
    }
    assert sorted(roles) == sorted(bindings) == sorted(watched)
    for namespace in watched:
        assert roles[namespace]["rules"] == SERVED_NAMESPACE_RULES
        assert bindings[namespace]["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": FULLNAME,
        }
    # Cluster-wide only what kopf reads there: CRDs, and namespaces (to serve ones created later).
    assert one(custom_docs, "ClusterRole")["rules"] == [CRD_READS, NAMESPACE_WATCH]


@pytest.mark.parametrize(
    "values",
    [{}, CUSTOM, {"watchNamespaces": [NAMESPACE, "team-a"]}],
    ids=["clusterwide", "namespaced", "serving-its-own-namespace"],
)
def test_the_lease_role_is_in_the_release_namespace_with_only_what_leader_election_needs(
    values: dict[str, Any],
) -> None:
    """Whatever the namespaces served: a Role for the leader Lease in the release's namespace, with
    create (which RBAC cannot restrict by name) and get/update of this release's Lease only; no list,
    watch, patch or delete. A release serving its own namespace has both Roles there, apart."""
    docs = render(values)
    role = lease_role(docs)
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == LEASE_RULES
    (binding,) = [doc for doc in of_kind(docs, "RoleBinding") if doc["metadata"]["name"] == LEASE_ROLE]
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": LEASE_ROLE}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    # Leases nowhere else: not in the ClusterRole, not in the Roles of the namespaces served.
    for doc in rbac_docs(docs):
        if doc is not role:
            assert all("leases" not in rule["resources"] for rule in doc.get("rules", [])), doc
    names = [(doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]) for doc in docs]
    assert len(names) == len(set(names)), names


def test_the_lease_the_operator_uses_is_the_one_its_role_allows(default_docs: list[dict[str, Any]]) -> None:
    settings = from_environment(env_of(default_docs))
    assert settings.lease_namespace == NAMESPACE == lease_role(default_docs)["metadata"]["namespace"]
    (named,) = [rule for rule in lease_role(default_docs)["rules"] if "resourceNames" in rule]
    assert named["resourceNames"] == [settings.lease_name] == [FULLNAME]  # one per release
    assert settings.identity == POD_NAME  # the pod's name, from the downward API


def test_rbac_can_be_left_to_someone_else() -> None:
    assert list(rbac_docs(render({"rbac": {"create": False}}))) == []


def test_every_resource_the_operator_watches_can_be_listed_and_watched(
    default_docs: list[dict[str, Any]],
) -> None:
    """The watches and indexes the operator registers with kopf (deeptune.registration: its custom
    resources and its children, Jobs, Pods, Deployments, ConfigMaps, Services, HPAs and
    NetworkPolicies), each granted list and watch where it serves."""
    registry, _ = registration.build(Settings())
    watched = {
        (handler.selector.group or "", handler.selector.plural or handler.selector.any_name)
        for handlers in (registry._indexing, registry._watching)
        for handler in handlers.get_all_handlers()
    }
    assert {("", "configmaps"), ("", "services"), ("autoscaling", "horizontalpodautoscalers"),
            ("networking.k8s.io", "networkpolicies"), ("batch", "jobs"), ("", "pods"),
            ("apps", "deployments")} <= watched  # fmt: skip
    rules = one(default_docs, "ClusterRole")["rules"]
    for group, plural in watched:
        verbs = {v for r in rules if group in r["apiGroups"] and plural in r["resources"] for v in r["verbs"]}
        assert {"list", "watch"} <= verbs, (group, plural)


# --- the operator's Deployment ---------------------------------------------------------------


def test_one_replica_recreated_without_a_disruption_budget(default_docs: list[dict[str, Any]]) -> None:
    spec = one(default_docs, "Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert "affinity" not in spec["template"]["spec"]  # nothing to spread
    assert of_kind(default_docs, "PodDisruptionBudget") == []  # it could only block drains
    scaled_to_zero = render({"replicas": 0})
    assert one(scaled_to_zero, "Deployment")["spec"]["replicas"] == 0
    assert of_kind(scaled_to_zero, "PodDisruptionBudget") == []


ANTI_AFFINITY = {
    "preferredDuringSchedulingIgnoredDuringExecution": [
        {
            "weight": 100,
            "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname",
                "labelSelector": {"matchLabels": {
                    "app.kubernetes.io/name": "deeptune",
                    "app.kubernetes.io/instance": RELEASE,
                    "app.kubernetes.io/component": "operator",
                }},
            },
        }
    ]
}  # fmt: skip


@pytest.mark.parametrize("replicas", [2, 3])
def test_several_replicas_get_a_budget_spread_and_each_its_identity(replicas: int) -> None:
    docs = render({"replicas": replicas})
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == replicas
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]
    # Spread over nodes where it can be (preferred: a one-node cluster still runs them all).
    assert pod["spec"]["affinity"] == {"podAntiAffinity": ANTI_AFFINITY}
    selector = ANTI_AFFINITY["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert selector["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    # One voluntary disruption at a time, whatever the replica count; a pod that is not ready does
    # not block a drain.
    budget = one(docs, "PodDisruptionBudget")
    assert budget["apiVersion"] == "policy/v1"
    assert budget["metadata"]["namespace"] == NAMESPACE
    assert budget["spec"] == {
        "maxUnavailable": 1,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
        "selector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]},
    }
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # Each replica's name in the Lease is its pod's (the downward API), the Lease the release's.
    (identity,) = [item for item in container(docs)["env"] if item["name"] == "DEEPTUNE_OPERATOR_IDENTITY"]
    assert identity == {
        "name": "DEEPTUNE_OPERATOR_IDENTITY",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    }
    settings = from_environment(env_of(docs))
    assert (settings.identity, settings.lease_namespace) == (POD_NAME, NAMESPACE)
    assert settings.lease_name == FULLNAME


def test_the_budget_leaves_out_what_older_clusters_lack() -> None:
    """unhealthyPodEvictionPolicy is 1.27's: on 1.25/1.26 (which the chart supports) it is left out."""
    (budget,) = render({"replicas": 2}, "--kube-version", "1.26.0", "--show-only",
                       "templates/poddisruptionbudget.yaml")  # fmt: skip
    assert budget["spec"] == {"maxUnavailable": 1, "selector": budget["spec"]["selector"]}


def test_own_affinity_is_kept_and_own_anti_affinity_wins() -> None:
    node_affinity = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["system"]}]}]}}  # fmt: skip
    show = ("--show-only", "templates/deployment.yaml")
    (merged,) = render({"replicas": 2, "affinity": {"nodeAffinity": node_affinity}}, *show)
    assert merged["spec"]["template"]["spec"]["affinity"] == {
        "nodeAffinity": node_affinity,
        "podAntiAffinity": ANTI_AFFINITY,
    }
    required = {"requiredDuringSchedulingIgnoredDuringExecution": [
        ANTI_AFFINITY["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]]}  # fmt: skip
    (own,) = render({"replicas": 2, "affinity": {"podAntiAffinity": required}}, *show)
    assert own["spec"]["template"]["spec"]["affinity"] == {"podAntiAffinity": required}
    (single,) = render({"affinity": {"nodeAffinity": node_affinity}}, *show)
    assert single["spec"]["template"]["spec"]["affinity"] == {"nodeAffinity": node_affinity}


def test_security_context(default_docs: list[dict[str, Any]]) -> None:
    pod = one(default_docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container(default_docs)["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["serviceAccountName"] == FULLNAME
    assert pod.get("automountServiceAccountToken", True) is True  # the operator talks to the API


def test_image_probes_and_ports(default_docs: list[dict[str, Any]]) -> None:
    operator = container(default_docs)
    assert operator["image"] == f"ghcr.io/deeptune/operator:{APP_VERSION}"
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert {p["name"]: p["containerPort"] for p in operator["ports"]} == {"metrics": 8080, "healthz": 8081}
    assert operator["resources"]["limits"]["memory"] and operator["resources"]["requests"]["cpu"]


def test_environment_is_what_the_operator_reads(default_docs: list[dict[str, Any]]) -> None:
    env = env_of(default_docs)
    assert env["DEEPTUNE_TRAINER_IMAGE"] == DEFAULT_TRAINER_IMAGE  # chart and code agree
    settings = from_environment(env)
    assert settings.namespaces == ()  # the whole cluster
    assert (settings.metrics_port, settings.liveness_port, settings.status_interval) == (8080, 8081, 5.0)
    assert settings.builder.trainer_image == DEFAULT_TRAINER_IMAGE
    assert settings.builder.image_pull_policy == "IfNotPresent"
    assert "DEEPTUNE_GPU_HOUR_PRICES" not in env and settings.gpu_hour_prices == {}  # no prices: no cost


def test_gpu_hour_prices_reach_the_operator() -> None:
    prices = {"nvidia.com/gpu": 2.5, "amd.com/gpu": 1.25}
    settings = from_environment(env_of(render({"costs": {"gpuHourPrices": prices}})))
    assert settings.gpu_hour_prices == prices


def test_the_operator_knows_who_it_is_for_network_policies(default_docs: list[dict[str, Any]]) -> None:
    """A ModelDeployment's NetworkPolicy admits the operator by its namespace and pod labels: those of
    the chart's own operator pods, and no others (no trainer pod carries them)."""
    builder = from_environment(env_of(default_docs)).builder
    assert builder.operator_namespace == NAMESPACE
    deployment = one(default_docs, "Deployment")
    assert builder.operator_labels == deployment["spec"]["selector"]["matchLabels"]
    assert builder.operator_labels.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert builder.operator_labels["app.kubernetes.io/component"] == "operator"


def test_custom_values_reach_the_operator(custom_docs: list[dict[str, Any]]) -> None:
    operator = container(custom_docs)
    assert operator["image"] == "registry.local/deeptune/operator:1.2.3"
    assert operator["imagePullPolicy"] == "Always"
    assert operator["resources"] == CUSTOM["resources"]
    settings = from_environment(env_of(custom_docs))
    assert settings.namespaces == ("team-a", "team-b")
    assert settings.status_interval == 2.5
    assert settings.builder.trainer_image == "registry.local/deeptune/trainer:1.2.3-cuda"


# --- metrics ---------------------------------------------------------------------------------


def trainer_pod(image: str) -> dict[str, Any]:
    """The pod template of the Job the operator builds for the tiny example."""
    owner = Owner(kind="FineTuneJob", name="tiny-keywords", namespace="team-a", uid="1234")
    job = build_job(owner, parse_spec(load_example("finetune-tiny.yaml")["spec"]), ChildSettings(image))
    return dict(job["spec"]["template"])


def test_metrics_service_selects_the_operator_only(default_docs: list[dict[str, Any]]) -> None:
    service = one(default_docs, "Service")
    pod_labels = one(default_docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    trainer_labels = trainer_pod(DEFAULT_TRAINER_IMAGE)["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= trainer_labels.items()


def test_monitors_are_off_by_default(default_docs: list[dict[str, Any]]) -> None:
    assert of_kind(default_docs, "ServiceMonitor") == of_kind(default_docs, "PodMonitor") == []


def test_service_monitor(custom_docs: list[dict[str, Any]]) -> None:
    monitor = one(custom_docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= one(custom_docs, "Service")["metadata"]["labels"].items()
    )
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


def test_pod_monitor_selects_the_trainer_pods_the_operator_builds(custom_docs: list[dict[str, Any]]) -> None:
    monitor = one(custom_docs, "PodMonitor")
    pod = trainer_pod("registry.local/deeptune/trainer:1.2.3-cuda")
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "trainer"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert ports["metrics"] == METRICS_PORT
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": CUSTOM["watchNamespaces"]}
    clusterwide = render(
        {"metrics": {"podMonitor": {"enabled": True}}}, "--show-only", "templates/podmonitor.yaml"
    )
    assert clusterwide[0]["spec"]["namespaceSelector"] == {"any": True}


# --- labels ----------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [{}, CUSTOM, {"replicas": 2}], ids=["defaults", "custom", "replicated"])
def test_every_object_has_the_standard_labels(values: dict[str, Any]) -> None:
    for doc in render(values):
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "deeptune", doc["kind"]
        assert labels["app.kubernetes.io/instance"] == RELEASE, doc["kind"]
        assert labels["app.kubernetes.io/version"] == APP_VERSION, doc["kind"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm", doc["kind"]
        assert labels["app.kubernetes.io/part-of"] == "deeptune", doc["kind"]
        assert labels["helm.sh/chart"] == f"deeptune-{CHART_META['version']}", doc["kind"]
        if doc["kind"] != "CustomResourceDefinition":
            assert labels["app.kubernetes.io/component"] == "operator", doc["kind"]
