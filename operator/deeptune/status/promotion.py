"""The promotion gate: whether the run a ModelDeployment's `fineTuneJobRef` names may be served.

A run is judged on the scores its FineTuneJob reports (`status.evalResults`) against
`spec.promotion`'s rules. One that passes is served; one that misses is not rolled out, and the run
served before it, if any, keeps serving. Pure functions: the reconciler hands in what the cache holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from deeptune.api.finetunejob import EvalResults, MetricScores
from deeptune.api.modeldeployment import (
    ModelDeploymentStatus,
    PromotionCheck,
    PromotionRule,
    PromotionSpec,
    PromotionStatus,
    ResolvedModel,
)
from deeptune.status.conditions import set_conditions
from deeptune.status.modeldeployment import Waiting

PROMOTED = "Promoted"
"""The condition type that carries the gate's verdict."""
PASSED = "PromotionGatePassed"
FAILED = "PromotionGateFailed"


@dataclass(frozen=True)
class Candidate:
    """A run the spec references now, with the scores its FineTuneJob reports (None when that
    FineTuneJob is gone or is another run of the same name)."""

    model: ResolvedModel
    results: EvalResults | None


def check(rule: PromotionRule, results: EvalResults | None, served: MetricScores | None) -> PromotionCheck:
    """One rule on one run: the strictest of its bounds (threshold, base + minImprovement, the served
    run's score) is the score it needs."""
    metric = rule.metric
    sign = -1 if rule.lower_is_better else 1
    fine_tuned = results.fine_tuned.get(metric) if results else None
    baseline = (results.baseline or {}).get(metric) if results else None
    served_score = (served or {}).get(metric)
    bounds = [bound for bound in (rule.threshold, served_score) if bound is not None]
    if rule.min_improvement is not None:
        if baseline is None:
            return PromotionCheck(metric=metric, passed=False, fine_tuned=fine_tuned, served=served_score)
        bounds.append(baseline + sign * rule.min_improvement)
    required = max(bounds, key=lambda bound: sign * bound)
    scores = {"fine_tuned": fine_tuned, "baseline": baseline, "served": served_score, "required": required}
    if fine_tuned is None:
        return PromotionCheck(metric=metric, passed=False, **scores)
    missed_by = sign * (required - fine_tuned)
    return PromotionCheck(metric=metric, passed=missed_by <= 0, shortfall=max(missed_by, 0) or None, **scores)


def judge(spec: PromotionSpec, candidate: Candidate, served: MetricScores | None) -> PromotionStatus:
    """Every rule on the candidate run; `served` is the scores of the run served now, if another."""
    against = served if spec.beat_served else None
    checks = [check(rule, candidate.results, against) for rule in spec.rules]
    passed = all(c.passed for c in checks)
    return PromotionStatus(
        fine_tune_job=candidate.model.fine_tune_job or "",
        fine_tune_job_uid=candidate.model.fine_tune_job_uid,
        passed=passed,
        checks=checks,
        served_scores=candidate.results.fine_tuned if passed and candidate.results else served,
    )


def gate(
    spec: PromotionSpec | None,
    candidate: Candidate,
    served: ResolvedModel | None,
    prior: PromotionStatus | None,
) -> tuple[ResolvedModel | Waiting, PromotionStatus | None]:
    """What to serve, and the verdict to report. A run judged before keeps its verdict while its
    FineTuneJob is gone or re-running; a run already served keeps serving whatever the verdict (a
    stricter rule does not take down the only model), and one that misses never replaces it."""
    if spec is None:
        return candidate.model, None
    uid = candidate.model.fine_tune_job_uid
    if candidate.results is None:  # nothing to judge now: the verdict given when there was
        return candidate.model, prior if prior is not None and prior.fine_tune_job_uid == uid else None
    another_served = served is not None and served.fine_tune_job_uid != uid
    served_scores = prior.served_scores if prior is not None and another_served else None
    verdict = judge(spec, candidate, served_scores)
    if verdict.passed:
        return candidate.model, verdict
    if not another_served:
        verdict = verdict.model_copy(update={"served_scores": prior.served_scores if prior else None})
        return (candidate.model if served is not None else Waiting(FAILED, refusal(verdict, None))), verdict
    assert served is not None
    return served, verdict


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def shortfalls(verdict: PromotionStatus) -> list[str]:
    """Each missed rule in words, saying how far off the run was or what score it lacked."""
    missed = []
    for c in verdict.checks:
        if c.passed:
            continue
        if c.fine_tuned is None:
            missed.append(f"no {c.metric} score: add {c.metric} to the run's evaluation.metrics")
        elif c.required is None:
            missed.append(f"no base-model {c.metric} score: set the run's evaluation.baseline to true")
        else:
            missed.append(
                f"{c.metric} {_number(c.fine_tuned)} missed the required {_number(c.required)}"
                f" by {_number(c.shortfall)}"
                + (f" (base model {_number(c.baseline)})" if c.baseline is not None else "")
            )
    return missed


def refusal(verdict: PromotionStatus, served: ResolvedModel | None) -> str:
    """The Promoted=False message: which rules missed, and what is served instead."""
    instead = (
        f"FineTuneJob {served.fine_tune_job}'s model keeps serving"
        if served is not None and served.fine_tune_job_uid != verdict.fine_tune_job_uid
        else "it keeps serving until a run that passes replaces it"
        if served is not None
        else "nothing is served until a run passes"
    )
    missed = "; ".join(shortfalls(verdict))
    return f"FineTuneJob {verdict.fine_tune_job} did not pass the promotion gate: {missed}; {instead}"


def approval(verdict: PromotionStatus) -> str:
    """The Promoted=True message: each metric against what it needed."""
    scores = ", ".join(
        f"{c.metric} {_number(c.fine_tuned)} (needed {_number(c.required)})" for c in verdict.checks
    )
    return f"FineTuneJob {verdict.fine_tune_job} passed the promotion gate: {scores}"


def with_verdict(
    status: ModelDeploymentStatus,
    previous: ModelDeploymentStatus,
    verdict: PromotionStatus | None,
    generation: int | None,
    now: str,
) -> ModelDeploymentStatus:
    """The status with the gate's verdict and its `Promoted` condition (neither without a gate)."""
    others = [c for c in status.conditions if c.type != PROMOTED]
    if verdict is None:
        return status.model_copy(update={"promotion": None, "conditions": others})
    message = approval(verdict) if verdict.passed else refusal(verdict, previous.resolved_model)
    wanted = {PROMOTED: (verdict.passed, PASSED if verdict.passed else FAILED, message)}
    promoted = set_conditions(previous.conditions, wanted, generation, now)
    return status.model_copy(update={"promotion": verdict, "conditions": others + promoted})
