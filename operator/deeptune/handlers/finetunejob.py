"""kopf glue for FineTuneJob: validate, create children, mirror their state into status.

Level-based: `reconcile` (create/resume/spec change) makes sure the ConfigMap and Job exist; the
status loop (`deeptune.statusloop`) visits every FineTuneJob, reads its Job and pods from in-memory
indexes (no API calls), scrapes the running trainer's metrics, and patches status only when something
changed. The Job and pod indexes nudge the loop, so a change shows in status at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import kopf
from kubernetes.client.exceptions import ApiException

from deeptune import events
from deeptune.api.base import GROUP, VERSION
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
from deeptune.kube import check_admissible, ensure, patch_job_spec, rejection
from deeptune.observability import measured
from deeptune.status.conditions import now, set_conditions
from deeptune.status.finetunejob import TERMINAL_PHASES, derive_status, is_invalid_spec
from deeptune.status.progress import parse_progress
from deeptune.statusloop import Indexes, Invalid, Specs, StatusLoop, StatusUpdate, record

RESOURCE = (GROUP, VERSION, PLURAL)
FTJ_LABEL = "deeptune.dev/finetunejob"
Obj = dict[str, Any]
Key = tuple[str | None, str]
IndexEntries = dict[Key, Obj]
LOG = logging.getLogger(__name__)

SPECS: Specs[FineTuneJobSpec] = Specs(parse_spec)
_JOB_OWNERS: dict[str, Key] = {}
"""Job uid → its FineTuneJob's key, so a pod change nudges the right FineTuneJob."""


def _owner(meta: kopf.Meta | Obj) -> Owner:
    return Owner(kind=KIND, name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


def _output_status(owner: Owner, spec: FineTuneJobSpec) -> OutputStatus:
    config = build.trainer_config(owner, spec)
    return OutputStatus(
        claim_name=spec.output.pvc.claim_name,
        path=config.paths.output_dir.removeprefix(f"{build.PVC_ROOT}/{spec.output.pvc.claim_name}/"),
    )


def _ensure_children(body: Obj, owner: Owner, spec: FineTuneJobSpec) -> bool:
    """Create the ConfigMap and Job where missing; True when the Job was created now. The Job is
    dry-run first, so one the API server refuses leaves no ConfigMap behind."""
    job = build.build_job(owner, spec, SETTINGS.builder)
    check_admissible(job)
    ensure(build.build_config_map(owner, spec))
    created = ensure(job)
    if created:
        LOG.info("created Job %s/%s", owner.namespace, build.job_name(owner))
        message = f"created Job {build.job_name(owner)}"
        events.post(body, events.Event("Normal", "JobCreated", message))
    return created


# --- indexes: what the status loop reads instead of calling the API ---------------------------


@kopf.index(*RESOURCE)
def finetunejobs_by_name(*, body: kopf.Body, namespace: str | None, name: str, **_: Any) -> IndexEntries:
    """FineTuneJobs by (namespace, name): the status loop's objects, and `model.fineTuneJobRef`'s."""
    LOOP.nudge((namespace, name))
    return {(namespace, name): record(body)}


@kopf.index("batch", "v1", "jobs", labels={FTJ_LABEL: kopf.PRESENT})
def trainer_jobs(*, body: kopf.Body, namespace: str | None, **_: Any) -> IndexEntries:
    """Jobs by (namespace, owning FineTuneJob uid)."""
    owners = [ref for ref in body.meta.get("ownerReferences", []) if ref.get("kind") == KIND]
    for ref in owners:
        _JOB_OWNERS[body.meta["uid"]] = (namespace, ref["name"])
        LOOP.nudge((namespace, ref["name"]))
    recorded = {"metadata": dict(body.meta), "status": dict(body.status)}
    return {(namespace, ref["uid"]): recorded for ref in owners}


@kopf.index("", "v1", "pods", labels={FTJ_LABEL: kopf.PRESENT})
def trainer_pods(*, body: kopf.Body, namespace: str | None, **_: Any) -> IndexEntries:
    """Trainer pods by (namespace, owning Job uid)."""
    owners = [ref["uid"] for ref in body.meta.get("ownerReferences", []) if ref.get("kind") == "Job"]
    for uid in owners:
        LOOP.nudge(_JOB_OWNERS.get(uid))
    return {(namespace, uid): {"metadata": dict(body.meta), "status": dict(body.status)} for uid in owners}


# --- reconcile: the children ------------------------------------------------------------------


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
async def reconcile(*, body: kopf.Body, meta: kopf.Meta, **kwargs: Any) -> None:
    """Make sure the trainer ConfigMap and Job exist for a valid, unfinished FineTuneJob.

    Status is the loop's to write; this says what it cannot see (the API server's refusal of a child)
    and nudges it. kopf passes the indexes by their function names, read here from `kwargs`.
    """
    LOOP.start(kwargs)
    key = (meta["namespace"], meta["name"])
    previous = FineTuneJobStatus.model_validate(body.get("status") or {})
    if previous.phase in TERMINAL_PHASES and not is_invalid_spec(previous):
        return
    with measured(KIND, "reconcile"):
        spec = SPECS.get(record(body))
        if isinstance(spec, Invalid):
            LOOP.nudge(key)  # the loop reports it
            return
        owner = _owner(meta)
        try:
            if not await asyncio.to_thread(_ensure_children, dict(body), owner, spec):
                await asyncio.to_thread(
                    patch_job_spec, build.job_name(owner), owner.namespace, build.job_controls(spec)
                )
        except ApiException as error:
            if error.status != 422:
                raise  # kopf retries with backoff: the API server may be restarting
            SPECS.reject(record(body), f"the API server rejected a child: {rejection(error)}")
        LOOP.nudge(key)


# --- the status loop's visit ------------------------------------------------------------------


async def _scrape(pod_ip: str) -> str | None:
    url = f"http://{pod_ip}:{METRICS_PORT}/metrics"
    try:
        timeout = aiohttp.ClientTimeout(total=SETTINGS.scrape_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
            return await response.text() if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError) as error:
        LOG.debug("metrics scrape of %s failed: %s", url, error)
        return None


def _invalid_spec_status(
    previous: FineTuneJobStatus, message: str, generation: int | None
) -> FineTuneJobStatus:
    """A spec that cannot run: Failed/InvalidSpec, no children, no retry."""
    status = previous.model_copy(deep=True)
    status.phase = "Failed"
    status.observed_generation = generation
    status.conditions = set_conditions(
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
    return status


async def visit(obj: Obj, indexes: Indexes) -> StatusUpdate | None:
    """The status a FineTuneJob should show now: its Job and pods from the indexes, the trainer's
    progress from its metrics endpoint; recreates the Job of an unfinished run if someone deleted it."""
    meta = obj["metadata"]
    previous = FineTuneJobStatus.model_validate(obj.get("status") or {})
    generation = meta.get("generation")
    spec = SPECS.get(obj)
    if isinstance(spec, Invalid):
        return _update(previous, _invalid_spec_status(previous, spec.message, generation))
    if is_invalid_spec(previous) and previous.observed_generation == generation:
        return None  # reported already; a spec change gets a fresh start
    with measured(KIND, "mirror_status"):
        owner = _owner(meta)
        jobs = list(indexes["trainer_jobs"].get((owner.namespace, owner.uid), []))
        job = jobs[0] if jobs else None
        if job is None and previous.phase in ("Running", "Suspended"):
            # Someone deleted the Job of an unfinished run: recreate it; the trainer resumes from
            # its newest checkpoint. (Pending runs may simply not be in the index yet.)
            await asyncio.to_thread(_ensure_children, obj, owner, spec)
        job_uid = job["metadata"]["uid"] if job else None
        pods = list(indexes["trainer_pods"].get((owner.namespace, job_uid), [])) if job_uid else []
        progress = None
        running = [p for p in pods if p["status"].get("phase") == "Running" and p["status"].get("podIP")]
        if running:
            text = await _scrape(running[0]["status"]["podIP"])
            progress = parse_progress(text, now()) if text else None
        new = derive_status(
            previous=previous,
            generation=generation,
            job=job,
            pods=pods,
            progress=progress,
            output=_output_status(owner, spec),
            now=now(),
        )
        return _update(previous, new)


def _update(previous: FineTuneJobStatus, new: FineTuneJobStatus) -> StatusUpdate:
    """The changed fields, and an Event when the phase moves."""
    before, after = previous.to_wire(), new.to_wire()
    changes = {key: value for key, value in after.items() if before.get(key) != value}
    found: tuple[events.Event, ...] = ()
    if changes and new.phase != previous.phase:
        ready = next((c for c in new.conditions if c.type == "Ready"), None)
        reason = ready.reason if ready is not None and ready.reason == "InvalidSpec" else new.phase
        message = ready.message if ready else ""
        if new.phase == "Failed":
            found = (events.Event("Warning", reason or "Failed", message),)
        else:
            found = (events.Event("Normal", reason or "Unknown", message),)
    return StatusUpdate(changes=changes, phase=new.phase, events=found)


LOOP = StatusLoop(
    KIND, PLURAL, "finetunejobs_by_name", visit, interval=SETTINGS.status_interval, caches=(SPECS,)
)
