"""kopf glue for ModelDeployment: validate, resolve the model, apply the serving children, mirror and
probe what they do.

Level-based: `reconcile` (create/resume/spec change) applies the ConfigMap, Deployment, Service and
optional HPA/ServiceMonitor with server-side apply, so a changed spec updates them. The
`mirror_status` timer reads the FineTuneJob, Deployment and pods from in-memory indexes (no API
calls), creates the children once a referenced FineTuneJob has succeeded (a timer, not a retry
storm), re-applies them if someone deleted the Deployment, probes a ready pod with tritonclient at most
every `probe_interval`, and patches status only when something changed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from deeptune import serverside
from deeptune.api import finetunejob
from deeptune.api.base import GROUP, VERSION, describe_validation_error
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
from deeptune.observability import STATUS_WRITES, PhaseBook, measured
from deeptune.probe import probe_server
from deeptune.status.conditions import now
from deeptune.status.modeldeployment import (
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

RESOURCE = (GROUP, VERSION, PLURAL)
Index = kopf.Index[tuple[str, str], dict[str, Any]]
IndexEntries = dict[tuple[str | None, str], dict[str, Any]]
PHASES = PhaseBook(KIND)


def _owner(meta: kopf.Meta) -> Owner:
    return Owner(kind=KIND, name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


def _status(body: kopf.Body) -> ModelDeploymentStatus:
    return ModelDeploymentStatus.model_validate(body.get("status") or {})


def _recorded(body: kopf.Body) -> dict[str, Any]:
    return {"metadata": dict(body.meta), "spec": dict(body.spec), "status": dict(body.status)}


# --- indexes: what the status timer reads instead of calling the API ---------------------------


@kopf.index(GROUP, VERSION, finetunejob.PLURAL)
def finetunejobs_by_name(*, body: kopf.Body, namespace: str | None, name: str, **_: Any) -> IndexEntries:
    """FineTuneJobs by (namespace, name), for `model.fineTuneJobRef`."""
    return {(namespace, name): _recorded(body)}


@kopf.index("apps", "v1", "deployments", labels={build.UID_LABEL: kopf.PRESENT})
def serving_deployments(*, body: kopf.Body, namespace: str | None, **_: Any) -> IndexEntries:
    """Serving Deployments by (namespace, owning ModelDeployment uid)."""
    return {(namespace, body.meta["labels"][build.UID_LABEL]): _recorded(body)}


@kopf.index("", "v1", "pods", labels={build.UID_LABEL: kopf.PRESENT})
def serving_pods(*, body: kopf.Body, namespace: str | None, **_: Any) -> IndexEntries:
    """Serving pods by (namespace, owning ModelDeployment uid): the ReplicaSet owns them, the label says
    whose they are."""
    return {
        (namespace, body.meta["labels"][build.UID_LABEL]): {
            "metadata": dict(body.meta),
            "status": dict(body.status),
        }
    }


def _referenced_job(index: Index, namespace: str, spec: ModelDeploymentSpec) -> dict[str, Any] | None:
    ref = spec.model.fine_tune_job_ref
    jobs = list(index.get((namespace, ref.name), [])) if ref else []
    return jobs[0] if jobs else None


# --- children -------------------------------------------------------------------------------


def _apply_children(
    body: kopf.Body, children: build.ServingChildren, owner: Owner, logger: kopf.Logger
) -> None:
    """Apply every child the spec asks for, and remove an HPA or ServiceMonitor it no longer asks for."""
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
            kopf.event(body, type="Warning", reason="ServiceMonitorUnavailable", message=message)
            continue
        if outcome != "unchanged":
            logger.info("%s %s %s", outcome, kind, name)
            if kind == "Deployment":
                reason = "DeploymentCreated" if outcome == "created" else "DeploymentUpdated"
                kopf.event(body, type="Normal", reason=reason, message=f"{outcome} Deployment {name}")
    name = build.server_name(owner)
    if children.autoscaler is None:
        serverside.remove("autoscaling/v2", "HorizontalPodAutoscaler", name, owner.namespace, owner.uid)
    if children.service_monitor is None:
        serverside.remove("monitoring.coreos.com/v1", "ServiceMonitor", name, owner.namespace, owner.uid)


def _report_invalid(
    body: kopf.Body, patch: kopf.Patch, previous: ModelDeploymentStatus, message: str, generation: int | None
) -> None:
    """A spec that cannot be served: a Warning Event and Ready=False/InvalidSpec, no retry."""
    kopf.event(body, type="Warning", reason="InvalidSpec", message=message)
    _write_changes(
        body, patch, previous, invalid_spec_status(previous, generation, message, now()), events=False
    )


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
def reconcile(
    *, body: kopf.Body, meta: kopf.Meta, patch: kopf.Patch, logger: kopf.Logger, **kwargs: Any
) -> None:
    """Apply the serving children for a valid spec whose model is resolvable; else say why not."""
    finetunejobs: Index = kwargs["finetunejobs_by_name"]
    previous = _status(body)
    generation = meta.get("generation")
    with measured(KIND, "reconcile"):
        try:
            spec = parse_spec(dict(body.spec))
        except ValidationError as error:
            _report_invalid(body, patch, previous, describe_validation_error(error), generation)
            return
        owner = _owner(meta)
        job = _referenced_job(finetunejobs, owner.namespace, spec)
        resolved = resolve_source(spec, job, previous.resolved_model)
        if isinstance(resolved, Waiting):
            # No children yet; the status timer notices when the FineTuneJob succeeds.
            _write_changes(body, patch, previous, waiting_status(previous, generation, resolved, now()))
            return
        try:
            _apply_children(
                body, build.build_children(owner, spec, resolved, SETTINGS.builder), owner, logger
            )
        except ApiException as error:
            if error.status != 422:
                raise  # kopf retries with backoff: the API server may be restarting
            _report_invalid(
                body, patch, previous, f"the API server rejected a child: {rejection(error)}", generation
            )
            return
        if previous.deployment_name is None or is_invalid_spec(previous):
            _write_changes(
                body,
                patch,
                previous,
                _derive(
                    previous,
                    generation=generation,
                    owner=owner,
                    spec=spec,
                    resolved=resolved,
                    deployment=None,
                    pods=[],
                    probe=None,
                ),
            )


@kopf.on.delete(*RESOURCE, optional=True)
def forget(*, meta: kopf.Meta, **_: Any) -> None:
    """Children go by garbage collection (owner references); only the state gauge needs updating."""
    PHASES.record(meta["uid"], None)


# --- the status timer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _LastProbe:
    pod: str
    at: float
    result: ProbeResult


async def _probe(
    memo: kopf.Memo, ready: list[dict[str, Any]], owner: Owner, spec: ModelDeploymentSpec
) -> ProbeResult | None:
    """The latest check of a ready pod of the current spec, made anew when the last is older than
    `probe_interval` or checked another pod."""
    if not ready:
        memo.pop("last_probe", None)
        return None
    pod = ready[0]
    name = pod["metadata"]["name"]
    last: _LastProbe | None = memo.get("last_probe")
    if last is not None and last.pod == name and time.monotonic() - last.at < SETTINGS.probe_interval:
        return last.result
    # The pod's own address, not the Service's: that needs no kube-proxy (this test cluster has none)
    # and checks the server the pods run, whichever route the Service takes to them.
    address = f"{pod['status']['podIP']}:{spec.service.http_port}"
    result = await probe_server(
        address, build.model_name(owner), infer=not spec.streaming, timeout=SETTINGS.probe_timeout, now=now()
    )
    memo["last_probe"] = _LastProbe(pod=name, at=time.monotonic(), result=result)
    return result


def _derive(
    previous: ModelDeploymentStatus,
    *,
    generation: int | None,
    owner: Owner,
    spec: ModelDeploymentSpec,
    resolved: ResolvedModel,
    deployment: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    probe: ProbeResult | None,
) -> ModelDeploymentStatus:
    return derive_status(
        previous=previous,
        generation=generation,
        resolved=resolved,
        deployment=deployment,
        pods=pods,
        probe=probe,
        endpoints=build.endpoints(owner, spec),
        deployment_name=build.server_name(owner),
        streaming=spec.streaming,
        now=now(),
    )


@kopf.timer(*RESOURCE, interval=SETTINGS.status_interval, initial_delay=1.0)
async def mirror_status(
    *,
    body: kopf.Body,
    meta: kopf.Meta,
    patch: kopf.Patch,
    logger: kopf.Logger,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """Mirror the Deployment and pods (and the probe) into status; apply the children once the model
    a spec waited for is there, or when the Deployment was deleted.

    kopf passes the indexes by their function names; they are read from `kwargs` so the signature
    still matches kopf's timer protocol.
    """
    finetunejobs: Index = kwargs["finetunejobs_by_name"]
    deployments: Index = kwargs["serving_deployments"]
    pods_index: Index = kwargs["serving_pods"]
    previous = _status(body)
    if is_invalid_spec(previous):
        return
    try:
        spec = parse_spec(dict(body.spec))
    except ValidationError:
        return  # reconcile reports it
    generation = meta.get("generation")
    with measured(KIND, "mirror_status"):
        owner = _owner(meta)
        resolved = resolve_source(
            spec, _referenced_job(finetunejobs, owner.namespace, spec), previous.resolved_model
        )
        if isinstance(resolved, Waiting):
            _write_changes(body, patch, previous, waiting_status(previous, generation, resolved, now()))
            return
        found = list(deployments.get((owner.namespace, owner.uid), []))
        deployment = found[0] if found else None
        if is_waiting(previous) or (deployment is None and previous.deployment_name):
            # The FineTuneJob has just succeeded (or a spec change waited for its model), or someone
            # deleted the Deployment. A first creation and spec changes are reconcile's: the timer
            # would race it.
            children = build.build_children(owner, spec, resolved, SETTINGS.builder)
            await asyncio.to_thread(_apply_children, body, children, owner, logger)
            deployment = children.deployment  # as applied: the index has not seen it yet
        pods = list(pods_index.get((owner.namespace, owner.uid), []))
        probe = await _probe(memo, ready_pods(deployment, pods), owner, spec)
        new = _derive(
            previous,
            generation=generation,
            owner=owner,
            spec=spec,
            resolved=resolved,
            deployment=deployment,
            pods=pods,
            probe=probe,
        )
        _write_changes(body, patch, previous, new)


def _write_changes(
    body: kopf.Body,
    patch: kopf.Patch,
    previous: ModelDeploymentStatus,
    new: ModelDeploymentStatus,
    *,
    events: bool = True,
) -> None:
    """Patch the status fields that changed, with an Event when the model state or readiness moves."""
    changed = status_changes(previous.to_wire(), new.to_wire())
    if not changed:
        return
    STATUS_WRITES.labels(KIND).inc()
    for key, value in changed.items():
        patch.status[key] = value
    PHASES.record(body.meta["uid"], new.model_state)
    if not events:
        return
    conditions = {c.type: c for c in new.conditions}
    if new.model_state != previous.model_state and new.model_state is not None:
        failed = new.model_state == "FailedToLoad"
        loaded = conditions.get("ModelLoaded")
        message = (new.last_failure.message if failed and new.last_failure else "") or (
            loaded.message if loaded else ""
        )
        kopf.event(body, type="Warning" if failed else "Normal", reason=new.model_state, message=message)
    was_known = any(c.type == "Ready" for c in previous.conditions)
    if is_ready(new) != is_ready(previous) and (is_ready(new) or was_known):
        ready = conditions["Ready"]
        reason = "Ready" if is_ready(new) else "NotReady"
        kopf.event(body, type="Normal" if is_ready(new) else "Warning", reason=reason, message=ready.message)
