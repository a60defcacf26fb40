"""The ModelDeployment resource: which fine-tuned model to serve on Triton, how, and how it is doing."""

from __future__ import annotations

import itertools
import posixpath
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from deeptune.api.base import (
    LONG_TEXT,
    SHORT_TEXT,
    ApiModel,
    Condition,
    EnvList,
    ImageReference,
    LabelSelector,
    PodCountOrPercent,
    PullSecrets,
    PvcLocation,
    Quantity,
    cel,
    cel_rules,
    exactly_one,
    nested_default,
)
from deeptune.api.finetunejob import (
    BaseModelSpec,
    FailureInfo,
    FineTuneJobRef,
    FineTuneJobSpec,
    FineTuneJobStatus,
    GenerationSpec,
    MetricScores,
    OutputStatus,
    ResourcesSpec,
    Score,
    Url,
)

KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SHORT_NAME = "mdep"

DEFAULT_SERVING_IMAGE = "ghcr.io/deeptune/serving:0.1.0"
"""The Python backend's image: Triton 24.10 (Triton 2.51, the release whose server and Python backend
the tests run) with torch, transformers, peft and bitsandbytes (serving-image/Dockerfile): NVIDIA's own
image has no torch, so it cannot run the Python backend's model."""
DEFAULT_VLLM_IMAGE = "nvcr.io/nvidia/tritonserver:25.12-vllm-python-py3"
"""The vLLM backend's image: NVIDIA's Triton with vLLM and Triton's own OpenAI frontend (in the images
since 25.01)."""

Backend = Literal["auto", "python", "vllm"]
"""How Triton runs the model: `python` (DeepTune's model on transformers, continuous or dynamic
batching, CPU or GPU), `vllm` (Triton's vLLM backend: paged attention, continuous batching, prefix
caching, LoRA adapters loaded beside one base; GPU only), or `auto` (see `serving_backend`)."""
ServingBackend = Literal["python", "vllm"]
"""A backend as decided for a spec (`auto` resolved)."""
ADAPTER_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$"
PRIMARY_ADAPTER = "adapter"
"""The LoRA name of `spec.model`'s own adapter on the vLLM backend; `spec.adapters` cannot use it."""
VLLM_NEEDS = (
    "runtime.backend vllm needs resources.gpu of 1 or more, quantization none or int4, and the response"
    " cache off (vLLM runs on NVIDIA GPUs and keeps no response cache): use runtime.backend python otherwise"
)
ADAPTERS_NEED_VLLM = (
    "adapters are served by the vLLM backend only (the Python backend serves one model): set"
    " resources.gpu to 1 or more, runtime.backend to vllm or auto, quantization to none or int4, and"
    " the response cache off"
)
ADAPTERS_NEED_A_BASE = (
    "adapters share model's base model: model must be a base model with an adapter (fineTuneJobRef or"
    " adapter), not merged"
)
PROMOTION_NEEDS_A_RUN = (
    "promotion judges a FineTuneJob's evaluation: it needs model.fineTuneJobRef, not a merged model or"
    " an adapter by path"
)
SCALE_TO_ZERO_NEEDS = (
    "minReplicas 0 needs keda.wakeUpQuery: a deployment scaled to zero has no pods to report load, so"
    " something outside them (your gateway's request count) must wake it; or set minReplicas to 1"
)
Quantization = Literal["none", "int8", "int4"]
ModelState = Literal["Pending", "Loading", "Loaded", "FailedToLoad"]
ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer"]
Port = Annotated[int, Field(ge=1, le=65535)]


# --- spec -----------------------------------------------------------------------------------


class MergedModel(ApiModel):
    """A complete model directory (config.json, tokenizer, weights), e.g. a FineTuneJob's `merged/`."""

    pvc: PvcLocation


class AdapterLocation(ApiModel):
    """A LoRA adapter directory saved by peft (adapter_config.json, adapter weights)."""

    pvc: PvcLocation


class AdapterModel(ApiModel):
    """A base model plus a LoRA adapter, combined when the model loads."""

    base_model: BaseModelSpec
    """The model the adapter was trained on (same shape as a FineTuneJob's baseModel)."""
    adapter: AdapterLocation


class ModelSource(ApiModel):
    """What to serve: a FineTuneJob's result, a merged model, or a base model with an adapter."""

    model_config = cel_rules(
        cel(
            "[has(self.fineTuneJobRef), has(self.merged), has(self.adapter)].filter(x, x).size() == 1",
            "set exactly one of fineTuneJobRef, merged or adapter",
        )
    )

    fine_tune_job_ref: FineTuneJobRef | None = None
    merged: MergedModel | None = None
    adapter: AdapterModel | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        exactly_one(self, ("fine_tune_job_ref", "merged", "adapter"))
        return self


LOWER_IS_BETTER: frozenset[str] = frozenset({"perplexity"})
"""Metrics where a smaller score is the better one; every other metric is better higher."""


class PromotionRule(ApiModel):
    """One metric a FineTuneJob's run must reach, from its `status.evalResults`, before it is served."""

    model_config = cel_rules(
        cel(
            "has(self.minImprovement) || has(self.threshold)",
            "set minImprovement (over the base model), threshold, or both",
        )
    )

    metric: Score
    """A score of the run's `status.evalResults` (a preference run's pairs: preferenceAccuracy,
    preferenceMargin)."""
    min_improvement: float | None = None
    """How much better than the base model on the same rows, in the metric's own units: fine-tuned
    minus base (base minus fine-tuned for perplexity). Needs the run's `evaluation.baseline`."""
    threshold: float | None = None
    """The score the run must reach: at least this, or at most this for perplexity."""

    @model_validator(mode="after")
    def _something_to_check(self) -> PromotionRule:
        if self.min_improvement is None and self.threshold is None:
            raise ValueError("set minImprovement (over the base model), threshold, or both")
        return self

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER


class PromotionSpec(ApiModel):
    """The gate a FineTuneJob's run passes before it is served: a run that misses is not rolled out,
    and the run served before it keeps serving."""

    rules: Annotated[list[PromotionRule], Field(min_length=1, max_length=6)]
    beat_served: bool = False
    """Also require each rule's metric to be no worse than that of the run served now (when there is
    one: its scores are kept in `status.promotion.servedScores`)."""


class RuntimeSpec(ApiModel):
    """The serving runtime: Triton's image and the backend that runs the model in it."""

    image: ImageReference | None = None
    """Triton image. Default: DeepTune's serving image for the Python backend (it must hold torch,
    transformers and peft, and bitsandbytes to quantize: serving-image/Dockerfile), NVIDIA's
    `-vllm-python-py3` image for vLLM."""
    backend: Backend = "auto"
    """`auto`: vLLM on GPUs, the Python backend on CPU and wherever vLLM cannot serve the spec (8-bit
    weights, the response cache)."""


class ServedAdapter(ApiModel):
    """Another FineTuneJob's LoRA adapter, served on the same base model as `model` (vLLM loads every
    adapter once beside one copy of the base weights)."""

    model_config = cel_rules(
        cel(f"self.name != '{PRIMARY_ADAPTER}'", f"name {PRIMARY_ADAPTER!r} is model's own adapter's")
    )

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=ADAPTER_NAME_PATTERN)]
    """Its name in requests: `model: <ModelDeployment>:<name>` on the OpenAI API. It stays when the
    FineTuneJob behind it changes, so clients need no change when a new run replaces an old one."""
    fine_tune_job_ref: FineTuneJobRef
    """A succeeded FineTuneJob with an adapter (a LoRA or QLoRA run) on `model`'s base model."""


class GenerationDefaults(GenerationSpec):
    """Decoding settings used when a request does not set its own (max_new_tokens, temperature, top_p),
    and the most new tokens a request may ask for."""

    model_config = cel_rules(
        cel(
            "!has(self.maxNewTokens) || !has(self.maxNewTokensLimit)"
            " || self.maxNewTokens <= self.maxNewTokensLimit",
            "maxNewTokens (the default) must not exceed maxNewTokensLimit",
            field_path=".maxNewTokens",
        )
    )

    stop_sequences: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=SHORT_TEXT)]], Field(max_length=16)
    ] = []
    """Text at which generation stops; the stop sequence itself is not returned."""
    max_new_tokens_limit: Annotated[int, Field(ge=1, le=32_768)] = 2048
    """The most new tokens one request may ask for (`max_tokens`); a request over it is refused."""

    @model_validator(mode="after")
    def _default_within_limit(self) -> GenerationDefaults:
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("maxNewTokens (the default) must not exceed maxNewTokensLimit")
        return self


class BatchingSpec(ApiModel):
    """How requests share the model. `continuous` (the default): requests join and leave the running
    batch at every decoding step (transformers' continuous batching, a paged KV cache), so a short
    answer never waits for a long one; the Triton model is decoupled, so clients use the OpenAI API,
    Triton's generate endpoints or gRPC streaming. `dynamic`: Triton's dynamic batcher gathers requests
    that arrive close together into one generate call, which waits for its longest answer; it also
    serves KServe-v2 `/infer`, and the response cache needs it."""

    model_config = cel_rules(
        cel(
            "!has(self.preferredBatchSizes) || !has(self.maxBatchSize)"
            " || self.preferredBatchSizes.all(s, s <= self.maxBatchSize)",
            "preferredBatchSizes must not exceed maxBatchSize",
        )
    )

    enabled: bool = True
    """Off: one request at a time."""
    mode: Literal["continuous", "dynamic"] = "continuous"
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 8
    """Most requests generating at once (`continuous`), or most prompts in one generate call
    (`dynamic`, also the most one request may carry)."""
    max_queue_delay_microseconds: Annotated[int, Field(ge=0, le=10_000_000)] = 2000
    """How long a request may wait for others to join its batch: latency traded for throughput
    (`dynamic`; with `continuous`, how long Triton gathers arrivals before handing them over)."""
    preferred_batch_sizes: Annotated[list[Annotated[int, Field(ge=1, le=1024)]], Field(max_length=16)] = []
    """Batch sizes Triton sends without waiting for the queue delay to pass."""
    max_queue_size: Annotated[int, Field(ge=1, le=1_000_000)] = 256
    """Requests that may wait for the model; more are refused at once (HTTP 429 from the OpenAI
    endpoint) rather than queued without bound."""
    queue_timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 60
    """A request still waiting after this long is refused (HTTP 503) instead of answered late."""

    @model_validator(mode="after")
    def _preferred_fit(self) -> BatchingSpec:
        if any(size > self.max_batch_size for size in self.preferred_batch_sizes):
            raise ValueError("preferredBatchSizes must not exceed maxBatchSize")
        return self


class ResponseCacheSpec(ApiModel):
    """Triton's response cache: repeated requests are answered from memory. Only greedy decoding gives
    one answer per request, so with the cache on, requests that sample (temperature > 0) are refused."""

    model_config = cel_rules(
        cel(
            "!has(self.size) || type(self.size) != string || !self.size.endsWith('m')",
            "size must be in bytes such as 64Mi (the suffix m means thousandths)",
            field_path=".size",
        )
    )

    enabled: bool = False
    size: Quantity = "64Mi"
    """Memory for cached responses, per pod."""

    @model_validator(mode="after")
    def _whole_bytes(self) -> ResponseCacheSpec:
        if self.size.endswith("m"):
            raise ValueError("size must be in bytes such as 64Mi (the suffix m means thousandths)")
        return self


class RolloutSpec(ApiModel):
    """How pods of a new spec replace the old ones (the Deployment's rolling update). Left unset, a GPU
    deployment takes one old pod down before its replacement starts (maxSurge 0, maxUnavailable 1: no
    spare GPU needed, one replica fewer for the while), and a CPU one keeps Kubernetes' defaults
    (25%, 25%: a new pod first)."""

    model_config = cel_rules(
        cel(
            "!has(self.maxSurge) || !has(self.maxUnavailable)"
            " || !(string(self.maxSurge) in ['0', '0%'] && string(self.maxUnavailable) in ['0', '0%'])",
            "maxSurge and maxUnavailable cannot both be 0: the rollout could never replace a pod",
        )
    )

    max_surge: PodCountOrPercent | None = None
    """Pods above the replica count during a rollout; 0 needs no spare GPU."""
    max_unavailable: PodCountOrPercent | None = None
    """Pods below the replica count during a rollout."""

    @model_validator(mode="after")
    def _some_progress(self) -> RolloutSpec:
        if self.max_surge in ("0", "0%") and self.max_unavailable in ("0", "0%"):
            raise ValueError(
                "maxSurge and maxUnavailable cannot both be 0: the rollout could never replace a pod"
            )
        return self


class KedaScaling(ApiModel):
    """Scale on the model's own load with a KEDA ScaledObject (KEDA must be installed), read from your
    Prometheus; KEDA then owns the replica count and may scale to zero. The queries select the serving
    pods' series by their `namespace` and `model` labels: have Prometheus scrape them with those (the
    Prometheus Operator does, with `serviceMonitor: true`)."""

    prometheus_address: Url
    """Your Prometheus server, e.g. `http://prometheus-operated.monitoring.svc:9090`."""
    waiting_requests: Annotated[int, Field(ge=1, le=100_000)] = 4
    """Python backend: requests waiting in each pod's continuous-batching engine
    (`deeptune_engine_requests_waiting`) that call for another pod."""
    time_to_first_token_seconds: Annotated[float, Field(gt=0, le=600)] = 2.0
    """vLLM backend: the 90th percentile of time to first token (vLLM's
    `vllm:time_to_first_token_seconds`, over two minutes) above which pods are added."""
    wake_up_query: Annotated[str, Field(min_length=1, max_length=LONG_TEXT)] | None = None
    """A PromQL query that is above 0 when requests arrive for this model, counted outside its pods
    (your gateway's or ingress controller's request rate): what wakes a deployment scaled to zero,
    which has no pods to report load. Needed for `minReplicas: 0`."""


class AutoscalingSpec(ApiModel):
    """Autoscaling of the serving Deployment; when enabled it owns the replica count. Without `keda`: a
    HorizontalPodAutoscaler on CPU use (and Triton's queue time); with it, a KEDA ScaledObject on the
    LLM's load."""

    model_config = cel_rules(
        cel(
            "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
            "minReplicas must not exceed maxReplicas",
        ),
        cel(
            "!has(self.minReplicas) || self.minReplicas > 0"
            " || (has(self.keda) && has(self.keda.wakeUpQuery))",
            SCALE_TO_ZERO_NEEDS,
            field_path=".minReplicas",
        ),
    )

    enabled: bool = False
    min_replicas: Annotated[int, Field(ge=0, le=1000)] = 1
    """0 scales to zero when idle (KEDA only: give `keda.wakeUpQuery`)."""
    max_replicas: Annotated[int, Field(ge=1, le=1000)] = 3
    target_cpu_utilization: Annotated[int, Field(ge=1, le=1000)] = 80
    """Average CPU use (percent of the request) the autoscaler aims for."""
    queue_time_microseconds: Annotated[int, Field(ge=1)] | None = None
    """Also scale on Triton's queue time per request (needs a custom-metrics adapter for Prometheus)."""
    keda: KedaScaling | None = None

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        if self.min_replicas == 0 and (self.keda is None or self.keda.wake_up_query is None):
            raise ValueError(SCALE_TO_ZERO_NEEDS)
        return self


class ServiceSpec(ApiModel):
    """The Service in front of the serving pods: Triton's three ports and the OpenAI-compatible API."""

    model_config = cel_rules(
        cel(
            " && ".join(
                f"(!has(self.{a}) || !has(self.{b}) || self.{a} != self.{b})"
                for a, b in itertools.combinations(("httpPort", "grpcPort", "metricsPort", "openaiPort"), 2)
            ),
            "httpPort, grpcPort, metricsPort and openaiPort must differ",
        )
    )

    type: ServiceType = "ClusterIP"
    http_port: Port = 8000
    grpc_port: Port = 8001
    metrics_port: Port = 8002
    openai_port: Port = 9000
    """The OpenAI-compatible API (`/v1/chat/completions`, `/v1/completions`, `/v1/models`)."""

    @model_validator(mode="after")
    def _distinct_ports(self) -> ServiceSpec:
        if len({self.http_port, self.grpc_port, self.metrics_port, self.openai_port}) != 4:
            raise ValueError("httpPort, grpcPort, metricsPort and openaiPort must differ")
        return self


class NetworkPeer(ApiModel):
    """Pods that may connect: those podSelector matches, in the namespaces namespaceSelector matches.
    Without namespaceSelector, the ModelDeployment's own namespace; `{}` selects everything."""

    model_config = cel_rules(
        cel(
            "has(self.namespaceSelector) || has(self.podSelector)",
            "set namespaceSelector, podSelector or both",
        )
    )

    namespace_selector: LabelSelector | None = None
    """Namespaces by their labels, e.g. `{matchLabels: {kubernetes.io/metadata.name: monitoring}}`."""
    pod_selector: LabelSelector | None = None
    """Pods by their labels, in those namespaces (or in the ModelDeployment's own)."""

    @model_validator(mode="after")
    def _some_selector(self) -> NetworkPeer:
        if self.namespace_selector is None and self.pod_selector is None:
            raise ValueError("set namespaceSelector, podSelector or both")
        return self


def _same_namespace() -> list[NetworkPeer]:
    return [NetworkPeer(pod_selector=LabelSelector())]


Peers = Annotated[list[NetworkPeer], Field(max_length=32)]


class NetworkPolicySpec(ApiModel):
    """A NetworkPolicy for the serving pods: inference only from `allowFrom` (and from the operator, which
    checks the model through the HTTP port), metrics only from `metricsFrom`; everything else is
    refused. It takes effect where the cluster's network plugin enforces NetworkPolicies."""

    enabled: bool = False
    """Off by default: the Service is ClusterIP, reachable only inside the cluster."""
    allow_from: Annotated[Peers, Field(json_schema_extra={"default": [{"podSelector": {}}]})] = Field(
        default_factory=_same_namespace
    )
    """Who may send requests to the HTTP and gRPC ports. Default: every pod in the ModelDeployment's
    namespace; `[]`: nobody but the operator."""
    metrics_from: Peers = []
    """Who may scrape the metrics port, e.g. Prometheus's namespace. Default: nobody."""


class ModelDeploymentSpec(ApiModel):
    """Desired state of a ModelDeployment."""

    model_config = cel_rules(
        cel(
            "!has(self.quantization) || self.quantization == 'none'"
            " || !has(self.resources) || !has(self.resources.gpu) || self.resources.gpu > 0",
            "quantization needs a GPU (bitsandbytes): set resources.gpu to 1 or more,"
            " or set quantization to none",
            field_path=".quantization",
        ),
        cel(
            "!has(self.streaming) || !self.streaming || !has(self.responseCache)"
            " || !has(self.responseCache.enabled) || !self.responseCache.enabled",
            "responseCache cannot be combined with streaming (Triton does not cache streamed"
            " responses): turn one of them off",
            field_path=".responseCache.enabled",
        ),
        cel(
            "!has(self.responseCache) || !has(self.responseCache.enabled) || !self.responseCache.enabled"
            " || (has(self.batching) && has(self.batching.mode) && self.batching.mode == 'dynamic')",
            "responseCache needs batching.mode dynamic: Triton caches only whole responses of models that"
            " are not decoupled, and continuous batching is",
            field_path=".responseCache.enabled",
        ),
        cel(
            "!has(self.responseCache) || !has(self.responseCache.enabled) || !self.responseCache.enabled"
            " || !has(self.generation) || !has(self.generation.temperature)"
            " || self.generation.temperature == 0.0",
            "responseCache needs greedy decoding (generation.temperature 0): a cached answer to a"
            " sampled request would be returned to every later one; set the temperature to 0 or turn"
            " the cache off",
            field_path=".responseCache.enabled",
        ),
        cel(
            "!has(self.runtime) || !has(self.runtime.backend) || self.runtime.backend != 'vllm'"
            " || (has(self.resources) && has(self.resources.gpu) && self.resources.gpu > 0"
            " && (!has(self.quantization) || self.quantization != 'int8')"
            " && (!has(self.responseCache) || !has(self.responseCache.enabled)"
            " || !self.responseCache.enabled))",
            VLLM_NEEDS,
            field_path=".runtime.backend",
        ),
        cel(
            "!has(self.adapters) || size(self.adapters) == 0"
            " || (has(self.resources) && has(self.resources.gpu) && self.resources.gpu > 0"
            " && (!has(self.runtime) || !has(self.runtime.backend) || self.runtime.backend != 'python')"
            " && (!has(self.quantization) || self.quantization != 'int8')"
            " && (!has(self.responseCache) || !has(self.responseCache.enabled)"
            " || !self.responseCache.enabled))",
            ADAPTERS_NEED_VLLM,
            field_path=".adapters",
        ),
        cel(
            "!has(self.adapters) || size(self.adapters) == 0 || !has(self.model.merged)",
            ADAPTERS_NEED_A_BASE,
            field_path=".adapters",
        ),
        cel(
            "!has(self.promotion) || has(self.model.fineTuneJobRef)",
            PROMOTION_NEEDS_A_RUN,
            field_path=".promotion",
        ),
    )

    model: ModelSource
    promotion: PromotionSpec | None = None
    """Serve a FineTuneJob's run only if its evaluation passes these rules (model.fineTuneJobRef)."""
    adapters: Annotated[
        list[ServedAdapter],
        Field(
            max_length=16,
            json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        ),
    ] = []
    """More LoRA adapters on `model`'s base model, each its own model name (vLLM backend). Adding or
    swapping one rolls the pods out: Triton's OpenAI frontend lists its models once, at start."""
    runtime: Annotated[RuntimeSpec, Field(json_schema_extra=nested_default())] = Field(
        default_factory=RuntimeSpec
    )
    quantization: Quantization = "none"
    """Load the weights in 8 or 4 bits with bitsandbytes: less GPU memory, a little lower quality."""
    generation: Annotated[GenerationDefaults, Field(json_schema_extra=nested_default())] = Field(
        default_factory=GenerationDefaults
    )
    batching: Annotated[BatchingSpec, Field(json_schema_extra=nested_default())] = Field(
        default_factory=BatchingSpec
    )
    response_cache: Annotated[ResponseCacheSpec, Field(json_schema_extra=nested_default())] = Field(
        default_factory=ResponseCacheSpec
    )
    streaming: bool = False
    """Send text as it is generated (a decoupled Triton model): `stream: true` on the OpenAI API,
    Triton's `generate_stream` and gRPC streaming get it piece by piece; without it, in one piece."""
    replicas: Annotated[int, Field(ge=0, le=1000)] = 1
    """Serving pods when autoscaling is off."""
    autoscaling: Annotated[AutoscalingSpec, Field(json_schema_extra=nested_default())] = Field(
        default_factory=AutoscalingSpec
    )
    rollout: Annotated[RolloutSpec, Field(json_schema_extra=nested_default())] = Field(
        default_factory=RolloutSpec
    )
    resources: Annotated[ResourcesSpec, Field(json_schema_extra=nested_default())] = Field(
        default_factory=ResourcesSpec
    )
    """What each serving pod asks of the cluster; gpu 0 serves on CPU (small models only)."""
    service: Annotated[ServiceSpec, Field(json_schema_extra=nested_default())] = Field(
        default_factory=ServiceSpec
    )
    service_monitor: bool = False
    """Create a Prometheus Operator ServiceMonitor for Triton's metrics port."""
    network_policy: Annotated[NetworkPolicySpec, Field(json_schema_extra=nested_default())] = Field(
        default_factory=NetworkPolicySpec
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: PullSecrets = []
    env: EnvList = []
    """Extra environment for Triton; take secrets by valueFrom.secretKeyRef, never inline."""

    @model_validator(mode="after")
    def _compatible(self) -> ModelDeploymentSpec:
        if self.quantization != "none" and self.resources.gpu == 0:
            raise ValueError(
                "quantization needs a GPU (bitsandbytes): set resources.gpu to 1 or more,"
                " or set quantization to none"
            )
        if self.streaming and self.response_cache.enabled:
            raise ValueError(
                "responseCache cannot be combined with streaming (Triton does not cache streamed"
                " responses): turn one of them off"
            )
        if self.response_cache.enabled and self.batching.mode != "dynamic":
            raise ValueError(
                "responseCache needs batching.mode dynamic: Triton caches only whole responses of models that"
                " are not decoupled, and continuous batching is"
            )
        if self.response_cache.enabled and self.generation.temperature != 0:
            raise ValueError(
                "responseCache needs greedy decoding (generation.temperature 0): a cached answer to a"
                " sampled request would be returned to every later one; set the temperature to 0 or turn"
                " the cache off"
            )
        if self.runtime.backend == "vllm" and not vllm_can_serve(self):
            raise ValueError(VLLM_NEEDS)
        if self.adapters:
            if serving_backend(self) != "vllm":
                raise ValueError(ADAPTERS_NEED_VLLM)
            if self.model.merged is not None:
                raise ValueError(ADAPTERS_NEED_A_BASE)
            names = [adapter.name for adapter in self.adapters]
            if PRIMARY_ADAPTER in names or len(set(names)) != len(names):
                raise ValueError(f"adapters: names must differ from each other and from {PRIMARY_ADAPTER!r}")
        if self.promotion is not None and self.model.fine_tune_job_ref is None:
            raise ValueError(PROMOTION_NEEDS_A_RUN)
        return self


def vllm_can_serve(spec: ModelDeploymentSpec) -> bool:
    """vLLM serves on GPUs, loads 4-bit bitsandbytes weights but not 8-bit, and has no response cache."""
    return spec.resources.gpu > 0 and spec.quantization != "int8" and not spec.response_cache.enabled


def serving_backend(spec: ModelDeploymentSpec) -> ServingBackend:
    """The backend that serves the spec: the one it names, else vLLM where it can serve it."""
    if spec.runtime.backend != "auto":
        return spec.runtime.backend
    return "vllm" if vllm_can_serve(spec) else "python"


def serving_image(spec: ModelDeploymentSpec) -> str:
    """The spec's image, else the backend's default."""
    if spec.runtime.image:
        return spec.runtime.image
    return DEFAULT_VLLM_IMAGE if serving_backend(spec) == "vllm" else DEFAULT_SERVING_IMAGE


# --- status ---------------------------------------------------------------------------------


class ResolvedAdapter(ApiModel):
    """One of `spec.adapters`, after following its fineTuneJobRef."""

    name: Annotated[str, Field(max_length=63)]
    adapter: PvcLocation
    rank: int | None = None
    fine_tune_job: Annotated[str, Field(max_length=SHORT_TEXT)]


class ResolvedModel(ApiModel):
    """Where the serving pods load the model from, after following a fineTuneJobRef."""

    merged: PvcLocation | None = None
    """A complete model directory."""
    base_model: BaseModelSpec | None = None
    """The base model an adapter is applied to."""
    adapter: PvcLocation | None = None
    adapter_rank: int | None = None
    """The adapter's LoRA rank, when its FineTuneJob says (vLLM sizes its adapter slots by it)."""
    fine_tune_job: str | None = None
    """The FineTuneJob whose output this is, when the spec names one."""
    fine_tune_job_uid: str | None = None
    """That FineTuneJob's uid: a FineTuneJob deleted and made again under the same name is another run."""
    digest: str | None = None
    """`sha256:` of the files served (merged model or adapter), from the FineTuneJob's status.lineage."""
    adapters: Annotated[list[ResolvedAdapter], Field(max_length=16)] | None = None
    """`spec.adapters`, each where its FineTuneJob saved it."""


class Endpoints(ApiModel):
    """In-cluster URLs of the Service's ports."""

    http: str | None = None
    grpc: str | None = None
    metrics: str | None = None
    openai: str | None = None
    """The OpenAI-compatible API's base URL (`.../v1`), for the `openai` client's `base_url`."""
    model_name: str | None = None
    """The model name to use in requests: `model` on the OpenAI API (and, on the Python backend,
    `/v2/models/<modelName>/infer`)."""
    models: Annotated[list[Annotated[str, Field(max_length=SHORT_TEXT)]], Field(max_length=17)] | None = None
    """Every model name the deployment answers to: `modelName`, then one per `spec.adapters`."""


class ProbeResult(ApiModel):
    """The operator's last check of the Service with tritonclient: health, then one small inference."""

    time: str
    latency_ms: float | None = None
    server_ready: bool = False
    model_ready: bool = False
    inference_ok: bool = False
    message: Annotated[str, Field(max_length=LONG_TEXT)] = ""


class PromotionCheck(ApiModel):
    """One rule of `spec.promotion` applied to a run's scores."""

    metric: Score
    passed: bool
    fine_tuned: float | None = None
    baseline: float | None = None
    served: float | None = None
    """The score of the run served when this one was judged (`beatServed`)."""
    required: float | None = None
    """The score the run needed, the strictest of the rule's bounds (None: a score was missing)."""
    shortfall: float | None = None
    """How far the run's score was from `required`, when it missed."""


class PromotionStatus(ApiModel):
    """The gate's verdict on the run `spec.model.fineTuneJobRef` names now."""

    fine_tune_job: Annotated[str, Field(max_length=SHORT_TEXT)]
    fine_tune_job_uid: Annotated[str, Field(max_length=SHORT_TEXT)] | None = None
    passed: bool
    checks: Annotated[list[PromotionCheck], Field(max_length=6)] = []
    served_scores: MetricScores | None = None
    """The evaluation scores of the run now served, as it was promoted: what `beatServed` compares
    against, even after that FineTuneJob is deleted."""


class ModelDeploymentStatus(ApiModel):
    """Observed state of a ModelDeployment, written only by the operator."""

    model_config = ConfigDict(extra="ignore")

    model_state: ModelState | None = None
    backend: ServingBackend | None = None
    """The Triton backend serving the model (`spec.runtime.backend`, with `auto` decided)."""
    observed_generation: int | None = None
    conditions: list[Condition] = []
    """ModelLoaded (every serving pod has loaded the model) and Ready (the Service answers)."""
    last_failure: FailureInfo | None = None
    """The last time a serving pod failed, e.g. the model did not load."""
    replicas: int | None = None
    ready_replicas: int | None = None
    endpoints: Endpoints | None = None
    last_probe: ProbeResult | None = None
    resolved_model: ResolvedModel | None = None
    promotion: PromotionStatus | None = None
    """`spec.promotion`'s verdict on the referenced run; its condition is `Promoted`."""
    deployment_name: Annotated[str, Field(max_length=SHORT_TEXT)] | None = None


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Model State", "type": "string", "jsonPath": ".status.modelState"},
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "OpenAI URL", "type": "string", "jsonPath": ".status.endpoints.openai"},
    {"name": "Backend", "type": "string", "jsonPath": ".status.backend", "priority": 1},
    {
        "name": "Promoted",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Promoted")].status',
        "priority": 1,
    },
    {"name": "Quantization", "type": "string", "jsonPath": ".spec.quantization", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def parse_spec(spec: dict[str, Any]) -> ModelDeploymentSpec:
    """Validate a spec as it comes from Kubernetes (camelCase, possibly defaulted by the API server)."""
    return ModelDeploymentSpec.model_validate(spec)


class ModelNotReadyError(ValueError):
    """The referenced FineTuneJob has no servable output yet (still running, failed, or never saved one)."""


def resolve_model(
    source: ModelSource,
    job: tuple[FineTuneJobSpec, FineTuneJobStatus] | None = None,
    *,
    adapter_needed: bool = False,
) -> ResolvedModel:
    """Where to load from. A fineTuneJobRef needs the job (spec and status): its merged model wins over
    its adapter, because a merged model loads faster and serves without the adapter's extra matmuls;
    unless `adapter_needed` (other adapters share its base model, so it must stay base + adapter)."""
    if source.merged is not None:
        return ResolvedModel(merged=source.merged.pvc)
    if source.adapter is not None:
        return ResolvedModel(base_model=source.adapter.base_model, adapter=source.adapter.adapter.pvc)
    assert source.fine_tune_job_ref is not None  # the validator guarantees one source
    name = source.fine_tune_job_ref.name
    job_spec, output = _succeeded_output(f"model.fineTuneJobRef: FineTuneJob {name}", job)
    digests = job[1].lineage.artifacts if job is not None and job[1].lineage is not None else {}
    if output.merged_path and not adapter_needed:
        merged = PvcLocation(
            claim_name=output.claim_name, path=posixpath.join(output.path, output.merged_path)
        )
        return ResolvedModel(merged=merged, fine_tune_job=name, digest=digests.get("merged"))
    if output.adapter_path:
        adapter = PvcLocation(
            claim_name=output.claim_name, path=posixpath.join(output.path, output.adapter_path)
        )
        return ResolvedModel(
            base_model=job_spec.base_model,
            adapter=adapter,
            adapter_rank=job_spec.lora.r,
            fine_tune_job=name,
            digest=digests.get("adapter"),
        )
    if adapter_needed:
        raise ModelNotReadyError(
            f"model.fineTuneJobRef: FineTuneJob {name} saved no adapter (method {job_spec.method}), so"
            " adapters cannot share its base model: serve it alone, or serve a LoRA or QLoRA run"
        )
    raise ModelNotReadyError(f"model.fineTuneJobRef: FineTuneJob {name} saved no model")


def _succeeded_output(
    what: str, job: tuple[FineTuneJobSpec, FineTuneJobStatus] | None
) -> tuple[FineTuneJobSpec, OutputStatus]:
    if job is None:
        raise ModelNotReadyError(f"{what} not found")
    job_spec, job_status = job
    if job_status.phase != "Succeeded" or job_status.output is None:
        raise ModelNotReadyError(f"{what} has not succeeded yet (phase {job_status.phase})")
    return job_spec, job_status.output


class AdapterMismatchError(ValueError):
    """An adapter of `spec.adapters` was trained on another base model than `spec.model`'s."""


def _same_base(a: BaseModelSpec, b: BaseModelSpec) -> bool:
    return (a.name, a.pvc, a.revision) == (b.name, b.pvc, b.revision)


def _describe_base(base: BaseModelSpec) -> str:
    if base.pvc is not None:
        return f"PVC {base.pvc.claim_name}:{base.pvc.path or '/'}"
    return f"{base.name}@{base.revision}"


def resolve_adapter(
    index: int,
    entry: ServedAdapter,
    job: tuple[FineTuneJobSpec, FineTuneJobStatus] | None,
    base: BaseModelSpec,
) -> ResolvedAdapter:
    """Where one of `spec.adapters` is, after checking that it was trained on `base` (`spec.model`'s)."""
    ref = entry.fine_tune_job_ref.name
    what = f"adapters[{index}] ({entry.name}): FineTuneJob {ref}"
    job_spec, output = _succeeded_output(what, job)
    if not output.adapter_path:
        raise ModelNotReadyError(
            f"{what} saved no adapter (method {job_spec.method}): only LoRA and QLoRA runs can share a"
            " base model"
        )
    if not _same_base(job_spec.base_model, base):
        raise AdapterMismatchError(
            f"{what} was trained on {_describe_base(job_spec.base_model)}, but model's base model is"
            f" {_describe_base(base)}: one deployment serves adapters of one base model"
        )
    location = PvcLocation(
        claim_name=output.claim_name, path=posixpath.join(output.path, output.adapter_path)
    )
    return ResolvedAdapter(name=entry.name, adapter=location, rank=job_spec.lora.r, fine_tune_job=ref)
