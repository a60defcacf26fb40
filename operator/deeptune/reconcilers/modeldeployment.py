"""The ModelDeployment reconciler: given a ModelDeployment and the cluster's view of its children,
apply every child its spec asks for (server-side apply), remove the optional ones it dropped, derive
the status (with the operator's own inference probe, run in the background) and write what changed.

A child is applied when it is missing from the cache, when the spec asks for something else than was
last applied, or when someone else changed it since (a Deployment's generation, another object's
resourceVersion moved): a deleted Service or a hand-edited Deployment is put back at the next
reconcile. After a restart every child is applied once (an unchanged apply changes nothing).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from kubernetes.client.exceptions import ApiException

from deeptune import children, events
from deeptune.api.base import API_VERSION
from deeptune.api.finetunejob import EvalResults, FineTuneJobStatus
from deeptune.api.modeldeployment import (
    KIND,
    PLURAL,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    ProbeResult,
    PromotionStatus,
    ResolvedModel,
    parse_spec,
    serving_backend,
)
from deeptune.builders import modeldeployment as build
from deeptune.builders.common import Manifest, Owner
from deeptune.cache import Cache
from deeptune.config import Settings
from deeptune.probe import probe_openai, probe_server
from deeptune.reconcilers.finetunejob import FINETUNEJOBS_BY_NAME
from deeptune.samples import Samples
from deeptune.serving.repository import decoupled
from deeptune.status import promotion
from deeptune.status.conditions import now
from deeptune.status.modeldeployment import (
    FINETUNEJOB_FAILED,
    INVALID_SPEC,
    Waiting,
    derive_status,
    invalid_spec_status,
    is_invalid_spec,
    is_ready,
    ready_pods,
    resolve_source,
    status_changes,
    waiting_status,
)
from deeptune.statuswriter import StatusUpdate, StatusWriter
from deeptune.verdicts import Invalid, SpecVerdicts

Obj = dict[str, Any]
LOG = logging.getLogger(__name__)
_KIND = (API_VERSION, KIND)
ChildKey = tuple[str, str]
"""(kind, name) of a child."""
CONFLICT_RETRY = 30.0
"""Seconds between looks at a child of our name that is not ours (someone must delete or rename)."""
OWNER_GOING_RETRY = 2.0
"""Seconds between looks at a child that a deleted owner of the same name left, until GC removes it."""
ABSENT = "absent"
"""The digest recorded for an optional child the spec does not ask for, once it was removed."""

# The cache's indexes (kopf index functions of these names, in deeptune.registration).
OBJECTS = "modeldeployments"
DEPLOYMENTS = "serving_deployments"
PODS = "serving_pods"
CHILD_RESOURCES = [
    ("", "v1", "configmaps"),
    ("", "v1", "services"),
    ("autoscaling", "v2", "horizontalpodautoscalers"),
    ("networking.k8s.io", "v1", "networkpolicies"),
]
"""The children watched besides the Deployment and pods, each an index `serving_<plural>` by owner
uid. Not a ServiceMonitor or a ScaledObject: their kinds may not be installed, so they are applied after
a spec change or a restart and not put back when deleted."""
WATCHED = frozenset({"ConfigMap", "Service", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy"})
OPTIONAL = {
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "ScaledObject": "keda.sh/v1alpha1",
}
NOT_INSTALLED = {
    "ServiceMonitor": (
        "ServiceMonitorUnavailable",
        "spec.serviceMonitor is set, but the ServiceMonitor kind (Prometheus Operator) is not installed",
    ),
    "ScaledObject": (
        "KedaUnavailable",
        "spec.autoscaling.keda is set, but KEDA's ScaledObject kind is not installed: nothing scales the"
        " Deployment, which keeps its replicas; install KEDA, or remove keda for a HorizontalPodAutoscaler",
    ),
}
"""Children of kinds that another project installs, and what a ModelDeployment that asks for one is told
(an Event) when it is missing."""


@dataclass(frozen=True)
class Applied:
    """A child as the operator last applied it: what it asked for, and the version that resulted."""

    digest: str
    resource_version: str | None = None
    generation: int | None = None

    def outdated_by(self, cached: Obj | None, digest: str, watched: bool) -> bool:
        if self.digest != digest:
            return True
        if not watched:
            return False
        if cached is None:
            return True  # deleted
        meta = cached["metadata"]
        if meta.get("generation") is not None:
            return bool(meta["generation"] != self.generation)
        return bool(meta.get("resourceVersion") != self.resource_version)


@dataclass(frozen=True)
class ProbeTarget:
    pod: str
    address: str
    model: str
    api: Literal["triton", "openai"]
    """Triton's KServe-v2 HTTP endpoint, or an OpenAI-compatible API."""
    decoupled: bool


class ModelDeploymentReconciler:
    """Holds what reconciles of ModelDeployments share: spec verdicts, the status writer, the last
    applied version of every child, and the serving pods' probe samples."""

    def __init__(self, settings: Settings, cache: Cache, enqueue: Callable[[str], None]) -> None:
        self.settings, self.cache = settings, cache
        self.verdicts: SpecVerdicts[ModelDeploymentSpec] = SpecVerdicts(parse_spec)
        self.writer = StatusWriter(KIND, PLURAL)
        self.probes: Samples[ProbeTarget, ProbeResult] = Samples(
            self._probe,
            max_age=settings.probe_interval,
            timeout=settings.probe_timeout + 5,
            on_news=enqueue,
            same=_same_probe,
        )
        self._applied: dict[str, dict[ChildKey, Applied]] = {}

    def keys(self) -> list[str]:
        return [str(key) for key in self.cache.keys(OBJECTS)]

    async def reconcile(self, uid: str) -> float | None:
        cached = self.cache.one(OBJECTS, uid)
        if cached is not None and children.holds(cached, children.LEGACY_FINALIZER):
            await asyncio.to_thread(children.release, cached, _KIND, children.LEGACY_FINALIZER)
        if cached is None or cached["metadata"].get("deletionTimestamp"):
            if cached is None:
                self._forget(uid)
            return None  # garbage collection removes the children
        obj = self.writer.current(cached)
        previous = ModelDeploymentStatus.model_validate(obj.get("status") or {})
        generation = obj["metadata"].get("generation")
        owner = _owner(obj)
        deployment = self.cache.one(DEPLOYMENTS, uid)
        spec = self.verdicts.get(obj)
        if isinstance(spec, Invalid):
            await self._report_invalid(obj, previous, spec.message, deployment is not None)
            return None
        if is_invalid_spec(previous) and previous.observed_generation == generation:
            return None  # reported already; a spec change gets a fresh start
        resolved, verdict = self._resolve(obj, spec, previous)
        if isinstance(resolved, Waiting):
            waiting = waiting_status(previous, generation, resolved, now())
            waiting = promotion.with_verdict(waiting, previous, verdict, generation, now())
            await self.writer.write(obj, _update(previous, waiting))
            return None
        manifests = build.build_children(owner, spec, resolved, self.settings.builder)
        try:
            applied = await self._apply(obj, owner, manifests)
        except ApiException as error:
            if error.status != 422:
                raise  # retried after a backoff: the API server may be restarting
            message = f"the API server rejected a child: {children.rejection(error)}"
            self.verdicts.reject(obj, message)
            await self._report_invalid(obj, previous, message, deployment is not None)
            return None
        except (children.NotOursError, children.OwnerGoingError) as error:  # someone must act, or GC will
            conflict = Waiting("ChildConflict", str(error))
            await self.writer.write(
                obj, _update(previous, waiting_status(previous, generation, conflict, now()))
            )
            return CONFLICT_RETRY if isinstance(error, children.NotOursError) else OWNER_GOING_RETRY
        deployment = deployment or applied
        pods = self.cache.all(PODS, uid)
        ready = ready_pods(deployment, pods)
        probe = self._latest_probe(uid, ready, owner, spec, resolved)
        if (
            ready
            and probe is None
            and self.probes.pending(uid, self._probe_target(ready[0], owner, spec, resolved))
        ):
            return None  # the first check of this pod is on its way; its news reconciles again
        new = derive_status(
            previous=previous,
            generation=generation,
            resolved=resolved,
            deployment=deployment,
            pods=pods,
            probe=probe,
            endpoints=build.endpoints(owner, spec, resolved),
            backend=serving_backend(spec),
            deployment_name=build.server_name(owner),
            now=now(),
        )
        new = promotion.with_verdict(new, previous, verdict, generation, now())
        await self.writer.write(obj, _update(previous, new))
        return None

    async def _report_invalid(
        self, obj: Obj, previous: ModelDeploymentStatus, message: str, serving: bool
    ) -> None:
        generation = obj["metadata"].get("generation")
        status = invalid_spec_status(previous, generation, message, now(), serving=serving)
        await self.writer.write(obj, _update(previous, status))

    def _resolve(
        self, obj: Obj, spec: ModelDeploymentSpec, previous: ModelDeploymentStatus
    ) -> tuple[ResolvedModel | Waiting, PromotionStatus | None]:
        """The model to serve: the referenced FineTuneJobs' outputs (from the cache), or the spec's own;
        with `spec.promotion`, the referenced run only if it passes the gate, and the gate's verdict."""
        namespace = obj["metadata"]["namespace"]
        refs = [spec.model.fine_tune_job_ref, *(adapter.fine_tune_job_ref for adapter in spec.adapters)]
        jobs = {
            ref.name: job
            for ref in refs
            if ref is not None and (job := self.cache.one(FINETUNEJOBS_BY_NAME, (namespace, ref.name)))
        }
        resolved = resolve_source(spec, jobs, previous.resolved_model)
        if isinstance(resolved, Waiting):
            return resolved, previous.promotion if spec.promotion else None
        job = jobs.get(resolved.fine_tune_job or "")
        candidate = promotion.Candidate(resolved, _scores_of(job, resolved))
        return promotion.gate(spec.promotion, candidate, previous.resolved_model, previous.promotion)

    # --- children ---------------------------------------------------------------------------

    async def _apply(self, obj: Obj, owner: Owner, wanted: build.ServingChildren) -> Obj | None:
        """Apply what is missing, changed or outdated, and remove dropped optional children; the
        Deployment as the API server returned it, when it was applied now."""
        records = self._applied.setdefault(owner.uid, {})
        cached = {
            (c["kind"], c["metadata"]["name"]): c
            for _, _, plural in CHILD_RESOURCES
            for c in self.cache.all(f"serving_{plural}", owner.uid)
        }
        deployment = self.cache.one(DEPLOYMENTS, owner.uid)
        if deployment is not None:
            cached[("Deployment", deployment["metadata"]["name"])] = deployment
        applied_deployment: Obj | None = None
        for manifest in wanted.manifests():
            key = (manifest["kind"], manifest["metadata"]["name"])
            digest = _digest(manifest)
            record = records.get(key)
            if record is not None and not record.outdated_by(cached.get(key), digest, key[0] in WATCHED):
                continue
            result = await asyncio.to_thread(self._apply_one, obj, manifest)
            if result is None:
                records[key] = Applied(digest)
                continue
            meta = result["metadata"]
            records[key] = Applied(digest, meta.get("resourceVersion"), meta.get("generation"))
            if key[0] == "Deployment":
                applied_deployment = result
        name = build.server_name(owner)
        optional = {"HorizontalPodAutoscaler": wanted.autoscaler, "ServiceMonitor": wanted.service_monitor,
                    "NetworkPolicy": wanted.network_policy, "ScaledObject": wanted.scaled_object}  # fmt: skip
        for kind, asked in optional.items():
            key = (kind, name)
            if asked is not None:
                continue
            present = key in cached if kind in WATCHED else records.get(key, Applied("")).digest != ABSENT
            if present:
                await asyncio.to_thread(
                    children.remove, OPTIONAL[kind], kind, name, owner.namespace, owner.uid
                )
            records[key] = Applied(ABSENT)
        return applied_deployment

    def _apply_one(self, obj: Obj, manifest: Manifest) -> Obj | None:
        """Apply one child; None for a child whose kind is not installed (said in an Event)."""
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        try:
            outcome, after = children.apply(manifest)
        except ApiException as error:
            if kind not in NOT_INSTALLED or error.status != 404:
                raise
            events.post(obj, events.Event("Warning", *NOT_INSTALLED[kind]))
            return None
        if outcome != "unchanged":
            LOG.info("%s %s %s/%s", outcome, kind, manifest["metadata"]["namespace"], name)
            if kind == "Deployment":
                reason = "DeploymentCreated" if outcome == "created" else "DeploymentUpdated"
                events.post(obj, events.Event("Normal", reason, f"{outcome} Deployment {name}"))
        return after

    # --- the probe --------------------------------------------------------------------------

    def _latest_probe(
        self, uid: str, ready: list[Obj], owner: Owner, spec: ModelDeploymentSpec, resolved: ResolvedModel
    ) -> ProbeResult | None:
        """The latest check of a ready pod of the current spec (None until there is one). The pod's
        own address, not the Service's: that needs no kube-proxy and checks the server the pods run,
        whichever route the Service takes to them."""
        if not ready:
            self.probes.forget(uid)
            return None
        return self.probes.latest(uid, self._probe_target(ready[0], owner, spec, resolved))

    @staticmethod
    def _probe_target(
        pod: Obj, owner: Owner, spec: ModelDeploymentSpec, resolved: ResolvedModel
    ) -> ProbeTarget:
        backend = serving_backend(spec)
        return ProbeTarget(
            pod=pod["metadata"]["name"],
            address=f"{pod['status']['podIP']}:{build.probe_port(spec)}",
            model=build.served_models(owner, spec, resolved)[0],
            api="triton" if backend == "python" else "openai",
            decoupled=decoupled(spec),
        )

    async def _probe(self, target: ProbeTarget) -> ProbeResult:
        timeout, at = self.settings.probe_timeout, now()
        if target.api == "openai":
            return await probe_openai(target.address, target.model, timeout=timeout, now=at)
        return await probe_server(
            target.address, target.model, decoupled=target.decoupled, timeout=timeout, now=at
        )

    def _forget(self, uid: str) -> None:
        self.verdicts.forget(uid)
        self.writer.forget(uid)
        self.probes.forget(uid)
        self._applied.pop(uid, None)


def _scores_of(job: Obj | None, resolved: ResolvedModel) -> EvalResults | None:
    """The evaluation of the run `resolved` comes from, while its FineTuneJob is that run (None when
    it is gone or re-created under the same name); a run that evaluated nothing has no scores."""
    if job is None or job["metadata"].get("uid") != resolved.fine_tune_job_uid:
        return None
    return FineTuneJobStatus.model_validate(job.get("status") or {}).eval_results or EvalResults()


def _digest(manifest: Manifest) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _same_probe(a: ProbeResult, b: ProbeResult) -> bool:
    """The same outcome (times and latencies differ on every probe)."""
    outcome = {"server_ready", "model_ready", "inference_ok", "message"}
    return a.model_dump(include=outcome) == b.model_dump(include=outcome)


def _owner(obj: Obj) -> Owner:
    meta = obj["metadata"]
    return Owner(kind=KIND, name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


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
    if new.promotion is not None and _verdict(new) != _verdict(previous):
        gate = conditions[promotion.PROMOTED]
        found.append(events.Event("Normal" if new.promotion.passed else "Warning", gate.reason, gate.message))
    reasons = [next((c.reason for c in s.conditions if c.type == "Ready"), None) for s in (previous, new)]
    if reasons[1] == FINETUNEJOB_FAILED != reasons[0]:  # Pending either way: say it went wrong
        found.append(events.Event("Warning", FINETUNEJOB_FAILED, conditions["Ready"].message))
    return found


def _verdict(status: ModelDeploymentStatus) -> tuple[str | None, bool] | None:
    """Which run the gate judged, and whether it passed: an Event each time this changes."""
    return (status.promotion.fine_tune_job_uid, status.promotion.passed) if status.promotion else None
