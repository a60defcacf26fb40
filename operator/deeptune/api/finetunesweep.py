"""The FineTuneSweep resource: a hyperparameter search whose trials are ordinary FineTuneJobs.

Composition, not a second trainer: each trial is a FineTuneJob the sweep owns (its own status, logs
and artifacts, servable by a ModelDeployment), made from `template` with the trial's values set at
the `parameters`' paths. Optuna chooses the values and stops trials whose validation loss trails.
"""

from __future__ import annotations

import copy
import math
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, JsonValue, ValidationError, field_validator, model_validator

from deeptune.api.base import (
    ApiModel,
    Condition,
    cel,
    cel_rules,
    describe_validation_error,
    immutable,
    nested_default,
)
from deeptune.api.finetunejob import FineTuneJobSpec, OutputStatus, Score
from deeptune.api.finetunejob import parse_spec as parse_finetunejob_spec

KIND = "FineTuneSweep"
PLURAL = "finetunesweeps"
SHORT_NAME = "fts"
MAX_TRIALS = 200
"""Trials a sweep may run: each is recorded in its status, which etcd caps at about 1.5 MB."""
MAX_EVALUATIONS = 100
"""Validation losses kept per trial (what the pruner compares trials by)."""

TunablePath = Literal[
    "hyperparameters.learningRate",
    "hyperparameters.epochs",
    "hyperparameters.maxSteps",
    "hyperparameters.perDeviceBatchSize",
    "hyperparameters.gradientAccumulationSteps",
    "hyperparameters.warmupRatio",
    "hyperparameters.weightDecay",
    "hyperparameters.scheduler",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "preference.beta",
    "distillation.temperature",
    "distillation.alpha",
]
"""The template fields a sweep may vary: those that change how a run learns, not what it learns from
or where it runs."""
OPTIONAL_SECTIONS = ("preference", "distillation")
"""Template sections that switch a method on: a parameter may tune them, never add them."""
LOWER_IS_BETTER: frozenset[str] = frozenset({"perplexity"})
TrialPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended", "Pruned"]
Phase = Literal["Running", "Succeeded", "Failed"]

PRUNER_NEEDS_EVALUATIONS = (
    "pruner compares trials by their validation loss during training: set "
    "template.evaluation.evalSteps, or remove pruner"
)
PRUNER_NOT_QUEUED = (
    "pruner stops a trial by suspending it, which a run queued in Kueue (template.queueName) cannot be: "
    "remove pruner or template.queueName"
)


class SearchParameter(ApiModel):
    """One template field to search over, and the values it may take."""

    model_config = cel_rules(
        # `values` holds numbers or strings, a list CEL cannot type: the operator checks it.
        cel(
            "self.type == 'categorical' ? !has(self.low) && !has(self.high)"
            " : has(self.low) && has(self.high) && self.low < self.high",
            "float and int parameters need low < high; categorical ones take values, not low and high",
        ),
        cel(
            "!has(self.log) || !self.log || (has(self.low) && self.low > 0)",
            "log sampling needs low above 0",
            field_path=".log",
        ),
    )

    path: TunablePath
    """The template field, e.g. `hyperparameters.learningRate`."""
    type: Literal["float", "int", "categorical"] = "float"
    low: float | None = None
    """Smallest value (float and int)."""
    high: float | None = None
    """Largest value, included (float and int)."""
    log: bool = False
    """Sample on a log scale (learning rates): as many trials between 1e-5 and 1e-4 as between 1e-4
    and 1e-3."""
    step: Annotated[float, Field(gt=0)] | None = None
    """Only multiples of this above `low` (float and int; not with log)."""
    values: Annotated[list[JsonValue], Field(min_length=1, max_length=100)] | None = None
    """The choices of a categorical parameter (numbers or strings)."""

    @field_validator("values")
    @classmethod
    def _scalars(cls, values: list[JsonValue] | None) -> list[JsonValue] | None:
        if values is not None and not all(isinstance(v, str | int | float | bool) for v in values):
            raise ValueError("values must be numbers or strings")
        return values

    @model_validator(mode="after")
    def _range(self) -> SearchParameter:
        if self.type == "categorical":
            if self.values is None or self.low is not None or self.high is not None:
                raise ValueError("a categorical parameter takes values, not low and high")
            return self
        if self.low is None or self.high is None or self.values is not None:
            raise ValueError(f"a {self.type} parameter takes low and high, not values")
        if not self.low < self.high:
            raise ValueError("low must be below high")
        if self.log and self.low <= 0:
            raise ValueError("log sampling needs low above 0")
        if self.log and self.step is not None:
            raise ValueError("step cannot be combined with log")
        if self.type == "int" and not all(
            float(v).is_integer() for v in (self.low, self.high, self.step or 1)
        ):
            raise ValueError("an int parameter needs whole numbers for low, high and step")
        return self

    def extremes(self) -> list[JsonValue]:
        """The values that bound what a trial may get: every spec built from one must be valid."""
        if self.values is not None:
            return list(self.values)
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class Objective(ApiModel):
    """What a trial is judged by: one of the fine-tuned model's scores in its `evalResults`."""

    metric: Score
    """E.g. `exactMatch`, `rouge`, `perplexity`, `preferenceAccuracy`. The template's
    `evaluation.metrics` must list it (the preference scores come with `preference`)."""
    direction: Literal["maximize", "minimize"] | None = None
    """Default: minimize perplexity, maximize every other score."""

    @property
    def maximize(self) -> bool:
        if self.direction is not None:
            return self.direction == "maximize"
        return self.metric not in LOWER_IS_BETTER

    def better(self, value: float, than: float) -> bool:
        return value > than if self.maximize else value < than


class Sampler(ApiModel):
    """How Optuna picks each trial's values from what earlier trials scored."""

    type: Literal["tpe", "random"] = "tpe"
    """`tpe` (Optuna's default) after `startupTrials` random ones; `random` throughout."""
    startup_trials: Annotated[int, Field(ge=1, le=MAX_TRIALS)] = 4
    """Random trials before TPE models the scores."""
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    """Trial n is sampled with seed + n from the trials before it, so a sweep is reproducible."""


class Pruner(ApiModel):
    """Optuna's median rule: a trial whose validation loss at an evaluation is worse than the median of
    finished trials' at that step is stopped (suspended: its checkpoints stay)."""

    startup_trials: Annotated[int, Field(ge=1, le=MAX_TRIALS)] = 2
    """Trials that must finish before any is pruned."""
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    """Steps a trial trains before it can be pruned."""


class FineTuneSweepSpec(ApiModel):
    """Desired state of a FineTuneSweep."""

    model_config = cel_rules(
        cel(
            "!has(self.pruner) || has(self.template.evaluation.evalSteps)",
            PRUNER_NEEDS_EVALUATIONS,
            field_path=".pruner",
        ),
        cel(
            "!has(self.pruner) || !has(self.template.queueName)",
            PRUNER_NOT_QUEUED,
            field_path=".pruner",
        ),
        cel(
            "self.parameters.all(p, self.parameters.exists_one(q, q.path == p.path))",
            "each parameter path may appear once",
            field_path=".parameters",
        ),
    )

    template: Annotated[FineTuneJobSpec, Field(json_schema_extra=immutable("template"))]
    """Every trial's FineTuneJob spec, but for the parameters. Each trial writes its artifacts under
    `output.pvc.path`/<trial name>."""
    parameters: Annotated[
        list[SearchParameter], Field(min_length=1, max_length=16, json_schema_extra=immutable("parameters"))
    ]
    objective: Annotated[Objective, Field(json_schema_extra=immutable("objective"))]
    trials: Annotated[int, Field(ge=1, le=MAX_TRIALS)] = 10
    """How many trials to run in all (may be raised to search further)."""
    parallelism: Annotated[int, Field(ge=1, le=MAX_TRIALS)] = 1
    """Trials that run at once."""
    sampler: Annotated[Sampler, Field(json_schema_extra={**nested_default(), **immutable("sampler")})] = (
        Field(default_factory=Sampler)
    )
    pruner: Pruner | None = None
    """Off unless given; needs `template.evaluation.evalSteps`."""

    @model_validator(mode="after")
    def _searchable(self) -> FineTuneSweepSpec:
        paths = [p.path for p in self.parameters]
        if len(set(paths)) != len(paths):
            raise ValueError("each parameter path may appear once")
        if self.pruner is not None and self.template.evaluation.eval_steps is None:
            raise ValueError(PRUNER_NEEDS_EVALUATIONS)
        if self.pruner is not None and self.template.queue_name:
            raise ValueError(PRUNER_NOT_QUEUED)
        metric = self.objective.metric
        if metric.startswith("preference") and self.template.preference is None:
            raise ValueError(f"objective.metric {metric} scores preference pairs: set template.preference")
        if not metric.startswith("preference") and metric not in self.template.evaluation.metrics:
            raise ValueError(
                f"objective.metric {metric} is not among template.evaluation.metrics: add it there"
            )
        for index, parameter in enumerate(self.parameters):
            _check_values(self.template, index, parameter)
        return self


def trial_spec(template: FineTuneJobSpec, values: dict[str, JsonValue]) -> dict[str, Any]:
    """A trial's FineTuneJob spec (wire form): the template with each path set to its value."""
    spec = copy.deepcopy(template.to_wire())
    for path, value in values.items():
        section, field = path.split(".")
        spec.setdefault(section, {})[field] = value
    return spec


def _check_values(template: FineTuneJobSpec, index: int, parameter: SearchParameter) -> None:
    """Every value the parameter may take must make a valid FineTuneJob (e.g. lora.r 0 does not)."""
    where = f"parameters[{index}]"
    section = parameter.path.split(".")[0]
    if section in OPTIONAL_SECTIONS and getattr(template, section) is None:
        raise ValueError(f"{where}.path {parameter.path} tunes template.{section}, which is not set")
    for value in parameter.extremes():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: {value} is not a number a trial can take")
        try:
            parse_finetunejob_spec(trial_spec(template, {parameter.path: value}))
        except ValidationError as error:
            problem = describe_validation_error(error, root="template")
            raise ValueError(
                f"{where}: {parameter.path} = {value!r} makes an invalid trial: {problem}"
            ) from None


# --- status ---------------------------------------------------------------------------------


class Evaluation(ApiModel):
    """A trial's validation loss at a training step, as the sweep saw it."""

    step: int
    eval_loss: float


class Trial(ApiModel):
    """One trial: its FineTuneJob, the values it got, and how it did."""

    number: int
    name: str
    """The FineTuneJob."""
    parameters: dict[str, JsonValue]
    """By template path."""
    phase: TrialPhase
    objective: float | None = None
    """The objective metric of the fine-tuned model, once the trial succeeded."""
    evaluations: list[Evaluation] = []
    """Validation losses during training (with `template.evaluation.evalSteps`)."""
    message: str = ""
    """Why it failed or was pruned."""


class BestTrial(ApiModel):
    """The succeeded trial with the best objective (the lower number on a tie)."""

    number: int
    name: str
    """Its FineTuneJob: what a ModelDeployment's `model.fineTuneJobRef` names to serve it."""
    parameters: dict[str, JsonValue]
    objective: float
    output: OutputStatus | None = None


class FineTuneSweepStatus(ApiModel):
    """Observed state of a FineTuneSweep, written only by the operator."""

    model_config = ConfigDict(extra="ignore")

    phase: Phase | None = None
    """Running until every trial has ended; then Succeeded (a best trial exists) or Failed."""
    observed_generation: int | None = None
    conditions: list[Condition] = []
    """Ready (a best trial is final), Running and Failed, each with a reason and message."""
    trials: list[Trial] = []
    best_trial: BestTrial | None = None
    """The best so far while running; final once the sweep succeeded."""
    succeeded: int = 0
    failed: int = 0
    pruned: int = 0
    running: int = 0
    """Trials not yet ended (pending, running or suspended)."""


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Succeeded", "type": "integer", "jsonPath": ".status.succeeded"},
    {"name": "Trials", "type": "integer", "jsonPath": ".spec.trials"},
    {"name": "Best", "type": "string", "jsonPath": ".status.bestTrial.name"},
    {"name": "Objective", "type": "number", "jsonPath": ".status.bestTrial.objective"},
    {"name": "Metric", "type": "string", "jsonPath": ".spec.objective.metric", "priority": 1},
    {"name": "Failed", "type": "integer", "jsonPath": ".status.failed", "priority": 1},
    {"name": "Pruned", "type": "integer", "jsonPath": ".status.pruned", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def parse_spec(spec: dict[str, Any]) -> FineTuneSweepSpec:
    """Validate a spec as it comes from Kubernetes (camelCase, possibly defaulted by the API server)."""
    return FineTuneSweepSpec.model_validate(spec)
