"""kopf glue for FineTuneJob: validate, create children, mirror their state into status.

Level-based: `reconcile` (create/resume/spec change) makes sure the ConfigMap and Job exist; the
`mirror_status` timer reads the Job and its pods from in-memory indexes (no API calls), scrapes the
running trainer's metrics, and patches status only when something changed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from deeptune.api.base import GROUP, VERSION, describe_validation_error
from deeptune.api.finetunejob import (
    KIND,
    PLURAL,
    FineTuneJobSpec,
    FineTuneJobStatus,
    OutputStatus,
    parse_spec,
)
from deeptune.api.trainer import METRICS_PORT
from deeptune.builders import finetunejob as build
from deeptune.builders.common import Owner
from deeptune.config import SETTINGS
from deeptune.kube import ensure, patch_job_spec, rejection
from deeptune.observability import STATUS_WRITES, PhaseBook, measured
from deeptune.status.conditions import now, set_conditions
from deeptune.status.finetunejob import TERMINAL_PHASES, derive_status, is_invalid_spec
from deeptune.status.progress import parse_progress

RESOURCE = (GROUP, VERSION, PLURAL)
FTJ_LABEL = "deeptune.dev/finetunejob"
IndexEntries = dict[tuple[str | None, str], dict[str, Any]]
PHASES = PhaseBook(KIND)


def _owner(meta: kopf.Meta) -> Owner:
    return Owner(kind=KIND, name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


def _output_status(owner: Owner, spec: FineTuneJobSpec) -> OutputStatus:
    config = build.trainer_config(owner, spec)
    return OutputStatus(
        claim_name=spec.output.pvc.claim_name,
        path=config.paths.output_dir.removeprefix(f"{build.PVC_ROOT}/{spec.output.pvc.claim_name}/"),
    )


def _invalid_spec(body: kopf.Body, patch: kopf.Patch, message: str, generation: int | None) -> None:
    """Report a spec that cannot run: a Warning Event and a Failed/InvalidSpec status, no retry."""
    kopf.event(body, type="Warning", reason="InvalidSpec", message=message)
    previous = FineTuneJobStatus.model_validate(body.get("status") or {})
    conditions = set_conditions(
        previous.conditions,
        {
            "Ready": (False, "InvalidSpec", message),
            "Running": (False, "InvalidSpec", message),
            "Suspended": (False, "InvalidSpec", message),
            "Failed": (True, "InvalidSpec", message),
        },
        generation,
        now(),
    )
    patch.status["phase"] = "Failed"
    patch.status["observedGeneration"] = generation
    patch.status["conditions"] = [c.to_wire() for c in conditions]
    PHASES.record(body.meta["uid"], "Failed")


def _ensure_children(body: kopf.Body, owner: Owner, spec: FineTuneJobSpec, logger: kopf.Logger) -> bool:
    """Create the ConfigMap and Job where missing; True when the Job was created now."""
    ensure(build.build_config_map(owner, spec))
    created = ensure(build.build_job(owner, spec, SETTINGS.builder))
    if created:
        logger.info("created Job %s", build.job_name(owner))
        kopf.event(body, type="Normal", reason="JobCreated", message=f"created Job {build.job_name(owner)}")
    return created


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
def reconcile(*, body: kopf.Body, meta: kopf.Meta, patch: kopf.Patch, logger: kopf.Logger, **_: Any) -> None:
    """Make sure the trainer ConfigMap and Job exist for a valid, unfinished FineTuneJob."""
    previous = FineTuneJobStatus.model_validate(body.get("status") or {})
    if previous.phase in TERMINAL_PHASES and not is_invalid_spec(previous):
        return
    with measured(KIND, "reconcile"):
        try:
            spec = parse_spec(dict(body.spec))
        except ValidationError as error:
            _invalid_spec(body, patch, describe_validation_error(error), meta.get("generation"))
            return
        owner = _owner(meta)
        try:
            if not _ensure_children(body, owner, spec, logger):
                patch_job_spec(build.job_name(owner), owner.namespace, build.job_controls(spec))
        except ApiException as error:
            if error.status != 422:
                raise  # kopf retries with backoff: the API server may be restarting
            _invalid_spec(
                body, patch, f"the API server rejected a child: {rejection(error)}", meta.get("generation")
            )
            return
        if previous.phase is None or is_invalid_spec(previous):
            fresh = derive_status(
                previous=FineTuneJobStatus(conditions=previous.conditions),
                generation=meta.get("generation"),
                job=None,
                pods=[],
                progress=None,
                output=_output_status(owner, spec),
                now=now(),
            )
            fresh.job_name = build.job_name(owner)
            _write_changes(body, patch, previous, fresh)


@kopf.on.delete(*RESOURCE, optional=True)
def forget(*, meta: kopf.Meta, **_: Any) -> None:
    """Children go by garbage collection (owner references); only the phase gauge needs updating."""
    PHASES.record(meta["uid"], None)


@kopf.index("batch", "v1", "jobs", labels={FTJ_LABEL: kopf.PRESENT})
def trainer_jobs(*, body: kopf.Body, namespace: str | None, **_: Any) -> IndexEntries:
    """Jobs by (namespace, owning FineTuneJob uid)."""
    owners = [ref["uid"] for ref in body.meta.get("ownerReferences", []) if ref.get("kind") == KIND]
    return {(namespace, uid): {"metadata": dict(body.meta), "status": dict(body.status)} for uid in owners}


@kopf.index("", "v1", "pods", labels={FTJ_LABEL: kopf.PRESENT})
def trainer_pods(*, body: kopf.Body, namespace: str | None, **_: Any) -> IndexEntries:
    """Trainer pods by (namespace, owning Job uid)."""
    owners = [ref["uid"] for ref in body.meta.get("ownerReferences", []) if ref.get("kind") == "Job"]
    return {(namespace, uid): {"metadata": dict(body.meta), "status": dict(body.status)} for uid in owners}


async def _scrape(pod_ip: str, logger: kopf.Logger) -> str | None:
    url = f"http://{pod_ip}:{METRICS_PORT}/metrics"
    try:
        timeout = aiohttp.ClientTimeout(total=SETTINGS.scrape_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
            return await response.text() if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError) as error:
        logger.debug("metrics scrape of %s failed: %s", url, error)
        return None


@kopf.timer(*RESOURCE, interval=SETTINGS.status_interval, initial_delay=1.0)
async def mirror_status(
    *,
    body: kopf.Body,
    meta: kopf.Meta,
    patch: kopf.Patch,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    """Mirror the Job and pod state (and the trainer's progress) into status.

    kopf passes the indexes by their function names; they are read from `kwargs` so the signature
    still matches kopf's timer protocol.
    """
    trainer_jobs: kopf.Index[tuple[str, str], dict[str, Any]] = kwargs["trainer_jobs"]
    trainer_pods: kopf.Index[tuple[str, str], dict[str, Any]] = kwargs["trainer_pods"]
    previous = FineTuneJobStatus.model_validate(body.get("status") or {})
    if is_invalid_spec(previous):
        return
    try:
        spec = parse_spec(dict(body.spec))
    except ValidationError:
        return  # reconcile reports it
    with measured(KIND, "mirror_status"):
        owner = _owner(meta)
        jobs = list(trainer_jobs.get((owner.namespace, owner.uid), []))
        job = jobs[0] if jobs else None
        if job is None and previous.phase in ("Running", "Suspended"):
            # Someone deleted the Job of an unfinished run: recreate it; the trainer resumes from
            # its newest checkpoint. (Pending runs may simply not be in the index yet.)
            await asyncio.to_thread(_ensure_children, body, owner, spec, logger)
        job_uid = job["metadata"]["uid"] if job else None
        pods = list(trainer_pods.get((owner.namespace, job_uid), [])) if job_uid else []
        progress = None
        running = [p for p in pods if p["status"].get("phase") == "Running" and p["status"].get("podIP")]
        if running:
            text = await _scrape(running[0]["status"]["podIP"], logger)
            progress = parse_progress(text, now()) if text else None
        new = derive_status(
            previous=previous,
            generation=meta.get("generation"),
            job=job,
            pods=pods,
            progress=progress,
            output=_output_status(owner, spec),
            now=now(),
        )
        _write_changes(body, patch, previous, new)


def _write_changes(
    body: kopf.Body, patch: kopf.Patch, previous: FineTuneJobStatus, new: FineTuneJobStatus
) -> None:
    before, after = previous.to_wire(), new.to_wire()
    changed = {key: value for key, value in after.items() if before.get(key) != value}
    if not changed:
        return
    STATUS_WRITES.labels(KIND).inc()
    for key, value in changed.items():
        patch.status[key] = value
    PHASES.record(body.meta["uid"], new.phase)
    if new.phase != previous.phase:
        ready = next((c for c in new.conditions if c.type == "Ready"), None)
        message = ready.message if ready else ""
        kind = "Warning" if new.phase == "Failed" else "Normal"
        kopf.event(body, type=kind, reason=new.phase or "Unknown", message=message)
