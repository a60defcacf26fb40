"""Status derivation from Job and pod states shaped as the Kubernetes API returns them."""

from __future__ import annotations

from typing import Any

import pytest

from deeptune.api.finetunejob import FineTuneJobStatus, OutputStatus
from deeptune.api.trainer import ArtifactPaths, TrainerError, TrainerSummary
from deeptune.status.finetunejob import derive_status, is_invalid_spec, waiting_reason
from deeptune.status.progress import format_duration, parse_progress

NOW = "2026-11-25T10:00:00Z"
OUTPUT = OutputStatus(claim_name="out", path="team-a/bot")


def job(conditions: list[dict[str, Any]] | None = None, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "bot-train", "uid": "job-uid"},
        "status": {"startTime": "2026-11-25T09:00:00Z", **status, "conditions": conditions or []},
    }


def condition(kind: str, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-11-25T09:30:00Z",
    }


def pod(
    phase: str,
    *,
    waiting: dict[str, Any] | None = None,
    terminated: dict[str, Any] | None = None,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if waiting:
        state["waiting"] = waiting
    if terminated:
        state["terminated"] = terminated
    if phase == "Running":
        state["running"] = {"startedAt": "2026-11-25T09:01:00Z"}
    return {
        "metadata": {"name": "bot-train-abcde"},
        "status": {
            "phase": phase,
            "podIP": "10.0.0.7",
            "conditions": conditions or [],
            "containerStatuses": [{"name": "trainer", "state": state, "restartCount": 0}],
        },
    }


def derive(
    job_obj: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    previous: FineTuneJobStatus | None = None,
    progress: Any = None,
) -> FineTuneJobStatus:
    return derive_status(
        previous=previous or FineTuneJobStatus(),
        generation=2,
        job=job_obj,
        pods=pods,
        progress=progress,
        output=OUTPUT,
        now=NOW,
    )


def conditions_of(status: FineTuneJobStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


METRICS = """\
# HELP deeptune_trainer_step Optimizer steps done.
# TYPE deeptune_trainer_step gauge
deeptune_trainer_step 150.0
deeptune_trainer_total_steps 600.0
deeptune_trainer_epoch 0.75
deeptune_trainer_train_loss 1.23456
deeptune_trainer_eval_loss NaN
deeptune_trainer_learning_rate 0.0002
deeptune_trainer_tokens_per_second 4321.55
deeptune_trainer_eta_seconds 3725.0
"""


def test_progress_from_the_trainers_metrics() -> None:
    progress = parse_progress(METRICS, NOW)
    assert progress is not None
    assert (progress.step, progress.total_steps, progress.percent) == (150, 600, 25)
    assert progress.epoch == 0.75 and progress.train_loss == 1.2346
    assert progress.eval_loss is None, "NaN means not computed yet"
    assert progress.eta == "1h2m" and progress.tokens_per_second == 4321.6
    assert parse_progress("# nothing yet\n", NOW) is None


def test_durations_read_like_kubectl() -> None:
    assert [format_duration(s) for s in (9, 250, 7500, -3)] == ["9s", "4m10s", "2h5m", "0s"]


def test_no_job_yet_is_pending() -> None:
    status = derive(None, [])
    assert status.phase == "Pending"
    assert conditions_of(status)["Ready"] == ("False", "JobNotCreated")


def test_unschedulable_pod_explains_itself() -> None:
    unschedulable = pod(
        "Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            }
        ],
    )
    status = derive(job(active=1), [unschedulable])
    assert status.phase == "Pending"
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert (ready.reason, ready.message) == (
        "Unschedulable",
        "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    )


def test_image_pull_error_explains_itself() -> None:
    pulling = pod("Pending", waiting={"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x"'})
    status = derive(job(active=1), [pulling])
    assert conditions_of(status)["Ready"] == ("False", "ImagePullBackOff")


def test_running_takes_progress() -> None:
    progress = parse_progress(METRICS, NOW)
    status = derive(job(active=1), [pod("Running")], progress=progress)
    assert status.phase == "Running"
    assert conditions_of(status)["Running"] == ("True", "Training")
    assert status.progress == progress
    assert status.job_name == "bot-train" and status.start_time == "2026-11-25T09:00:00Z"


def test_succeeded_carries_results_from_the_termination_message() -> None:
    summary = TrainerSummary(
        outcome="succeeded",
        steps=600,
        train_loss=0.31,
        eval_results={
            "fineTuned": {"exactMatch": 0.9},
            "baseline": {"exactMatch": 0.1},
            "delta": {"exactMatch": 0.8},
        },
        dataset={"rowsRead": 1000, "rowsKept": 950, "duplicatesRemoved": 50},
        artifacts=ArtifactPaths(adapter="adapter", merged="merged"),
        lineage={
            "config": "sha256:" + "c" * 64,
            "datasets": {"dataset.source": "sha256:" + "d" * 64},
            "baseModel": "deepseek-ai/deepseek-llm-7b-base@" + "e" * 40,
            "artifacts": {"adapter": "sha256:" + "a" * 64},
        },
    )
    done = pod(
        "Succeeded",
        terminated={"exitCode": 0, "reason": "Completed", "message": summary.model_dump_json(by_alias=True)},
    )
    finished = job(
        [condition("Complete", "CompletionsReached")], succeeded=1, completionTime="2026-11-25T09:59:00Z"
    )
    image = "ghcr.io/deeptune/trainer@sha256:" + "f" * 64
    done["status"]["containerStatuses"][0]["imageID"] = image
    status = derive(finished, [done])
    assert status.phase == "Succeeded"
    assert conditions_of(status)["Ready"] == ("True", "Succeeded")
    assert status.eval_results is not None and status.eval_results.delta == {"exactMatch": 0.8}
    assert status.dataset is not None and status.dataset.duplicates_removed == 50
    assert status.output is not None and status.output.merged_path == "merged"
    assert (
        status.lineage is not None and status.lineage.trainer_image == image
    )  # from the pod, not the trainer
    assert status.lineage.model_copy(update={"trainer_image": None}) == summary.lineage
    assert status.to_wire()["lineage"]["datasets"] == {"dataset.source": "sha256:" + "d" * 64}
    assert status.progress is not None and (status.progress.percent, status.progress.step) == (100, 600)
    assert status.completion_time == "2026-11-25T09:59:00Z"


def test_a_finished_run_visited_again_changes_nothing() -> None:
    summary = TrainerSummary(outcome="succeeded", steps=600, train_loss=0.31)
    done = pod("Succeeded", terminated={"exitCode": 0, "message": summary.model_dump_json(by_alias=True)})
    finished = job([condition("Complete", "CompletionsReached")], succeeded=1)
    first = derive(finished, [done])
    again = derive_status(
        previous=first, generation=2, job=finished, pods=[done], progress=None, output=OUTPUT,
        now="2026-11-25T11:00:00Z",
    )  # fmt: skip
    assert again.to_wire() == first.to_wire()  # no status write on every pass after the end
    assert first.progress is not None and first.progress.last_update_time == NOW


@pytest.mark.parametrize(("reason", "exit_code"), [("Unknown", 255), ("ContainerStatusUnknown", 137)])
def test_a_container_lost_with_its_node_is_said_so(reason: str, exit_code: int) -> None:
    """What the real node's kubelet reported after a crash and restart (tests/cluster/test_faults.py):
    a reason and exit code that alone tell a user nothing."""
    lost = pod(
        "Failed", terminated={"exitCode": exit_code, "reason": reason, "finishedAt": "2026-11-25T09:40:00Z"}
    )
    status = derive(job([], failed=1), [lost])
    assert status.last_failure is not None
    assert (status.last_failure.reason, status.last_failure.exit_code) == (reason, exit_code)
    assert "lost with its node" in status.last_failure.message
    assert "resumes from the newest checkpoint" in status.last_failure.message


def test_oom_killed_says_what_to_change() -> None:
    killed = pod(
        "Failed", terminated={"exitCode": 137, "reason": "OOMKilled", "finishedAt": "2026-11-25T09:40:00Z"}
    )
    failed = job(
        [condition("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")], failed=4
    )
    status = derive(failed, [killed])
    assert status.phase == "Failed" and status.retries == 4
    assert status.last_failure is not None
    assert (status.last_failure.reason, status.last_failure.exit_code) == ("OOMKilled", 137)
    assert "resources.memory" in status.last_failure.message
    failed_condition = next(c for c in status.conditions if c.type == "Failed")
    assert failed_condition.reason == "OOMKilled"
    job_says = "BackoffLimitExceeded: Job has reached the specified backoff limit"
    assert failed_condition.message == f"{status.last_failure.message} (Job: {job_says})"


def trainer_failure(reason: str, message: str) -> dict[str, Any]:
    """A trainer pod that gave up on bad input: exit code 3, its summary as the termination message."""
    summary = TrainerSummary(outcome="failed", error=TrainerError(reason=reason, message=message))
    return pod(
        "Failed",
        terminated={"exitCode": 3, "reason": "Error", "message": summary.model_dump_json(by_alias=True)},
    )


FAIL_JOB = condition(
    "Failed",
    "PodFailurePolicy",
    "Container trainer for pod ns/bot-train-abcde failed with exit code 3 matching FailJob rule at index 0",
)


def test_a_trainer_error_leads_the_failed_condition_in_its_own_words() -> None:
    bad = trainer_failure("InvalidDataset", "dataset.fields.completion: column 'answer' not found")
    status = derive(job([FAIL_JOB]), [bad])
    assert status.last_failure is not None
    assert (status.last_failure.reason, status.last_failure.exit_code) == ("InvalidDataset", 3)
    expected = (
        "dataset.fields.completion: column 'answer' not found (Job: PodFailurePolicy: Container trainer for "
        "pod ns/bot-train-abcde failed with exit code 3 matching FailJob rule at index 0)"
    )
    for kind in ("Failed", "Ready"):
        failed = next(c for c in status.conditions if c.type == kind)
        assert (failed.reason, failed.message) == ("InvalidDataset", expected)


def test_a_failed_job_without_a_trainer_failure_keeps_the_jobs_words() -> None:
    status = derive(job([FAIL_JOB]), [])
    failed = next(c for c in status.conditions if c.type == "Failed")
    assert (failed.reason, failed.message) == ("PodFailurePolicy", FAIL_JOB["message"])


def test_a_trainer_rejecting_the_spec_is_a_finished_failure_not_the_operators_rejection() -> None:
    """The operator starts a fixed spec afresh after its own InvalidSpec; a trainer's InvalidSpec ends
    the run like any other failure (a restarted operator must not reset it to Pending)."""
    bad = trainer_failure("InvalidSpec", "earlyStopping watches the validation loss, but it is empty")
    status = derive(job([FAIL_JOB]), [bad])
    assert conditions_of(status)["Failed"] == ("True", "InvalidSpec")
    assert not is_invalid_spec(status)


def test_deadline_exceeded() -> None:
    expired = job([condition("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")])
    status = derive(expired, [])
    assert status.phase == "Failed"
    assert conditions_of(status)["Failed"] == ("True", "DeadlineExceeded")
    assert status.completion_time == "2026-11-25T09:30:00Z"


def test_a_deadline_is_the_jobs_decision_and_leads() -> None:
    stopped = pod("Failed", terminated={"exitCode": 143, "reason": "Error", "message": "step 40/100"})
    expired = job([condition("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")])
    failed = next(c for c in derive(expired, [stopped]).conditions if c.type == "Failed")
    assert (failed.reason, failed.message) == (
        "DeadlineExceeded",
        "Job was active longer than specified deadline: Error: step 40/100",
    )


def test_suspended() -> None:
    status = derive(job([condition("Suspended", "JobSuspended")]), [])
    assert status.phase == "Suspended"
    assert conditions_of(status)["Suspended"] == ("True", "Suspended")


def test_finished_run_survives_its_job_being_deleted() -> None:
    done = derive(job([condition("Complete", "CompletionsReached")]), [])
    after_ttl = derive(None, [], previous=done)
    assert after_ttl == done, "the recorded outcome stands, reason and times included"


def test_ttl_does_not_erase_why_a_run_failed() -> None:
    """Issue 12, fault 2: once the Job was gone, Failed/BackoffLimitExceeded became Failed/JobRemoved."""
    failed = derive(job([condition("Failed", "BackoffLimitExceeded", "too many retries")]), [])
    assert conditions_of(failed)["Failed"] == ("True", "BackoffLimitExceeded")
    after_ttl = derive(None, [], previous=failed)
    assert conditions_of(after_ttl)["Failed"] == ("True", "BackoffLimitExceeded")
    assert after_ttl == failed


def test_a_failure_recorded_before_leads_when_its_pod_is_gone() -> None:
    """The trainer's words were recorded while the Job retried; the Job then failed, its pod gone from
    view (deleted with the Job's TTL): the Failed condition still leads with the trainer's reason."""
    exit_3 = trainer_failure("DatasetNotFound", "missing.jsonl does not exist")
    retrying = derive(job(failed=1), [exit_3])
    assert retrying.last_failure is not None and retrying.last_failure.reason == "DatasetNotFound"
    failed = derive(job([condition("Failed", "PodFailurePolicy", "exit code 3")]), [], previous=retrying)
    assert conditions_of(failed)["Failed"] == ("True", "DatasetNotFound")


def test_the_same_figures_scraped_again_are_no_change() -> None:
    """Issue 12, fault 8: every visit wrote a fresh progress.lastUpdateTime, so a running job's
    status was written (and watched by every client) on every pass."""
    first = derive(job(active=1), [pod("Running")], progress=parse_progress(METRICS, NOW))
    again = derive(job(active=1), [pod("Running")], previous=first, progress=parse_progress(METRICS, "later"))
    assert again == first
    moved = parse_progress(
        METRICS.replace("deeptune_trainer_step 150.0", "deeptune_trainer_step 151.0"), "later"
    )
    assert moved is not None and moved.step == 151
    assert derive(job(active=1), [pod("Running")], previous=first, progress=moved).progress == moved


def test_transition_time_moves_only_when_status_flips() -> None:
    first = derive(job(active=1), [pod("Running")])
    later = derive_status(
        previous=first,
        generation=2,
        job=job(active=1),
        pods=[pod("Running")],
        progress=None,
        output=OUTPUT,
        now="2026-11-25T11:00:00Z",
    )
    assert [c.last_transition_time for c in later.conditions] == [
        c.last_transition_time for c in first.conditions
    ]
    done = derive_status(
        previous=later,
        generation=2,
        job=job([condition("Complete", "CompletionsReached")]),
        pods=[],
        progress=None,
        output=OUTPUT,
        now="2026-11-25T12:00:00Z",
    )
    times = {c.type: c.last_transition_time for c in done.conditions}
    assert times["Ready"] == times["Running"] == "2026-11-25T12:00:00Z"
    assert times["Failed"] == NOW


def test_invalid_spec_marker() -> None:
    status = FineTuneJobStatus.model_validate(
        {
            "conditions": [
                {"type": "Failed", "status": "True", "reason": "InvalidSpec", "lastTransitionTime": NOW}
            ]
        }
    )
    assert is_invalid_spec(status)
    assert not is_invalid_spec(derive(None, []))


def test_a_finished_pod_before_the_job_completes_is_still_running() -> None:
    done = pod("Succeeded", terminated={"exitCode": 0, "reason": "Completed", "message": "{}"})
    status = derive(job(succeeded=1), [done], previous=derive(job(active=1), [pod("Running")]))
    assert (status.phase, conditions_of(status)["Running"]) == ("Running", ("True", "Finishing"))


def test_a_failed_pod_waiting_for_its_retry() -> None:
    killed = pod("Failed", terminated={"exitCode": 137, "reason": "Error", "finishedAt": NOW})
    status = derive(job(failed=1), [killed])
    assert status.phase == "Pending" and status.retries == 1
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert ready.reason == "Retrying"
    assert ready.message.startswith("the trainer pod failed and will be retried: Error")


def test_queued_by_kueue_is_pending_and_names_the_queue() -> None:
    queued = job([condition("Suspended", "JobSuspended")])
    queued["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpu-queue"}
    queued["spec"] = {"suspend": True}
    status = derive(queued, [])
    assert status.phase == "Pending"
    running = next(c for c in status.conditions if c.type == "Running")
    assert (running.status, running.reason) == ("False", "Queued")
    assert "LocalQueue gpu-queue" in running.message
    assert conditions_of(status)["Suspended"][0] == "False"  # the user did not pause it


def test_a_queued_run_says_why_kueue_has_not_admitted_it() -> None:
    queued = job([condition("Suspended", "JobSuspended")])
    queued["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpu-queue"}
    queued["spec"] = {"suspend": True}
    why = (
        "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor"
        " gpus, 1 more needed"
    )
    workload = {
        "status": {
            "conditions": [{"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": why}]
        }
    }
    status = derive_status(
        previous=FineTuneJobStatus(),
        generation=2,
        job=queued,
        pods=[],
        progress=None,
        output=OUTPUT,
        now=NOW,
        workload=workload,
    )
    running = next(c for c in status.conditions if c.type == "Running")
    assert running.message == f"waiting in Kueue's LocalQueue gpu-queue: {why}"
    assert waiting_reason({"status": {"conditions": [{"type": "QuotaReserved", "status": "True"}]}}) is None


def test_an_indexed_run_lists_the_newest_pod_of_each_index() -> None:
    indexed = job()
    indexed["spec"] = {"completionMode": "Indexed"}

    def worker(name: str, index: str, created: str, phase: str) -> dict[str, Any]:
        found = pod(phase)
        found["metadata"].update(
            name=name,
            creationTimestamp=created,
            annotations={"batch.kubernetes.io/job-completion-index": index},
        )
        return found

    pods = [
        worker("bot-train-1-a", "1", "2026-11-25T09:00:00Z", "Failed"),
        worker("bot-train-0-a", "0", "2026-11-25T09:00:00Z", "Running"),
        worker("bot-train-1-b", "1", "2026-11-25T09:05:00Z", "Running"),
    ]
    status = derive(indexed, pods)
    assert [(w.index, w.name, w.phase) for w in status.workers] == [
        (0, "bot-train-0-a", "Running"), (1, "bot-train-1-b", "Running"),
    ]  # fmt: skip
    assert derive(job(), [pod("Running")]).workers is None
