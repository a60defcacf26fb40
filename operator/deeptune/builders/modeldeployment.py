"""ModelDeployment → its children: the Triton model repository ConfigMap, the serving Deployment, its
Service, and optionally a HorizontalPodAutoscaler, a Prometheus Operator ServiceMonitor and a
NetworkPolicy. Pure.

Shaped after Triton's `deploy/k8s-onprem` chart: ports 8000/8001/8002, live/ready probes on Triton's
health endpoints, metrics scraped from the metrics port.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass

from deeptune.api.base import PvcLocation
from deeptune.api.finetunejob import BaseModelSpec
from deeptune.api.modeldeployment import (
    PRIMARY_ADAPTER,
    Endpoints,
    ModelDeploymentSpec,
    ResolvedModel,
    serving_backend,
    serving_image,
)
from deeptune.builders.common import (
    Manifest,
    Owner,
    child_name,
    container_security_context,
    labels,
    metadata,
    pod_security_context,
    uid_label,
)
from deeptune.builders.finetunejob import PVC_ROOT, ChildSettings
from deeptune.builders.pod import container_resources, cpu_threads, scheduling
from deeptune.serving import repository, vllm
from deeptune.serving.repository import REPOSITORY_PATH, ModelLocation

COMPONENT = "serving"
CONTAINER = "triton"
UID_LABEL = uid_label("ModelDeployment")
"""On every pod and in every selector: the owner's name label is cut to 63 characters and could be
shared by two ModelDeployments, its uid cannot."""
CONFIG_HASH = "deeptune.dev/config-hash"
QUEUE_TIME_METRIC = "triton_queue_time_microseconds"
"""The per-pod custom metric the autoscaler reads for `queueTimeMicroseconds`. Triton exports only
cumulative counters, so a metrics adapter (e.g. prometheus-adapter) must define it, per pod, as
`rate(nv_inference_queue_duration_us[1m]) / rate(nv_inference_request_success[1m])`."""
ENGINE_WAITING_METRIC = "deeptune_engine_requests_waiting"
"""The Python backend's continuous engine's queue length, on Triton's metrics endpoint (the serving
package's WAITING_METRIC; a test checks they agree)."""
STARTUP_SECONDS = 1800
"""How long Triton may take to load the model before the kubelet restarts it: the HTTP endpoint
opens only after loading, and a 70B model read from a network volume takes many minutes."""
_NOT_DNS_LABEL = re.compile(r"[^a-z0-9-]")
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
"""The label Kubernetes puts on every namespace, with its name: what a policy selects a namespace by."""


@dataclass(frozen=True)
class ServingChildren:
    """Everything a ModelDeployment owns, in the order they are applied (the repository before the
    pods that mount it)."""

    config_map: Manifest
    deployment: Manifest
    service: Manifest
    autoscaler: Manifest | None
    service_monitor: Manifest | None
    network_policy: Manifest | None = None
    scaled_object: Manifest | None = None

    def manifests(self) -> list[Manifest]:
        """The policy goes before the Deployment, so that new pods are never reachable without it;
        the Service too, so that whoever sees the Deployment finds its Service."""
        policy = [self.network_policy] if self.network_policy is not None else []
        optional = [m for m in (self.autoscaler, self.scaled_object, self.service_monitor) if m is not None]
        return [self.config_map, *policy, self.service, self.deployment, *optional]


def server_name(owner: Owner) -> str:
    """The Deployment, Service, HPA and ServiceMonitor name. A Service name must be a DNS-1035 label
    (no dots, starts with a letter), stricter than a custom resource's name."""
    base = _NOT_DNS_LABEL.sub("-", owner.name.lower())
    if not base[:1].isalpha():
        base = f"mdep-{base}"
    return child_name(base, "triton")


def repository_name(owner: Owner) -> str:
    """The ConfigMap holding the Triton model repository."""
    return child_name(owner.name, "repository")


def model_name(owner: Owner) -> str:
    """The Triton model's name (`/v2/models/<name>/...`): the ModelDeployment's name."""
    return owner.name


def served_models(owner: Owner, spec: ModelDeploymentSpec, resolved: ResolvedModel) -> list[str]:
    """The names clients put in `model` on the OpenAI API: `spec.model`'s first, then one per adapter.
    The Python backend serves one model under the Triton model's name; on vLLM the Triton model is the
    base (or merged) model and each adapter is `<name>:<adapter>` (Triton's OpenAI frontend)."""
    name = model_name(owner)
    if serving_backend(spec) == "python":
        return [name]
    own = vllm.served_name(name, PRIMARY_ADAPTER if resolved.adapter else None)
    return [own, *(vllm.served_name(name, adapter.name) for adapter in resolved.adapters or [])]


def selector_labels(owner: Owner) -> dict[str, str]:
    """What the Deployment, Service and ServiceMonitor select serving pods (and the Service) by."""
    owner_label = f"deeptune.dev/{owner.kind.lower()}"
    return {
        "app.kubernetes.io/component": COMPONENT,
        owner_label: labels(owner, COMPONENT)[owner_label],
        UID_LABEL: owner.uid,
    }


def _labelled_metadata(owner: Owner, name: str, settings: ChildSettings) -> Manifest:
    meta = metadata(owner, name, COMPONENT)
    meta["labels"].update({**settings.extra_labels, UID_LABEL: owner.uid})
    return meta


def endpoints(owner: Owner, spec: ModelDeploymentSpec, resolved: ResolvedModel) -> Endpoints:
    """In-cluster addresses of the Service: URLs for HTTP, metrics and the OpenAI API (its base URL, as
    the `openai` client takes it), `host:port` for gRPC (the form `tritonclient.grpc` takes), and the
    model names to ask for."""
    host = f"{server_name(owner)}.{owner.namespace}.svc"
    ports = spec.service
    models = served_models(owner, spec, resolved)
    return Endpoints(
        http=f"http://{host}:{ports.http_port}",
        grpc=f"{host}:{ports.grpc_port}",
        metrics=f"http://{host}:{ports.metrics_port}/metrics",
        openai=f"http://{host}:{ports.openai_port}/v1",
        model_name=models[0],
        models=models,
    )


# --- where the model is ----------------------------------------------------------------------


def _mounted(location: PvcLocation) -> str:
    root = posixpath.join(PVC_ROOT, location.claim_name)
    return posixpath.join(root, location.path) if location.path else root


def model_location(resolved: ResolvedModel) -> ModelLocation:
    """Paths as the serving container sees them (claims mounted under PVC_ROOT, as for the trainer)."""
    if resolved.merged is not None:
        return ModelLocation(model=_mounted(resolved.merged))
    base, adapter = resolved.base_model, resolved.adapter
    if base is None or adapter is None:
        raise ValueError("a resolved model is either merged, or a base model with an adapter")
    return ModelLocation(
        model=_mounted(base.pvc) if base.pvc else str(base.name),
        adapter=_mounted(adapter),
        revision=base.revision,
        trust_remote_code=base.trust_remote_code,
    )


def extra_adapters(resolved: ResolvedModel) -> dict[str, str]:
    """`spec.adapters` as the serving container sees them: name → directory."""
    return {adapter.name: _mounted(adapter.adapter) for adapter in resolved.adapters or []}


def _claims(resolved: ResolvedModel) -> list[str]:
    """Every claim holding weights, once each (base model and adapters often share one)."""
    base_pvc = resolved.base_model.pvc if resolved.base_model else None
    locations = [resolved.merged, base_pvc, resolved.adapter, *(a.adapter for a in resolved.adapters or [])]
    return list(dict.fromkeys(loc.claim_name for loc in locations if loc is not None))


def _lora_rank(resolved: ResolvedModel) -> int | None:
    """The largest rank of the adapters served, when every one is known."""
    ranks = [resolved.adapter_rank] if resolved.adapter else []
    ranks += [adapter.rank for adapter in resolved.adapters or []]
    known = [rank for rank in ranks if rank is not None]
    return max(known) if known and len(known) == len(ranks) else None


def serving_files(owner: Owner, spec: ModelDeploymentSpec, resolved: ResolvedModel) -> dict[str, str]:
    """The model repository the spec's backend reads."""
    location = model_location(resolved)
    if serving_backend(spec) == "python":
        return repository.repository_files(spec, location, model_name(owner))
    adapters = vllm.lora_adapters(location, extra_adapters(resolved))
    return vllm.repository_files(spec, location, model_name(owner), adapters, _lora_rank(resolved))


def _command(owner: Owner, spec: ModelDeploymentSpec, resolved: ResolvedModel) -> list[str]:
    """Each backend's OpenAI frontend, which starts Triton and ends with it: DeepTune's for the Python
    backend (deeptune_serving.__main__), Triton's own for vLLM (its chat template from the artifact's
    tokenizer: the adapter's, which the trainer saved with the template it trained with)."""
    if serving_backend(spec) == "python":
        return repository.serving_command(spec, model_name(owner))
    location = model_location(resolved)
    return vllm.frontend_command(spec, tokenizer=location.adapter or location.model)


def metrics_port_name(spec: ModelDeploymentSpec) -> str:
    """The container port Prometheus scrapes: Triton's metrics port, or on vLLM the OpenAI port, where
    Triton's OpenAI frontend serves Triton's metrics (`/metrics`; it opens no metrics port)."""
    return "metrics" if serving_backend(spec) == "python" else "openai"


def _pod_metrics_port(spec: ModelDeploymentSpec) -> int:
    ports = spec.service
    return ports.metrics_port if metrics_port_name(spec) == "metrics" else ports.openai_port


def probe_port(spec: ModelDeploymentSpec) -> int:
    """The port the operator checks the model through: Triton's HTTP endpoint on the Python backend,
    the OpenAI API on vLLM (the API clients use, and the one both frontends share)."""
    ports = spec.service
    return ports.http_port if serving_backend(spec) == "python" else ports.openai_port


# --- the ConfigMap -----------------------------------------------------------------------------


def config_map_key(path: str) -> str:
    """A repository path as a ConfigMap key, which may not contain `/` (`__` cannot occur in the
    paths: model names are Kubernetes names and the shipped files are fixed)."""
    return path.replace("/", "__")


def build_config_map(owner: Owner, files: dict[str, str], settings: ChildSettings) -> Manifest:
    """The model repository (config.pbtxt and the Python backend's code); the pod maps each key back
    to its path with `items`."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _labelled_metadata(owner, repository_name(owner), settings),
        "data": {config_map_key(path): content for path, content in sorted(files.items())},
    }


# --- the Deployment ----------------------------------------------------------------------------


def _volumes(
    owner: Owner, spec: ModelDeploymentSpec, resolved: ResolvedModel, files: dict[str, str]
) -> tuple[list[Manifest], list[Manifest]]:
    items = [{"key": config_map_key(path), "path": path} for path in sorted(files)]
    volumes: list[Manifest] = [
        {"name": "repository", "configMap": {"name": repository_name(owner), "items": items}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}},
    ]
    mounts: list[Manifest] = [
        # Each model's directory apart (subPath): a ConfigMap volume mounted whole also shows the
        # kubelet's `..data` link and timestamped directory, which Triton takes for models it cannot
        # load, and exits (found on the suite's real node). Triton reads the repository once, so the
        # updates a subPath mount does not receive are not missed: a change restarts the pods.
        *(
            {
                "name": "repository",
                "mountPath": posixpath.join(REPOSITORY_PATH, top),
                "subPath": top,
                "readOnly": True,
            }
            for top in sorted({path.split("/", 1)[0] for path in files})
        ),
        {"name": "tmp", "mountPath": "/tmp"},
        # Triton's Python backend passes tensors to the model's process through /dev/shm.
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    for index, claim in enumerate(_claims(resolved)):
        volumes.append(
            {"name": f"model-{index}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append(
            {"name": f"model-{index}", "mountPath": posixpath.join(PVC_ROOT, claim), "readOnly": True}
        )
    return volumes, mounts


def _token(base: BaseModelSpec | None) -> list[Manifest]:
    ref = base.token_secret_ref if base else None
    if ref is None:
        return []
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def _env(spec: ModelDeploymentSpec, resolved: ResolvedModel) -> list[Manifest]:
    """The operator's variables, then the user's. A name the user sets replaces the operator's: the
    Deployment is applied server-side, which refuses a name twice (a Job would take the last)."""
    env: list[Manifest] = [
        {"name": "HOME", "value": "/tmp"},
        # A base model named by its Hugging Face id is downloaded here (the root filesystem is read-only).
        {"name": "HF_HOME", "value": "/tmp/huggingface"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *_token(resolved.base_model),
    ]
    threads = cpu_threads(spec.resources.cpu)
    if threads:
        env.append({"name": "OMP_NUM_THREADS", "value": str(threads)})
    users = {var.name for var in spec.env}
    return [var for var in env if var["name"] not in users] + [var.to_wire() for var in spec.env]


def _http_probe(path: str, period: int, failures: int) -> Manifest:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _container(
    owner: Owner,
    spec: ModelDeploymentSpec,
    resolved: ResolvedModel,
    mounts: list[Manifest],
    settings: ChildSettings,
) -> Manifest:
    ports = spec.service
    container_ports = [
        {"name": "http", "containerPort": ports.http_port, "protocol": "TCP"},
        {"name": "grpc", "containerPort": ports.grpc_port, "protocol": "TCP"},
        {"name": "metrics", "containerPort": ports.metrics_port, "protocol": "TCP"},
        {"name": "openai", "containerPort": ports.openai_port, "protocol": "TCP"},
    ]
    return {
        "name": CONTAINER,
        "image": serving_image(spec),
        "imagePullPolicy": spec.image_pull_policy or settings.image_pull_policy,
        "command": _command(owner, spec, resolved),
        "ports": [
            p for p in container_ports if p["name"] != "metrics" or metrics_port_name(spec) == "metrics"
        ],
        "env": _env(spec, resolved),
        "resources": container_resources(spec.resources),
        "volumeMounts": mounts,
        # Triton opens its HTTP port only once the model has loaded; until then only the startup
        # probe runs, so a slow load is not mistaken for a dead server.
        "startupProbe": _http_probe("/v2/health/live", 10, STARTUP_SECONDS // 10),
        "livenessProbe": _http_probe("/v2/health/live", 10, 3),
        "readinessProbe": _http_probe("/v2/health/ready", 5, 3),
        "securityContext": container_security_context(),
        # A model that fails to load stops the server (--exit-on-error); its log tail says why.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _pod_spec(
    owner: Owner,
    spec: ModelDeploymentSpec,
    resolved: ResolvedModel,
    files: dict[str, str],
    settings: ChildSettings,
) -> Manifest:
    volumes, mounts = _volumes(owner, spec, resolved, files)
    pod: Manifest = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [_container(owner, spec, resolved, mounts, settings)],
        "volumes": volumes,
        **scheduling(spec.resources),
    }
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [s.to_wire() for s in spec.image_pull_secrets]
    return pod


def config_hash(files: dict[str, str], pod_spec: Manifest) -> str:
    """A digest of what the server runs: the repository (a ConfigMap change alone would not restart
    Triton, which reads it once) and the pod spec. Pods carry it, so the status can tell pods of the
    current spec from those of a rollout in progress."""
    text = json.dumps({"repository": files, "pod": pod_spec}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pods_or_percent(value: str) -> int | str:
    return value if value.endswith("%") else int(value)


def rollout_strategy(spec: ModelDeploymentSpec) -> Manifest | None:
    """The Deployment's rolling update: the spec's, else no spare GPU on GPUs (one pod down at a
    time), else Kubernetes' defaults (None)."""
    rollout = spec.rollout
    gpu = spec.resources.gpu > 0
    surge = rollout.max_surge or ("0" if gpu else None)
    unavailable = rollout.max_unavailable or ("1" if gpu and surge in ("0", "0%") else None)
    rolling = {
        key: _pods_or_percent(value)
        for key, value in (("maxSurge", surge), ("maxUnavailable", unavailable))
        if value is not None
    }
    return {"type": "RollingUpdate", "rollingUpdate": rolling} if rolling else None


def build_deployment(
    owner: Owner,
    spec: ModelDeploymentSpec,
    resolved: ResolvedModel,
    files: dict[str, str],
    settings: ChildSettings,
) -> Manifest:
    """The Triton Deployment. With autoscaling on, `replicas` is left out: the HPA owns it, and the
    operator's server-side apply would otherwise reset it on every change."""
    pod_spec = _pod_spec(owner, spec, resolved, files, settings)
    meta = _labelled_metadata(owner, server_name(owner), settings)
    deployment_spec: Manifest = {
        "selector": {"matchLabels": selector_labels(owner)},
        "template": {
            "metadata": {
                "labels": dict(meta["labels"]),
                "annotations": {
                    CONFIG_HASH: config_hash(files, pod_spec),
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(_pod_metrics_port(spec)),
                    "prometheus.io/path": "/metrics",
                },
            },
            "spec": pod_spec,
        },
    }
    if not spec.autoscaling.enabled:
        deployment_spec["replicas"] = spec.replicas
    if strategy := rollout_strategy(spec):
        deployment_spec["strategy"] = strategy
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": deployment_spec}


# --- Service, autoscaler, monitor --------------------------------------------------------------


def build_service(owner: Owner, spec: ModelDeploymentSpec, settings: ChildSettings) -> Manifest:
    ports = spec.service
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _labelled_metadata(owner, server_name(owner), settings),
        "spec": {
            "type": ports.type,
            "selector": selector_labels(owner),
            "ports": [
                {"name": "http", "port": ports.http_port, "targetPort": "http", "protocol": "TCP"},
                {
                    "name": "grpc",
                    "port": ports.grpc_port,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "grpc",
                },
                {
                    "name": "metrics",
                    "port": ports.metrics_port,
                    "targetPort": metrics_port_name(spec),
                    "protocol": "TCP",
                },
                {
                    "name": "openai",
                    "port": ports.openai_port,
                    "targetPort": "openai",
                    "protocol": "TCP",
                    "appProtocol": "http",
                },
            ],
        },
    }


def build_autoscaler(owner: Owner, spec: ModelDeploymentSpec, settings: ChildSettings) -> Manifest | None:
    """An autoscaling/v2 HPA on CPU use (which needs `resources.cpu`: utilization is a share of the
    request), and on Triton's queue time when `queueTimeMicroseconds` is set."""
    scaling = spec.autoscaling
    if not scaling.enabled or scaling.keda is not None:
        return None
    metrics: list[Manifest] = [
        {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": scaling.target_cpu_utilization},
            },
        }
    ]
    meta = _labelled_metadata(owner, server_name(owner), settings)
    if scaling.queue_time_microseconds is not None:
        # A Pods metric comes from the custom metrics API: without an adapter that serves
        # QUEUE_TIME_METRIC, the HPA reports FailedGetPodsMetric and scales on CPU alone.
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": QUEUE_TIME_METRIC},
                    "target": {"type": "AverageValue", "averageValue": str(scaling.queue_time_microseconds)},
                },
            }
        )
        meta["annotations"] = {
            "deeptune.dev/requires": f"a custom metrics adapter serving {QUEUE_TIME_METRIC} per pod, e.g."
            " prometheus-adapter: rate(nv_inference_queue_duration_us[1m])"
            " / rate(nv_inference_request_success[1m])"
        }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": server_name(owner)},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": metrics,
        },
    }


def load_query(owner: Owner, spec: ModelDeploymentSpec) -> tuple[str, str, str]:
    """The PromQL query of the model's load, its threshold and KEDA's metric type: waiting requests per
    pod on the Python backend (the engine's gauge, averaged over the pods), vLLM's 90th-percentile time
    to first token (a latency: compared as it is)."""
    keda = spec.autoscaling.keda
    assert keda is not None
    selector = f'namespace="{owner.namespace}",model="{model_name(owner)}"'
    if serving_backend(spec) == "python":
        return f"sum({ENGINE_WAITING_METRIC}{{{selector}}})", str(keda.waiting_requests), "AverageValue"
    ttft = f"sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{{{selector}}}[2m]))"
    return f"histogram_quantile(0.9, {ttft})", f"{keda.time_to_first_token_seconds:g}", "Value"


def build_scaled_object(owner: Owner, spec: ModelDeploymentSpec, settings: ChildSettings) -> Manifest | None:
    """A KEDA ScaledObject on the model's load (`load_query`), and on `wakeUpQuery` when given: the
    trigger that can take a deployment scaled to zero back to one pod."""
    scaling = spec.autoscaling
    if not scaling.enabled or scaling.keda is None:
        return None
    keda = scaling.keda
    query, threshold, metric_type = load_query(owner, spec)
    triggers: list[Manifest] = [
        {
            "type": "prometheus",
            "name": "load",
            "metricType": metric_type,
            "metadata": {"serverAddress": keda.prometheus_address, "query": query, "threshold": threshold},
        }
    ]
    if keda.wake_up_query is not None:
        triggers.append(
            {
                "type": "prometheus",
                "name": "wake-up",
                "metricType": "Value",
                "metadata": {
                    "serverAddress": keda.prometheus_address,
                    "query": keda.wake_up_query,
                    "threshold": "1",
                    "activationThreshold": "0",
                },
            }
        )
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _labelled_metadata(owner, server_name(owner), settings),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": server_name(owner)},
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            "triggers": triggers,
        },
    }


def build_service_monitor(
    owner: Owner, spec: ModelDeploymentSpec, settings: ChildSettings
) -> Manifest | None:
    """A Prometheus Operator ServiceMonitor for Triton's metrics port (the CRD must be installed)."""
    if not spec.service_monitor:
        return None
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _labelled_metadata(owner, server_name(owner), settings),
        "spec": {
            "selector": {"matchLabels": selector_labels(owner)},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "30s"}],
        },
    }


def _operator_peer(settings: ChildSettings) -> Manifest | None:
    """The operator's pods, by namespace and labels; None when they are not known (a local run)."""
    if not settings.operator_namespace or not settings.operator_labels:
        return None
    return {
        "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: settings.operator_namespace}},
        "podSelector": {"matchLabels": dict(settings.operator_labels)},
    }


def _port_rule(peers: list[Manifest], *ports: int) -> list[Manifest]:
    """One ingress rule, or none without peers: a rule with no `from` would admit everyone."""
    if not peers:
        return []
    return [{"from": peers, "ports": [{"protocol": "TCP", "port": port} for port in ports]}]


def build_network_policy(owner: Owner, spec: ModelDeploymentSpec, settings: ChildSettings) -> Manifest | None:
    """Ingress to the serving pods: HTTP, gRPC and the OpenAI API from `allowFrom`, the probe port from
    the operator (its model check), metrics from `metricsFrom` (on vLLM that is the OpenAI port, where
    Triton's OpenAI frontend serves them); nothing else. The kubelet's probes come from the node, which
    network plugins admit. Egress is left alone (a base model named by its Hugging Face id is
    downloaded)."""
    policy = spec.network_policy
    if not policy.enabled:
        return None
    ports = spec.service
    operator = _operator_peer(settings)
    rules = [
        *_port_rule(
            [peer.to_wire() for peer in policy.allow_from],
            ports.http_port,
            ports.grpc_port,
            ports.openai_port,
        ),
        *_port_rule([operator] if operator else [], probe_port(spec)),
        *_port_rule([peer.to_wire() for peer in policy.metrics_from], _pod_metrics_port(spec)),
    ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _labelled_metadata(owner, server_name(owner), settings),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(owner)},
            "policyTypes": ["Ingress"],
            "ingress": rules,
        },
    }


def build_children(
    owner: Owner, spec: ModelDeploymentSpec, resolved: ResolvedModel, settings: ChildSettings
) -> ServingChildren:
    """Every child of a ModelDeployment whose model is resolved (a fineTuneJobRef followed)."""
    files = serving_files(owner, spec, resolved)
    return ServingChildren(
        config_map=build_config_map(owner, files, settings),
        deployment=build_deployment(owner, spec, resolved, files, settings),
        service=build_service(owner, spec, settings),
        autoscaler=build_autoscaler(owner, spec, settings),
        scaled_object=build_scaled_object(owner, spec, settings),
        service_monitor=build_service_monitor(owner, spec, settings),
        network_policy=build_network_policy(owner, spec, settings),
    )


def template_hash(deployment: Manifest) -> str | None:
    """The config hash a Deployment's pod template carries (from the API or from `build_deployment`)."""
    template = deployment.get("spec", {}).get("template", {})
    return (template.get("metadata", {}).get("annotations") or {}).get(CONFIG_HASH)
