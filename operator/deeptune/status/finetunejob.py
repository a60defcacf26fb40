"""Derive a FineTuneJob's status from its Job and pods. Pure: recorded objects in, status out.

The Job's own conditions decide the terminal phases (Complete, Failed, Suspended); the pods explain
the rest: why a pod is not running yet (unschedulable, image pull), why the last one failed (OOMKilled,
the trainer's own error from its termination message), and what a finished run produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from deeptune.api.base import Condition
from deeptune.api.finetunejob import (
    KUEUE_QUEUE_LABEL,
    FailureInfo,
    FineTuneJobStatus,
    OutputStatus,
    Phase,
    Progress,
    WorkerPod,
)
from deeptune.api.trainer import TrainerSummary
from deeptune.builders.finetunejob import CONTAINER as TRAINER_CONTAINER
from deeptune.status.conditions import set_conditions

Obj = dict[str, Any]
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed"})
INVALID_SPEC = "InvalidSpec"
CONDITION_TYPES = ("Ready", "Running", "Suspended", "Failed")
_WAITING_PROBLEMS = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
}
_JOB_DECIDED = {"DeadlineExceeded"}
"""Job failure reasons that are the Job's own decision, not the trainer's failure: activeDeadlineSeconds
passed, whatever the trainer was doing."""


@dataclass(frozen=True)
class RunState:
    """Where the run stands, before it is written as conditions."""

    phase: Phase
    reason: str
    message: str


def is_invalid_spec(status: FineTuneJobStatus) -> bool:
    """Whether the operator rejected the current spec (a fixed spec gets a fresh start).

    The trainer may fail with reason InvalidSpec too (a problem only the model or the data reveal),
    which the Failed condition then carries: that run is over like any other failed one. The
    operator's own rejection never writes `lastFailure`, the trainer's always does.
    """
    trainer_said_so = status.last_failure is not None and status.last_failure.reason == INVALID_SPEC
    return not trainer_said_so and any(
        c.type == "Failed" and c.status == "True" and c.reason == INVALID_SPEC for c in status.conditions
    )


def _job_condition(job: Obj, kind: str) -> Obj | None:
    for cond in job.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def _terminated(pod: Obj) -> Obj | None:
    for status in pod.get("status", {}).get("containerStatuses", []) or []:
        state = status.get("state", {}).get("terminated") or status.get("lastState", {}).get("terminated")
        if state:
            return dict(state)
    return None


def parse_summary(message: str | None) -> TrainerSummary | None:
    """The trainer's JSON summary, or None when the message is something else (e.g. a log tail)."""
    if not message:
        return None
    try:
        return TrainerSummary.model_validate_json(message)
    except ValidationError:
        return None


def _finished_at(pod: Obj) -> str:
    state = _terminated(pod) or {}
    return str(state.get("finishedAt") or "")


LOST_CONTAINER_REASONS = frozenset({"Unknown", "ContainerStatusUnknown"})
"""What a kubelet reports for a container that ended unseen: `Unknown` when its runtime no longer has
the container (a node crashed and back, exit code 255), `ContainerStatusUnknown` when the kubelet
cannot find it at all (137)."""


def last_failure(pods: list[Obj]) -> FailureInfo | None:
    """Why the newest failed trainer pod failed, in the trainer's words when it left any."""
    failed = [p for p in pods if p.get("status", {}).get("phase") == "Failed"]
    if not failed:
        return None
    pod = max(failed, key=_finished_at)
    state = _terminated(pod)
    if state is None:
        reason = pod.get("status", {}).get("reason") or "PodFailed"
        return FailureInfo(reason=reason, message=pod.get("status", {}).get("message", ""))
    summary = parse_summary(state.get("message"))
    if summary is not None and summary.error is not None:
        return FailureInfo(
            reason=summary.error.reason, message=summary.error.message, exit_code=state.get("exitCode")
        )
    message = (state.get("message") or "").strip()
    if state.get("reason") == "OOMKilled":
        message = "the trainer ran out of memory: raise resources.memory, or lower batch size or max length"
    elif state.get("reason") in LOST_CONTAINER_REASONS:
        message = (
            "the trainer's container was lost with its node (its kubelet or container runtime "
            "restarted and found it gone); a retry resumes from the newest checkpoint"
        )
    return FailureInfo(
        reason=state.get("reason") or "Error", message=message[-1024:], exit_code=state.get("exitCode")
    )


def _pending_explanation(pods: list[Obj]) -> tuple[str, str]:
    for pod in pods:
        for status in pod.get("status", {}).get("containerStatuses", []) or []:
            waiting = status.get("state", {}).get("waiting") or {}
            if waiting.get("reason") in _WAITING_PROBLEMS:
                return waiting["reason"], waiting.get("message", "")
        for cond in pod.get("status", {}).get("conditions", []) or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return cond.get("reason") or "Unschedulable", cond.get("message", "")
    return "Pending", "waiting for the trainer pod to start"


def _failed(job_failed: Obj, failure: FailureInfo | None) -> RunState:
    """Failed, in the trainer's words first: its reason (InvalidDataset, OOMKilled, ...) and message
    say what to fix; the Job's condition (the rule that failed it, naming the pod) follows in
    parentheses. A deadline is the Job's own decision, so there the Job's words lead."""
    reason = job_failed.get("reason") or "Failed"
    job_says = job_failed.get("message", "")
    if failure is None or not failure.message:
        return RunState("Failed", reason, job_says)
    if reason in _JOB_DECIDED:
        return RunState("Failed", reason, f"{job_says}: {failure.reason}: {failure.message}")
    context = f"{reason}: {job_says}" if job_says else reason
    return RunState("Failed", failure.reason, f"{failure.message} (Job: {context})")


def waiting_reason(workload: Obj | None) -> str | None:
    """Why Kueue has not admitted a Workload yet, in its own words (its QuotaReserved condition's
    message, e.g. "couldn't assign flavors to pod set main: insufficient unused quota for
    nvidia.com/gpu in flavor gpus, 1 more needed"); None when it has not said."""
    conditions = ((workload or {}).get("status") or {}).get("conditions") or []
    reserved = next((c for c in conditions if c.get("type") == "QuotaReserved"), None)
    if reserved is None or reserved.get("status") != "False" or not reserved.get("message"):
        return None
    return str(reserved["message"])


def _suspended(job: Obj, workload: Obj | None) -> RunState:
    """Paused by the user, or waiting for Kueue to admit it (its label says which queue; its Workload,
    when the operator sees it, why)."""
    queue = job["metadata"].get("labels", {}).get(KUEUE_QUEUE_LABEL)
    if queue is None:
        return RunState("Suspended", "Suspended", "suspended; set spec.suspend to false to resume")
    waiting = f"waiting in Kueue's LocalQueue {queue}"
    if (why := waiting_reason(workload)) is not None:
        return RunState("Pending", "Queued", f"{waiting}: {why}")
    return RunState(
        "Pending",
        "Queued",
        f"{waiting}: the Job starts when Kueue admits it (quota and priority; "
        f"`kubectl get workloads -n {job['metadata'].get('namespace', '')}` says why it waits)",
    )


def observe(
    job: Obj | None,
    pods: list[Obj],
    blocked: RunState | None = None,
    known: FailureInfo | None = None,
    workload: Obj | None = None,
) -> RunState:
    """The phase of an unfinished run, with a CamelCase reason and a human message. `blocked` says
    why there is no Job (one of that name that is not ours, say) when the operator knows; `known` is
    the trainer's failure recorded before, for when its pod is gone from view; `workload` is Kueue's
    Workload of the Job, when it is queued."""
    if job is None:
        return blocked or RunState("Pending", "JobNotCreated", "the trainer Job is being created")
    if (cond := _job_condition(job, "Complete")) is not None:
        return RunState("Succeeded", "Succeeded", "fine-tuning finished")
    if (cond := _job_condition(job, "Failed")) is not None:
        return _failed(cond, last_failure(pods) or known)
    if _job_condition(job, "Suspended") is not None or job.get("spec", {}).get("suspend"):
        return _suspended(job, workload)
    phases = {p.get("status", {}).get("phase") for p in pods}
    if "Running" in phases:
        return RunState("Running", "Training", "the trainer is running")
    if "Succeeded" in phases:  # the Job controller adds Complete a moment after the pod ends
        return RunState("Running", "Finishing", "the trainer finished; the Job is completing")
    if "Failed" in phases and not phases & {"Pending"}:
        failure = last_failure(pods)
        detail = f": {failure.reason}: {failure.message}" if failure else ""
        return RunState("Pending", "Retrying", f"the trainer pod failed and will be retried{detail}")
    reason, message = _pending_explanation(pods)
    return RunState("Pending", reason, message)


def same_progress(a: Progress | None, b: Progress | None) -> bool:
    """The same figures, whenever they were read: an unchanged scrape is no status write."""
    if a is None or b is None:
        return a is b
    return a.model_copy(update={"last_update_time": None}) == b.model_copy(update={"last_update_time": None})


def _succeeded_summary(pods: list[Obj]) -> TrainerSummary | None:
    """The summary rank 0 wrote (over several pods, the others' termination messages are empty),
    with the image its pod ran in the lineage."""
    for pod in pods:
        if pod.get("status", {}).get("phase") == "Succeeded":
            summary = parse_summary((_terminated(pod) or {}).get("message"))
            if summary is not None:
                if summary.lineage is not None:
                    summary.lineage.trainer_image = _image_id(pod)
                return summary
    return None


def _image_id(pod: Obj) -> str | None:
    """The trainer container's image as the runtime resolved it."""
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return next((s.get("imageID") or None for s in statuses if s.get("name") == TRAINER_CONTAINER), None)


def _conditions(
    previous: list[Condition], observation: RunState, generation: int | None, now: str
) -> list[Condition]:
    wanted = {
        "Ready": observation.phase == "Succeeded",
        "Running": observation.phase == "Running",
        "Suspended": observation.phase == "Suspended",
        "Failed": observation.phase == "Failed",
    }
    return set_conditions(
        previous,
        {kind: (value, observation.reason, observation.message) for kind, value in wanted.items()},
        generation,
        now,
    )


def derive_status(
    *,
    previous: FineTuneJobStatus,
    generation: int | None,
    job: Obj | None,
    pods: list[Obj],
    progress: Progress | None,
    output: OutputStatus,
    now: str,
    blocked: RunState | None = None,
    workload: Obj | None = None,
) -> FineTuneJobStatus:
    """The status to write, given what the cluster shows now and what the status said before.

    A finished run's outcome is recorded once and stands: when its Job is gone (deleted by hand; the
    operator's finalizer keeps it until the outcome is in status), nothing changes."""
    if job is None and previous.phase in TERMINAL_PHASES and not is_invalid_spec(previous):
        return previous
    observation = observe(job, pods, blocked, previous.last_failure, workload)
    job_status = (job or {}).get("status", {})
    status = previous.model_copy(deep=True)
    status.phase = observation.phase
    status.observed_generation = generation
    status.conditions = _conditions(previous.conditions, observation, generation, now)
    if job is not None:
        status.job_name = job["metadata"]["name"]
        status.start_time = job_status.get("startTime") or status.start_time
        status.completion_time = job_status.get("completionTime") or status.completion_time
        status.retries = int(job_status.get("failed") or 0)
    status.last_failure = last_failure(pods) or status.last_failure
    indexed = job is not None and "completionMode" in job.get("spec", {})
    status.workers = worker_pods(pods) if indexed else None
    if (
        observation.phase == "Running"
        and progress is not None
        and not same_progress(progress, status.progress)
    ):
        status.progress = progress
    if observation.phase == "Failed" and status.completion_time is None:
        cond = _job_condition(job or {}, "Failed") or {}
        status.completion_time = cond.get("lastTransitionTime")
    if observation.phase == "Succeeded":
        _apply_summary(status, _succeeded_summary(pods), output, now)
    return status


COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


def completion_index(pod: Obj) -> int | None:
    """The pod's index in an Indexed Job (None for a Job of one pod)."""
    index = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX)
    return int(index) if index is not None and index.isdigit() else None


def worker_pods(pods: list[Obj]) -> list[WorkerPod]:
    """The newest pod of each index of an Indexed Job, by index."""
    newest: dict[int, Obj] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or ""):
        index = completion_index(pod)
        if index is not None:
            newest[index] = pod
    return [
        WorkerPod(
            index=index, name=pod["metadata"]["name"], phase=pod.get("status", {}).get("phase", "Pending")
        )
        for index, pod in sorted(newest.items())
    ]


def _apply_summary(
    status: FineTuneJobStatus, summary: TrainerSummary | None, output: OutputStatus, now: str
) -> None:
    if summary is None:
        return
    status.eval_results = summary.eval_results
    status.dataset = summary.dataset
    status.lineage = summary.lineage
    artifacts = summary.artifacts
    status.output = output.model_copy(
        update={
            "adapter_path": artifacts.adapter if artifacts else None,
            "merged_path": artifacts.merged if artifacts else None,
            "quantized_path": artifacts.quantized if artifacts else None,
        }
    )
    final = (status.progress or Progress()).model_copy(update={"percent": 100, "eta": "0s"})
    if summary.steps is not None:
        final.step = summary.steps
    if summary.train_loss is not None:
        final.train_loss = round(summary.train_loss, 4)
    if final != status.progress:
        # Only when the final figures arrive: a finished run is visited on every pass while its pod
        # exists, and a fresh time on each would be a status write (a watch event) per pass.
        final.last_update_time = now
    status.progress = final
