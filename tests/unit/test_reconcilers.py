"""The reconcilers' decisions, with the cache as plain mappings and the API's writes recorded instead
of sent. Each fault of issue 12 that lives in a decision has a test here; the same faults on a real
API server are in tests/cluster/test_reconcile_faults.py."""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from typing import Any

import pytest

from deeptune.api.modeldeployment import ModelDeploymentStatus
from deeptune.builders.common import uid_label
from deeptune.builders.finetunejob import RESULT_FINALIZER
from deeptune.cache import Cache
from deeptune.config import Settings
from deeptune.reconcilers.finetunejob import CONFLICT_RETRY, JOB_UID_LABEL, FineTuneJobReconciler
from deeptune.reconcilers.modeldeployment import CHILD_RESOURCES, ModelDeploymentReconciler
from deeptune.status.modeldeployment import is_waiting
from tests.unit.conftest import Api
from tests.unit.test_finetunejob_model import MINIMAL
from tests.unit.test_finetunejob_status import condition
from tests.unit.test_modeldeployment_status import NOW, conditions_of, deployment, derive
from tests.unit.test_modeldeployment_status import job as finetunejob_of

Obj = dict[str, Any]
UID = "ftj-uid"


def cache(**indexes: dict[Any, list[Obj]]) -> Cache:
    filled = Cache()
    names = [
        *("finetunejobs", "finetunejobs_by_name", "trainer_jobs", "trainer_pods", "trainer_config_maps"),
        *("trainer_services", "trainer_job_owners", "kueue_workloads"),
        *("modeldeployments", "serving_deployments", "serving_pods"),
        *(f"serving_{plural}" for _, _, plural in CHILD_RESOURCES),
    ]
    filled.fill({name: indexes.get(name, {}) for name in names})
    return filled


def ftj(status: Obj | None = None, spec: Obj | None = None, generation: int = 1) -> Obj:
    return {
        "apiVersion": "deeptune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": "bot",
            "namespace": "ns",
            "uid": UID,
            "generation": generation,
            "resourceVersion": "5",
        },
        "spec": copy.deepcopy(spec or MINIMAL),
        "status": status or {},
    }


def trainer_job(conditions: list[Obj] | None = None, deleting: bool = False, **spec: Any) -> Obj:
    owner = {"kind": "FineTuneJob", "uid": UID, "name": "bot"}
    meta: Obj = {
        "name": "bot-train", "namespace": "ns", "uid": "job-uid", "resourceVersion": "9",
        "finalizers": [RESULT_FINALIZER], "ownerReferences": [owner],
    }  # fmt: skip
    if deleting:
        meta["deletionTimestamp"] = NOW
    controls = {"backoffLimit": 3, "suspend": False, **spec}
    return {"kind": "Job", "metadata": meta, "spec": controls, "status": {"conditions": conditions or []}}


def trainer_pod(phase: str, deleting: bool = False) -> Obj:
    meta: Obj = {
        "name": "bot-train-x", "namespace": "ns", "uid": "pod-uid", "resourceVersion": "11",
        "finalizers": [RESULT_FINALIZER], "ownerReferences": [{"kind": "Job", "uid": "job-uid"}],
        "labels": {uid_label("FineTuneJob"): UID},
    }  # fmt: skip
    if deleting:
        meta["deletionTimestamp"] = NOW
    return {"kind": "Pod", "metadata": meta, "status": {"phase": phase, "containerStatuses": []}}


def reconcile_ftj(
    obj: Obj | None, jobs: list[Obj] = (), pods: list[Obj] = (), config_maps: bool = True
) -> Any:  # type: ignore[assignment]
    view = cache(
        finetunejobs={UID: [obj]} if obj else {},
        trainer_jobs={UID: list(jobs)},
        trainer_pods={UID: list(pods)},
        trainer_config_maps={UID: [{"kind": "ConfigMap", "metadata": {"name": "bot-config"}}]}
        if config_maps
        else {},
    )

    async def scenario() -> Any:
        reconciler = FineTuneJobReconciler(Settings(), view, lambda key: None)
        return await reconciler.reconcile(UID)

    return asyncio.run(scenario())


# --- FineTuneJob ------------------------------------------------------------------------------


def test_an_unfinished_run_without_a_job_gets_one(api: Api) -> None:
    """Fault 3: a Job deleted while Pending was never recreated (status stayed JobNotCreated)."""
    reconcile_ftj(ftj({"phase": "Pending"}))
    assert [c[1:] for c in api.named("create")] == [
        ("Job", "bot-train", True), ("ConfigMap", "bot-config", False), ("Job", "bot-train", False),
    ]  # fmt: skip
    assert [e.reason for e in api.events] == ["JobCreated"]


def test_a_finished_run_is_never_trained_again(api: Api) -> None:
    """Fault 1: a Job removed before the result was recorded, or after, was made again."""
    for phase in ("Succeeded", "Failed"):
        reconcile_ftj(ftj({"phase": phase, "conditions": []}))
    assert api.named("create") == [] and api.named("status") == []


def test_the_job_and_its_pods_are_released_once_the_outcome_is_in_status(api: Api) -> None:
    """Fault 1: the result finalizer keeps a finished Job and its pods until status holds the
    outcome; then they are let go (a TTL may remove them)."""
    done = trainer_job([condition("Complete", "CompletionsReached")])
    reconcile_ftj(ftj({"phase": "Running"}), [done], [trainer_pod("Succeeded")])
    statuses = api.named("status")
    assert statuses and statuses[0][1]["phase"] == "Succeeded"
    assert api.named("release") == [], "not in the reconcile that wrote the outcome: the next one"
    reconcile_ftj(ftj({"phase": "Running", **statuses[0][1]}), [done], [trainer_pod("Succeeded")])
    assert sorted(api.named("release")) == [
        ("release", "Job", "bot-train"),
        ("release", "Pod", "bot-train-x"),
    ]


def test_a_pod_not_yet_seen_finished_keeps_the_job(api: Api) -> None:
    """The Job's Failed condition can reach the cache before its pod's final state (and the trainer's
    summary in it): nothing is let go until that state is in status too."""
    failed = trainer_job([condition("Failed", "PodFailurePolicy", "exit code 3")])
    failed["status"]["failed"] = 1
    failed["metadata"]["deletionTimestamp"] = NOW  # ttlSecondsAfterFinished: 0
    api.pods_on_server = [trainer_pod("Failed")]
    for pods in ([trainer_pod("Running")], []):  # the pod's last update, or the pod itself, not seen yet
        reconcile_ftj(ftj({"phase": "Running"}), [failed], pods)
        written = api.named("status")[-1][1]
        reconcile_ftj(ftj({"phase": "Running", **written}), [failed], pods)
        assert api.named("release") == []
    for _ in range(2):  # the pod's state written, then found settled
        reconcile_ftj(ftj({"phase": "Running", **written}), [failed], [trainer_pod("Failed")])
        written = {**written, **api.named("status")[-1][1]}
    assert len(api.named("release")) == 2


def test_a_pod_let_go_before_its_job_was_seen_finished_does_not_keep_the_job(api: Api) -> None:
    """A TTL of 0 deletes a finished Job at once, and its pods with it; the pods' deletion can reach
    the cache before the Job's condition. The pod (its state recorded) is let go then; the Job still
    counts it, and once the API server confirms it is gone the Job is let go too, not held forever."""
    reconcile_ftj(ftj({"phase": "Running"}), [trainer_job()], [trainer_pod("Failed", deleting=True)])
    assert api.named("release") == [("release", "Pod", "bot-train-x")]
    written = api.named("status")[-1][1]
    failed = trainer_job([condition("Failed", "BackoffLimitExceeded", "backoff")], deleting=True)
    failed["status"]["failed"] = 1
    for _ in range(2):  # the Job's outcome written, then found settled
        reconcile_ftj(ftj({"phase": "Running", **written}), [failed], [])
        written = {**written, **api.named("status")[-1][1]}
    assert written["phase"] == "Failed"
    assert api.named("release")[-1] == ("release", "Job", "bot-train")
    assert [call[1:] for call in api.named("list")][-1] == ("v1", "Pod", "ns", f"{JOB_UID_LABEL}=job-uid")


def test_nothing_is_released_while_the_run_goes_on_except_what_is_being_deleted(api: Api) -> None:
    reconcile_ftj(ftj({"phase": "Running"}), [trainer_job()], [trainer_pod("Running")])
    assert api.named("release") == []
    reconcile_ftj(ftj({"phase": "Running"}), [trainer_job()], [trainer_pod("Failed", deleting=True)])
    assert api.named("release") == [("release", "Pod", "bot-train-x")]


def test_a_deleted_finetunejob_lets_its_children_go(api: Api) -> None:
    reconcile_ftj(None, [trainer_job(deleting=True)], [trainer_pod("Running", deleting=True)])
    assert sorted(api.named("release")) == [
        ("release", "Job", "bot-train"),
        ("release", "Pod", "bot-train-x"),
    ]


def test_changed_job_controls_reach_the_running_job_and_only_those(api: Api) -> None:
    """Fault 4: backoffLimit (among others) was accepted in the spec and never reached the Job."""
    spec = {**MINIMAL, "backoffLimit": 7, "suspend": True}
    reconcile_ftj(ftj({"phase": "Running"}, spec=spec), [trainer_job()], [trainer_pod("Running")])
    patches = api.named("patch")
    assert len(patches) == 1 and patches[0][-1] == {"spec": {"backoffLimit": 7, "suspend": True}}
    api.calls.clear()
    same = {**MINIMAL, "backoffLimit": 3}
    reconcile_ftj(ftj({"phase": "Running"}, spec=same), [trainer_job()], [trainer_pod("Running")])
    assert api.named("patch") == []


def test_a_deleted_configmap_of_an_unfinished_run_is_made_again(api: Api) -> None:
    reconcile_ftj(ftj({"phase": "Pending"}), [trainer_job()], [], config_maps=False)
    assert [c[1:3] for c in api.named("create")] == [("ConfigMap", "bot-config")]


def test_a_job_of_our_name_that_is_not_ours_is_reported_and_looked_at_again(api: Api) -> None:
    """Fault 5: kopf's PermanentError was swallowed by the loop, and status said forever that the
    Job was being created."""
    api.existing["bot-train"] = {"metadata": {"name": "bot-train", "uid": "someone-elses"}}
    again = reconcile_ftj(ftj({"phase": "Pending"}))
    assert again == CONFLICT_RETRY
    status = api.named("status")[0][1]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "JobConflict" and "not ours" in ready["message"]
    assert ("Warning", "JobConflict") in [(e.type, e.reason) for e in api.events]


def test_an_unchanged_running_job_is_not_written(api: Api) -> None:
    """Fault 8: nothing changed, nothing written (the first pass records Running; the next one, from
    that status, writes nothing)."""
    running = [trainer_job()], [trainer_pod("Running")]
    reconcile_ftj(ftj({"phase": "Running"}), *running)
    written = api.named("status")[-1][1]
    api.calls.clear()
    reconcile_ftj(ftj({"phase": "Running", **written}), *running)
    assert api.named("status") == []


def test_a_hanging_metrics_endpoint_does_not_hold_the_reconcile(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault 7: the scrape ran inside the visit, so one unreachable trainer delayed every object."""

    async def hang(self: FineTuneJobReconciler, pod_ip: str) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(FineTuneJobReconciler, "_scrape", hang)
    pod = trainer_pod("Running")
    pod["status"]["podIP"] = "10.0.0.7"

    async def scenario() -> None:
        view = cache(finetunejobs={UID: [ftj({"phase": "Running"})]}, trainer_jobs={UID: [trainer_job()]},
                     trainer_pods={UID: [pod]}, trainer_config_maps={UID: [{"metadata": {}}]})  # fmt: skip
        reconciler = FineTuneJobReconciler(Settings(), view, lambda key: None)
        await asyncio.wait_for(reconciler.reconcile(UID), timeout=2)
        reconciler.progress.forget(UID)

    asyncio.run(scenario())


# --- ModelDeployment --------------------------------------------------------------------------

REF = {"model": {"fineTuneJobRef": {"name": "bot"}}, "resources": {"gpu": 0}}
INVALID = {**REF, "quantization": "int8"}  # quantization needs a GPU
MDEP_UID = "mdep-uid"


def mdep(spec: Obj, previous: ModelDeploymentStatus) -> Obj:
    return {
        "apiVersion": "deeptune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": "bot",
            "namespace": "ns",
            "uid": MDEP_UID,
            "generation": 2,
            "resourceVersion": "3",
        },
        "spec": spec,
        "status": previous.to_wire(),
    }


@dataclass
class Serving:
    """A ModelDeployment reconciler and the cache it reads, to reconcile it several times."""

    spec: Obj
    previous: ModelDeploymentStatus = field(default_factory=ModelDeploymentStatus)
    jobs: list[Obj] = field(default_factory=list)
    deployments: list[Obj] = field(default_factory=list)
    children: dict[str, list[Obj]] = field(default_factory=dict)
    reconciler: ModelDeploymentReconciler | None = None

    def reconcile(self) -> None:
        view = cache(
            modeldeployments={MDEP_UID: [mdep(self.spec, self.previous)]},
            finetunejobs_by_name={("ns", "bot"): self.jobs},
            serving_deployments={MDEP_UID: self.deployments},
            **{index: {MDEP_UID: objs} for index, objs in self.children.items()},
        )

        async def scenario() -> None:
            if self.reconciler is None:
                self.reconciler = ModelDeploymentReconciler(Settings(), view, lambda key: None)
            self.reconciler.cache = view
            await self.reconciler.reconcile(MDEP_UID)

        asyncio.run(scenario())


def written(api: Api) -> Obj:
    return dict(api.named("status")[-1][1])


def test_a_rejected_spec_clears_the_deployment_only_when_there_is_none(api: Api) -> None:
    Serving(INVALID, derive(None, [])).reconcile()
    changes = written(api)
    assert changes["modelState"] == "FailedToLoad"
    assert changes["deploymentName"] is None and changes["endpoints"] is None
    Serving(INVALID, derive(None, []), deployments=[deployment()]).reconcile()
    kept = written(api)
    assert kept["modelState"] == "FailedToLoad"
    assert "deploymentName" not in kept and "endpoints" not in kept


def test_a_failed_finetunejob_is_reported_and_its_successful_rerun_served(api: Api) -> None:
    failed = finetunejob_of("Failed")
    malformed = "3 of 3 rows are malformed"
    failed["status"]["conditions"] = [
        {"type": "Failed", "status": "True", "reason": "InvalidDataset", "message": malformed},
    ]
    failed["status"]["conditions"][0]["lastTransitionTime"] = NOW
    serving = Serving(REF, jobs=[failed])
    serving.reconcile()
    status = ModelDeploymentStatus.model_validate(written(api))
    assert conditions_of(status)["Ready"] == ("False", "FineTuneJobFailed")
    assert [(e.type, e.reason) for e in api.events] == [
        ("Normal", "Pending"),
        ("Warning", "FineTuneJobFailed"),
    ]
    assert api.events[1].message.endswith(f"succeeds: InvalidDataset: {malformed}")
    api.calls.clear()
    serving.previous = status
    serving.reconcile()
    assert api.named("status") == [] and api.named("apply") == []

    serving.jobs = [finetunejob_of("Succeeded", mergedPath="merged")]
    serving.reconcile()
    assert ("apply", "Deployment", "bot-triton") in api.calls, "the children follow once the rerun succeeded"
    changes = written(api)
    assert changes["deploymentName"] == "bot-triton" and changes["resolvedModel"]["fineTuneJob"] == "bot"
    assert not is_waiting(ModelDeploymentStatus.model_validate({**status.to_wire(), **changes}))


def test_serving_children_are_applied_once_and_again_when_deleted_or_edited(api: Api) -> None:
    """Fault 12: only a deleted Deployment was re-applied; a deleted Service, ConfigMap or HPA, or a
    hand-edited Deployment, stayed so until a spec change or a restart."""
    spec = {"model": {"merged": {"pvc": {"claimName": "models", "path": "m"}}}, "resources": {"gpu": 0},
            "autoscaling": {"enabled": True}}  # fmt: skip
    serving = Serving(spec)
    serving.reconcile()
    first = {call[1] for call in api.named("apply")}
    assert first == {"ConfigMap", "Service", "Deployment", "HorizontalPodAutoscaler"}

    def cached(kind: str, generation: int | None = None, version: str = "7") -> Obj:
        meta = {"name": "bot-triton" if kind != "ConfigMap" else "bot-repository", "resourceVersion": version}
        return {"kind": kind, "metadata": {**meta, "generation": generation}, "spec": {}, "status": {}}

    serving.children = {
        "serving_configmaps": [cached("ConfigMap")],
        "serving_services": [cached("Service")],
        "serving_horizontalpodautoscalers": [cached("HorizontalPodAutoscaler")],
    }
    serving.deployments = [cached("Deployment", generation=1)]
    api.calls.clear()
    serving.reconcile()
    assert api.named("apply") == [], "nothing changed: nothing applied"

    serving.children["serving_services"] = []  # someone deleted the Service
    serving.deployments = [cached("Deployment", generation=2, version="8")]  # and edited the Deployment
    serving.reconcile()
    assert {call[1] for call in api.named("apply")} == {"Service", "Deployment"}


def test_a_dropped_autoscaler_is_removed(api: Api) -> None:
    spec = {"model": {"merged": {"pvc": {"claimName": "models", "path": "m"}}}, "resources": {"gpu": 0}}
    hpa = {"kind": "HorizontalPodAutoscaler", "metadata": {"name": "bot-triton", "resourceVersion": "1"}}
    Serving(spec, children={"serving_horizontalpodautoscalers": [hpa]}).reconcile()
    removed = [call[2] for call in api.named("remove")]
    assert "HorizontalPodAutoscaler" in removed and "NetworkPolicy" not in removed


def test_the_operator_leaves_a_queued_jobs_suspend_to_kueue(api: Api) -> None:
    """Kueue flips `suspend` on admission (and back on preemption); patching it back would fight it."""
    spec = {**MINIMAL, "queueName": "gpu-queue"}
    admitted, running = trainer_job(suspend=False), [trainer_pod("Running")]
    reconcile_ftj(ftj({"phase": "Pending"}, spec=spec), [admitted], running)
    reconcile_ftj(ftj({"phase": "Running"}, spec=spec), [trainer_job(suspend=True)], [])
    assert api.named("patch") == []


def test_a_known_model_that_cannot_fit_its_gpus_is_refused_before_any_child(api: Api) -> None:
    spec = {**MINIMAL, "baseModel": {"name": "deepseek-ai/deepseek-llm-67b-base"}}
    spec["resources"] = {"gpu": 1, "gpuMemory": "80Gi"}
    reconcile_ftj(ftj({"phase": "Pending"}, spec=spec))
    assert api.named("create") == []
    (status,) = [call[1] for call in api.named("status")]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "deepseek-llm-67b-base does not fit resources.gpuMemory 80Gi per GPU" in failed["message"]
    assert "would fit with" in failed["message"] and "fsdp" in failed["message"]


def test_a_run_that_fits_gets_its_plan_in_status(api: Api) -> None:
    spec = {**MINIMAL, "resources": {"gpu": 1, "gpuMemory": "24Gi"}}
    reconcile_ftj(ftj({"phase": "Pending"}, spec=spec))
    assert [c[1] for c in api.named("create")][-1] == "Job"
    plan = api.named("status")[-1][1]["plan"]
    assert plan["fits"] is True and plan["worldSize"] == 1 and plan["strategy"] == "ddp"
    assert plan["summary"].startswith("lora on 1 GPU (ddp): ") and "of 24 GiB" in plan["summary"]


def test_a_run_over_several_pods_gets_its_headless_service_before_the_job(api: Api) -> None:
    spec = {**MINIMAL, "distributed": {"nodes": 2}}
    reconcile_ftj(ftj({"phase": "Pending"}, spec=spec))
    assert [c[1:] for c in api.named("create")] == [
        ("Job", "bot-train", True), ("ConfigMap", "bot-config", False), ("Service", "bot-workers", False),
        ("Job", "bot-train", False),
    ]  # fmt: skip
    api.calls.clear()
    reconcile_ftj(
        ftj({"phase": "Running"}, spec=spec), [trainer_job(backoffLimit=6)], [trainer_pod("Running")]
    )
    assert [c[1:3] for c in api.named("create")] == [("Service", "bot-workers")]  # deleted: made again
