"""The promotion gate (deeptune.status.promotion): each rule's bound, lower-is-better metrics, missing
scores named with the field to fix, and what is served when a run misses."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from deeptune.api.finetunejob import EvalResults
from deeptune.api.modeldeployment import (
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    PromotionSpec,
    PromotionStatus,
    ResolvedModel,
)
from deeptune.status import promotion
from deeptune.status.modeldeployment import Waiting

NOW = "2026-12-04T12:00:00Z"


def rules(*entries: dict[str, Any], beat_served: bool = False) -> PromotionSpec:
    return PromotionSpec.model_validate({"rules": list(entries), "beatServed": beat_served})


def run(
    name: str, fine_tuned: dict[str, float], baseline: dict[str, float] | None = None
) -> promotion.Candidate:
    model = ResolvedModel(fine_tune_job=name, fine_tune_job_uid=f"uid-{name}")
    return promotion.Candidate(model, EvalResults(fine_tuned=fine_tuned, baseline=baseline))


def test_a_run_that_beats_its_base_model_by_the_margin_passes() -> None:
    verdict = promotion.judge(
        rules({"metric": "exactMatch", "minImprovement": 0.3}),
        run("a", {"exactMatch": 0.9}, {"exactMatch": 0.1}),
        None,
    )
    assert verdict.passed
    (check,) = verdict.checks
    assert check.required == pytest.approx(0.4)
    assert check.shortfall is None
    assert verdict.served_scores == {"exactMatch": 0.9}


def test_a_preference_run_is_gated_on_how_it_ranks_pairs() -> None:
    gate = rules({"metric": "preferenceAccuracy", "threshold": 0.8, "minImprovement": 0.2})
    assert promotion.judge(
        gate, run("a", {"preferenceAccuracy": 0.95}, {"preferenceAccuracy": 0.5}), None
    ).passed
    missed = promotion.judge(gate, run("b", {"preferenceAccuracy": 0.6}, {"preferenceAccuracy": 0.5}), None)
    assert not missed.passed


def test_a_run_short_of_the_margin_fails_by_how_much_it_missed() -> None:
    verdict = promotion.judge(
        rules({"metric": "exactMatch", "minImprovement": 0.3}),
        run("a", {"exactMatch": 0.2}, {"exactMatch": 0.1}),
        None,
    )
    assert not verdict.passed
    assert verdict.checks[0].shortfall == pytest.approx(0.2)
    (missed,) = promotion.shortfalls(verdict)
    assert missed == "exactMatch 0.2 missed the required 0.4 by 0.2 (base model 0.1)"


def test_perplexity_must_go_down_by_the_margin_and_stay_under_the_threshold() -> None:
    gate = rules({"metric": "perplexity", "minImprovement": 2.0, "threshold": 10.0})
    assert promotion.judge(gate, run("a", {"perplexity": 8.0}, {"perplexity": 12.0}), None).passed
    worse = promotion.judge(gate, run("b", {"perplexity": 11.0}, {"perplexity": 14.0}), None)
    assert not worse.passed  # 3 better than base, but above the threshold of 10
    assert worse.checks[0].required == 10.0
    assert worse.checks[0].shortfall == pytest.approx(1.0)
    higher = promotion.judge(gate, run("c", {"perplexity": 9.5}, {"perplexity": 10.0}), None)
    assert higher.checks[0].required == 8.0 and not higher.passed  # base 10 - 2: the stricter bound


def test_every_rule_must_pass() -> None:
    gate = rules({"metric": "exactMatch", "threshold": 0.5}, {"metric": "bleu", "threshold": 30})
    verdict = promotion.judge(gate, run("a", {"exactMatch": 0.8, "bleu": 12.0}), None)
    assert [c.passed for c in verdict.checks] == [True, False]
    assert not verdict.passed


def test_missing_scores_name_the_field_of_the_run_to_change() -> None:
    gate = rules({"metric": "rouge", "threshold": 0.2}, {"metric": "exactMatch", "minImprovement": 0.1})
    verdict = promotion.judge(gate, run("a", {"exactMatch": 0.5}), None)
    assert promotion.shortfalls(verdict) == [
        "no rouge score: add rouge to the run's evaluation.metrics",
        "no base-model exactMatch score: set the run's evaluation.baseline to true",
    ]


def test_beat_served_compares_with_the_scores_of_the_run_served_now() -> None:
    gate = rules({"metric": "exactMatch", "threshold": 0.5}, beat_served=True)
    verdict = promotion.judge(gate, run("b", {"exactMatch": 0.7}), {"exactMatch": 0.8})
    assert not verdict.passed
    assert verdict.checks[0].served == 0.8 and verdict.checks[0].required == 0.8
    assert verdict.served_scores == {"exactMatch": 0.8}  # still the served run's
    assert promotion.judge(
        rules({"metric": "exactMatch", "threshold": 0.5}), run("b", {"exactMatch": 0.7}), {"exactMatch": 0.8}
    ).passed


def test_a_run_that_misses_does_not_replace_the_one_served() -> None:
    gate = rules({"metric": "exactMatch", "threshold": 0.5})
    served = run("a", {"exactMatch": 0.9})
    _, first = promotion.gate(gate, served, None, None)
    assert first is not None and first.passed
    model, verdict = promotion.gate(gate, run("b", {"exactMatch": 0.0}), served.model, first)
    assert model == served.model
    assert verdict is not None and not verdict.passed and verdict.fine_tune_job == "b"
    assert verdict.served_scores == {"exactMatch": 0.9}
    message = promotion.refusal(verdict, served.model)
    assert message == (
        "FineTuneJob b did not pass the promotion gate: exactMatch 0 missed the required 0.5 by 0.5;"
        " FineTuneJob a's model keeps serving"
    )
    better, verdict = promotion.gate(gate, run("c", {"exactMatch": 0.7}), served.model, verdict)
    assert better == run("c", {}).model and verdict is not None and verdict.passed


def test_a_first_run_that_misses_is_not_served_at_all() -> None:
    model, verdict = promotion.gate(
        rules({"metric": "exactMatch", "threshold": 0.5}), run("a", {"exactMatch": 0.1}), None, None
    )
    assert isinstance(model, Waiting) and model.reason == promotion.FAILED
    assert "nothing is served until a run passes" in model.message
    assert verdict is not None and not verdict.passed


def test_a_run_already_served_keeps_serving_under_a_stricter_rule() -> None:
    served = run("a", {"exactMatch": 0.6})
    model, verdict = promotion.gate(
        rules({"metric": "exactMatch", "threshold": 0.9}), served, served.model, None
    )
    assert model == served.model
    assert verdict is not None and not verdict.passed
    assert promotion.refusal(verdict, served.model).endswith(
        "it keeps serving until a run that passes replaces it"
    )


def test_a_verdict_stands_while_its_finetunejob_is_gone() -> None:
    served = run("a", {"exactMatch": 0.9})
    gate = rules({"metric": "exactMatch", "threshold": 0.5})
    _, verdict = promotion.gate(gate, served, None, None)
    gone = promotion.Candidate(served.model, None)
    assert promotion.gate(gate, gone, served.model, verdict) == (served.model, verdict)
    other = PromotionStatus(fine_tune_job="a", fine_tune_job_uid="an-earlier-run", passed=True)
    assert promotion.gate(gate, gone, served.model, other) == (served.model, None)


def test_the_promoted_condition_carries_the_verdict() -> None:
    previous = ModelDeploymentStatus(resolved_model=run("a", {}).model)
    _, verdict = promotion.gate(
        rules({"metric": "exactMatch", "threshold": 0.5}),
        run("b", {"exactMatch": 0.2}),
        previous.resolved_model,
        None,
    )
    status = promotion.with_verdict(ModelDeploymentStatus(), previous, verdict, 3, NOW)
    (condition,) = status.conditions
    assert (condition.type, condition.status, condition.reason) == (
        "Promoted",
        "False",
        "PromotionGateFailed",
    )
    assert "FineTuneJob a's model keeps serving" in condition.message
    assert promotion.with_verdict(status, previous, None, 3, NOW).conditions == []


def test_a_rule_needs_a_bound_and_a_gate_needs_a_finetunejob() -> None:
    with pytest.raises(ValidationError, match="set minImprovement"):
        rules({"metric": "exactMatch"})
    spec = {
        "model": {"merged": {"pvc": {"claimName": "m"}}},
        "promotion": {"rules": [{"metric": "bleu", "threshold": 1}]},
    }
    with pytest.raises(ValidationError, match="promotion judges a FineTuneJob's evaluation"):
        ModelDeploymentSpec.model_validate(spec)
