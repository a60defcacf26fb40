"""The ModelDeployment builders: the repository ConfigMap, Deployment, Service, HPA and ServiceMonitor."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from pydantic import ValidationError

from deeptune.api.base import PvcLocation, describe_validation_error
from deeptune.api.finetunejob import BaseModelSpec
from deeptune.api.modeldeployment import ModelDeploymentSpec, ResolvedAdapter, ResolvedModel, parse_spec
from deeptune.builders.common import Owner
from deeptune.builders.finetunejob import ChildSettings
from deeptune.builders.modeldeployment import (
    CONFIG_HASH,
    ENGINE_WAITING_METRIC,
    QUEUE_TIME_METRIC,
    ServingChildren,
    build_children,
    endpoints,
    server_name,
    template_hash,
)
from deeptune.children import PLURALS
from tests.conftest import load_example

OWNER = Owner(kind="ModelDeployment", name="support-bot", namespace="team-a", uid="5678-efgh")
SETTINGS = ChildSettings(image_pull_policy="IfNotPresent", extra_labels={"team": "a"})
MERGED = ResolvedModel(merged=PvcLocation(claim_name="out", path="team-a/bot/merged"), fine_tune_job="bot")
SPEC: dict[str, Any] = {"model": {"fineTuneJobRef": {"name": "bot"}}, "resources": {"gpu": 0}}


def spec_with(**changes: Any) -> ModelDeploymentSpec:
    spec = copy.deepcopy(SPEC)
    spec.update(changes)
    return parse_spec(spec)


def children(
    spec: ModelDeploymentSpec | None = None, resolved: ResolvedModel = MERGED, owner: Owner = OWNER
) -> ServingChildren:
    return build_children(owner, spec or spec_with(), resolved, SETTINGS)


def pod_of(built: ServingChildren) -> dict[str, Any]:
    return built.deployment["spec"]["template"]["spec"]


def container_of(built: ServingChildren) -> dict[str, Any]:
    (container,) = pod_of(built)["containers"]
    return container


def config_pbtxt(built: ServingChildren) -> str:
    return str(built.config_map["data"]["support-bot__config.pbtxt"])


def test_the_openai_frontend_runs_triton_on_the_spec_ports() -> None:
    container = container_of(children(spec_with(service={"httpPort": 9100, "openaiPort": 8080})))
    assert container["image"] == "ghcr.io/deeptune/serving:0.1.0"
    command = container["command"]
    split = command.index("--")
    assert command[:split] == [
        "python3",
        "-m",
        "deeptune_serving",
        "--model=support-bot",
        "--openai-port=8080",
        "--triton-http=http://127.0.0.1:9100",
    ]
    triton = command[split + 1 :]
    assert triton[0] == "tritonserver"
    assert "--model-repository=/models" in triton and "--http-port=9100" in triton
    assert not [arg for arg in triton if arg.startswith(("--backend-directory", "--http-address"))], (
        "the image's own defaults (/opt/tritonserver/backends, all interfaces) apply"
    )
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 9100, "grpc": 8001, "metrics": 8002, "openai": 8080}


def test_probes_use_tritons_health_endpoints_and_wait_long_for_loading() -> None:
    container = container_of(children())
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    startup = container["startupProbe"]
    assert startup["httpGet"]["port"] == "http"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800, "a big model loads for minutes"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_pod_is_locked_down_with_a_writable_tmp_only() -> None:
    built = children()
    pod = pod_of(built)
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container_of(built)["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    mounts = {m["mountPath"]: m for m in container_of(built)["volumeMounts"]}
    writable = {path for path, m in mounts.items() if not m.get("readOnly")}
    assert writable == {"/tmp", "/dev/shm"}


def test_shared_memory_follows_the_spec() -> None:
    volumes = pod_of(children(spec_with(resources={"gpu": 0, "sharedMemory": "2Gi"})))["volumes"]
    assert {"medium": "Memory", "sizeLimit": "2Gi"} in [v.get("emptyDir") for v in volumes]


def test_merged_model_is_one_read_only_claim() -> None:
    built = children()
    claims = [v for v in pod_of(built)["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"name": "model-0", "persistentVolumeClaim": {"claimName": "out", "readOnly": True}}]
    assert {"name": "model-0", "mountPath": "/mnt/pvc/out", "readOnly": True} in container_of(built)[
        "volumeMounts"
    ]
    assert 'key: "model" value: { string_value: "/mnt/pvc/out/team-a/bot/merged" }' in config_pbtxt(built)
    assert 'key: "adapter" value: { string_value: "" }' in config_pbtxt(built)


@pytest.mark.parametrize(
    ("base_claim", "claims"), [("models", ["models", "out"]), ("out", ["out"])], ids=["two", "shared"]
)
def test_adapter_mounts_base_and_adapter_claims_once_each(base_claim: str, claims: list[str]) -> None:
    resolved = ResolvedModel(
        base_model=BaseModelSpec(pvc=PvcLocation(claim_name=base_claim, path="ds-7b")),
        adapter=PvcLocation(claim_name="out", path="run/adapter"),
    )
    built = children(resolved=resolved)
    mounted = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_of(built)["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert mounted == claims
    text = config_pbtxt(built)
    assert f'key: "model" value: {{ string_value: "/mnt/pvc/{base_claim}/ds-7b" }}' in text
    assert 'key: "adapter" value: { string_value: "/mnt/pvc/out/run/adapter" }' in text


def test_adapter_on_a_hub_model_gets_its_token_by_reference() -> None:
    resolved = ResolvedModel(
        base_model=BaseModelSpec(name="deepseek-ai/deepseek-llm-7b-base", token_secret_ref={"name": "hf"}),
        adapter=PvcLocation(claim_name="out", path="run/adapter"),
    )
    built = children(resolved=resolved)
    assert [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_of(built)["volumes"]
        if "persistentVolumeClaim" in v
    ] == ["out"]
    env = container_of(built)["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in env
    assert {"name": "HF_HOME", "value": "/tmp/huggingface"} in env
    assert 'string_value: "deepseek-ai/deepseek-llm-7b-base"' in config_pbtxt(built)
    assert "valueFrom" not in json.dumps(built.config_map)


def test_repository_config_map_keys_map_back_to_their_paths() -> None:
    built = children()
    data = built.config_map["data"]
    assert all("/" not in key for key in data)
    (volume,) = [v for v in pod_of(built)["volumes"] if v["name"] == "repository"]
    paths = {item["key"]: item["path"] for item in volume["configMap"]["items"]}
    assert set(paths) == set(data)
    assert set(paths.values()) == {
        "support-bot/config.pbtxt",
        "support-bot/1/model.py",
    }
    # Each model's directory by subPath, never the volume's root: there the kubelet keeps `..data`
    # and a timestamped directory, which Triton would take for models.
    repository_mounts = [m for m in container_of(built)["volumeMounts"] if m["name"] == "repository"]
    assert repository_mounts == [
        {"name": "repository", "mountPath": "/models/support-bot", "subPath": "support-bot", "readOnly": True}
    ]


@pytest.mark.parametrize(("gpus", "kind"), [(1, "KIND_GPU"), (2, "KIND_MODEL")])
def test_gpu_request_and_instance_kind(gpus: int, kind: str) -> None:
    built = children(spec_with(resources={"gpu": gpus, "memory": "48Gi"}, runtime={"backend": "python"}))
    assert container_of(built)["resources"]["limits"] == {"nvidia.com/gpu": str(gpus), "memory": "48Gi"}
    assert f"kind: {kind}" in config_pbtxt(built)


def test_cpu_serving_asks_for_no_gpu_and_sizes_torch_threads() -> None:
    built = children(spec_with(resources={"gpu": 0, "cpu": "2"}))
    assert "nvidia.com/gpu" not in json.dumps(container_of(built)["resources"])
    assert "kind: KIND_CPU" in config_pbtxt(built)
    assert {"name": "OMP_NUM_THREADS", "value": "2"} in container_of(built)["env"]


def test_a_users_variable_replaces_the_operators_of_the_same_name() -> None:
    """Server-side apply refuses a Deployment that names an env var twice (found by the spec fuzzing):
    the user's value wins, as it would in a Job, where the last of two is taken."""
    user = [{"name": "HOME", "value": "/home/triton"}, {"name": "OMP_NUM_THREADS", "value": "8"}]
    env = container_of(children(spec_with(resources={"gpu": 0, "cpu": "2"}, env=user)))["env"]
    names = [var["name"] for var in env]
    assert len(names) == len(set(names))
    assert env[-2:] == user
    assert {"name": "HF_HOME", "value": "/tmp/huggingface"} in env


def test_owner_references_labels_and_selectors() -> None:
    built = children()
    for manifest in built.manifests():
        assert manifest["metadata"]["ownerReferences"][0]["uid"] == "5678-efgh"
        assert manifest["metadata"]["labels"]["team"] == "a"
    template_labels = built.deployment["spec"]["template"]["metadata"]["labels"]
    selector = built.deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template_labels.items()
    assert built.service["spec"]["selector"] == selector
    assert selector["deeptune.dev/modeldeployment-uid"] == "5678-efgh"


def test_service_ports_and_type() -> None:
    service = children(spec_with(service={"type": "LoadBalancer", "grpcPort": 9001})).service
    assert service["spec"]["type"] == "LoadBalancer"
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {
        "http": (8000, "http"),
        "grpc": (9001, "grpc"),
        "metrics": (8002, "metrics"),
        "openai": (9000, "openai"),
    }
    assert children().service["spec"]["type"] == "ClusterIP"


def test_without_autoscaling_the_deployment_owns_its_replicas() -> None:
    built = children(spec_with(replicas=3))
    assert built.deployment["spec"]["replicas"] == 3
    assert built.autoscaler is None and built.service_monitor is None
    assert len(built.manifests()) == 3


def test_autoscaler_on_cpu_and_queue_time() -> None:
    built = children(spec_with(autoscaling={"enabled": True, "minReplicas": 2, "maxReplicas": 5}))
    assert "replicas" not in built.deployment["spec"], "the HPA owns the replica count"
    hpa = built.autoscaler
    assert hpa is not None and hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "support-bot-triton",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    (cpu,) = hpa["spec"]["metrics"]
    assert cpu["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}

    queued = children(spec_with(autoscaling={"enabled": True, "queueTimeMicroseconds": 50000})).autoscaler
    assert queued is not None
    pods = queued["spec"]["metrics"][1]["pods"]
    assert pods == {
        "metric": {"name": QUEUE_TIME_METRIC},
        "target": {"type": "AverageValue", "averageValue": "50000"},
    }
    assert "nv_inference_queue_duration_us" in queued["metadata"]["annotations"]["deeptune.dev/requires"]


def test_service_monitor_scrapes_the_metrics_port() -> None:
    monitor = children(spec_with(serviceMonitor=True)).service_monitor
    assert monitor is not None
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= children().service["metadata"]["labels"].items()
    )


def test_config_hash_follows_what_the_server_runs() -> None:
    base = template_hash(children().deployment)
    assert base and base == template_hash(children().deployment), "deterministic"
    changed_repository = template_hash(children(spec_with(generation={"maxNewTokens": 7})).deployment)
    changed_command = template_hash(
        children(spec_with(responseCache={"enabled": True}, batching={"mode": "dynamic"})).deployment
    )
    changed_model = template_hash(
        children(resolved=ResolvedModel(merged=PvcLocation(claim_name="out", path="other"))).deployment
    )
    assert len({base, changed_repository, changed_command, changed_model}) == 4
    assert template_hash(children(spec_with(replicas=4)).deployment) == base, "scaling rolls no pods"
    annotations = children().deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations[CONFIG_HASH] == base
    assert annotations["prometheus.io/port"] == "8002"


def test_names_are_valid_service_names_and_endpoints_use_them() -> None:
    assert server_name(OWNER) == "support-bot-triton"
    dotted = Owner(kind="ModelDeployment", name="bot.v2", namespace="ns", uid="u")
    assert server_name(dotted) == "bot-v2-triton"
    assert (
        server_name(Owner(kind="ModelDeployment", name="7b-bot", namespace="ns", uid="u"))
        == "mdep-7b-bot-triton"
    )
    assert len(server_name(Owner(kind="ModelDeployment", name="x" * 200, namespace="ns", uid="u"))) <= 63
    urls = endpoints(OWNER, spec_with(), MERGED)
    assert urls.http == "http://support-bot-triton.team-a.svc:8000"
    assert urls.grpc == "support-bot-triton.team-a.svc:8001"
    assert urls.metrics == "http://support-bot-triton.team-a.svc:8002/metrics"
    assert urls.model_name == "support-bot" and urls.models == ["support-bot"]


def test_scheduling_and_pull_settings_reach_the_pod() -> None:
    spec = spec_with(
        resources={"gpu": 1, "nodeSelector": {"gpu": "l4"}, "priorityClassName": "serving"},
        imagePullSecrets=[{"name": "ngc"}],
        imagePullPolicy="Always",
        env=[{"name": "LOG", "value": "1"}],
    )
    built = children(spec)
    assert pod_of(built)["nodeSelector"] == {"gpu": "l4"}
    assert pod_of(built)["priorityClassName"] == "serving"
    assert pod_of(built)["imagePullSecrets"] == [{"name": "ngc"}]
    assert container_of(built)["imagePullPolicy"] == "Always"
    assert {"name": "LOG", "value": "1"} in container_of(built)["env"]
    assert container_of(children())["imagePullPolicy"] == "IfNotPresent"


def test_the_example_deployment_builds() -> None:
    manifest = load_example("deployment.yaml")
    spec = parse_spec(manifest["spec"])
    owner = Owner(kind="ModelDeployment", name=manifest["metadata"]["name"], namespace="default", uid="u")
    built = build_children(owner, spec, MERGED, SETTINGS)
    assert built.scaled_object is not None and built.autoscaler is None and built.service_monitor is not None
    assert container_of(built)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert json.loads(built.config_map["data"]["support-bot-7b__1__model.json"])["max_num_seqs"] == 16


# --- the optional NetworkPolicy ------------------------------------------------------------------

OPERATOR_SETTINGS = ChildSettings(
    extra_labels={"team": "a"},
    operator_namespace="deeptune-system",
    operator_labels={"app.kubernetes.io/name": "deeptune", "app.kubernetes.io/component": "operator"},
)
OPERATOR_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "deeptune-system"}},
    "podSelector": {"matchLabels": dict(OPERATOR_SETTINGS.operator_labels)},
}


def policy_of(spec: ModelDeploymentSpec, settings: ChildSettings = OPERATOR_SETTINGS) -> dict[str, Any]:
    built = build_children(OWNER, spec, MERGED, settings)
    assert built.network_policy is not None
    return built.network_policy


def tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def test_no_network_policy_unless_asked() -> None:
    spec = spec_with()
    assert spec.network_policy.enabled is False
    assert build_children(OWNER, spec, MERGED, OPERATOR_SETTINGS).network_policy is None


def test_network_policy_admits_the_namespace_and_the_operator_by_default() -> None:
    built = build_children(OWNER, spec_with(networkPolicy={"enabled": True}), MERGED, OPERATOR_SETTINGS)
    policy = built.network_policy
    assert policy is not None
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    assert policy["metadata"]["name"] == "support-bot-triton"
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "5678-efgh"
    assert policy["spec"]["podSelector"] == built.deployment["spec"]["selector"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress stays open: hub downloads
    assert policy["spec"]["ingress"] == [
        {"from": [{"podSelector": {}}], "ports": tcp(8000, 8001, 9000)},  # this namespace's pods
        {"from": [OPERATOR_PEER], "ports": tcp(8000)},  # the operator's model check, HTTP only
    ]
    kinds = [m["kind"] for m in built.manifests()]
    assert kinds.index("NetworkPolicy") < kinds.index("Deployment"), "no pod without its policy"


def test_network_policy_follows_the_peers_and_ports_of_the_spec() -> None:
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    clients = {
        "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]},
        "podSelector": {"matchLabels": {"app": "chat-frontend"}},
    }
    spec = spec_with(
        networkPolicy={"enabled": True, "allowFrom": [clients], "metricsFrom": [monitoring]},
        service={"httpPort": 9000, "grpcPort": 9001, "metricsPort": 9002, "openaiPort": 8080},
    )
    assert policy_of(spec)["spec"]["ingress"] == [
        {"from": [clients], "ports": tcp(9000, 9001, 8080)},
        {"from": [OPERATOR_PEER], "ports": tcp(9000)},
        {"from": [monitoring], "ports": tcp(9002)},
    ]


def test_an_empty_peer_list_admits_nobody_never_everybody() -> None:
    """An ingress rule without `from` admits every source: a list with no peers must give no rule."""
    spec = spec_with(networkPolicy={"enabled": True, "allowFrom": []})
    assert policy_of(spec)["spec"]["ingress"] == [{"from": [OPERATOR_PEER], "ports": tcp(8000)}]
    local = policy_of(spec, SETTINGS)  # an operator run outside the cluster has no pods to admit
    assert local["spec"]["ingress"] == []
    assert local["spec"]["policyTypes"] == ["Ingress"]  # so: everything refused


@pytest.mark.parametrize(
    ("policy", "complaint"),
    [
        ({"enabled": True, "allowFrom": [{}]}, "set namespaceSelector, podSelector or both"),
        (
            {
                "enabled": True,
                "allowFrom": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}],
            },
            "In and NotIn need values",
        ),
        (
            {"enabled": True, "metricsFrom": [{"podSelector": {"matchLabels": {"not a key": "x"}}}]},
            "label keys",
        ),
    ],
)
def test_network_peers_are_checked(policy: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError) as caught:
        spec_with(networkPolicy=policy)
    assert complaint in describe_validation_error(caught.value)
    assert "spec.networkPolicy." in describe_validation_error(caught.value)


def test_every_child_kind_can_be_applied_and_removed_server_side() -> None:
    spec = spec_with(networkPolicy={"enabled": True}, autoscaling={"enabled": True}, serviceMonitor=True)
    kinds = {(m["apiVersion"], m["kind"]) for m in children(spec).manifests()}
    assert kinds <= set(PLURALS)


def test_a_gpu_deployment_rolls_out_without_a_spare_gpu() -> None:
    """Kubernetes' default (25% surge) would start the new pod first: on a full GPU node it would wait
    for a GPU that never frees. Unless the spec says otherwise, one old pod goes first."""
    gpu = children(spec_with(resources={"gpu": 1})).deployment["spec"]
    assert gpu["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    assert "strategy" not in children(spec_with(resources={"gpu": 0})).deployment["spec"]
    chosen = children(spec_with(resources={"gpu": 2}, rollout={"maxSurge": "50%", "maxUnavailable": 0}))
    assert chosen.deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": "50%", "maxUnavailable": 0}


def test_a_rollout_that_could_never_progress_is_refused() -> None:
    with pytest.raises(ValueError, match="maxSurge and maxUnavailable cannot both be 0"):
        spec_with(rollout={"maxSurge": 0, "maxUnavailable": "0%"})


# --- the vLLM backend ----------------------------------------------------------------------------

BASE = BaseModelSpec(name="deepseek-ai/deepseek-llm-7b-base")
ADAPTED = ResolvedModel(
    base_model=BASE,
    adapter=PvcLocation(claim_name="out", path="team-a/bot/adapter"),
    adapter_rank=16,
    fine_tune_job="bot",
    adapters=[
        ResolvedAdapter(
            name="billing",
            adapter=PvcLocation(claim_name="runs", path="team-a/billing/adapter"),
            rank=32,
            fine_tune_job="billing-run-3",
        )
    ],
)
VLLM_SPEC = {
    "resources": {"gpu": 1},
    "adapters": [{"name": "billing", "fineTuneJobRef": {"name": "billing-run-3"}}],
}


def test_on_gpus_auto_serves_with_vllm_behind_tritons_openai_frontend() -> None:
    built = children(spec_with(**VLLM_SPEC), ADAPTED)
    container = container_of(built)
    assert container["image"] == "nvcr.io/nvidia/tritonserver:25.12-vllm-python-py3"
    assert container["command"][1] == "/opt/tritonserver/python/openai/openai_frontend/main.py"
    assert "--tokenizer=/mnt/pvc/out/team-a/bot/adapter" in container["command"], (
        "the adapter's tokenizer carries the chat template it was trained with"
    )
    files = built.config_map["data"]
    assert set(files) == {
        "support-bot__config.pbtxt",
        "support-bot__1__model.json",
        "support-bot__1__multi_lora.json",
    }
    assert json.loads(files["support-bot__1__multi_lora.json"]) == {
        "adapter": "/mnt/pvc/out/team-a/bot/adapter",
        "billing": "/mnt/pvc/runs/team-a/billing/adapter",
    }
    engine = json.loads(files["support-bot__1__model.json"])
    assert (engine["max_loras"], engine["max_lora_rank"]) == (2, 32), "a slot per adapter, the largest rank"
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/mnt/pvc/out", "/mnt/pvc/runs"} <= mounted


def test_vllm_metrics_are_scraped_from_the_openai_port() -> None:
    """Triton's OpenAI frontend opens no metrics port: it serves Triton's metrics at /metrics."""
    built = children(spec_with(**VLLM_SPEC, networkPolicy={"enabled": True}), ADAPTED)
    ports = {p["name"]: p["containerPort"] for p in container_of(built)["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "openai": 9000}
    service_ports = {p["name"]: p["targetPort"] for p in built.service["spec"]["ports"]}
    assert service_ports["metrics"] == "openai"
    annotations = built.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9000"
    assert container_of(built)["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}


def test_every_adapter_is_its_own_model_name() -> None:
    urls = endpoints(OWNER, spec_with(**VLLM_SPEC), ADAPTED)
    assert urls.model_name == "support-bot:adapter"
    assert urls.models == ["support-bot:adapter", "support-bot:billing"]
    merged = endpoints(OWNER, spec_with(resources={"gpu": 1}), MERGED)
    assert merged.models == ["support-bot"]


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"resources": {"gpu": 0}}, "adapters are served by the vLLM backend only"),
        ({"runtime": {"backend": "python"}}, "adapters are served by the vLLM backend only"),
        ({"quantization": "int8"}, "adapters are served by the vLLM backend only"),
        ({"model": {"merged": {"pvc": {"claimName": "out"}}}}, "model must be a base model with an adapter"),
        ({"adapters": [{"name": "adapter", "fineTuneJobRef": {"name": "x"}}]}, "must differ"),
    ],
)
def test_adapters_that_could_not_be_served_are_refused(changes: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        spec_with(**{**VLLM_SPEC, **changes})


def test_vllm_where_it_cannot_serve_is_refused_and_auto_falls_back() -> None:
    with pytest.raises(ValidationError, match=r"runtime.backend vllm needs resources.gpu of 1 or more"):
        spec_with(runtime={"backend": "vllm"})  # SPEC has no GPU
    eight_bit = spec_with(resources={"gpu": 1}, quantization="int8")
    assert container_of(children(eight_bit))["image"] == "ghcr.io/deeptune/serving:0.1.0"


# --- KEDA -----------------------------------------------------------------------------------------

KEDA = {"prometheusAddress": "http://prometheus.monitoring.svc:9090"}


def test_keda_scales_the_python_backend_on_the_engines_queue_instead_of_an_hpa() -> None:
    built = children(
        spec_with(autoscaling={"enabled": True, "maxReplicas": 5, "keda": {**KEDA, "waitingRequests": 3}})
    )
    assert built.autoscaler is None and "replicas" not in built.deployment["spec"]
    scaled = built.scaled_object
    assert scaled is not None and scaled["kind"] == "ScaledObject"
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "support-bot-triton",
    }
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 5)
    (load,) = scaled["spec"]["triggers"]
    assert load["type"] == "prometheus" and load["metricType"] == "AverageValue"
    assert load["metadata"] == {
        "serverAddress": "http://prometheus.monitoring.svc:9090",
        "query": 'sum(deeptune_engine_requests_waiting{namespace="team-a",model="support-bot"})',
        "threshold": "3",
    }


def test_the_operator_queries_the_gauge_the_serving_engine_exports() -> None:
    from deeptune_serving.engine import WAITING_METRIC  # imports torch: only this test needs it

    assert ENGINE_WAITING_METRIC == WAITING_METRIC


def test_keda_scales_vllm_on_time_to_first_token_and_wakes_from_zero_on_the_users_query() -> None:
    wake = 'sum(rate(gateway_requests_total{route="support-bot"}[1m]))'
    spec = spec_with(
        resources={"gpu": 1},
        autoscaling={"enabled": True, "minReplicas": 0, "keda": {**KEDA, "wakeUpQuery": wake}},
    )
    scaled = children(spec).scaled_object
    assert scaled is not None and scaled["spec"]["minReplicaCount"] == 0
    load, wake_up = scaled["spec"]["triggers"]
    assert load["metricType"] == "Value" and load["metadata"]["threshold"] == "2"
    assert load["metadata"]["query"].startswith(
        "histogram_quantile(0.9, sum by (le) (rate(vllm:time_to_first_token"
    )
    assert wake_up["metadata"]["query"] == wake and wake_up["metadata"]["activationThreshold"] == "0"


def test_scale_to_zero_without_a_wake_up_signal_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"minReplicas 0 needs keda\.wakeUpQuery"):
        spec_with(autoscaling={"enabled": True, "minReplicas": 0, "keda": KEDA})
    with pytest.raises(ValidationError, match=r"minReplicas 0 needs keda\.wakeUpQuery"):
        spec_with(autoscaling={"enabled": True, "minReplicas": 0})
