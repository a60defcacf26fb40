"""A FineTuneJob's memory plan: which specs get one, and the quantities it reads."""

from __future__ import annotations

import pytest

from deeptune.api.finetunejob import parse_spec
from deeptune.fitting import plan_for, plan_status, quantity_bytes, refusal
from tests.conftest import load_example
from tests.specs import changed
from tests.unit.test_finetunejob_model import with_changes


@pytest.mark.parametrize(
    ("quantity", "size"),
    [("80Gi", 80 * 2**30), ("81920Mi", 80 * 2**30), ("24G", 24 * 10**9), ("1024", 1024), ("1500m", 1)],
)
def test_memory_quantities(quantity: str, size: int) -> None:
    assert quantity_bytes(quantity) == size


def test_no_plan_without_a_known_shape_or_a_gpu() -> None:
    assert plan_for(parse_spec(with_changes(baseModel={"pvc": {"claimName": "models"}}))) is None
    assert plan_for(parse_spec(with_changes(resources={"gpu": 0}))) is None


def test_the_plan_follows_the_spec() -> None:
    spec = parse_spec(
        with_changes(
            baseModel={"name": "deepseek-ai/deepseek-llm-7b-base"},
            method="full",
            resources={"gpu": 8, "gpuMemory": "80Gi"},
            distributed={"strategy": "fsdp"},
        )
    )
    plan = plan_for(spec)
    assert plan is not None and plan.fits is True and plan.request.world_size == 8
    assert refusal(spec, plan) is None
    alone = parse_spec(with_changes(baseModel={"name": "deepseek-ai/deepseek-llm-7b-base"}, method="full",
                                    resources={"gpu": 1, "gpuMemory": "80Gi"}))  # fmt: skip
    lonely = plan_for(alone)
    assert lonely is not None and lonely.fits is False
    assert "resources.gpuMemory 80Gi" in (refusal(alone, lonely) or "")


def test_unknown_gpu_memory_shows_the_plan_and_refuses_nothing() -> None:
    spec = parse_spec(with_changes(baseModel={"name": "deepseek-ai/deepseek-llm-67b-base"}))
    plan = plan_for(spec)
    assert plan is not None and plan.fits is None and refusal(spec, plan) is None


@pytest.mark.parametrize(
    ("example", "gib_per_gpu"),
    [
        ("finetune-67b-lora.yaml", 38.6),
        ("finetune-v2-lite.yaml", 33.8),
        ("finetune-7b-full-offload.yaml", 31.7),
    ],
)
def test_the_big_examples_fit_their_gpus_as_the_readme_says(example: str, gib_per_gpu: float) -> None:
    spec = parse_spec(load_example(example)["spec"])
    plan = plan_for(spec)
    assert plan is not None and plan.fits is True
    assert plan_status(plan, spec).gib_per_gpu == gib_per_gpu


def test_offloading_is_what_lets_the_7b_full_example_fit_one_gpu() -> None:
    manifest = load_example("finetune-7b-full-offload.yaml")
    manifest["spec"]["distributed"] = {"strategy": "deepspeed"}
    spec = parse_spec(manifest["spec"])
    plan = plan_for(spec)
    assert plan is not None and plan.fits is False
    assert "would fit with 2 GPUs and strategy deepspeed" in (refusal(spec, plan) or "")


def test_what_offload_keeps_in_the_pod_is_shown_and_checked_against_its_memory() -> None:
    spec = parse_spec(load_example("finetune-7b-full-offload.yaml")["spec"])
    plan = plan_for(spec)
    assert plan is not None
    status = plan_status(plan, spec)
    assert status.offloaded_gib_per_pod == 77.2  # fp32 master weights and two Adam moments: 12 bytes each
    assert "and 77.2 GiB per GPU in host memory" in status.summary
    assert refusal(spec, plan) is None  # resources.memory 160Gi holds it
    example = load_example("finetune-7b-full-offload.yaml")["spec"]
    small = parse_spec(changed(example, resources__memory="64Gi"))
    message = refusal(small, plan) or ""
    assert "keeps 77.2 GiB in each pod's memory, more than resources.memory 64Gi" in message
