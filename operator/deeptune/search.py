"""Optuna as a FineTuneSweep's sampler and pruner, with the sweep's status as its only storage.

Each decision builds an in-memory study from the trials the status records (finished ones with their
scores, running ones as running) and asks it one question: the next trial's values, or whether a
running trial should stop. Nothing lives in the operator between reconciles, so a restarted operator
or another replica decides the same; trial n is sampled with seed + n, so a sweep is reproducible.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState, create_trial
from pydantic import JsonValue

from deeptune.api.finetunesweep import FineTuneSweepSpec, SearchParameter, Trial

STATES: dict[str, TrialState] = {
    "Succeeded": TrialState.COMPLETE,
    "Failed": TrialState.FAIL,
    "Pruned": TrialState.PRUNED,
}
"""Optuna's state of a trial by its phase; any other phase is a trial still under way (RUNNING)."""


def distribution(parameter: SearchParameter) -> BaseDistribution:
    if parameter.values is not None:
        return CategoricalDistribution(parameter.values)  # type: ignore[arg-type]  # scalars, checked
    assert parameter.low is not None and parameter.high is not None
    if parameter.type == "int":
        step = int(parameter.step or 1)
        return IntDistribution(int(parameter.low), int(parameter.high), log=parameter.log, step=step)
    return FloatDistribution(parameter.low, parameter.high, log=parameter.log, step=parameter.step)


def search_space(spec: FineTuneSweepSpec) -> dict[str, BaseDistribution]:
    return {parameter.path: distribution(parameter) for parameter in spec.parameters}


def next_values(spec: FineTuneSweepSpec, trials: list[Trial], number: int) -> dict[str, JsonValue]:
    """The values trial `number` runs with, given every trial before it."""
    seed = spec.sampler.seed + number
    sampler: optuna.samplers.BaseSampler
    if spec.sampler.type == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        with warnings.catch_warnings():  # constant_liar is "experimental" (since Optuna 2.8)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=spec.sampler.startup_trials, constant_liar=True
            )
    direction = "maximize" if spec.objective.maximize else "minimize"
    study = optuna.create_study(direction=direction, sampler=sampler)
    space = search_space(spec)
    for frozen in _frozen(trials, space):
        study.add_trial(frozen)
    return dict(study.ask(space).params)


def should_prune(spec: FineTuneSweepSpec, trial: Trial, trials: list[Trial]) -> bool:
    """Optuna's median rule on validation loss (lower is better, whatever the objective): the
    trial's best loss so far is worse than the median of succeeded trials' at its latest step."""
    if spec.pruner is None or not trial.evaluations:
        return False
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=spec.pruner.startup_trials, n_warmup_steps=spec.pruner.warmup_steps
    )
    study = optuna.create_study(direction="minimize", pruner=pruner)
    running = _losses(trial)
    for finished in trials:
        if finished.phase == "Succeeded" and finished.evaluations:
            losses = _losses(finished)
            aligned = {**_carried(losses, running), **losses}
            study.add_trial(create_trial(value=losses[max(losses)], intermediate_values=aligned))
    study.add_trial(create_trial(state=TrialState.RUNNING, intermediate_values=running))
    return bool(pruner.prune(study, study.trials[-1]))


def _carried(losses: dict[int, float], steps: Iterable[int]) -> dict[int, float]:
    """A finished trial's loss at each of `steps`: the last one it reported at or before the step.

    The operator sees evaluations when it samples a trainer's metrics, so two trials' recorded steps
    need not meet (Optuna's median compares at equal steps only). An earlier loss is no lower than a
    later one would have been, so this errs toward keeping the running trial."""
    carried = {}
    for step in steps:
        earlier = [recorded for recorded in losses if recorded <= step]
        if earlier:
            carried[step] = losses[max(earlier)]
    return carried


def best(spec: FineTuneSweepSpec, trials: list[Trial]) -> Trial | None:
    """The succeeded trial with the best objective; the lower number wins a tie."""
    found: Trial | None = None
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.phase != "Succeeded" or trial.objective is None:
            continue
        if found is None or spec.objective.better(trial.objective, found.objective):  # type: ignore[arg-type]
            found = trial
    return found


def _losses(trial: Trial) -> dict[int, float]:
    return {evaluation.step: evaluation.eval_loss for evaluation in trial.evaluations}


def _frozen(trials: list[Trial], space: dict[str, BaseDistribution]) -> Iterator[FrozenTrial]:
    """The recorded trials as Optuna's, skipping any whose values lie outside the space."""
    for trial in trials:
        state = STATES.get(trial.phase, TrialState.RUNNING)
        if state is TrialState.COMPLETE and trial.objective is None:
            state = TrialState.FAIL
        try:
            yield create_trial(
                state=state,
                params={path: trial.parameters[path] for path in space},
                distributions=space,
                value=trial.objective if state is TrialState.COMPLETE else None,
            )
        except (KeyError, ValueError):
            continue
