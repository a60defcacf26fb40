"""FineTuneSweep: its spec's checks, Optuna's decisions from recorded trials, the trials' records and
the sweep's status, and the reconciler's writes (the API recorded, as in test_reconcilers)."""

from __future__ import annotations

import asyncio
import copy
import json
import math
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from deeptune import search
from deeptune.api.base import describe_validation_error
from deeptune.api.finetunesweep import Evaluation, FineTuneSweepStatus, Trial, parse_spec
from deeptune.builders.common import Owner, uid_label
from deeptune.builders.finetunesweep import PRUNED, TRIAL_NUMBER, TRIAL_PARAMETERS, build_trial
from deeptune.cache import Cache
from deeptune.config import Settings
from deeptune.reconcilers.finetunesweep import OBJECTS, TRIALS, FineTuneSweepReconciler
from deeptune.status.finetunesweep import derive_status, observe_trial
from tests.conftest import ROOT
from tests.unit.conftest import Api
from tests.unit.test_finetunejob_model import MINIMAL

Obj = dict[str, Any]
LR = "hyperparameters.learningRate"
NOW = "2026-12-05T00:00:00Z"
SWEEP_UID = "sweep-uid"
EXAMPLE = yaml.safe_load((ROOT / "examples" / "finetune-tiny-sweep.yaml").read_text())


def sweep_spec(**changes: Any) -> Obj:
    spec: Obj = {
        "template": copy.deepcopy(MINIMAL),
        "parameters": [{"path": LR, "low": 1e-5, "high": 1e-2, "log": True}],
        "objective": {"metric": "exactMatch"},
        "trials": 4,
        "parallelism": 2,
    }
    spec.update(changes)
    return spec


def error_of(spec: Obj) -> str:
    with pytest.raises(ValidationError) as caught:
        parse_spec(spec)
    return describe_validation_error(caught.value)


def trial(number: int, phase: str, lr: float, objective: float | None = None, **losses: float) -> Trial:
    evaluations = [Evaluation(step=int(step[1:]), eval_loss=loss) for step, loss in losses.items()]
    return Trial(
        number=number, name=f"s-{number}", parameters={LR: lr}, phase=phase,  # type: ignore[arg-type]
        objective=objective, evaluations=evaluations,
    )  # fmt: skip


# --- the spec ---------------------------------------------------------------------------------


def test_the_example_is_a_valid_sweep_judged_by_exact_match() -> None:
    spec = parse_spec(EXAMPLE["spec"])
    assert spec.objective.maximize and spec.pruner is not None
    assert parse_spec(sweep_spec(objective={"metric": "perplexity"})).objective.maximize is False


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"parameters": [{"path": LR, "low": 1e-2, "high": 1e-5}]}, "low must be below high"),
        ({"parameters": [{"path": "lora.r", "type": "categorical"}]}, "takes values, not low and high"),
        ({"parameters": [{"path": LR, "values": [1e-4]}]}, "takes low and high, not values"),
        (
            {"parameters": [{"path": LR, "low": 0, "high": 1e-2, "log": True}]},
            "log sampling needs low above 0",
        ),
        ({"parameters": [{"path": "lora.r", "type": "int", "low": 0.5, "high": 8}]}, "whole numbers"),
        ({"parameters": [{"path": "lora.r", "type": "categorical", "values": [[8]]}]}, "numbers or strings"),
        ({"parameters": [{"path": "dataset.source", "low": 0, "high": 1}]}, "parameters.0.path"),
        (
            {"parameters": [{"path": LR, "low": 1e-5, "high": 1e-2}] * 2},
            "each parameter path may appear once",
        ),
        ({"objective": {"metric": "f1"}}, "objective.metric f1 is not among template.evaluation.metrics"),
        ({"objective": {"metric": "preferenceAccuracy"}}, "set template.preference"),
        ({"pruner": {}}, "set template.evaluation.evalSteps"),
    ],
)
def test_a_wrong_sweep_says_which_field_and_what_to_do(change: Obj, message: str) -> None:
    assert message in error_of(sweep_spec(**change))


def test_every_value_a_parameter_may_take_must_make_a_valid_trial() -> None:
    """lora.r 0 or a scheduler that does not exist would fail only when that trial is made."""
    message = error_of(sweep_spec(parameters=[{"path": "lora.r", "type": "int", "low": 0, "high": 16}]))
    assert "parameters[0]: lora.r = 0 makes an invalid trial: template.lora.r" in message
    message = error_of(
        sweep_spec(
            parameters=[
                {"path": "hyperparameters.scheduler", "type": "categorical", "values": ["cosine", "sgdr"]}
            ]
        )
    )
    assert "hyperparameters.scheduler = 'sgdr'" in message
    message = error_of(sweep_spec(parameters=[{"path": "preference.beta", "low": 0.1, "high": 1}]))
    assert "tunes template.preference, which is not set" in message


def test_the_pruner_cannot_suspend_a_queued_trial() -> None:
    template = {**MINIMAL, "queueName": "team", "evaluation": {"evalSteps": 10}}
    assert "template.queueName" in error_of(sweep_spec(template=template, pruner={}))


# --- Optuna's decisions -----------------------------------------------------------------------


def test_each_trial_is_sampled_from_the_trials_before_it_reproducibly() -> None:
    spec = parse_spec(sweep_spec())
    history = [trial(0, "Succeeded", 1e-3, 0.8), trial(1, "Running", 1e-4)]
    first = search.next_values(spec, history, 2)
    assert first == search.next_values(spec, history, 2)
    assert first != search.next_values(spec, history, 3)
    assert 1e-5 <= first[LR] <= 1e-2  # type: ignore[operator]
    other_seed = parse_spec(sweep_spec(sampler={"seed": 1}))
    assert search.next_values(other_seed, history, 2) != first


def test_categorical_and_stepped_int_values_stay_in_their_space() -> None:
    spec = parse_spec(
        sweep_spec(
            parameters=[
                {"path": "lora.r", "type": "int", "low": 8, "high": 64, "step": 8},
                {"path": "hyperparameters.scheduler", "type": "categorical", "values": ["cosine", "linear"]},
            ]
        )
    )
    for number in range(8):
        values = search.next_values(spec, [], number)
        assert values["lora.r"] in range(8, 65, 8)
        assert values["hyperparameters.scheduler"] in ("cosine", "linear")


def test_tpe_samples_nearer_the_best_learning_rate_than_random_does() -> None:
    """With ten finished trials scored by closeness to 1e-3 (log scale), TPE's next proposals land
    nearer 1e-3 than random sampling's: the sampler learns from the recorded scores."""
    history = []
    for number, exponent in enumerate([-5, -4.5, -4, -3.5, -3.2, -2.8, -2.5, -2.2, -2.1, -2]):
        lr = 10**exponent
        history.append(trial(number, "Succeeded", lr, objective=-abs(math.log10(lr) + 3)))

    def distance(kind: str) -> float:
        spec = parse_spec(sweep_spec(sampler={"type": kind, "startupTrials": 4}))
        proposals = [search.next_values(spec, history, n)[LR] for n in range(10, 30)]
        return sum(abs(math.log10(p) + 3) for p in proposals) / len(proposals)  # type: ignore[arg-type]

    assert distance("tpe") < 0.7 * distance("random")


def test_a_trial_whose_loss_trails_the_median_is_pruned() -> None:
    spec = parse_spec(
        sweep_spec(template={**MINIMAL, "evaluation": {"evalSteps": 10}}, pruner={"startupTrials": 2})
    )
    finished = [
        trial(0, "Succeeded", 1e-3, 0.9, s10=1.0, s20=0.5),
        trial(1, "Succeeded", 1e-4, 0.5, s10=2.0, s20=1.5),
    ]
    trailing = trial(2, "Running", 1e-5, s10=3.0)
    leading = trial(3, "Running", 3e-3, s10=1.2)
    assert search.should_prune(spec, trailing, [*finished, trailing, leading])
    assert not search.should_prune(spec, leading, [*finished, trailing, leading])
    assert not search.should_prune(spec, trailing, [finished[0], trailing]), "one finished trial is too few"
    assert not search.should_prune(parse_spec(sweep_spec()), trailing, [*finished, trailing]), "no pruner"
    warm = parse_spec(
        sweep_spec(template={**MINIMAL, "evaluation": {"evalSteps": 10}}, pruner={"warmupSteps": 20})
    )
    assert not search.should_prune(warm, trailing, [*finished, trailing]), "within the warm-up steps"


def test_trials_seen_at_different_steps_are_compared_by_their_last_loss_before() -> None:
    """The operator records the evaluations it happens to see: a running trial seen at step 30 is
    compared with the finished trials' losses at steps 10 and 20, carried forward."""
    spec = parse_spec(
        sweep_spec(template={**MINIMAL, "evaluation": {"evalSteps": 10}}, pruner={"startupTrials": 2})
    )
    finished = [
        trial(0, "Succeeded", 1e-3, 0.9, s10=1.0, s40=0.5),
        trial(1, "Succeeded", 1e-4, 0.5, s20=2.0, s50=1.5),
    ]
    assert search.should_prune(spec, trial(2, "Running", 1e-5, s30=3.0), [*finished])
    assert not search.should_prune(spec, trial(3, "Running", 3e-3, s30=1.2), [*finished])
    assert not search.should_prune(spec, trial(4, "Running", 1e-5, s5=9.0), [*finished]), "nothing before"


def test_the_best_trial_by_the_objectives_direction() -> None:
    trials = [
        trial(0, "Succeeded", 1e-3, 0.5),
        trial(1, "Failed", 1e-2),
        trial(2, "Succeeded", 1e-4, 0.9),
        trial(3, "Succeeded", 1e-5, 0.9),
    ]
    assert search.best(parse_spec(sweep_spec()), trials).number == 2  # type: ignore[union-attr]
    lowest = parse_spec(sweep_spec(objective={"metric": "perplexity"}))
    assert search.best(lowest, trials).number == 0  # type: ignore[union-attr]
    assert search.best(lowest, trials[1:2]) is None


# --- trials and status ------------------------------------------------------------------------

OWNER = Owner(kind="FineTuneSweep", name="s", namespace="ns", uid=SWEEP_UID)


def made_trial(number: int, status: Obj | None = None, **annotations: str) -> Obj:
    spec = parse_spec(sweep_spec(template={**MINIMAL, "evaluation": {"evalSteps": 10}}))
    manifest = build_trial(OWNER, spec, number, {LR: 10.0 ** -(number + 2)})
    manifest["metadata"]["annotations"].update(annotations)
    manifest["metadata"]["uid"] = f"trial-{number}"
    manifest["status"] = status or {}
    return manifest


def test_a_trial_is_the_template_with_its_values_owned_by_the_sweep() -> None:
    spec = parse_spec(
        sweep_spec(template={**MINIMAL, "output": {"pvc": {"claimName": "out", "path": "runs"}}})
    )
    manifest = build_trial(OWNER, spec, 3, {LR: 3e-4})
    meta = manifest["metadata"]
    assert meta["name"] == "s-3" and meta["labels"][uid_label("FineTuneSweep")] == SWEEP_UID
    assert meta["ownerReferences"][0]["uid"] == SWEEP_UID and meta["ownerReferences"][0]["controller"]
    assert meta["annotations"] == {TRIAL_NUMBER: "3", TRIAL_PARAMETERS: json.dumps({LR: 3e-4})}
    assert manifest["spec"]["hyperparameters"]["learningRate"] == 3e-4
    assert manifest["spec"]["output"]["pvc"] == {"claimName": "out", "path": "runs/s-3"}
    assert build_trial(OWNER, parse_spec(sweep_spec()), 0, {LR: 1e-3})["spec"]["output"]["pvc"]["path"] == ""


def test_a_trials_record_follows_its_finetunejob() -> None:
    spec = parse_spec(sweep_spec(template={**MINIMAL, "evaluation": {"evalSteps": 10}}))
    running = made_trial(0, {"phase": "Running", "progress": {"step": 27, "evalLoss": 1.5}})
    seen = observe_trial(running, None, spec)
    assert (seen.phase, seen.parameters, seen.evaluations) == (
        "Running",
        {LR: 1e-2},
        [Evaluation(step=20, eval_loss=1.5)],
    )
    later = observe_trial(
        made_trial(0, {"phase": "Running", "progress": {"step": 33, "evalLoss": 1.1}}), seen, spec
    )
    assert [e.step for e in later.evaluations] == [20, 30]
    done = made_trial(0, {"phase": "Succeeded", "evalResults": {"fineTuned": {"exactMatch": 0.75}}})
    assert observe_trial(done, later, spec).objective == 0.75
    unscored = observe_trial(
        made_trial(0, {"phase": "Succeeded", "evalResults": {"fineTuned": {}}}), None, spec
    )
    assert unscored.phase == "Failed" and "no exactMatch" in unscored.message
    failed = made_trial(
        0,
        {"phase": "Failed", "lastFailure": {"reason": "Error", "exitCode": 137, "message": "killed"}},
    )
    assert observe_trial(failed, None, spec).message == "Error (exit code 137): killed"
    pruned = observe_trial(made_trial(0, {"phase": "Suspended"}, **{PRUNED: "trails"}), None, spec)
    assert (pruned.phase, pruned.message) == ("Pruned", "trails")


def test_the_sweep_runs_until_every_trial_ended_then_names_the_best_or_fails() -> None:
    spec = parse_spec(sweep_spec(trials=3))

    def status(*trials: Trial) -> FineTuneSweepStatus:
        return derive_status(spec, FineTuneSweepStatus(), list(trials), outputs={}, generation=1, now=NOW)

    running = status(trial(0, "Succeeded", 1e-3, 0.5), trial(1, "Running", 1e-4))
    assert running.phase == "Running" and running.best_trial.name == "s-0" and running.running == 1  # type: ignore[union-attr]
    done = status(trial(0, "Succeeded", 1e-3, 0.5), trial(1, "Failed", 1e-4), trial(2, "Pruned", 1e-5))
    assert done.phase == "Succeeded" and (done.succeeded, done.failed, done.pruned) == (1, 1, 1)
    assert {c.type: c.status for c in done.conditions}["Ready"] == "True"
    lost = status(trial(0, "Failed", 1e-3), trial(1, "Failed", 1e-4), trial(2, "Pruned", 1e-5))
    assert lost.phase == "Failed" and "every trial failed or was pruned" in lost.conditions[0].message


# --- the reconciler ---------------------------------------------------------------------------


def sweep_object(spec: Obj, status: Obj | None = None) -> Obj:
    return {
        "apiVersion": "deeptune.dev/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {
            "name": "s",
            "namespace": "ns",
            "uid": SWEEP_UID,
            "generation": 1,
            "resourceVersion": "3",
        },
        "spec": spec,
        "status": status or {},
    }


def reconcile(sweep: Obj, trials: list[Obj]) -> None:
    cache = Cache()
    cache.fill({OBJECTS: {SWEEP_UID: [sweep]}, TRIALS: {SWEEP_UID: trials}})
    reconciler = FineTuneSweepReconciler(Settings(), cache, lambda uid: None)
    asyncio.run(reconciler.reconcile(SWEEP_UID))


def test_a_new_sweep_starts_as_many_trials_as_parallelism_allows(api: Api, reads: dict[str, Obj]) -> None:
    reconcile(sweep_object(sweep_spec()), [])
    assert [call[2] for call in api.named("create")] == ["s-0", "s-1"]
    status = api.written()
    assert [t["name"] for t in status["trials"]] == ["s-0", "s-1"] and status["phase"] == "Running"
    assert [e.reason for e in api.events] == ["TrialCreated", "TrialCreated"]


def test_an_ended_trial_makes_room_for_the_next_and_the_budget_is_kept(
    api: Api, reads: dict[str, Obj]
) -> None:
    trials = [
        made_trial(0, {"phase": "Succeeded", "evalResults": {"fineTuned": {"exactMatch": 0.5}}}),
        made_trial(1, {"phase": "Running"}),
    ]
    reconcile(sweep_object(sweep_spec()), trials)
    assert [call[2] for call in api.named("create")] == ["s-2"]
    api.calls.clear()
    trials += [made_trial(2, {"phase": "Failed"}), made_trial(3, {"phase": "Running"})]
    reconcile(sweep_object(sweep_spec()), trials)
    assert not api.named("create"), "four trials were the budget"


def test_a_trial_made_before_the_cache_saw_it_is_found_not_made_again(
    api: Api, reads: dict[str, Obj]
) -> None:
    recorded = {"trials": [{"number": 0, "name": "s-0", "parameters": {LR: 1e-2}, "phase": "Pending"}]}
    reads["s-0"] = made_trial(0, {"phase": "Running"})
    reconcile(sweep_object(sweep_spec(parallelism=1), recorded), [])
    assert not api.named("create")
    assert api.written().get("trials", recorded["trials"])[0]["phase"] in ("Pending", "Running")


def test_a_deleted_trial_is_recorded_as_failed_and_replaced(api: Api, reads: dict[str, Obj]) -> None:
    recorded = {"trials": [{"number": 0, "name": "s-0", "parameters": {LR: 1e-2}, "phase": "Running"}]}
    reconcile(sweep_object(sweep_spec(parallelism=1), recorded), [])
    trials = api.written()["trials"]
    assert trials[0]["phase"] == "Failed" and trials[0]["message"] == "its FineTuneJob was deleted"
    assert [call[2] for call in api.named("create")] == ["s-1"]


def test_a_trailing_trial_is_suspended_and_marked_pruned(api: Api, reads: dict[str, Obj]) -> None:
    spec = sweep_spec(
        template={**MINIMAL, "evaluation": {"evalSteps": 10}}, pruner={"startupTrials": 1}, trials=2
    )
    done = made_trial(0, {"phase": "Succeeded", "evalResults": {"fineTuned": {"exactMatch": 0.9}}})
    previous = {"trials": [{"number": 0, "name": "s-0", "parameters": {LR: 1e-2}, "phase": "Running",
                            "evaluations": [{"step": 10, "evalLoss": 1.0}]}]}  # fmt: skip
    reconcile(
        sweep_object(spec, previous),
        [done, made_trial(1, {"phase": "Running", "progress": {"step": 10, "evalLoss": 4.0}})],
    )
    (patch,) = api.named("patch")
    assert (
        patch[3] == "s-1"
        and patch[5]["spec"] == {"suspend": True}
        and PRUNED in patch[5]["metadata"]["annotations"]
    )
    status = api.written()
    assert status["trials"][1]["phase"] == "Pruned" and status["phase"] == "Succeeded"
    assert status["bestTrial"]["name"] == "s-0"
    assert [e.reason for e in api.events] == ["TrialPruned", "BestTrialFound"]


def test_an_invalid_sweep_is_reported_and_makes_nothing(api: Api, reads: dict[str, Obj]) -> None:
    reconcile(sweep_object(sweep_spec(objective={"metric": "f1"})), [])
    assert not api.named("create")
    status = api.written()
    assert status["phase"] == "Failed" and status["conditions"][-1]["reason"] == "InvalidSpec"
