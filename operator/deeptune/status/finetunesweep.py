"""A FineTuneSweep's status from its trials' FineTuneJobs. Pure: recorded objects in, status out.

A trial's record comes from its FineTuneJob: the values from the annotation the sweep wrote, the
phase and scores from the FineTuneJob's status. Validation losses are collected as the sweep sees
them (the FineTuneJob shows only the latest), so the record of a trial keeps its own history.
"""

from __future__ import annotations

import json
from typing import Any

from deeptune.api.finetunejob import FineTuneJobStatus, OutputStatus
from deeptune.api.finetunesweep import (
    MAX_EVALUATIONS,
    BestTrial,
    Evaluation,
    FineTuneSweepSpec,
    FineTuneSweepStatus,
    Trial,
)
from deeptune.builders.finetunesweep import PRUNED, TRIAL_NUMBER, TRIAL_PARAMETERS
from deeptune.search import best
from deeptune.status.conditions import phase_conditions

Obj = dict[str, Any]
ENDED: frozenset[str] = frozenset({"Succeeded", "Failed", "Pruned"})


def trial_number(finetunejob: Obj) -> int | None:
    value = (finetunejob["metadata"].get("annotations") or {}).get(TRIAL_NUMBER, "")
    return int(value) if value.isdigit() else None


def observe_trial(finetunejob: Obj, previous: Trial | None, spec: FineTuneSweepSpec) -> Trial:
    """A trial as its FineTuneJob shows it now, with the losses seen before."""
    meta = finetunejob["metadata"]
    annotations = meta.get("annotations") or {}
    status = FineTuneJobStatus.model_validate(finetunejob.get("status") or {})
    phase = "Pruned" if PRUNED in annotations else (status.phase or "Pending")
    message = annotations.get(PRUNED, "") if phase == "Pruned" else _ready_message(status, phase)
    objective = None
    if phase == "Succeeded":
        scores = status.eval_results.fine_tuned if status.eval_results else {}
        objective = scores.get(spec.objective.metric)
        if objective is None:
            phase, message = "Failed", f"its evalResults have no {spec.objective.metric}"
    return Trial(
        number=trial_number(finetunejob) or 0,
        name=meta["name"],
        parameters=json.loads(annotations.get(TRIAL_PARAMETERS) or "{}"),
        phase=phase,
        objective=objective,
        evaluations=_evaluations(previous, status, spec.template.evaluation.eval_steps),
        message=message,
    )


def gone(trial: Trial) -> Trial:
    """A trial whose FineTuneJob was deleted: an ended one keeps its record, any other failed."""
    if trial.phase in ENDED:
        return trial
    return trial.model_copy(update={"phase": "Failed", "message": "its FineTuneJob was deleted"})


def _ready_message(status: FineTuneJobStatus, phase: str) -> str:
    """Why a trial failed: its trainer's last failure (the trainer's own words, or the container's
    reason and exit code), else its FineTuneJob's Ready condition (an invalid spec, a deadline)."""
    if phase != "Failed":
        return ""
    ready = next((c.message for c in status.conditions if c.type == "Ready"), "")
    failure = status.last_failure
    if failure is None:
        return ready
    code = f" (exit code {failure.exit_code})" if failure.exit_code is not None else ""
    return f"{failure.reason}{code}: {failure.message or ready}"


def _evaluations(previous: Trial | None, status: FineTuneJobStatus, every: int | None) -> list[Evaluation]:
    """The losses seen before, and the latest if it is new. The latest is attributed to the last
    evaluation step at or before the trainer's step (it evaluates every `every` steps), so trials are
    compared at the same steps."""
    seen = list(previous.evaluations) if previous else []
    progress = status.progress
    if every is None or progress is None or progress.eval_loss is None or not progress.step:
        return seen
    step = progress.step // every * every
    if step and all(evaluation.step != step for evaluation in seen):
        seen.append(Evaluation(step=step, eval_loss=progress.eval_loss))
    return seen[-MAX_EVALUATIONS:]


def derive_status(
    spec: FineTuneSweepSpec,
    previous: FineTuneSweepStatus,
    trials: list[Trial],
    *,
    outputs: dict[str, OutputStatus | None],
    generation: int | None,
    now: str,
) -> FineTuneSweepStatus:
    """The sweep's status from its trials; `outputs` holds each trial's `status.output` by name."""
    trials = sorted(trials, key=lambda t: t.number)
    counts = {phase: sum(t.phase == phase for t in trials) for phase in ("Succeeded", "Failed", "Pruned")}
    running = sum(t.phase not in ENDED for t in trials)
    done = len(trials) >= spec.trials and not running
    top = best(spec, trials)
    best_trial = None
    if top is not None and top.objective is not None:
        best_trial = BestTrial(
            number=top.number, name=top.name, parameters=top.parameters, objective=top.objective,
            output=outputs.get(top.name),
        )  # fmt: skip
    metric = spec.objective.metric
    if not done:
        phase, reason = "Running", "TrialsRunning"
        message = f"{len(trials)} of {spec.trials} trials started, {running} running"
    elif best_trial is not None:
        phase, reason = "Succeeded", "BestTrialFound"
        message = f"{best_trial.name} is best: {metric} {best_trial.objective:g} with {best_trial.parameters}"
    else:
        phase, reason = "Failed", "NoTrialSucceeded"
        message = f"every trial failed or was pruned ({counts['Failed']} failed, {counts['Pruned']} pruned)"
    conditions = phase_conditions(previous.conditions, phase, reason, message, generation=generation, now=now)
    return FineTuneSweepStatus(
        phase=phase, observed_generation=generation, conditions=conditions, trials=trials,
        best_trial=best_trial, succeeded=counts["Succeeded"], failed=counts["Failed"],
        pruned=counts["Pruned"], running=running,
    )  # fmt: skip
