"""A FineTuneJob's memory plan: which specs get one, and the quantities it reads."""

from __future__ import annotations

import pytest

from deeptune.api.finetunejob import parse_spec
from deeptune.fitting import plan_for, quantity_bytes, refusal
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
