"""The FineTuneJob model: defaults a user expects, and bad specs named by their field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from deeptune.api.base import describe_validation_error
from deeptune.api.finetunejob import FineTuneJobSpec, parse_spec
from tests.specs import changed

MINIMAL: dict[str, Any] = {
    "baseModel": {"name": "deepseek-ai/deepseek-coder-1.3b-base"},
    "dataset": {"source": {"url": "https://example.com/data.jsonl"}},
    "output": {"pvc": {"claimName": "out"}},
}


def with_changes(**changes: Any) -> dict[str, Any]:
    return changed(MINIMAL, **changes)


def error_of(spec: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        parse_spec(spec)
    return describe_validation_error(caught.value)


def test_defaults_a_user_expects() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.method == "lora"
    assert spec.learning_rate == 2e-4
    assert spec.hyperparameters.epochs == 3
    assert spec.hyperparameters.weight_decay == 0.01
    assert spec.lora.target_modules == ["auto"]
    assert spec.base_model.trust_remote_code is False
    assert spec.resources.gpu == 1 and spec.resources.gpu_resource_name == "nvidia.com/gpu"
    assert spec.evaluation.baseline is True
    assert spec.dataset.validation.ratio == 0.1
    assert spec.dataset.cleaning.pii.action == "redact"
    assert spec.backoff_limit == 3


@pytest.mark.parametrize(("method", "rate"), [("full", 2e-5), ("lora", 2e-4), ("qlora", 2e-4)])
def test_learning_rate_default_depends_on_method(method: str, rate: float) -> None:
    assert parse_spec(with_changes(method=method)).learning_rate == rate


def test_explicit_learning_rate_wins() -> None:
    assert parse_spec(with_changes(method="full", hyperparameters__learningRate=1e-4)).learning_rate == 1e-4


def test_wire_form_round_trips_in_camel_case() -> None:
    spec = parse_spec(MINIMAL)
    wire = spec.to_wire()
    assert "baseModel" in wire and "perDeviceBatchSize" in wire["hyperparameters"]
    assert FineTuneJobSpec.model_validate(wire) == spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            with_changes(method="qlora", resources__gpu=0),
            "spec: method qlora needs a GPU: set resources.gpu to 1 or more, or use method lora",
        ),
        (
            with_changes(output__quantizedExport="int8", resources__gpu=0),
            "spec: output.quantizedExport needs a GPU: set resources.gpu to 1 or more, or set it to none",
        ),
        (
            with_changes(resources__gpu=8, distributed={"processesPerNode": 4}),
            "spec: distributed.processesPerNode must equal resources.gpu (one process per GPU), or be left "
            "unset to get that",
        ),
        (
            with_changes(workloadPriorityClassName="urgent"),
            "spec: workloadPriorityClassName is Kueue's: set queueName too (the LocalQueue the run waits in)",
        ),
        (
            with_changes(queueName="gpu-queue", suspend=True),
            "spec: suspend cannot hold a run queued in Kueue (queueName): Kueue starts every Job it admits. "
            "To hold it, deactivate its Workload (kubectl patch workload NAME --type merge -p "
            '\'{"spec":{"active":false}}\')',
        ),
        (
            with_changes(method="qlora", distributed={"strategy": "fsdp"}),
            "spec: distributed.strategy fsdp or deepspeed cannot shard QLoRA's 4-bit weights: use strategy "
            "ddp (or auto) with method qlora, or method lora with fsdp or deepspeed",
        ),
        (
            with_changes(method="qlora", distributed={"strategy": "deepspeed"}),
            "spec: distributed.strategy fsdp or deepspeed cannot shard QLoRA's 4-bit weights: use strategy "
            "ddp (or auto) with method qlora, or method lora with fsdp or deepspeed",
        ),
        (
            with_changes(distributed={"strategy": "fsdp", "offload": "optimizer"}),
            "spec: distributed.offload is DeepSpeed's ZeRO-Offload: set distributed.strategy to deepspeed, "
            "or offload to none",
        ),
        (
            with_changes(baseModel={"name": "a/b", "pvc": {"claimName": "m"}}),
            "spec.baseModel: set exactly one of name, pvc (found 2)",
        ),
        (
            with_changes(dataset={"source": {}}),
            "spec.dataset.source: set exactly one of pvc, configMap, url, hub, inline (found 0)",
        ),
        (
            with_changes(hyperparameters__learningRate=0),
            "spec.hyperparameters.learningRate: Input should be greater than 0",
        ),
        (with_changes(method="dpo"), "spec.method: Input should be 'lora', 'qlora' or 'full'"),
        (
            with_changes(output={"pvc": {"claimName": "o", "path": "../etc"}}),
            "spec.output.pvc.path: must be a relative path without '..' segments"
            " (it is resolved inside the volume)",
        ),
        (
            with_changes(dataset={"source": {"url": "ftp://x/y"}}),
            "spec.dataset.source.url: String should match pattern '^https?://\\S+$'",
        ),
        (
            with_changes(
                dataset={"source": {"url": "https://x"}, "cleaning": {"minChars": 9, "maxChars": 3}}
            ),
            "spec.dataset.cleaning: minChars must not exceed maxChars",
        ),
        (
            with_changes(lora={"targetModules": ["auto", "q_proj"]}),
            "spec.lora: targetModules: `auto` cannot be combined with explicit module names",
        ),
        (
            with_changes(hyperparameters__epoch=3),
            "spec.hyperparameters.epoch: Extra inputs are not permitted",
        ),
        ({"dataset": MINIMAL["dataset"], "output": MINIMAL["output"]}, "spec.baseModel: Field required"),
    ],
)
def test_bad_specs_name_the_field(spec: dict[str, Any], message: str) -> None:
    assert error_of(spec) == message


def test_every_problem_is_reported_at_once() -> None:
    spec = with_changes(method="full", hyperparameters={"epochs": -1, "perDeviceBatchSize": 0})
    message = error_of(spec)
    assert "spec.hyperparameters.epochs" in message
    assert "spec.hyperparameters.perDeviceBatchSize" in message


def test_quantities_accept_numbers_and_strings() -> None:
    spec = parse_spec(with_changes(resources={"cpu": 4, "memory": "64Gi"}))
    assert (spec.resources.cpu, spec.resources.memory) == ("4", "64Gi")
    assert "spec.resources.memory" in error_of(with_changes(resources={"memory": "lots"}))


def test_examples_are_valid(tiny_manifest: dict[str, Any], big_manifest: dict[str, Any]) -> None:
    tiny = parse_spec(tiny_manifest["spec"])
    assert tiny.resources.gpu == 0 and tiny.base_model.pvc is not None
    big = parse_spec(big_manifest["spec"])
    assert big.base_model.name == "deepseek-ai/deepseek-llm-7b-base"
    assert big.base_model.token_secret_ref is not None


def test_world_size_is_one_process_per_gpu() -> None:
    assert parse_spec(with_changes(resources__gpu=8)).world_size == 8
    assert parse_spec(with_changes(resources__gpu=0, distributed={"processesPerNode": 2})).world_size == 2
    assert parse_spec(with_changes(resources__gpu=0)).world_size == 1
