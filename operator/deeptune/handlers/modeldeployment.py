"""kopf glue for ModelDeployment: validate, resolve the model, apply the serving children, mirror and
probe what they do.

Level-based: `reconcile` (create/resume/spec change) applies the ConfigMap, Deployment, Service and
optional HPA/ServiceMonitor with server-side apply, so a changed spec updates them. The status loop
(`deeptune.statusloop`) visits every ModelDeployment: it reads the FineTuneJob, Deployment and pods
from in-memory indexes (no API calls), applies the children once a referenced FineTuneJob has
succeeded (a periodic visit, not a retry storm), re-applies them if someone deleted the Deployment,
probes a ready pod with tritonclient at most every `probe_interval`, and patches status only when
something changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from deeptune import events, serverside
from deeptune.api.base import GROUP, VERSION
from deeptune.api.modeldeployment import (
    KIND,
    PLURAL,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    ProbeResult,
    ResolvedModel,
    parse_spec,
)
from deeptune.builders import modeldeployment as build
from deeptune.builders.common import Owner
from deeptune.config import SETTINGS
from deeptune.kube import rejection
from deeptune.observability import measured
from deeptune.probe import probe_server
from deeptune.status.conditions import now
from deeptune.status.modeldeployment import (
    FINETUNEJOB_FAILED,
    INVALID_SPEC,
    Waiting,
    derive_status,
    invalid_spec_status,
    is_invalid_spec,
    is_ready,
    is_waiting,
    ready_pods,
    resolve_source,
    status_changes,
    waiting_status,
)
from deeptune.statusloop import Indexes, Invalid, Specs, StatusLoop, StatusUpdate, record

RESOURCE = (GROUP, VERSION, PLURAL)
Obj = dict[str, Any]
IndexEntries = dict[tuple[str | None, str], Obj]
LOG = logging.getLogger(__name__)

SPECS: Specs[ModelDeploymentSpec] = Specs(parse_spec)


def _owner(meta: kopf.Meta | Obj) -> Owner:
    return Owner(kind=KIND, name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


def _status(obj: Obj) -> ModelDeploymentStatus:
    return ModelDeploymentStatus.model_validate(obj.get("status") or {})


# --- indexes: what the status loop reads instead of calling the API ---------------------------
# FineTuneJobs are indexed by name in handlers/finetunejob.py (`finetunejobs_by_name`).


@kopf.index(*RESOURCE)
def modeldeployments(*, body: kopf.Body, **_: Any) -> dict[str, Obj]:
    """ModelDeployments by uid: the status loop's objects."""
    LOOP.nudge(body.meta["uid"])
    return {body.meta["uid"]: record(body)}


@kopf.index("apps", "v1", "deployments", labels={build.UID_LABEL: kopf.PRESENT})
def serving_deployments(*, body: kopf.Body, namespace: str | None, **_: Any) -> IndexEntries:
    """Serving Deployments by (namespace, owning ModelDeployment uid)."""
    uid = body.meta["labels"][build.UID_LABEL]
    LOOP.nudge(uid)
    return {(namespace, uid): {key: dict(body.get(key) or {}) for key in ("metadata", "spec", "status")}}


@kopf.index("", "v1", "pods", labels={build.UID_LABEL: kopf.PRESENT})
def serving_pods(*, body: kopf.Body, namespace: str | None, **_: Any) -> IndexEntries:
    """Serving pods by (namespace, owning ModelDeployment uid): the ReplicaSet owns them, the label says
    whose they are."""
    uid = body.meta["labels"][build.UID_LABEL]
    LOOP.nudge(uid)
    return {(namespace, uid): {"metadata": dict(body.meta), "status": dict(body.status)}}


def _resolve(indexes: Indexes, obj: Obj, spec: ModelDeploymentSpec) -> ResolvedModel | Waiting:
    """The model to serve: the referenced FineTuneJob's output (from the index), or the spec's own."""
    ref = spec.model.fine_tune_job_ref
    namespace = obj["metadata"]["namespace"]
    jobs = list(indexes["finetunejobs_by_name"].get((namespace, ref.name), [])) if ref else []
    return resolve_source(spec, jobs[0] if jobs else None, _status(obj).resolved_model)


# --- children -------------------------------------------------------------------------------


def _apply_children(obj: Obj, children: build.ServingChildren, owner: Owner) -> None:
    """Apply every child the spec asks for, and remove an HPA, ServiceMonitor or NetworkPolicy it no
    longer asks for."""
    for manifest in children.manifests():
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        try:
            outcome = serverside.apply(manifest)
        except ApiException as error:
            if kind != "ServiceMonitor" or error.status != 404:
                raise
            message = (
                "spec.serviceMonitor is set, but the ServiceMonitor kind (Prometheus Operator)"
                " is not installed"
            )
            events.post(obj, events.Event("Warning", "ServiceMonitorUnavailable", message))
            continue
        if outcome != "unchanged":
            LOG.info("%s %s %s/%s", outcome, kind, owner.namespace, name)
            if kind == "Deployment":
                reason = "DeploymentCreated" if outcome == "created" else "DeploymentUpdated"
                events.post(obj, events.Event("Normal", reason, f"{outcome} Deployment {name}"))
    name = build.server_name(owner)
    if children.autoscaler is None:
        serverside.remove("autoscaling/v2", "HorizontalPodAutoscaler", name, owner.namespace, owner.uid)
    if children.service_monitor is None:
        serverside.remove("monitoring.coreos.com/v1", "ServiceMonitor", name, owner.namespace, owner.uid)
    if children.network_policy is None:
        serverside.remove("networking.k8s.io/v1", "NetworkPolicy", name, owner.namespace, owner.uid)


async def _apply_or_note_rejection(obj: Obj, spec: ModelDeploymentSpec, resolved: ResolvedModel) -> bool:
    """Apply the children; a child the API server refuses (422) is remembered as an invalid spec for
    this generation instead of being retried. True when applied."""
    owner = _owner(obj["metadata"])
    children = build.build_children(owner, spec, resolved, SETTINGS.builder)
    try:
        await asyncio.to_thread(_apply_children, obj, children, owner)
    except ApiException as error:
        if error.status != 422:
            raise  # retried: the API server may be restarting
        SPECS.reject(obj, f"the API server rejected a child: {rejection(error)}")
        return False
    return True


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
async def reconcile(*, body: kopf.Body, **kwargs: Any) -> None:
    """Apply the serving children for a valid spec whose model is resolvable.

    Status is the loop's to write: this nudges it (it reports invalid specs and waiting models, and
    applies the children once a waited-for model is there). kopf passes the indexes by their
    function names, read here from `kwargs`.
    """
    LOOP.start(kwargs)
    obj = record(body)
    with measured(KIND, "reconcile"):
        spec = SPECS.get(obj)
        if not isinstance(spec, Invalid):
            resolved = _resolve(kwargs, obj, spec)
            if not isinstance(resolved, Waiting):
                await _apply_or_note_rejection(obj, spec, resolved)
    LOOP.nudge(body.meta["uid"])


# --- the status loop's visit --------------------------------------------------------------------


@dataclass(frozen=True)
class _LastProbe:
    pod: str
    at: float
    result: ProbeResult


class _Probes(dict[str, _LastProbe]):
    """The last probe of each ModelDeployment, by uid."""

    def retain(self, uids: set[str]) -> None:
        for uid in set(self) - uids:
            del self[uid]


PROBES = _Probes()


async def _probe(ready: list[Obj], owner: Owner, spec: ModelDeploymentSpec) -> ProbeResult | None:
    """The latest check of a ready pod of the current spec, made anew when the last is older than
    `probe_interval` or checked another pod."""
    if not ready:
        PROBES.pop(owner.uid, None)
        return None
    pod = ready[0]
    name = pod["metadata"]["name"]
    last = PROBES.get(owner.uid)
    if last is not None and last.pod == name and time.monotonic() - last.at < SETTINGS.probe_interval:
        return last.result
    # The pod's own address, not the Service's: that needs no kube-proxy (this test cluster has none)
    # and checks the server the pods run, whichever route the Service takes to them.
    address = f"{pod['status']['podIP']}:{spec.service.http_port}"
    result = await probe_server(
        address, build.model_name(owner), infer=not spec.streaming, timeout=SETTINGS.probe_timeout, now=now()
    )
    PROBES[owner.uid] = _LastProbe(pod=name, at=time.monotonic(), result=result)
    return result


async def visit(obj: Obj, indexes: Indexes) -> StatusUpdate | None:
    """The status a ModelDeployment should show now; applies the children once the model a spec
    waited for is there, or when the Deployment was deleted."""
    meta = obj["metadata"]
    previous = _status(obj)
    generation = meta.get("generation")
    spec = SPECS.get(obj)
    owner = _owner(meta)
    found = list(indexes["serving_deployments"].get((owner.namespace, owner.uid), []))
    deployment = found[0] if found else None
    if isinstance(spec, Invalid):
        status = invalid_spec_status(
            previous, generation, spec.message, now(), serving=deployment is not None
        )
        return _update(previous, status)
    if is_invalid_spec(previous) and previous.observed_generation == generation:
        return None  # reported already; a spec change gets a fresh start
    with measured(KIND, "mirror_status"):
        resolved = _resolve(indexes, obj, spec)
        if isinstance(resolved, Waiting):
            return _update(previous, waiting_status(previous, generation, resolved, now()))
        if is_waiting(previous) or (deployment is None and previous.deployment_name):
            # The FineTuneJob has just succeeded (or a spec change waited for its model), or someone
            # deleted the Deployment. A first creation and spec changes are reconcile's.
            if not await _apply_or_note_rejection(obj, spec, resolved):
                return await visit(obj, indexes)  # reports the rejection
            deployment = build.build_children(owner, spec, resolved, SETTINGS.builder).deployment
        pods = list(indexes["serving_pods"].get((owner.namespace, owner.uid), []))
        new = derive_status(
            previous=previous,
            generation=generation,
            resolved=resolved,
            deployment=deployment,
            pods=pods,
            probe=await _probe(ready_pods(deployment, pods), owner, spec),
            endpoints=build.endpoints(owner, spec),
            deployment_name=build.server_name(owner),
            streaming=spec.streaming,
            now=now(),
        )
        return _update(previous, new)


def _update(previous: ModelDeploymentStatus, new: ModelDeploymentStatus) -> StatusUpdate:
    """The changed fields, with an Event when the spec is rejected, or the model state or readiness
    moves."""
    changes = status_changes(previous.to_wire(), new.to_wire())
    if not changes:
        return StatusUpdate(changes={}, phase=new.model_state)
    if is_invalid_spec(new):
        message = new.last_failure.message if new.last_failure else ""
        found = () if is_invalid_spec(previous) else (events.Event("Warning", INVALID_SPEC, message),)
        return StatusUpdate(changes=changes, phase=new.model_state, events=found)
    return StatusUpdate(changes=changes, phase=new.model_state, events=tuple(_transitions(previous, new)))


def _transitions(previous: ModelDeploymentStatus, new: ModelDeploymentStatus) -> list[events.Event]:
    found = []
    conditions = {c.type: c for c in new.conditions}
    if new.model_state != previous.model_state and new.model_state is not None:
        failed = new.model_state == "FailedToLoad"
        loaded = conditions.get("ModelLoaded")
        message = (new.last_failure.message if failed and new.last_failure else "") or (
            loaded.message if loaded else ""
        )
        found.append(events.Event("Warning" if failed else "Normal", new.model_state, message))
    was_known = any(c.type == "Ready" for c in previous.conditions)
    if is_ready(new) != is_ready(previous) and (is_ready(new) or was_known):
        ready = conditions["Ready"]
        found.append(
            events.Event("Normal", "Ready", ready.message)
            if is_ready(new)
            else events.Event("Warning", "NotReady", ready.message)
        )
    reasons = [next((c.reason for c in s.conditions if c.type == "Ready"), None) for s in (previous, new)]
    if reasons[1] == FINETUNEJOB_FAILED != reasons[0]:  # Pending either way: say it went wrong
        found.append(events.Event("Warning", FINETUNEJOB_FAILED, conditions["Ready"].message))
    return found


LOOP = StatusLoop(
    KIND,
    PLURAL,
    "modeldeployments",
    visit,
    interval=SETTINGS.status_interval,
    caches=(SPECS, PROBES),
)
