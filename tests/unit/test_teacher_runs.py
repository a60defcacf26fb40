"""A distillation teacher given as another FineTuneJob (`distillation.teacher.fineTuneJobRef`): the
student waits for it, then learns from its merged model or from its adapter on its base model."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from pydantic import ValidationError

from deeptune.api.base import describe_validation_error
from deeptune.api.finetunejob import parse_spec
from deeptune.api.trainer import TrainerConfig
from deeptune.builders.finetunejob import build_config_map
from deeptune.config import Settings
from deeptune.reconcilers.finetunejob import FineTuneJobReconciler
from deeptune.status.finetunejob import RunState
from deeptune.status.teacher import WAITING, resolve_teacher
from tests.unit.conftest import Api
from tests.unit.test_finetunejob_builders import OWNER, claims_of, container_of, job_for
from tests.unit.test_finetunejob_model import MINIMAL, with_changes
from tests.unit.test_reconcilers import UID, cache, ftj

Obj = dict[str, Any]
STUDENT = with_changes(distillation={"teacher": {"fineTuneJobRef": {"name": "big"}}})
TEACHER_SPEC = {**MINIMAL, "baseModel": {"name": "org/big-base", "tokenSecretRef": {"name": "hf"}}}


def teacher(phase: str, **output: str) -> Obj:
    status: Obj = {"phase": phase}
    if output:
        status["output"] = {"claimName": "models", "path": "runs/big", **output}
    meta = {"name": "big", "namespace": OWNER.namespace, "uid": "teacher-uid"}
    return {"metadata": meta, "spec": copy.deepcopy(TEACHER_SPEC), "status": status}


def test_a_teacher_is_one_of_name_pvc_or_a_run_and_an_adapter_goes_with_a_model() -> None:
    for teacher_spec, message in [
        ({"name": "a/b", "fineTuneJobRef": {"name": "big"}}, "exactly one of name, pvc, fineTuneJobRef"),
        ({"fineTuneJobRef": {"name": "big"}, "adapter": {"claimName": "x"}}, "fineTuneJobRef brings its own"),
    ]:  # fmt: skip
        with pytest.raises(ValidationError) as caught:
            parse_spec(with_changes(distillation={"teacher": teacher_spec}))
        assert message in describe_validation_error(caught.value)


@pytest.mark.parametrize(
    ("referenced", "says"),
    [
        (None, "FineTuneJob big not found"),
        (teacher("Running"), "waiting for FineTuneJob big to succeed (phase Running)"),
        (teacher("Failed"), "FineTuneJob big failed; rerun it under that name"),
        (teacher("Succeeded"), "reports no model in status.output"),
    ],
)
def test_the_student_waits_until_its_teacher_succeeded(referenced: Obj | None, says: str) -> None:
    waiting = resolve_teacher(parse_spec(STUDENT), referenced)
    assert isinstance(waiting, RunState)
    assert (waiting.phase, waiting.reason) == ("Pending", WAITING)
    assert waiting.message.startswith("distillation.teacher.fineTuneJobRef: ") and says in waiting.message


def test_a_merged_teacher_is_its_merged_directory() -> None:
    resolved = resolve_teacher(
        parse_spec(STUDENT), teacher("Succeeded", mergedPath="merged", adapterPath="adapter")
    )
    assert not isinstance(resolved, RunState) and resolved.distillation is not None
    config = TrainerConfig.model_validate_json(build_config_map(OWNER, resolved)["data"]["config.json"])
    assert config.paths.teacher_model == "/mnt/pvc/models/runs/big/merged"
    assert config.paths.teacher_adapter is None


def test_an_adapter_teacher_is_its_base_model_with_its_adapter_and_token() -> None:
    resolved = resolve_teacher(parse_spec(STUDENT), teacher("Succeeded", adapterPath="adapter"))
    assert not isinstance(resolved, RunState) and resolved.distillation is not None
    wire = resolved.to_wire()
    assert wire["distillation"]["teacher"]["name"] == "org/big-base"
    config = TrainerConfig.model_validate_json(build_config_map(OWNER, resolved)["data"]["config.json"])
    assert config.paths.teacher_adapter == "/mnt/pvc/models/runs/big/adapter"
    job = job_for(wire)
    assert "models" in claims_of(job)
    env = {var["name"]: var for var in container_of(job)["env"]}
    assert env["DEEPTUNE_TEACHER_HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf"


def reconcile_student(api: Api, referenced: Obj | None) -> Obj:
    view = cache(
        finetunejobs={UID: [ftj({"phase": "Pending"}, spec=STUDENT)]},
        finetunejobs_by_name={(ftj({})["metadata"]["namespace"], "big"): [referenced]} if referenced else {},
    )
    asyncio.run(FineTuneJobReconciler(Settings(), view, lambda key: None).reconcile(UID))
    return api.named("status")[-1][1] if api.named("status") else {}


def test_a_waiting_student_makes_no_job_and_says_why(api: Api) -> None:
    status = reconcile_student(api, teacher("Running"))
    assert not api.named("create")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (status.get("phase", "Pending"), ready["reason"]) == ("Pending", WAITING)  # Pending already


def test_a_student_of_a_succeeded_teacher_gets_its_job(api: Api) -> None:
    reconcile_student(
        api,
        {
            **teacher("Succeeded", adapterPath="adapter"),
            "metadata": {"name": "big", "namespace": "ns", "uid": "t"},
        },
    )
    assert [c[1] for c in api.named("create")] == ["Job", "ConfigMap", "Job"]
