"""The FineTuneJob reconciler: given a FineTuneJob and the cluster's view of its children, make the
children that should exist, derive the status, write what changed, and let go of a finished Job.

Level-based: it looks at what is, never at what event woke it, so a missed event costs nothing but
the time to the next resync. The steps:
1. Gone or being deleted: release the result finalizer of whatever children are left (garbage
   collection removes them).
2. Judge the spec (once per generation); an invalid one is reported, and nothing is made.
3. An unfinished run without a Job gets its ConfigMap and Job (dry-run first, so a Job the API
   server refuses leaves nothing behind); a Job that exists gets its mutable fields (backoffLimit,
   suspend, deadline, TTL) brought in line and its ConfigMap back if someone deleted it.
4. Status from the Job, its pods and the trainer's latest metrics sample (fetched in the background:
   a reconcile never waits for a pod).
5. Once the status holds the outcome, the Job and its pods are released: a TTL may remove them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from kubernetes.client.exceptions import ApiException

from deeptune import children, events, fitting, observability
from deeptune.api.base import API_VERSION
from deeptune.api.finetunejob import (
    KIND,
    PLURAL,
    FineTuneJobSpec,
    FineTuneJobStatus,
    OutputStatus,
    Progress,
    parse_spec,
)
from deeptune.api.trainer import METRICS_PORT
from deeptune.builders import finetunejob as build
from deeptune.builders.common import Owner
from deeptune.cache import Cache
from deeptune.config import Settings
from deeptune.samples import Samples
from deeptune.status import usage
from deeptune.status.conditions import now, set_conditions
from deeptune.status.finetunejob import (
    TERMINAL_PHASES,
    RunState,
    completion_index,
    derive_status,
    is_invalid_spec,
    same_progress,
)
from deeptune.status.progress import parse_progress
from deeptune.status.teacher import resolve_teacher, teacher_run
from deeptune.statuswriter import StatusUpdate, StatusWriter
from deeptune.verdicts import Invalid, SpecVerdicts

Obj = dict[str, Any]
LOG = logging.getLogger(__name__)
_KIND = (API_VERSION, KIND)
JOB = ("batch/v1", "Job")
POD = ("v1", "Pod")
JOB_UID_LABEL = "batch.kubernetes.io/controller-uid"
"""The label the Job controller gives each pod it makes: its Job's uid."""
CONFLICT_RETRY = 30.0
"""Seconds between looks at a Job of our name that is not ours (someone must delete or rename)."""
OWNER_GOING_RETRY = 2.0
"""Seconds between looks at a Job of our name that a deleted FineTuneJob left, until GC removes it."""
CREATION_GRACE = 30.0
"""Seconds a Job this operator created may take to appear in the cache before it is made again."""

# The cache's indexes (kopf index functions of these names, in deeptune.registration).
OBJECTS = "finetunejobs"
JOBS = "trainer_jobs"
JOB_OWNERS = "trainer_job_owners"
"""Trainer Jobs' uids → their FineTuneJobs' uids: which run a Kueue Workload's news is about."""
WORKLOADS = "kueue_workloads"
"""Kueue's Workloads by the uid of the Job they hold (when Kueue is installed)."""
PODS = "trainer_pods"
CONFIG_MAPS = "trainer_config_maps"
SERVICES = "trainer_services"
FINETUNEJOBS_BY_NAME = "finetunejobs_by_name"
"""FineTuneJobs by (namespace, name): what a `fineTuneJobRef` names (a teacher, a served model)."""
STUDENTS_BY_TEACHER = "students_by_teacher"
"""FineTuneJobs by the (namespace, name) of the FineTuneJob they distil from."""
TEACHER_RETRY = 30.0
"""Seconds between looks at a teacher run not yet succeeded (its changes queue the student sooner)."""


class RejectedError(Exception):
    """The API server refused a child built from this spec (422): the spec cannot run."""


class FineTuneJobReconciler:
    """Holds what reconciles of FineTuneJobs share: spec verdicts, the status writer, the trainers'
    metrics samples and the Jobs created but not yet seen in the cache."""

    def __init__(self, settings: Settings, cache: Cache, enqueue: Callable[[str], None]) -> None:
        self.settings, self.cache = settings, cache
        self.verdicts: SpecVerdicts[FineTuneJobSpec] = SpecVerdicts(parse_spec)
        self.writer = StatusWriter(KIND, PLURAL)
        self.progress: Samples[str, Progress] = Samples(
            self._scrape,
            max_age=settings.status_interval,
            timeout=settings.scrape_timeout,
            on_news=enqueue,
            same=same_progress,
        )
        self._created: dict[str, float] = {}
        """FineTuneJob uid → when its Job was created, until the cache has the Job."""

    def keys(self) -> list[str]:
        """Every FineTuneJob, and the owners of trainer Jobs whose FineTuneJob is gone (their
        finalizers to release)."""
        return list(dict.fromkeys(str(key) for index in (OBJECTS, JOBS) for key in self.cache.keys(index)))

    async def reconcile(self, uid: str) -> float | None:
        cached = self.cache.one(OBJECTS, uid)
        if cached is not None and children.holds(cached, children.LEGACY_FINALIZER):
            await asyncio.to_thread(children.release, cached, _KIND, children.LEGACY_FINALIZER)
        jobs = self.cache.all(JOBS, uid)
        pods = self.cache.all(PODS, uid)
        if cached is None or cached["metadata"].get("deletionTimestamp"):
            await self._release(jobs + pods)  # nothing left to record
            if cached is None:
                self._forget(uid)
            return None
        obj = self.writer.current(cached)
        previous = FineTuneJobStatus.model_validate(obj.get("status") or {})
        generation = obj["metadata"].get("generation")
        spec = self.verdicts.get(obj)
        if isinstance(spec, Invalid):
            await self.writer.write(
                obj, _update(previous, _invalid_spec_status(previous, spec.message, generation))
            )
            return None
        if is_invalid_spec(previous) and previous.observed_generation == generation:
            return None  # reported already; a spec change gets a fresh start
        owner = _owner(obj)
        job = jobs[0] if jobs else None
        blocked, again = None, None
        if job is not None:
            self._created.pop(uid, None)
        finished = previous.phase in TERMINAL_PHASES and not is_invalid_spec(previous)
        plan = fitting.plan_for(spec) if job is None and not finished else None
        if plan is not None and (refused := fitting.refusal(spec, plan)) is not None:
            await self._refuse(obj, previous, refused)
            return None
        try:
            if not finished and job is None:
                blocked, again = await self._create(obj, owner, spec)
            elif not finished and job is not None and not job["metadata"].get("deletionTimestamp"):
                await self._keep(owner, spec, job)
        except RejectedError as error:
            await self._refuse(obj, previous, f"the API server rejected a child: {error}")
            return None
        job_uid = job["metadata"]["uid"] if job else None
        run_pods = [p for p in pods if job_uid in children.owner_uids(p)]
        new = derive_status(
            previous=previous,
            generation=generation,
            job=job,
            pods=run_pods,
            progress=self._latest_progress(uid, run_pods),
            output=_output_status(owner, spec),
            now=now(),
            blocked=blocked,
            workload=self.cache.one(WORKLOADS, job_uid) if job_uid else None,
        )
        if new is not previous:  # previous: a finished run's status stands (derive_status says when)
            new = new.model_copy(
                update={
                    "world_size": spec.world_size,
                    "usage": usage.account(previous.usage, run_pods, self.settings.gpu_hour_prices),
                    "plan": fitting.plan_status(plan, spec) if plan is not None else new.plan,
                }
            )
        update = _update(previous, new)
        if await self.writer.write(obj, update):
            ended = usage.newly_finished(previous.usage, new.usage)
            observability.count_usage(obj["metadata"]["namespace"], ended)
            settled = not update.changes and await _outcome_complete(new, jobs, pods)
            await self._release(_recorded(new, jobs, pods, settled=settled))
        return again

    async def _refuse(self, obj: Obj, previous: FineTuneJobStatus, message: str) -> None:
        """This generation's spec cannot run: say why in status, until the spec changes."""
        self.verdicts.reject(obj, message)
        generation = obj["metadata"].get("generation")
        await self.writer.write(obj, _update(previous, _invalid_spec_status(previous, message, generation)))

    # --- children ---------------------------------------------------------------------------

    async def _create(
        self, obj: Obj, owner: Owner, spec: FineTuneJobSpec
    ) -> tuple[RunState | None, float | None]:
        """Make the ConfigMap and Job; what blocks it (and when to look again), if anything does."""
        created = self._created.get(owner.uid)
        if created is not None and time.monotonic() - created < CREATION_GRACE:
            return None, CREATION_GRACE  # made a moment ago; the cache has not caught up
        resolved = self._resolved(owner, spec)
        if isinstance(resolved, RunState):
            return resolved, TEACHER_RETRY
        spec = resolved
        job = build.build_job(owner, spec, self.settings.builder)
        try:
            await asyncio.to_thread(
                _create_children, build.build_config_map(owner, spec), build.build_service(owner, spec), job
            )
        except children.NotOursError as error:
            return RunState("Pending", "JobConflict", str(error)), CONFLICT_RETRY
        except children.OwnerGoingError as error:
            return RunState("Pending", "WaitingForOldJob", str(error)), OWNER_GOING_RETRY
        self._created[owner.uid] = time.monotonic()
        LOG.info("created Job %s/%s", owner.namespace, job["metadata"]["name"])
        message = f"created Job {job['metadata']['name']}"
        await asyncio.to_thread(events.post, obj, events.Event("Normal", "JobCreated", message))
        return None, None

    async def _keep(self, owner: Owner, spec: FineTuneJobSpec, job: Obj) -> None:
        """Bring an unfinished Job's mutable fields in line with the spec, and its ConfigMap and
        Service back."""
        if _finished(job):
            return
        wanted = build.job_controls(spec)
        drift = {key: value for key, value in wanted.items() if job.get("spec", {}).get(key) != value}
        if drift:
            name = job["metadata"]["name"]
            await asyncio.to_thread(children.patch, *JOB, name, owner.namespace, {"spec": drift})
            LOG.info("patched Job %s/%s: %s", owner.namespace, name, sorted(drift))
        if not self.cache.all(CONFIG_MAPS, owner.uid):
            resolved = self._resolved(owner, spec)
            if not isinstance(resolved, RunState):  # a teacher rerun since: made when it succeeds
                await asyncio.to_thread(_create, build.build_config_map(owner, resolved))
        service = build.build_service(owner, spec)
        if service is not None and not self.cache.all(SERVICES, owner.uid):
            await asyncio.to_thread(_create, service)

    def _resolved(self, owner: Owner, spec: FineTuneJobSpec) -> FineTuneJobSpec | RunState:
        """The spec with a `fineTuneJobRef` teacher resolved to that run's model, or why it waits."""
        name = teacher_run(spec)
        referenced = self.cache.one(FINETUNEJOBS_BY_NAME, (owner.namespace, name)) if name else None
        return resolve_teacher(spec, referenced)

    async def _release(self, objects: list[Obj]) -> None:
        for obj in objects:
            kind = JOB if obj.get("kind") == "Job" else POD
            if await asyncio.to_thread(children.release, obj, kind, build.RESULT_FINALIZER):
                LOG.info("released %s %s/%s", kind[1], obj["metadata"]["namespace"], obj["metadata"]["name"])

    # --- the trainer's metrics --------------------------------------------------------------

    def _latest_progress(self, uid: str, pods: list[Obj]) -> Progress | None:
        running = [p for p in pods if p["status"].get("phase") == "Running" and p["status"].get("podIP")]
        if not running:
            self.progress.forget(uid)
            return None
        rank_zero = min(running, key=lambda pod: completion_index(pod) or 0)  # pod 0 over several
        return self.progress.latest(uid, rank_zero["status"]["podIP"])

    async def _scrape(self, pod_ip: str) -> Progress | None:
        url = f"http://{pod_ip}:{METRICS_PORT}/metrics"
        try:
            timeout = aiohttp.ClientTimeout(total=self.settings.scrape_timeout)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
                text = await response.text() if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError) as error:
            LOG.debug("metrics scrape of %s failed: %s", url, error)
            return None
        return parse_progress(text, now()) if text else None

    def _forget(self, uid: str) -> None:
        self.verdicts.forget(uid)
        self.writer.forget(uid)
        self.progress.forget(uid)
        self._created.pop(uid, None)


def _create(manifest: Obj) -> None:
    try:
        children.create(manifest)
    except ApiException as error:
        if error.status == 422:
            raise RejectedError(children.rejection(error)) from error
        raise


def _create_children(config_map: Obj, service: Obj | None, job: Obj) -> None:
    """The Job is dry-run first, so one the API server refuses leaves no ConfigMap behind; the
    Service (a run over several pods) comes before the Job, so pod 0's name resolves from the start."""
    try:
        children.create(job, dry_run=True)
    except ApiException as error:
        if error.status == 422:
            raise RejectedError(children.rejection(error)) from error
        raise
    _create(config_map)
    if service is not None:
        _create(service)
    _create(job)


def _finished(job: Obj) -> bool:
    conditions = job.get("status", {}).get("conditions") or []
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions)


def _recorded(status: FineTuneJobStatus, jobs: list[Obj], pods: list[Obj], *, settled: bool) -> list[Obj]:
    """The children whose state the status now holds, that may go.

    A finished Job (its TTL may be deleting it already) and its pods once the outcome is recorded: a
    reconcile found the status terminal with nothing to add, and the cache has the final state of
    every pod (`settled`, from `_outcome_complete`). Before that, whatever is being deleted while the
    run goes on (an evicted pod, a Job deleted by hand, the pods of a finished Job whose condition has
    not reached the cache yet): its state is in this reconcile's status already."""
    if settled:
        return jobs + pods
    ended = {j["metadata"]["uid"] for j in jobs if _finished(j)}
    going = {j["metadata"]["uid"] for j in jobs if j["metadata"].get("deletionTimestamp")} - ended
    return [
        obj
        for obj in jobs + pods
        if not (ended & ({obj["metadata"]["uid"]} | children.owner_uids(obj)))
        and (obj["metadata"].get("deletionTimestamp") or going & children.owner_uids(obj))
    ]


async def _outcome_complete(status: FineTuneJobStatus, jobs: list[Obj], pods: list[Obj]) -> bool:
    """Whether the status is terminal and the cache had every pod's final state for it."""
    return status.phase in TERMINAL_PHASES and await asyncio.to_thread(_every_pod_seen_finished, jobs, pods)


def _every_pod_seen_finished(jobs: list[Obj], pods: list[Obj]) -> bool:
    """Whether the cache has the final state of every pod the Jobs count as finished (a pod's last
    update, with the trainer's summary, may reach the cache after the Job's condition), and no pod of
    theirs still runs.

    A pod the Job counts that the cache lacks was either let go already (every trainer pod holds the
    result finalizer until a reconcile has recorded its state; then it is removed for good) or is
    not in the cache yet: only then does this ask the API server which."""
    for job in jobs:
        uid = job["metadata"]["uid"]
        mine = [p for p in pods if uid in children.owner_uids(p)]
        if any(p.get("status", {}).get("phase") not in ("Succeeded", "Failed") for p in mine):
            return False
        counted = sum(int(job.get("status", {}).get(key) or 0) for key in ("succeeded", "failed"))
        if len(mine) >= counted:
            continue
        on_server = children.listed(*POD, job["metadata"]["namespace"], f"{JOB_UID_LABEL}={uid}")
        if {p["metadata"]["uid"] for p in on_server} - {p["metadata"]["uid"] for p in mine}:
            return False
    return True


def _owner(obj: Obj) -> Owner:
    meta = obj["metadata"]
    return Owner(kind=KIND, name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


def _output_status(owner: Owner, spec: FineTuneJobSpec) -> OutputStatus:
    config = build.trainer_config(owner, spec)
    return OutputStatus(
        claim_name=spec.output.pvc.claim_name,
        path=config.paths.output_dir.removeprefix(f"{build.PVC_ROOT}/{spec.output.pvc.claim_name}/"),
    )


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


def _update(previous: FineTuneJobStatus, new: FineTuneJobStatus) -> StatusUpdate:
    """The changed fields, and an Event when the phase moves or the run is blocked anew."""
    before, after = previous.to_wire(), new.to_wire()
    changes = {key: value for key, value in after.items() if before.get(key) != value}
    found: list[events.Event] = []
    ready = next((c for c in new.conditions if c.type == "Ready"), None)
    was = next((c.reason for c in previous.conditions if c.type == "Ready"), None)
    reason, message = (ready.reason, ready.message) if ready else (None, "")
    if changes and new.phase != previous.phase:
        if new.phase == "Failed":
            found.append(events.Event("Warning", reason if reason == "InvalidSpec" else "Failed", message))
        else:
            found.append(events.Event("Normal", new.phase or "Unknown", message))
    if changes and reason == "JobConflict" != was:
        found.append(events.Event("Warning", "JobConflict", message))
    return StatusUpdate(changes=changes, phase=new.phase, events=tuple(found))
