"""The kopf glue: indexes that make the operator's cache, watch-event handlers that queue keys, the
liveness probe, and the start of the controllers behind the leader Lease.

Everything is registered on a registry made per operator (`build`), with the state it needs held by
an `Operator`, not by module globals. kopf runs each watch event's index functions first and its
event handlers after, so a key is queued only once the cache holds the change that queued it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from dataclasses import asdict
from typing import Any

import kopf
from kubernetes import client, config

from deeptune import observability
from deeptune.api.base import GROUP, VERSION
from deeptune.api.federatedfinetune import PLURAL as FEDERATION_PLURAL
from deeptune.api.finetunejob import KIND as FTJ_KIND
from deeptune.api.finetunejob import PLURAL as FTJ_PLURAL
from deeptune.api.finetunesweep import PLURAL as SWEEP_PLURAL
from deeptune.api.modeldeployment import PLURAL as MDEP_PLURAL
from deeptune.builders.common import uid_label
from deeptune.cache import Cache
from deeptune.config import Settings
from deeptune.controller import Controller
from deeptune.leadership import Leadership, LeaseSettings
from deeptune.reconcilers import federatedfinetune as federation
from deeptune.reconcilers import finetunejob as ftj
from deeptune.reconcilers import finetunesweep as sweep
from deeptune.reconcilers import modeldeployment as mdep

FTJ_NAME_LABEL = "deeptune.dev/finetunejob"
FTJ_UID = uid_label("FineTuneJob")
MDEP_UID = uid_label("ModelDeployment")
SWEEP_UID = uid_label(sweep.KIND)
FEDERATION_UID = uid_label(federation.KIND)
Obj = dict[str, Any]
LOG = logging.getLogger(__name__)
MDEPS_BY_FINETUNEJOB = "modeldeployments_by_finetunejob"
"""ModelDeployments by the FineTuneJob they serve: a FineTuneJob's change queues them."""


def record(body: kopf.Body, *fields: str) -> Obj:
    """What the cache keeps of an object: its kind, metadata, and the named top-level fields."""
    kept = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": dict(body.meta)}
    kept.update({key: dict(body.get(key) or {}) for key in fields})
    return kept


def record_pod(body: kopf.Body) -> Obj:
    """A trainer pod as the cache keeps it: its status, and of its spec the node and each
    container's resources, which a run's usage is counted by (GPU-seconds)."""
    spec = body.get("spec") or {}
    containers = [
        {"name": c.get("name"), "resources": dict(c.get("resources") or {})}
        for c in spec.get("containers") or []
    ]
    return record(body, "status") | {"spec": {"nodeName": spec.get("nodeName"), "containers": containers}}


def _owners(body: kopf.Body, kind: str) -> list[str]:
    return [ref["uid"] for ref in body.meta.get("ownerReferences") or [] if ref.get("kind") == kind]


class Operator:
    """One operator process: its cache, a controller per kind, and the Lease that lets it lead."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = Cache()
        # A reconciler's news goes to its controller's queue; a controller runs its reconciler.
        self.finetunejobs = ftj.FineTuneJobReconciler(
            settings,
            self.cache,
            lambda uid: self.ftj_controller.enqueue(uid),  # noqa: PLW0108 (made below)
        )
        self.modeldeployments = mdep.ModelDeploymentReconciler(
            settings,
            self.cache,
            lambda uid: self.mdep_controller.enqueue(uid),  # noqa: PLW0108 (made below)
        )
        self.sweeps = sweep.FineTuneSweepReconciler(
            settings,
            self.cache,
            lambda uid: self.sweep_controller.enqueue(uid),  # noqa: PLW0108 (made below)
        )
        self.ftj_controller = Controller(
            FTJ_KIND, self.finetunejobs.reconcile, self.finetunejobs.keys, settings.status_interval,
            workers=settings.workers,
        )  # fmt: skip
        self.mdep_controller = Controller(
            mdep.KIND, self.modeldeployments.reconcile, self.modeldeployments.keys, settings.status_interval,
            workers=settings.workers,
        )  # fmt: skip
        self.sweep_controller = Controller(
            sweep.KIND, self.sweeps.reconcile, self.sweeps.keys, settings.status_interval,
            workers=settings.workers,
        )  # fmt: skip
        self.federations = federation.FederatedFineTuneReconciler(
            settings,
            self.cache,
            lambda uid: self.federation_controller.enqueue(uid),  # noqa: PLW0108 (made below)
        )
        self.federation_controller = Controller(
            federation.KIND, self.federations.reconcile, self.federations.keys, settings.status_interval,
            workers=settings.workers,
        )  # fmt: skip
        self.controllers = (
            self.ftj_controller, self.mdep_controller, self.sweep_controller, self.federation_controller,
        )  # fmt: skip
        self.leadership = Leadership(
            LeaseSettings(settings.lease_name, settings.lease_namespace, settings.identity)
        )
        self.task: asyncio.Task[None] | None = None

    def fill(self, indexes: dict[str, Any]) -> None:
        """The first handler's indexes: every index is filled from its first LIST by now. Until a
        handler runs there is nothing to reconcile: keys come from handlers (which fill the cache
        first) and from the resync of the cache's keys (none while it is empty)."""
        self.cache.fill(indexes)

    async def lead(self) -> None:
        """Run every controller (each supervises its own tasks) while this replica leads."""
        await asyncio.gather(*(controller.run() for controller in self.controllers))

    async def run(self) -> None:
        await self.leadership.run(self.lead)

    def health(self) -> dict[str, Any]:
        """For the liveness probe; raises when a leading controller is stuck or the task ended."""
        report: dict[str, Any] = {"identity": self.settings.identity, "leading": self.leadership.leading}
        if self.task is None or self.task.done():
            raise kopf.PermanentError("the operator's controller task is not running")
        if report["leading"]:
            healths = [controller.health() for controller in self.controllers]
            report["controllers"] = [asdict(h) for h in healths]
            stuck = [h.kind for h in healths if not h.healthy]
            if stuck:
                raise kopf.PermanentError(
                    f"no reconcile finished recently while keys wait: {', '.join(stuck)}"
                )
        return report


def load_credentials() -> None:
    """In-cluster credentials when running in a pod, else the user's kubeconfig; one API client for
    the process, so every request reuses its connection pool (without a default, each
    `client.XxxApi()` builds a client and opens a new TLS connection per request)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    client.ApiClient.set_default(client.ApiClient())


def build(settings: Settings) -> tuple[kopf.OperatorRegistry, Operator]:
    """A registry with every handler, bound to a new `Operator`."""
    registry = kopf.OperatorRegistry()
    op = Operator(settings)
    _register_lifecycle(registry, op)
    _register_finetunejobs(registry, op)
    _register_modeldeployments(registry, op)
    _register_sweeps(registry, op)
    _register_federations(registry, op)
    return registry, op


def _register_lifecycle(registry: kopf.OperatorRegistry, op: Operator) -> None:
    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """kopf's own requests authenticate as the Kubernetes client does (in-cluster or kubeconfig):
        the registry of kopf's default handlers, which would do so, is not this one."""
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def configure(*, settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
        """kopf's own log lines as Events only for warnings (ours are posted explicitly)."""
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 270
        settings.watching.client_timeout = 300
        settings.watching.connect_timeout = 30
        settings.networking.request_timeout = 60
        settings.queueing.error_delays = (1, 2, 5, 10, 30, 60)
        load_credentials()
        for controller in op.controllers:
            controller.bind(asyncio.get_running_loop())
        observability.serve(op.settings.metrics_port)
        op.task = asyncio.get_running_loop().create_task(op.run(), name="deeptune operator")
        logger.info(
            "DeepTune operator %s started; metrics on :%d", op.settings.identity, op.settings.metrics_port
        )

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        """Stop reconciling and hand the Lease back, so another replica takes over at once."""
        if op.task is not None:
            op.task.cancel()
            await asyncio.gather(op.task, return_exceptions=True)

    @kopf.on.probe(registry=registry, id="operator")
    def probe(**_: Any) -> dict[str, Any]:
        return op.health()


def _register_finetunejobs(registry: kopf.OperatorRegistry, op: Operator) -> None:
    ftj_resource = (GROUP, VERSION, FTJ_PLURAL)

    @kopf.index(*ftj_resource, registry=registry, id=ftj.OBJECTS)
    def finetunejobs(*, body: kopf.Body, uid: str, **_: Any) -> dict[str, Obj]:
        return {uid: record(body, "spec", "status")}

    @kopf.index(*ftj_resource, registry=registry, id=ftj.FINETUNEJOBS_BY_NAME)
    def finetunejobs_by_name(
        *, body: kopf.Body, namespace: str | None, name: str, **_: Any
    ) -> dict[Hashable, Obj]:
        """For `model.fineTuneJobRef`, which names a FineTuneJob."""
        return {(namespace, name): record(body, "spec", "status")}

    @kopf.index("batch", "v1", "jobs", labels={FTJ_NAME_LABEL: kopf.PRESENT}, registry=registry, id=ftj.JOBS)
    def trainer_jobs(*, body: kopf.Body, **_: Any) -> dict[str, Obj]:
        return {uid: record(body, "spec", "status") for uid in _owners(body, FTJ_KIND)}

    @kopf.index(
        "batch", "v1", "jobs", labels={FTJ_NAME_LABEL: kopf.PRESENT}, registry=registry, id=ftj.JOB_OWNERS
    )
    def trainer_job_owners(*, body: kopf.Body, uid: str, **_: Any) -> dict[str, Obj]:
        owners = _owners(body, FTJ_KIND)
        return {uid: {"uid": owners[0]}} if owners else {}

    # Kueue's Workloads: watched only where Kueue's CRD is installed (kopf follows CRDs as they come).
    @kopf.index("kueue.x-k8s.io", "v1beta1", "workloads", registry=registry, id=ftj.WORKLOADS)
    def kueue_workloads(*, body: kopf.Body, **_: Any) -> dict[str, Obj]:
        return {job: record(body, "status") for job in _owners(body, "Job")}

    @kopf.on.event("kueue.x-k8s.io", "v1beta1", "workloads", registry=registry)
    def kueue_workload_changed(*, body: kopf.Body, **indexes: Any) -> None:
        op.fill(indexes)
        for job in _owners(body, "Job"):
            for owner in op.cache.all(ftj.JOB_OWNERS, job):
                op.ftj_controller.enqueue(owner["uid"])

    @kopf.index("", "v1", "pods", labels={FTJ_UID: kopf.PRESENT}, registry=registry, id=ftj.PODS)
    def trainer_pods(*, body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, Obj]:
        return {labels[FTJ_UID]: record_pod(body)}

    @kopf.index("", "v1", "configmaps", labels={FTJ_UID: kopf.PRESENT}, registry=registry, id=ftj.CONFIG_MAPS)
    def trainer_config_maps(*, body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, Obj]:
        return {labels[FTJ_UID]: record(body)}

    @kopf.index(*ftj_resource, registry=registry, id=ftj.STUDENTS_BY_TEACHER)
    def students_by_teacher(
        *, spec: kopf.Spec, namespace: str | None, uid: str, **_: Any
    ) -> dict[Hashable, Obj]:
        """FineTuneJobs by the FineTuneJob they distil from: a teacher's change queues its students."""
        teacher = ((spec.get("distillation") or {}).get("teacher") or {}).get("fineTuneJobRef") or {}
        return {(namespace, teacher["name"]): {"uid": uid}} if teacher.get("name") else {}

    @kopf.on.event(*ftj_resource, registry=registry)
    def finetunejob_changed(
        *, uid: str, namespace: str | None, name: str, labels: kopf.Labels, **indexes: Any
    ) -> None:
        op.fill(indexes)
        op.ftj_controller.enqueue(uid)
        op.sweep_controller.enqueue(labels.get(SWEEP_UID))  # a trial's news is its sweep's
        op.federation_controller.enqueue(labels.get(FEDERATION_UID))  # and a site's its federation's
        for student in op.cache.all(ftj.STUDENTS_BY_TEACHER, (namespace, name)):
            op.ftj_controller.enqueue(student["uid"])
        for user in op.cache.all(MDEPS_BY_FINETUNEJOB, (namespace, name)):
            op.mdep_controller.enqueue(user["uid"])

    @kopf.on.event("batch", "v1", "jobs", labels={FTJ_NAME_LABEL: kopf.PRESENT}, registry=registry)
    def trainer_job_changed(*, body: kopf.Body, **indexes: Any) -> None:
        op.fill(indexes)
        for uid in _owners(body, FTJ_KIND):
            op.ftj_controller.enqueue(uid)

    @kopf.index("", "v1", "services", labels={FTJ_UID: kopf.PRESENT}, registry=registry, id=ftj.SERVICES)
    def trainer_services(*, body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, Obj]:
        return {labels[FTJ_UID]: record(body)}

    @kopf.on.event("", "v1", "pods", labels={FTJ_UID: kopf.PRESENT}, registry=registry)
    @kopf.on.event("", "v1", "configmaps", labels={FTJ_UID: kopf.PRESENT}, registry=registry)
    @kopf.on.event("", "v1", "services", labels={FTJ_UID: kopf.PRESENT}, registry=registry)
    def trainer_child_changed(*, labels: kopf.Labels, **indexes: Any) -> None:
        op.fill(indexes)
        op.ftj_controller.enqueue(labels[FTJ_UID])


def _register_modeldeployments(registry: kopf.OperatorRegistry, op: Operator) -> None:
    mdep_resource = (GROUP, VERSION, MDEP_PLURAL)

    @kopf.index(*mdep_resource, registry=registry, id=mdep.OBJECTS)
    def modeldeployments(*, body: kopf.Body, uid: str, **_: Any) -> dict[str, Obj]:
        return {uid: record(body, "spec", "status")}

    @kopf.index(*mdep_resource, registry=registry, id=MDEPS_BY_FINETUNEJOB)
    def modeldeployments_by_finetunejob(
        *, spec: kopf.Spec, namespace: str | None, uid: str, **_: Any
    ) -> dict[Hashable, Obj]:
        """ModelDeployments by the FineTuneJob they serve: a FineTuneJob's change queues them."""
        ref = (spec.get("model") or {}).get("fineTuneJobRef") or {}
        return {(namespace, ref["name"]): {"uid": uid}} if ref.get("name") else {}

    @kopf.index(
        "apps",
        "v1",
        "deployments",
        labels={MDEP_UID: kopf.PRESENT},
        registry=registry,
        id=mdep.DEPLOYMENTS,
    )
    def serving_deployments(*, body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, Obj]:
        return {labels[MDEP_UID]: record(body, "spec", "status")}

    @kopf.index("", "v1", "pods", labels={MDEP_UID: kopf.PRESENT}, registry=registry, id=mdep.PODS)
    def serving_pods(*, body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, Obj]:
        """The ReplicaSet owns them; the label says whose they are."""
        return {labels[MDEP_UID]: record(body, "status")}

    def serving_child_index(group: str, version: str, plural: str) -> None:
        def index(*, body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, Obj]:
            return {labels[MDEP_UID]: record(body)}

        kopf.index(group, version, plural, labels={MDEP_UID: kopf.PRESENT}, registry=registry,
                   id=f"serving_{plural}")(index)  # fmt: skip

    for group, version, plural in mdep.CHILD_RESOURCES:
        serving_child_index(group, version, plural)

    @kopf.on.event(*mdep_resource, registry=registry)
    def modeldeployment_changed(*, uid: str, **indexes: Any) -> None:
        op.fill(indexes)
        op.mdep_controller.enqueue(uid)

    for group, version, plural in [("apps", "v1", "deployments"), ("", "v1", "pods"), *mdep.CHILD_RESOURCES]:

        @kopf.on.event(group, version, plural, labels={MDEP_UID: kopf.PRESENT}, registry=registry,
                       id=f"serving_{plural}_changed")  # fmt: skip
        def serving_child_changed(*, labels: kopf.Labels, **indexes: Any) -> None:
            op.fill(indexes)
            op.mdep_controller.enqueue(labels[MDEP_UID])


def _register_sweeps(registry: kopf.OperatorRegistry, op: Operator) -> None:
    sweep_resource = (GROUP, VERSION, SWEEP_PLURAL)

    @kopf.index(*sweep_resource, registry=registry, id=sweep.OBJECTS)
    def finetunesweeps(*, body: kopf.Body, uid: str, **_: Any) -> dict[str, Obj]:
        return {uid: record(body, "spec", "status")}

    @kopf.index(
        GROUP, VERSION, FTJ_PLURAL, labels={SWEEP_UID: kopf.PRESENT}, registry=registry, id=sweep.TRIALS
    )
    def sweep_trials(*, body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, Obj]:
        return {labels[SWEEP_UID]: record(body, "spec", "status")}

    @kopf.on.event(*sweep_resource, registry=registry)
    def finetunesweep_changed(*, uid: str, **indexes: Any) -> None:
        op.fill(indexes)
        op.sweep_controller.enqueue(uid)


def _register_federations(registry: kopf.OperatorRegistry, op: Operator) -> None:
    federation_resource = (GROUP, VERSION, FEDERATION_PLURAL)

    @kopf.index(*federation_resource, registry=registry, id=federation.OBJECTS)
    def federatedfinetunes(*, body: kopf.Body, uid: str, **_: Any) -> dict[str, Obj]:
        return {uid: record(body, "spec", "status")}

    @kopf.index(
        "batch", "v1", "jobs", labels={FEDERATION_UID: kopf.PRESENT}, registry=registry, id=federation.JOBS
    )
    def federation_jobs(*, body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, Obj]:
        return {labels[FEDERATION_UID]: record(body, "status")}

    @kopf.index(
        GROUP,
        VERSION,
        FTJ_PLURAL,
        labels={FEDERATION_UID: kopf.PRESENT},
        registry=registry,
        id=federation.SITES,
    )
    def federation_sites(*, body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, Obj]:
        """The sites' FineTuneJobs, in any namespace (a site's news is its federation's)."""
        return {labels[FEDERATION_UID]: record(body, "status")}

    @kopf.on.event(*federation_resource, registry=registry)
    def federatedfinetune_changed(*, uid: str, **indexes: Any) -> None:
        op.fill(indexes)
        op.federation_controller.enqueue(uid)

    @kopf.on.event("batch", "v1", "jobs", labels={FEDERATION_UID: kopf.PRESENT}, registry=registry)
    def coordinator_job_changed(*, labels: kopf.Labels, **indexes: Any) -> None:
        op.fill(indexes)
        op.federation_controller.enqueue(labels[FEDERATION_UID])
