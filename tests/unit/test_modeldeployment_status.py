"""ModelDeployment status from Deployment and pod states shaped as the Kubernetes API returns them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from deeptune.api.base import PvcLocation
from deeptune.api.modeldeployment import (
    Endpoints,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    ProbeResult,
    ResolvedModel,
    parse_spec,
)
from deeptune.status.modeldeployment import (
    Waiting,
    derive_status,
    invalid_spec_status,
    is_invalid_spec,
    is_waiting,
    load_error,
    ready_pods,
    record_probe,
    resolve_source,
    status_changes,
    waiting_status,
)

FIXTURES = Path(__file__).parent / "fixtures" / "status"
NOW = "2026-11-25T10:00:00Z"
HASH = "abc123"
RESOLVED = ResolvedModel(merged=PvcLocation(claim_name="out", path="bot/merged"), fine_tune_job="bot")
ENDPOINTS = Endpoints(http="http://bot-triton.ns.svc:8000", model_name="bot")
REF_SPEC = parse_spec({"model": {"fineTuneJobRef": {"name": "bot"}}, "resources": {"gpu": 0}})
TRITON_LOG_TAIL = (
    "| cache_enabled                    | 0                                  |\n"
    "+----------------------------------+------------------------------------+\n"
    "E1125 01:46:51.930159 23523 model_lifecycle.cc:642] \"failed to load 'bot' version 1: Internal:"
    " FileNotFoundError: no model at /mnt/pvc/out/nope: the directory does not exist\\n\\nAt:\\n"
    '  /models/bot/1/deeptune/serving/generation.py(101): _check_directory\\n"\n'
    'I1125 01:46:51.931611 23523 server.cc:336] "All models are stopped, unloading models"\n'
    "error: creating server: Internal - failed to load all models\n"
)


def deployment(
    replicas: int = 1, ready: int = 0, conditions: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"name": "bot-triton"},
        "spec": {
            "replicas": replicas,
            "template": {"metadata": {"annotations": {"deeptune.dev/config-hash": HASH}}},
        },
        "status": {"replicas": replicas, "readyReplicas": ready, "conditions": conditions or []},
    }


def pod(
    name: str = "bot-triton-abc",
    *,
    running: bool = True,
    ready: bool = False,
    waiting: dict[str, Any] | None = None,
    terminated: dict[str, Any] | None = None,
    last: dict[str, Any] | None = None,
    config_hash: str = HASH,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if running and not (waiting or terminated):
        state["running"] = {"startedAt": "2026-11-25T09:59:00Z"}
    if waiting:
        state["waiting"] = waiting
    if terminated:
        state["terminated"] = terminated
    return {
        "metadata": {"name": name, "annotations": {"deeptune.dev/config-hash": config_hash}},
        "status": {
            "phase": "Running",
            "podIP": "10.244.0.9",
            "conditions": conditions or [],
            "containerStatuses": [
                {
                    "name": "triton",
                    "ready": ready,
                    "restartCount": 1 if last else 0,
                    "state": state,
                    "lastState": {"terminated": last} if last else {},
                }
            ],
        },
    }


def probe(ok: bool = True, time: str = NOW, message: str = "") -> ProbeResult:
    return ProbeResult(
        time=time, latency_ms=12.5, server_ready=True, model_ready=True, inference_ok=ok, message=message
    )


def derive(
    deployment_obj: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    probe_result: ProbeResult | None = None,
    previous: ModelDeploymentStatus | None = None,
) -> ModelDeploymentStatus:
    return derive_status(
        previous=previous or ModelDeploymentStatus(),
        generation=3,
        resolved=RESOLVED,
        deployment=deployment_obj,
        pods=pods,
        probe=probe_result,
        endpoints=ENDPOINTS,
        backend="python",
        deployment_name="bot-triton",
        now=NOW,
    )


def fixture(name: str) -> dict[str, Any]:
    """An object recorded from a real run (fixtures/status/README.md)."""
    return dict(json.loads((FIXTURES / name).read_text()))


def conditions_of(status: ModelDeploymentStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


def resolve(spec: ModelDeploymentSpec, found: dict[str, Any] | None, previous: ResolvedModel | None) -> Any:
    """resolve_source with `found` (or nothing) as the FineTuneJob the spec's model refers to."""
    ref = spec.model.fine_tune_job_ref
    return resolve_source(spec, {ref.name: found} if ref and found else {}, previous)


def job(phase: str | None, **output: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase} if phase else {}
    if output:
        status["output"] = {"claimName": "out", "path": "ns/bot", **output}
    return {
        "metadata": {"name": "bot"},
        "spec": {
            "baseModel": {"name": "deepseek-ai/deepseek-llm-7b-base"},
            "dataset": {"source": {"url": "https://example.com/d.jsonl"}},
            "output": {"pvc": {"claimName": "out"}},
        },
        "status": status,
    }


# --- the referenced FineTuneJob ----------------------------------------------------------------


def test_a_missing_finetunejob_is_named() -> None:
    result = resolve(REF_SPEC, None, None)
    assert result == Waiting("FineTuneJobNotFound", "model.fineTuneJobRef: FineTuneJob bot not found")


def test_a_running_finetunejob_is_waited_for() -> None:
    result = resolve(REF_SPEC, job("Running"), None)
    assert isinstance(result, Waiting) and result.reason == "WaitingForFineTuneJob"
    assert "FineTuneJob bot" in result.message and "Running" in result.message
    status = waiting_status(ModelDeploymentStatus(), 1, result, NOW)
    assert status.model_state == "Pending"
    assert conditions_of(status) == {
        "ModelLoaded": ("False", "WaitingForFineTuneJob"),
        "Ready": ("False", "WaitingForFineTuneJob"),
    }


def test_a_succeeded_finetunejob_resolves_to_its_merged_model_else_its_adapter() -> None:
    merged = resolve(REF_SPEC, job("Succeeded", mergedPath="merged", adapterPath="adapter"), None)
    assert merged == ResolvedModel(
        merged=PvcLocation(claim_name="out", path="ns/bot/merged"), fine_tune_job="bot"
    )
    adapter = resolve(REF_SPEC, job("Succeeded", adapterPath="adapter"), None)
    assert isinstance(adapter, ResolvedModel) and adapter.adapter == PvcLocation(
        claim_name="out", path="ns/bot/adapter"
    )
    assert adapter.base_model is not None and adapter.base_model.name == "deepseek-ai/deepseek-llm-7b-base"
    nothing = resolve(REF_SPEC, job("Succeeded"), None)
    assert isinstance(nothing, Waiting) and nothing.reason == "FineTuneJobSavedNoModel"


def test_the_served_files_are_named_by_their_digest_and_their_runs_uid() -> None:
    """Lineage: which run's output is serving, down to its files (FineTuneJob status.lineage)."""
    succeeded = job("Succeeded", mergedPath="merged", adapterPath="adapter")
    succeeded["metadata"]["uid"] = "6f1c-run-1"
    digests = {"merged": "sha256:" + "m" * 64, "adapter": "sha256:" + "a" * 64}
    succeeded["status"]["lineage"] = {"config": "sha256:" + "c" * 64, "artifacts": digests}
    merged = resolve(REF_SPEC, succeeded, None)
    assert isinstance(merged, ResolvedModel)
    assert (merged.fine_tune_job, merged.fine_tune_job_uid, merged.digest) == (
        "bot",
        "6f1c-run-1",
        digests["merged"],
    )
    del succeeded["status"]["output"]["mergedPath"]
    adapter = resolve(REF_SPEC, succeeded, None)
    assert isinstance(adapter, ResolvedModel) and adapter.digest == digests["adapter"]
    assert resolve(REF_SPEC, None, merged) == merged  # the job deleted: what is served keeps its lineage


def test_a_served_model_stays_resolved_when_its_job_goes_away() -> None:
    assert resolve(REF_SPEC, None, RESOLVED) == RESOLVED
    assert resolve(REF_SPEC, job("Running"), RESOLVED) == RESOLVED
    other = RESOLVED.model_copy(update={"fine_tune_job": "another"})
    assert isinstance(resolve(REF_SPEC, None, other), Waiting)


def test_a_finetunejob_without_status_has_not_started() -> None:
    result = resolve(REF_SPEC, job(None), None)
    assert result == Waiting(
        "WaitingForFineTuneJob",
        "model.fineTuneJobRef: waiting for FineTuneJob bot to succeed (it has not started yet)",
    )
    assert isinstance(waiting := resolve(REF_SPEC, job("Pending"), None), Waiting)
    assert waiting.message.endswith("(phase Pending)")


def test_a_failed_finetunejob_is_named_with_its_own_failure() -> None:
    """Not a wait like any other: Argo CD's health check reads the reason as Degraded. The recorded
    job's Failed condition gives the trainer's reason and message (the Job's words after them)."""
    failed = fixture("finetunejob-failed-invaliddataset.json")
    result = resolve(REF_SPEC, failed, None)
    assert isinstance(result, Waiting) and result.reason == "FineTuneJobFailed"
    assert result.message.startswith(
        "model.fineTuneJobRef: FineTuneJob broken-dataset failed, so there is no model to serve until it"
        " is rerun and succeeds: InvalidDataset: dataset.source.pvc: 3 of 3 rows are malformed"
    ), result.message
    assert "(Job: PodFailurePolicy: Container trainer for pod recording/" in result.message
    status = waiting_status(ModelDeploymentStatus(), 1, result, NOW)
    assert status.model_state == "Pending" and is_waiting(status)
    assert conditions_of(status) == {
        "ModelLoaded": ("False", "FineTuneJobFailed"),
        "Ready": ("False", "FineTuneJobFailed"),
    }


def test_a_failed_finetunejob_without_a_failed_condition_says_what_it_can() -> None:
    failed = job("Failed")
    failed["status"]["lastFailure"] = {"reason": "OOMKilled", "message": "the trainer ran out of memory"}
    result = resolve(REF_SPEC, failed, None)
    assert isinstance(result, Waiting)
    assert result.message.endswith("succeeds: OOMKilled: the trainer ran out of memory")
    bare = resolve(REF_SPEC, job("Failed"), None)
    assert isinstance(bare, Waiting) and bare.message.endswith("until it is rerun")


def test_a_failed_finetunejob_rerun_under_its_name_is_served_once_it_succeeds() -> None:
    failed = resolve(REF_SPEC, job("Failed"), None)
    assert isinstance(failed, Waiting)
    previous = waiting_status(ModelDeploymentStatus(), 1, failed, NOW)
    rerun = resolve(REF_SPEC, job("Running"), previous.resolved_model)
    assert isinstance(rerun, Waiting) and rerun.reason == "WaitingForFineTuneJob"
    succeeded = resolve(REF_SPEC, job("Succeeded", mergedPath="merged"), previous.resolved_model)
    assert isinstance(succeeded, ResolvedModel) and succeeded.fine_tune_job == "bot"
    assert derive(None, [], previous=previous).model_state == "Pending"
    assert conditions_of(derive(None, [], previous=previous))["Ready"] == ("False", "Creating")


def test_a_served_model_keeps_serving_when_a_rerun_of_its_job_fails() -> None:
    assert resolve(REF_SPEC, job("Failed"), RESOLVED) == RESOLVED


def test_a_direct_source_needs_no_job() -> None:
    spec = parse_spec(
        {"model": {"merged": {"pvc": {"claimName": "m", "path": "x"}}}, "resources": {"gpu": 0}}
    )
    assert resolve(spec, None, None) == ResolvedModel(merged=PvcLocation(claim_name="m", path="x"))


# --- model state ------------------------------------------------------------------------------


def test_before_the_deployment_exists() -> None:
    status = derive(None, [])
    assert status.model_state == "Pending"
    assert conditions_of(status)["Ready"] == ("False", "Creating")
    assert status.endpoints == ENDPOINTS and status.resolved_model == RESOLVED
    assert status.observed_generation == 3


def test_running_but_not_ready_is_loading() -> None:
    status = derive(deployment(), [pod()])
    assert status.model_state == "Loading"
    assert conditions_of(status) == {"ModelLoaded": ("False", "Loading"), "Ready": ("False", "Loading")}


def test_ready_pod_is_loaded_and_ready_once_the_probe_passes() -> None:
    available = [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]
    loaded = derive(deployment(ready=1, conditions=available), [pod(ready=True)])
    assert loaded.model_state == "Loaded"
    assert conditions_of(loaded) == {"ModelLoaded": ("True", "Loaded"), "Ready": ("False", "Probing")}
    ready = derive(deployment(ready=1, conditions=available), [pod(ready=True)], probe())
    assert conditions_of(ready)["Ready"] == ("True", "Ready")
    assert (
        next(c.message for c in ready.conditions if c.type == "Ready")
        == "the model answered an inference in 12 ms"
    )
    assert (ready.replicas, ready.ready_replicas) == (1, 1)
    assert ready.last_probe == probe()


def test_a_failed_probe_keeps_it_not_ready() -> None:
    failed = probe(ok=False, message="InferenceServerException: model bot is not ready")
    status = derive(deployment(ready=1), [pod(ready=True)], failed)
    assert conditions_of(status)["Ready"] == ("False", "ProbeFailed")
    assert next(c.message for c in status.conditions if c.type == "Ready") == failed.message


def test_every_model_must_answer_the_probe_to_be_ready() -> None:
    """Decoupled models too (continuous batching, streaming): the probe asks them through
    generate_stream, so readiness never rests on Triton's word alone."""
    unanswered = probe(ok=False, message="")
    assert conditions_of(derive(deployment(ready=1), [pod(ready=True)], unanswered))["Ready"] == (
        "False",
        "ProbeFailed",
    )


def test_a_crashed_server_is_failed_to_load_with_its_message() -> None:
    crashed = pod(
        waiting={"reason": "CrashLoopBackOff", "message": "back-off 10s restarting failed container"},
        last={"exitCode": 1, "reason": "Error", "message": TRITON_LOG_TAIL},
    )
    status = derive(deployment(), [crashed])
    assert status.model_state == "FailedToLoad"
    assert status.last_failure is not None
    assert status.last_failure.reason == "ModelLoadFailed" and status.last_failure.exit_code == 1
    assert status.last_failure.message == (
        "Internal: FileNotFoundError: no model at /mnt/pvc/out/nope: the directory does not exist"
    )
    assert conditions_of(status)["Ready"] == ("False", "ModelLoadFailed")


def test_a_server_that_ended_is_failed_to_load_and_the_failure_is_remembered() -> None:
    ended = pod(terminated={"exitCode": 137, "reason": "OOMKilled", "message": ""})
    status = derive(deployment(), [ended])
    assert status.model_state == "FailedToLoad"
    assert status.last_failure is not None and status.last_failure.reason == "OOMKilled"
    assert "resources.memory" in status.last_failure.message
    restarted = derive(deployment(), [pod(last={"exitCode": 137, "reason": "OOMKilled"})], previous=status)
    assert restarted.model_state == "Loading"
    assert restarted.last_failure == status.last_failure


def test_pods_of_a_rollout_in_progress_are_not_counted() -> None:
    old = pod("old", ready=True, config_hash="previous-spec")
    status = derive(deployment(ready=1), [old, pod("new")], probe())
    assert status.model_state == "Loading"
    assert ready_pods(deployment(), [old, pod("new", ready=True)])[0]["metadata"]["name"] == "new"
    assert ready_pods(None, [old]) == []


def test_partially_loaded() -> None:
    status = derive(deployment(replicas=2, ready=1), [pod("a", ready=True), pod("b")], probe())
    assert status.model_state == "Loaded"
    assert conditions_of(status) == {"ModelLoaded": ("False", "PartiallyLoaded"), "Ready": ("True", "Ready")}


def test_pending_pods_explain_themselves() -> None:
    unschedulable = pod(
        running=False,
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/1 nodes: gpu",
            }
        ],
    )
    status = derive(deployment(), [unschedulable])
    assert (status.model_state, conditions_of(status)["Ready"]) == ("Pending", ("False", "Unschedulable"))
    pulling = pod(waiting={"reason": "ErrImagePull", "message": "not found"})
    assert conditions_of(derive(deployment(), [pulling]))["Ready"] == ("False", "ErrImagePull")
    rejected = [{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": "quota"}]
    assert conditions_of(derive(deployment(conditions=rejected), []))["Ready"] == ("False", "FailedCreate")
    assert conditions_of(derive(deployment(replicas=0), []))["Ready"] == ("False", "ScaledToZero")


# --- probe records, invalid specs, patches ----------------------------------------------------------


def test_an_unchanged_probe_outcome_is_written_back_only_now_and_then() -> None:
    first = probe(time="2026-11-25T10:00:00Z")
    assert record_probe(None, first) == first
    assert record_probe(first, probe(time="2026-11-25T10:00:30Z")) == first
    later = probe(time="2026-11-25T10:05:00Z")
    assert record_probe(first, later) == later
    failed = probe(ok=False, time="2026-11-25T10:00:30Z", message="timeout")
    assert record_probe(first, failed) == failed
    assert record_probe(first, None) == first


def test_invalid_spec_status() -> None:
    status = invalid_spec_status(
        ModelDeploymentStatus(), 2, "spec.quantization: needs a GPU", NOW, serving=False
    )
    assert is_invalid_spec(status)
    assert status.model_state == "FailedToLoad"
    assert conditions_of(status) == {
        "ModelLoaded": ("False", "InvalidSpec"),
        "Ready": ("False", "InvalidSpec"),
    }
    assert status.last_failure is not None and status.last_failure.reason == "InvalidSpec"
    assert not is_invalid_spec(derive(None, [], previous=status))


def test_a_rejected_first_spec_names_no_deployment() -> None:
    """Rejected before any Deployment existed (e.g. the API server refused the first one, after the
    status already said it was being created): no name, URL, replicas or model describe nothing."""
    creating = derive(None, [])
    assert creating.deployment_name == "bot-triton" and creating.endpoints == ENDPOINTS
    status = invalid_spec_status(creating, 3, "the API server rejected a child: ...", NOW, serving=False)
    assert is_invalid_spec(status) and status.model_state == "FailedToLoad"
    assert status.deployment_name is None and status.endpoints is None
    assert status.resolved_model is None and status.last_probe is None
    assert status.replicas is None and status.ready_replicas is None
    wire = status_changes(creating.to_wire(), status.to_wire())
    assert {"deploymentName", "endpoints", "resolvedModel", "replicas", "readyReplicas"} <= {
        key for key, value in wire.items() if value is None
    }


def test_a_rejected_spec_change_keeps_describing_the_deployment_that_still_serves() -> None:
    available = [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]
    serving = derive(deployment(ready=1, conditions=available), [pod(ready=True)], probe())
    status = invalid_spec_status(serving, 4, "spec.quantization: needs a GPU", NOW, serving=True)
    assert is_invalid_spec(status) and status.observed_generation == 4
    assert status.deployment_name == "bot-triton" and status.endpoints == ENDPOINTS
    assert status.resolved_model == RESOLVED and status.last_probe == probe()
    assert (status.replicas, status.ready_replicas) == (1, 1)


def test_transition_times_move_only_when_a_condition_flips() -> None:
    first = derive(deployment(), [pod()])
    later = derive_status(
        previous=first,
        generation=3,
        resolved=RESOLVED,
        deployment=deployment(),
        pods=[pod()],
        probe=None,
        endpoints=ENDPOINTS,
        backend="python",
        deployment_name="bot-triton",
        now="2026-11-25T11:00:00Z",
    )
    assert status_changes(first.to_wire(), later.to_wire()) == {}


def test_status_changes_remove_fields_that_went_away() -> None:
    assert status_changes({"a": 1, "b": 2}, {"a": 1, "c": 3}) == {"b": None, "c": 3}


def test_log_tails_and_plain_messages() -> None:
    assert load_error("error: creating server: Internal - failed to load all models\n") == (
        "creating server: Internal - failed to load all models"
    )
    assert load_error("FileNotFoundError: no model at /x\n") == "FileNotFoundError: no model at /x"
    assert len(load_error("x" * 5000)) == 1024


# --- adapters on the model's base ------------------------------------------------------------------

ADAPTERS_SPEC = parse_spec(
    {
        "model": {"fineTuneJobRef": {"name": "bot"}},
        "adapters": [{"name": "billing", "fineTuneJobRef": {"name": "billing-run"}}],
        "resources": {"gpu": 1},
    }
)


def named(found: dict[str, Any], name: str, base: str | None = None) -> dict[str, Any]:
    """`found` as the FineTuneJob `name`, trained on the hub model `base` when given."""
    renamed = copy.deepcopy(found)
    renamed["metadata"]["name"] = name
    if base:
        renamed["spec"]["baseModel"] = {"name": base}
    return renamed


def test_adapters_share_the_models_base_and_keep_its_adapter_unmerged() -> None:
    own = job("Succeeded", mergedPath="merged", adapterPath="adapter")
    billing = named(job("Succeeded", adapterPath="adapter"), "billing-run")
    result = resolve_source(ADAPTERS_SPEC, {"bot": own, "billing-run": billing}, None)
    assert isinstance(result, ResolvedModel)
    assert result.merged is None and result.adapter == PvcLocation(claim_name="out", path="ns/bot/adapter")
    assert result.adapter_rank == 16
    assert result.adapters is not None and [(a.name, a.fine_tune_job) for a in result.adapters] == [
        ("billing", "billing-run")
    ]


def test_an_adapter_of_another_base_is_named_with_both_bases() -> None:
    own = job("Succeeded", adapterPath="adapter")
    other = named(
        job("Succeeded", adapterPath="adapter"), "billing-run", "deepseek-ai/deepseek-coder-6.7b-base"
    )
    result = resolve_source(ADAPTERS_SPEC, {"bot": own, "billing-run": other}, None)
    assert isinstance(result, Waiting) and result.reason == "AdapterBaseMismatch"
    assert result.message.startswith("adapters[0] (billing): FineTuneJob billing-run was trained on")
    assert "deepseek-coder-6.7b-base" in result.message and "deepseek-llm-7b-base" in result.message


def test_an_adapter_still_training_is_waited_for_and_a_served_one_stays_while_its_job_reruns() -> None:
    own = job("Succeeded", adapterPath="adapter")
    running = named(job("Running"), "billing-run")
    waiting = resolve_source(ADAPTERS_SPEC, {"bot": own, "billing-run": running}, None)
    assert isinstance(waiting, Waiting) and waiting.reason == "WaitingForFineTuneJob"
    assert waiting.message.startswith("adapters[0] (billing): waiting for FineTuneJob billing-run")
    served = resolve_source(
        ADAPTERS_SPEC,
        {"bot": own, "billing-run": named(job("Succeeded", adapterPath="adapter"), "billing-run")},
        None,
    )
    assert isinstance(served, ResolvedModel)
    assert resolve_source(ADAPTERS_SPEC, {"bot": own, "billing-run": running}, served) == served
    assert (
        resolve_source(ADAPTERS_SPEC, {"bot": own}, served) == served
    )  # deleted: the weights are still there


def test_a_full_fine_tune_cannot_lend_its_base_to_adapters() -> None:
    full = job("Succeeded", mergedPath="model")
    result = resolve_source(ADAPTERS_SPEC, {"bot": full}, None)
    assert isinstance(result, Waiting) and "saved no adapter" in result.message
