"""Derive a ModelDeployment's status from its Deployment, its pods and the operator's own probe. Pure.

As KServe does in raw-deployment mode: the pods of the current spec say where the model stands (a
server container that ended or is crash-looping → FailedToLoad with its termination message; running
but not ready → Loading; ready → Loaded), the Deployment's conditions explain pods that never start,
and `Ready` additionally needs the operator's own tritonclient check (server ready, model ready, one
small inference) to have passed.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from deeptune.api.base import describe_validation_error
from deeptune.api.finetunejob import FailureInfo, FineTuneJobSpec, FineTuneJobStatus
from deeptune.api.modeldeployment import (
    AdapterMismatchError,
    Endpoints,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    ModelNotReadyError,
    ModelState,
    ProbeResult,
    ResolvedAdapter,
    ResolvedModel,
    ServedAdapter,
    ServingBackend,
    resolve_adapter,
    resolve_model,
)
from deeptune.builders.modeldeployment import CONFIG_HASH, template_hash
from deeptune.status.conditions import set_conditions

Obj = dict[str, Any]
INVALID_SPEC = "InvalidSpec"
FINETUNEJOB_FAILED = "FineTuneJobFailed"
ADAPTER_BASE_MISMATCH = "AdapterBaseMismatch"
WAITING_REASONS = frozenset(
    {
        "FineTuneJobNotFound",
        "WaitingForFineTuneJob",
        "FineTuneJobSavedNoModel",
        FINETUNEJOB_FAILED,
        ADAPTER_BASE_MISMATCH,
    }
)
"""Ready reasons of a spec whose model is not there yet: no children follow it until it is. A failed
FineTuneJob is one of them (it may be rerun under the same name); Argo CD's health check reads that
reason as Degraded, the others as Progressing."""
PROBE_RECORD_REFRESH = dt.timedelta(minutes=5)
"""An unchanged probe outcome is written back at most this often: `lastProbe.time` stays a recent
heartbeat without a status write (and a watch event for every client) per probe."""
MESSAGE_LIMIT = 1024
_WAITING_PROBLEMS = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
}
_LOAD_ERROR = re.compile(r"failed to load '[^']*' version \d+: (.*?)\"?$")


# --- resolving the model --------------------------------------------------------------------


@dataclass(frozen=True)
class Waiting:
    """Why there is no model to serve yet; no children are created until this clears."""

    reason: str
    """One of WAITING_REASONS."""
    message: str


def _job_failed(field: str, name: str, status: FineTuneJobStatus) -> Waiting:
    """A failed FineTuneJob, in its own Failed condition's words (the trainer's reason and message
    first, the Job's after them). Still a wait: a rerun under the same name may yet succeed."""
    failed = next((c for c in status.conditions if c.type == "Failed" and c.status == "True"), None)
    said = failed or status.last_failure
    detail = ": ".join(part for part in (said.reason, said.message) if part) if said else ""
    message = f"{field}: FineTuneJob {name} failed, so there is no model to serve until it is rerun"
    return Waiting(FINETUNEJOB_FAILED, f"{message} and succeeds: {detail}" if detail else message)


def _job_models(field: str, job: Obj) -> tuple[FineTuneJobSpec, FineTuneJobStatus] | Waiting:
    status = FineTuneJobStatus.model_validate(job.get("status") or {})
    name = job.get("metadata", {}).get("name", "")
    if status.phase == "Failed":
        return _job_failed(field, name, status)
    if status.phase != "Succeeded":
        where = f"phase {status.phase}" if status.phase else "it has not started yet"
        return Waiting(
            "WaitingForFineTuneJob", f"{field}: waiting for FineTuneJob {name} to succeed ({where})"
        )
    try:
        return FineTuneJobSpec.model_validate(job.get("spec") or {}), status
    except ValidationError as error:
        return Waiting("WaitingForFineTuneJob", f"FineTuneJob {name}: {describe_validation_error(error)}")


def resolve_source(
    spec: ModelDeploymentSpec, jobs: dict[str, Obj], previous: ResolvedModel | None
) -> ResolvedModel | Waiting:
    """Where to load the model and its adapters from, given the FineTuneJobs the spec references (by
    name, as the API returns them; a missing one is not there).

    A model resolved earlier from the same FineTuneJob stays resolved when the job is later deleted
    or re-run: the weights are on the volume, and a serving deployment must not stop for that. So does
    each adapter.
    """
    ref = spec.model.fine_tune_job_ref
    job = jobs.get(ref.name) if ref else None
    models: tuple[FineTuneJobSpec, FineTuneJobStatus] | None = None
    if ref is not None and job is not None:
        found = _job_models("model.fineTuneJobRef", job)
        if isinstance(found, Waiting):
            return _keep(previous, ref.name) or found
        models = found
    try:
        resolved = resolve_model(spec.model, models, adapter_needed=bool(spec.adapters))
        if job is not None:
            resolved = resolved.model_copy(update={"fine_tune_job_uid": job["metadata"].get("uid")})
    except ModelNotReadyError as error:
        kept = _keep(previous, ref.name if ref else None)
        if kept is None:
            return _unservable(error, job)
        resolved = kept
    if spec.adapters and resolved.base_model is None:  # served merged before adapters were added
        return Waiting(
            "FineTuneJobSavedNoModel",
            "adapters need model's adapter on its base model, and FineTuneJob"
            f" {ref.name if ref else ''} is gone: only its merged model was resolved before",
        )
    adapters: list[ResolvedAdapter] = []
    for index, entry in enumerate(spec.adapters):
        adapter = _resolve_adapter(index, entry, jobs.get(entry.fine_tune_job_ref.name), resolved, previous)
        if isinstance(adapter, Waiting):
            return adapter
        adapters.append(adapter)
    return resolved.model_copy(update={"adapters": adapters or None})


def _resolve_adapter(
    index: int, entry: ServedAdapter, job: Obj | None, resolved: ResolvedModel, previous: ResolvedModel | None
) -> ResolvedAdapter | Waiting:
    """One of `spec.adapters`, or why it cannot be served (yet); as resolved before, while its
    FineTuneJob is gone or being re-run."""
    kept = next(
        (
            adapter
            for adapter in ((previous.adapters if previous else None) or [])
            if adapter.name == entry.name and adapter.fine_tune_job == entry.fine_tune_job_ref.name
        ),
        None,
    )
    field = f"adapters[{index}] ({entry.name})"
    found = _job_models(field, job) if job is not None else None
    if isinstance(found, Waiting):
        return kept or found
    assert resolved.base_model is not None  # resolve_source checked
    try:
        return resolve_adapter(index, entry, found, resolved.base_model)
    except AdapterMismatchError as error:
        return Waiting(ADAPTER_BASE_MISMATCH, str(error))
    except ModelNotReadyError as error:
        return kept or _unservable(error, job)


def _unservable(error: ModelNotReadyError, job: Obj | None) -> Waiting:
    """A referenced FineTuneJob that is not there, or that saved nothing this deployment can serve."""
    return Waiting("FineTuneJobNotFound" if job is None else "FineTuneJobSavedNoModel", str(error))


def _keep(previous: ResolvedModel | None, job_name: str | None) -> ResolvedModel | None:
    return previous if previous is not None and job_name and previous.fine_tune_job == job_name else None


# --- what the pods say -------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """Where the model stands across the pods of the current spec, before it is written as status."""

    state: ModelState
    reason: str
    message: str
    failure: FailureInfo | None = None
    loaded: int = 0
    """Current pods that are ready (have loaded the model)."""
    desired: int = 0


def current_pods(deployment: Obj, pods: list[Obj]) -> list[Obj]:
    """Pods of the Deployment's current template (not those a rollout is replacing, nor deleted ones)."""
    wanted = template_hash(deployment)
    return [
        pod
        for pod in pods
        if not pod.get("metadata", {}).get("deletionTimestamp")
        and (pod.get("metadata", {}).get("annotations") or {}).get(CONFIG_HASH) == wanted
    ]


def _container_statuses(pod: Obj) -> list[Obj]:
    return list(pod.get("status", {}).get("containerStatuses") or [])


def load_error(text: str) -> str:
    """The useful part of a termination message: Triton's own `failed to load` error when the message
    is a log tail (the traceback after `At:` dropped), else the message itself, trimmed."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if match := _LOAD_ERROR.search(line):
            error = match[1].replace("\\n", "\n").replace('\\"', '"')  # the log line is quoted
            return error.split("\n\nAt:")[0].strip()[:MESSAGE_LIMIT]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1].removeprefix("error: ")[:MESSAGE_LIMIT]
    return "\n".join(lines)[-MESSAGE_LIMIT:]


def container_failure(pod: Obj) -> FailureInfo | None:
    """Why the server container stopped: it ended (a server only ends on failure: Triton stops when
    the model does not load), or is waiting to be restarted after ending (CrashLoopBackOff)."""
    for status in _container_statuses(pod):
        state = status.get("state") or {}
        terminated = state.get("terminated")
        if terminated is None and (state.get("waiting") or {}).get("reason") == "CrashLoopBackOff":
            terminated = (status.get("lastState") or {}).get("terminated")
        if terminated is None:
            continue
        if terminated.get("reason") == "OOMKilled":
            message = "the server ran out of memory loading the model: raise resources.memory"
            return FailureInfo(reason="OOMKilled", message=message, exit_code=terminated.get("exitCode"))
        return FailureInfo(
            reason="ModelLoadFailed",
            message=load_error(terminated.get("message") or ""),
            exit_code=terminated.get("exitCode"),
        )
    return None


def _is_ready(pod: Obj) -> bool:
    statuses = _container_statuses(pod)
    return bool(statuses) and all(s.get("ready") for s in statuses)


def _is_running(pod: Obj) -> bool:
    return any("running" in (s.get("state") or {}) for s in _container_statuses(pod))


def ready_pods(deployment: Obj | None, pods: list[Obj]) -> list[Obj]:
    """Current pods that have loaded the model and have an address, by name (a stable probe target)."""
    if deployment is None:
        return []
    ready = [p for p in current_pods(deployment, pods) if _is_ready(p) and p.get("status", {}).get("podIP")]
    return sorted(ready, key=lambda pod: str(pod.get("metadata", {}).get("name")))


def _deployment_condition(deployment: Obj, kind: str) -> Obj:
    conditions = deployment.get("status", {}).get("conditions") or []
    return next((dict(c) for c in conditions if c.get("type") == kind), {})


def _pending_explanation(deployment: Obj, pods: list[Obj]) -> tuple[str, str]:
    for pod in pods:
        for status in _container_statuses(pod):
            waiting = (status.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _WAITING_PROBLEMS:
                return waiting["reason"], waiting.get("message", "")
        for cond in pod.get("status", {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return cond.get("reason") or "Unschedulable", cond.get("message", "")
    failure = _deployment_condition(deployment, "ReplicaFailure")
    if failure.get("status") == "True":  # e.g. a quota or admission policy rejected the pods
        return failure.get("reason") or "FailedCreate", failure.get("message", "")
    progressing = _deployment_condition(deployment, "Progressing")
    if progressing.get("status") == "False":
        return progressing.get("reason") or "ProgressDeadlineExceeded", progressing.get("message", "")
    return "WaitingForPods", "waiting for a serving pod to start"


def observe(deployment: Obj | None, pods: list[Obj]) -> Observation:
    """The model's state across the current pods, with a CamelCase reason and a human message."""
    if deployment is None:
        return Observation("Pending", "Creating", "creating the serving Deployment")
    desired = int(deployment.get("spec", {}).get("replicas", 1))
    if desired == 0:
        return Observation("Pending", "ScaledToZero", "replicas is 0: no pod serves the model")
    current = current_pods(deployment, pods)
    failures = [f for f in map(container_failure, current) if f is not None]
    if failures:
        failure = failures[0]
        return Observation("FailedToLoad", failure.reason, failure.message, failure, desired=desired)
    loaded = sum(1 for pod in current if _is_ready(pod))
    if loaded:
        message = f"{loaded} of {desired} serving pods loaded the model"
        return Observation("Loaded", "Loaded", message, loaded=loaded, desired=desired)
    loading = sum(1 for pod in current if _is_running(pod))
    if loading:
        message = f"Triton is loading the model ({loading} pod{'s' if loading > 1 else ''})"
        return Observation("Loading", "Loading", message, desired=desired)
    reason, message = _pending_explanation(deployment, current)
    return Observation("Pending", reason, message, desired=desired)


# --- the probe ------------------------------------------------------------------------------


def probe_passed(probe: ProbeResult) -> bool:
    """Server and model ready, and the model generated."""
    return probe.server_ready and probe.model_ready and probe.inference_ok


def _parse_time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def record_probe(recorded: ProbeResult | None, latest: ProbeResult | None) -> ProbeResult | None:
    """The probe result to keep in status: the latest when its outcome differs from the recorded one,
    or the recorded one is older than PROBE_RECORD_REFRESH; else the recorded one (no write)."""
    if latest is None or recorded is None:
        return latest or recorded
    outcome = ("server_ready", "model_ready", "inference_ok", "message")
    if recorded.model_dump(include=set(outcome)) != latest.model_dump(include=set(outcome)):
        return latest
    if _parse_time(latest.time) - _parse_time(recorded.time) >= PROBE_RECORD_REFRESH:
        return latest
    return recorded


# --- conditions and status -------------------------------------------------------------------


def _readiness(
    observation: Observation, deployment: Obj | None, probe: ProbeResult | None
) -> tuple[bool, str, str]:
    if observation.state != "Loaded":
        return False, observation.reason, observation.message
    available = _deployment_condition(deployment or {}, "Available")
    if available.get("status") == "False":
        return False, available.get("reason") or "DeploymentUnavailable", available.get("message", "")
    if probe is None:
        return False, "Probing", "waiting for the operator's inference check of a serving pod"
    if not probe_passed(probe):
        return False, "ProbeFailed", probe.message
    latency = f" in {probe.latency_ms:.0f} ms" if probe.latency_ms is not None else ""
    return True, "Ready", f"the model answered an inference{latency}"


def _model_loaded(observation: Observation) -> tuple[bool, str, str]:
    if observation.state != "Loaded":
        return False, observation.reason, observation.message
    if observation.loaded < observation.desired:
        return False, "PartiallyLoaded", observation.message
    return True, "Loaded", observation.message


def derive_status(
    *,
    previous: ModelDeploymentStatus,
    generation: int | None,
    resolved: ResolvedModel,
    deployment: Obj | None,
    pods: list[Obj],
    probe: ProbeResult | None,
    endpoints: Endpoints,
    backend: ServingBackend,
    deployment_name: str,
    now: str,
) -> ModelDeploymentStatus:
    """The status to write, given the cluster's objects, the latest probe of a current ready pod (None
    when there is none) and what the status said before."""
    observation = observe(deployment, pods)
    status = previous.model_copy(deep=True)
    status.model_state = observation.state
    status.observed_generation = generation
    status.conditions = set_conditions(
        previous.conditions,
        {
            "ModelLoaded": _model_loaded(observation),
            "Ready": _readiness(observation, deployment, probe),
        },
        generation,
        now,
    )
    counts = (deployment or {}).get("status", {})
    status.replicas = int(counts.get("replicas") or 0)
    status.ready_replicas = int(counts.get("readyReplicas") or 0)
    status.last_failure = observation.failure or previous.last_failure
    status.endpoints = endpoints
    status.backend = backend
    status.resolved_model = resolved
    status.deployment_name = deployment_name
    status.last_probe = record_probe(previous.last_probe, probe)
    return status


def _not_ready(
    previous: ModelDeploymentStatus, generation: int | None, reason: str, message: str, now: str
) -> ModelDeploymentStatus:
    status = previous.model_copy(deep=True)
    status.observed_generation = generation
    status.conditions = set_conditions(
        previous.conditions,
        {"ModelLoaded": (False, reason, message), "Ready": (False, reason, message)},
        generation,
        now,
    )
    return status


def waiting_status(
    previous: ModelDeploymentStatus, generation: int | None, waiting: Waiting, now: str
) -> ModelDeploymentStatus:
    """Pending on the referenced FineTuneJob; whatever serves already (an earlier spec) keeps serving."""
    status = _not_ready(previous, generation, waiting.reason, waiting.message, now)
    status.model_state = "Pending"
    return status


def invalid_spec_status(
    previous: ModelDeploymentStatus, generation: int | None, message: str, now: str, *, serving: bool
) -> ModelDeploymentStatus:
    """A spec the operator cannot serve: the model will not load until the spec is fixed.

    `serving` says whether the ModelDeployment's Deployment exists (the operator's index of them, not
    the previous status: that names the Deployment as soon as it is being created, before the API
    server may reject it). If it does, it was built from an earlier valid spec and keeps serving, so
    the fields that describe it stay as they were: its name, endpoints, replicas, last probe and the
    model it loads. If it does not, there is nothing to describe, and those fields go: `kubectl get`
    shows no URL, and no client is pointed at a server that never started.
    """
    status = _not_ready(previous, generation, INVALID_SPEC, message, now)
    status.model_state = "FailedToLoad"
    status.last_failure = FailureInfo(reason=INVALID_SPEC, message=message[-MESSAGE_LIMIT:])
    if not serving:
        status.deployment_name = status.endpoints = status.resolved_model = status.last_probe = None
        status.replicas = status.ready_replicas = None
    return status


def _ready_reason(status: ModelDeploymentStatus) -> str | None:
    return next((c.reason for c in status.conditions if c.type == "Ready"), None)


def is_invalid_spec(status: ModelDeploymentStatus) -> bool:
    """Whether the operator rejected the current spec (a spec change re-evaluates it)."""
    return _ready_reason(status) == INVALID_SPEC


def is_waiting(status: ModelDeploymentStatus) -> bool:
    """Whether the status says the spec waits for its FineTuneJob (so no children follow it yet)."""
    return _ready_reason(status) in WAITING_REASONS


def is_ready(status: ModelDeploymentStatus) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions)


def status_changes(before: Obj, after: Obj) -> Obj:
    """The top-level status fields to patch: changed ones, and removed ones as None (a merge patch
    deletes those)."""
    changed = {key: value for key, value in after.items() if before.get(key) != value}
    changed.update({key: None for key in before if key not in after})
    return changed
