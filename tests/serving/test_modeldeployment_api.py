"""The ModelDeployment model and CRD: defaults, checks named by field, where a job's model is served from."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from deeptune import crdgen
from deeptune.api.base import PvcLocation, describe_validation_error
from deeptune.api.finetunejob import FineTuneJobSpec, FineTuneJobStatus, OutputStatus
from deeptune.api.modeldeployment import (
    KIND,
    PLURAL,
    PRINTER_COLUMNS,
    SHORT_NAME,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    ModelNotReadyError,
    ModelSource,
    parse_spec,
    resolve_model,
    serving_backend,
    serving_image,
)
from tests.specs import changed

MINIMAL: dict[str, Any] = {"model": {"fineTuneJobRef": {"name": "support-bot-7b"}}}
REALISTIC: dict[str, Any] = {
    "model": {
        "adapter": {
            "baseModel": {"name": "deepseek-ai/deepseek-llm-7b-base", "tokenSecretRef": {"name": "hf-token"}},
            "adapter": {"pvc": {"claimName": "deeptune-output", "path": "default/support-bot-7b/adapter"}},
        }
    },
    "quantization": "int8",
    "generation": {"maxNewTokens": 256, "stopSequences": ["\n\nUser:"]},
    "batching": {"mode": "dynamic", "maxBatchSize": 16, "preferredBatchSizes": [8, 16]},
    "responseCache": {"enabled": True, "size": "256Mi"},
    "autoscaling": {"enabled": True, "maxReplicas": 4, "queueTimeMicroseconds": 50000},
    "resources": {"gpu": 1, "memory": "48Gi"},
    "service": {"type": "LoadBalancer"},
    "serviceMonitor": True,
}

CRD = crdgen.crd_manifest(
    kind=KIND,
    plural=PLURAL,
    short_names=[SHORT_NAME],
    spec_model=ModelDeploymentSpec,
    status_model=ModelDeploymentStatus,
    printer_columns=PRINTER_COLUMNS,
)
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def with_changes(**changes: Any) -> dict[str, Any]:
    return changed(MINIMAL, **changes)


def error_of(spec: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        parse_spec(spec)
    return describe_validation_error(caught.value)


def test_defaults_a_user_expects() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.runtime.image is None and spec.runtime.backend == "auto"
    assert spec.resources.gpu == 1 and serving_backend(spec) == "vllm", "vLLM serves on GPUs"
    assert serving_image(spec) == "nvcr.io/nvidia/tritonserver:25.12-vllm-python-py3"
    on_cpu = parse_spec(with_changes(resources={"gpu": 0}))
    assert serving_backend(on_cpu) == "python" and serving_image(on_cpu) == "ghcr.io/deeptune/serving:0.1.0"
    assert spec.quantization == "none" and spec.streaming is False and spec.replicas == 1
    assert (spec.generation.max_new_tokens, spec.generation.temperature, spec.generation.top_p) == (
        128,
        0.0,
        1.0,
    )
    assert spec.batching.enabled and spec.batching.max_batch_size == 8
    assert spec.batching.max_queue_delay_microseconds == 2000
    assert not spec.response_cache.enabled and spec.response_cache.size == "64Mi"
    assert spec.autoscaling.min_replicas == 1 and spec.autoscaling.max_replicas == 3
    assert spec.resources.gpu == 1
    assert (spec.service.type, spec.service.http_port, spec.service.grpc_port, spec.service.metrics_port) == (
        "ClusterIP",
        8000,
        8001,
        8002,
    )
    assert parse_spec(spec.to_wire()) == spec


def test_a_realistic_spec_is_accepted() -> None:
    spec = parse_spec(REALISTIC)
    assert spec.model.adapter is not None and spec.model.adapter.base_model.token_secret_ref is not None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (with_changes(model={}), "spec.model: set exactly one of fineTuneJobRef, merged, adapter (found 0)"),
        (
            with_changes(model__merged={"pvc": {"claimName": "out"}}),
            "spec.model: set exactly one of fineTuneJobRef, merged, adapter (found 2)",
        ),
        (
            with_changes(quantization="int4", resources={"gpu": 0}),
            "spec: quantization needs a GPU (bitsandbytes): set resources.gpu to 1 or more,"
            " or set quantization to none",
        ),
        (
            with_changes(streaming=True, responseCache={"enabled": True}, batching={"mode": "dynamic"}),
            "spec: responseCache cannot be combined with streaming",
        ),
        (
            with_changes(batching={"maxBatchSize": 4, "preferredBatchSizes": [8]}),
            "spec.batching: preferredBatchSizes must not exceed maxBatchSize",
        ),
        (
            with_changes(autoscaling={"minReplicas": 5, "maxReplicas": 2}),
            "spec.autoscaling: minReplicas must not exceed maxReplicas",
        ),
        (
            with_changes(service={"grpcPort": 8000}),
            "spec.service: httpPort, grpcPort, metricsPort and openaiPort must differ",
        ),
        (
            with_changes(responseCache={"size": "100m"}),
            "spec.responseCache: size must be in bytes such as 64Mi",
        ),
        (with_changes(runtime={"backend": "tensorrtllm"}), "spec.runtime.backend: Input should be 'auto',"),
        (
            with_changes(runtime={"backend": "vllm"}, quantization="int8"),
            "spec: runtime.backend vllm needs resources.gpu of 1 or more, quantization none or int4",
        ),
        (
            with_changes(adapters=[{"name": "b", "fineTuneJobRef": {"name": "b"}}], resources={"gpu": 0}),
            "spec: adapters are served by the vLLM backend only",
        ),
        (
            with_changes(adapters=[{"name": "B!", "fineTuneJobRef": {"name": "b"}}]),
            "spec.adapters.0.name: String should match pattern",
        ),
        (
            with_changes(generation={"temperature": 9}),
            "spec.generation.temperature: Input should be less than",
        ),
        (
            with_changes(service={"openaiPort": 8002}),
            "spec.service: httpPort, grpcPort, metricsPort and openaiPort must differ",
        ),
        (
            with_changes(generation={"maxNewTokens": 512, "maxNewTokensLimit": 256}),
            "spec.generation: maxNewTokens (the default) must not exceed maxNewTokensLimit",
        ),
        (
            with_changes(
                generation={"temperature": 0.7}, responseCache={"enabled": True}, batching={"mode": "dynamic"}
            ),
            "spec: responseCache needs greedy decoding",
        ),
        (
            with_changes(responseCache={"enabled": True}),
            "spec: responseCache needs batching.mode dynamic",
        ),
    ],
)
def test_bad_specs_are_named_by_field(spec: dict[str, Any], message: str) -> None:
    assert message in error_of(spec)


# --- where the model is loaded from ----------------------------------------------------------


def _job(
    phase: str, adapter: str | None = None, merged: str | None = None
) -> tuple[FineTuneJobSpec, FineTuneJobStatus]:
    spec = FineTuneJobSpec.model_validate(
        {
            "baseModel": {"name": "deepseek-ai/deepseek-llm-7b-base"},
            "dataset": {"source": {"url": "https://example.com/data.jsonl"}},
            "output": {"pvc": {"claimName": "deeptune-output"}},
        }
    )
    output = OutputStatus(
        claim_name="deeptune-output", path="default/bot", adapter_path=adapter, merged_path=merged
    )
    return spec, FineTuneJobStatus(phase=phase, output=output if phase == "Succeeded" else None)


def _source(**model: Any) -> ModelSource:
    return ModelSource.model_validate(model)


def test_a_jobs_merged_model_wins_over_its_adapter() -> None:
    resolved = resolve_model(
        _source(fineTuneJobRef={"name": "bot"}), _job("Succeeded", adapter="adapter", merged="merged")
    )
    assert resolved.merged == PvcLocation(claim_name="deeptune-output", path="default/bot/merged")
    assert resolved.fine_tune_job == "bot" and resolved.adapter is None


def test_a_jobs_adapter_is_served_on_the_jobs_base_model() -> None:
    resolved = resolve_model(_source(fineTuneJobRef={"name": "bot"}), _job("Succeeded", adapter="adapter"))
    assert resolved.adapter == PvcLocation(claim_name="deeptune-output", path="default/bot/adapter")
    assert resolved.base_model is not None and resolved.base_model.name == "deepseek-ai/deepseek-llm-7b-base"


@pytest.mark.parametrize(
    ("job", "message"),
    [
        (None, "model.fineTuneJobRef: FineTuneJob bot not found"),
        (_job("Running"), "model.fineTuneJobRef: FineTuneJob bot has not succeeded yet (phase Running)"),
        (_job("Succeeded"), "model.fineTuneJobRef: FineTuneJob bot saved no model"),
    ],
)
def test_a_job_without_a_model_is_not_ready(
    job: tuple[FineTuneJobSpec, FineTuneJobStatus] | None, message: str
) -> None:
    with pytest.raises(ModelNotReadyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_model(_source(fineTuneJobRef={"name": "bot"}), job)


def test_direct_sources_need_no_job() -> None:
    merged = resolve_model(_source(merged={"pvc": {"claimName": "models", "path": "bot"}}))
    assert merged.merged == PvcLocation(claim_name="models", path="bot") and merged.fine_tune_job is None
    adapter = resolve_model(parse_spec(REALISTIC).model)
    assert adapter.adapter is not None and adapter.adapter.path == "default/support-bot-7b/adapter"


# --- the CRD --------------------------------------------------------------------------------


def _walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_the_schema_is_structural() -> None:
    for path, node in _walk(SCHEMA):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title"} & node.keys(), path
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed or node.get("x-kubernetes-preserve-unknown-fields"), path


def _validate(spec: dict[str, Any]) -> None:
    manifest = {"apiVersion": "deeptune.dev/v1alpha1", "kind": KIND, "metadata": {}, "spec": spec}
    jsonschema.Draft4Validator(SCHEMA).validate(manifest)


def test_the_schema_accepts_what_the_model_accepts_and_rejects_bad_values() -> None:
    _validate(MINIMAL)
    _validate(REALISTIC)
    for bad in (
        with_changes(quantization="fp8"),
        with_changes(runtime={"backend": "tensorrtllm"}),
        with_changes(adapters=[{"name": "Upper", "fineTuneJobRef": {"name": "b"}}]),
        with_changes(service={"type": "Ingress"}),
        with_changes(replicas=-1),
    ):
        with pytest.raises(jsonschema.ValidationError):
            _validate(bad)


def test_every_cross_field_rule_reaches_the_crd_with_the_models_message() -> None:
    text = json.dumps(SCHEMA)
    for message in (
        "set exactly one of fineTuneJobRef, merged or adapter",
        "quantization needs a GPU (bitsandbytes): set resources.gpu to 1 or more, or set quantization to",
        "responseCache cannot be combined with streaming",
        "preferredBatchSizes must not exceed maxBatchSize",
        "minReplicas must not exceed maxReplicas",
        "httpPort, grpcPort, metricsPort and openaiPort must differ",
        "size must be in bytes such as 64Mi",
        "maxNewTokens (the default) must not exceed maxNewTokensLimit",
        "responseCache needs greedy decoding (generation.temperature 0)",
        "responseCache needs batching.mode dynamic",
        "runtime.backend vllm needs resources.gpu of 1 or more",
        "adapters are served by the vLLM backend only",
        "adapters share model's base model",
        "name 'adapter' is model's own adapter's",
    ):
        assert message in text, message


def test_status_and_printer_columns() -> None:
    status = SCHEMA["properties"]["status"]["properties"]
    assert status["modelState"]["enum"] == ["Pending", "Loading", "Loaded", "FailedToLoad"]
    assert set(status["lastProbe"]["properties"]) >= {
        "time",
        "latencyMs",
        "serverReady",
        "modelReady",
        "inferenceOk",
    }
    assert set(status["endpoints"]["properties"]) >= {"http", "grpc", "metrics"}
    columns = {c["name"]: c["jsonPath"] for c in PRINTER_COLUMNS}
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Model State"] == ".status.modelState"
    assert columns["OpenAI URL"] == ".status.endpoints.openai"
    assert CRD["spec"]["names"]["shortNames"] == ["mdep"]
