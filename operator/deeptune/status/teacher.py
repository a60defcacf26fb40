"""A distillation teacher given as `fineTuneJobRef`, resolved to that run's model once it succeeded.

The run's Job is made from the resolved spec (its trainer config names the teacher's directories, its
pod mounts their claims); until the teacher's run has succeeded, the student's waits in Pending with
the reason `WaitingForTeacher`, and a rerun of a failed teacher under the same name releases it.
"""

from __future__ import annotations

import posixpath
from typing import Any

from deeptune.api.base import PvcLocation
from deeptune.api.finetunejob import FineTuneJobSpec, FineTuneJobStatus, TeacherModel, parse_spec
from deeptune.status.finetunejob import RunState

Obj = dict[str, Any]
WAITING = "WaitingForTeacher"
WHERE = "distillation.teacher.fineTuneJobRef"


def teacher_run(spec: FineTuneJobSpec) -> str | None:
    """The FineTuneJob the spec's teacher is, if it names one."""
    teacher = spec.distillation.teacher if spec.distillation else None
    return teacher.fine_tune_job_ref.name if teacher and teacher.fine_tune_job_ref else None


def resolve_teacher(spec: FineTuneJobSpec, referenced: Obj | None) -> FineTuneJobSpec | RunState:
    """The spec with its teacher as directories (the run's merged model, else its base model with its
    adapter), or why the run must wait. A spec without a teacher run is returned as it is."""
    name = teacher_run(spec)
    if name is None or spec.distillation is None:
        return spec
    if referenced is None:
        return RunState(
            "Pending", WAITING, f"{WHERE}: FineTuneJob {name} not found; the run starts once it has succeeded"
        )
    status = FineTuneJobStatus.model_validate(referenced.get("status") or {})
    if status.phase != "Succeeded":
        if status.phase == "Failed":
            why = (
                f"FineTuneJob {name} failed; rerun it under that name (the run starts once it has succeeded)"
            )
        else:
            why = f"waiting for FineTuneJob {name} to succeed (phase {status.phase or 'Pending'})"
        return RunState("Pending", WAITING, f"{WHERE}: {why}")
    output = status.output
    if output is None or not (output.merged_path or output.adapter_path):
        return RunState(
            "Pending", WAITING, f"{WHERE}: FineTuneJob {name} succeeded but reports no model in status.output"
        )
    if output.merged_path:
        teacher = TeacherModel(
            pvc=PvcLocation(
                claim_name=output.claim_name, path=posixpath.join(output.path, output.merged_path)
            )
        )
    else:
        base = parse_spec(dict(referenced.get("spec") or {})).base_model
        adapter = PvcLocation(
            claim_name=output.claim_name, path=posixpath.join(output.path, output.adapter_path or "")
        )
        teacher = TeacherModel(**dict(base), adapter=adapter)
    distillation = spec.distillation.model_copy(update={"teacher": teacher})
    return spec.model_copy(update={"distillation": distillation})
