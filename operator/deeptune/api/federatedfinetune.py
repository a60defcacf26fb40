"""The FederatedFineTune resource: one LoRA adapter trained by several sites whose rows never leave
their namespaces, averaged round by round by a coordinator (Flower, FedAvg).

Composition again: each site is an ordinary FineTuneJob in the site's namespace (its own status,
logs, data report and a copy of the final adapter), made from `template` with `federation` set; the
coordinator is a Job in the resource's namespace that serves the rounds and saves the average.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from deeptune.api.base import ApiModel, Condition, cel, cel_rules, describe_validation_error, immutable
from deeptune.api.finetunejob import (
    DNS_LABEL_PATTERN,
    DataSource,
    EvalResults,
    FineTuneJobSpec,
    OutputStatus,
)
from deeptune.api.finetunejob import parse_spec as parse_finetunejob_spec

KIND = "FederatedFineTune"
PLURAL = "federatedfinetunes"
SHORT_NAME = "fft"
MAX_SITES = 16
Phase = Literal["Running", "Succeeded", "Failed"]

UNIQUE_SITES_MESSAGE = "sites: each namespace may appear once"
TEMPLATE_FEDERATION_MESSAGE = (
    "template.federation is the operator's to set (each site's coordinator address): leave it out"
)
TEMPLATE_QUEUE_MESSAGE = (
    "template.queueName cannot hold a federation's sites: every site must run in each round, and a "
    "queue may admit one and hold another; leave it out"
)


class Site(ApiModel):
    """One institution's part: a namespace whose rows stay in it."""

    namespace: Annotated[str, Field(max_length=63, pattern=DNS_LABEL_PATTERN)]
    """Where the site's FineTuneJob runs, reading only this namespace's volumes."""
    source: DataSource | None = None
    """Where the site's rows are, in its namespace. Default: `template.dataset.source` (e.g. a claim
    of the same name in every site's namespace, each holding that site's own rows)."""


class FederatedFineTuneSpec(ApiModel):
    """Desired state of a FederatedFineTune."""

    model_config = cel_rules(
        cel("!has(self.template.federation)", TEMPLATE_FEDERATION_MESSAGE, field_path=".template.federation"),
        cel("!has(self.template.queueName)", TEMPLATE_QUEUE_MESSAGE, field_path=".template.queueName"),
    )

    template: Annotated[FineTuneJobSpec, Field(json_schema_extra=immutable("template"))]
    """Every site's FineTuneJob spec: model, method (lora or qlora), adapter shape, and the training of
    one round (`hyperparameters`: each round every site trains this many steps or epochs from the
    average). `dataset` says how every site prepares its rows; `output.pvc` names a claim that each
    site's namespace and this one have (sites keep a copy of the final adapter; the coordinator
    writes the average under `output.pvc.path`, default `<namespace>/<name>`)."""
    sites: Annotated[
        list[Site],
        Field(
            min_length=2,
            max_length=MAX_SITES,
            # Unique namespaces are the operator's check (InvalidSpec): as a CEL rule it costs over the
            # API server's budget, and a list keyed by namespace breaks `self == oldSelf` on status writes.
            json_schema_extra=immutable("sites"),
        ),
    ]
    rounds: Annotated[int, Field(ge=1, le=1000, json_schema_extra=immutable("rounds"))] = 3
    """Rounds of local training and averaging."""

    @model_validator(mode="after")
    def _federable(self) -> FederatedFineTuneSpec:
        namespaces = [site.namespace for site in self.sites]
        if len(set(namespaces)) != len(namespaces):
            raise ValueError(UNIQUE_SITES_MESSAGE)
        if self.template.federation is not None:
            raise ValueError(TEMPLATE_FEDERATION_MESSAGE)
        if self.template.queue_name:
            raise ValueError(TEMPLATE_QUEUE_MESSAGE)
        for index, site in enumerate(self.sites):
            try:
                parse_finetunejob_spec(site_spec(self.template, site, coordinator="coordinator.check:1"))
            except ValidationError as error:
                problem = describe_validation_error(error, root="template")
                raise ValueError(f"sites[{index}] ({site.namespace}) cannot run: {problem}") from None
        return self


def site_spec(template: FineTuneJobSpec, site: Site, coordinator: str) -> dict[str, Any]:
    """A site's FineTuneJob spec (wire form): the template with the site's rows and its coordinator."""
    spec = copy.deepcopy(template.to_wire())
    spec["federation"] = {"coordinator": coordinator}
    if site.source is not None:
        spec["dataset"]["source"] = site.source.to_wire()
    return spec


# --- status ---------------------------------------------------------------------------------


class SiteStatus(ApiModel):
    """A site as its FineTuneJob shows it."""

    namespace: str
    fine_tune_job: str
    phase: str | None = None
    """The FineTuneJob's phase."""
    eval_results: EvalResults | None = None
    """The final averaged adapter against the base model, on this site's own held-out rows."""
    message: str = ""


class CoordinatorStatus(ApiModel):
    """The coordinator's Job."""

    job_name: str
    phase: Literal["Running", "Succeeded", "Failed"] = "Running"
    message: str = ""


class FederatedFineTuneStatus(ApiModel):
    """Observed state of a FederatedFineTune, written only by the operator."""

    model_config = ConfigDict(extra="ignore")

    phase: Phase | None = None
    """Running until the coordinator and every site have ended; Succeeded when all succeeded;
    Failed as soon as one failed."""
    observed_generation: int | None = None
    conditions: list[Condition] = []
    """Ready (the averaged adapter is saved), Running and Failed, with a reason and message."""
    coordinator: CoordinatorStatus | None = None
    sites: list[SiteStatus] = []
    output: OutputStatus | None = None
    """Where the averaged adapter is (in this namespace), once the coordinator succeeded."""


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Rounds", "type": "integer", "jsonPath": ".spec.rounds"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def parse_spec(spec: dict[str, Any]) -> FederatedFineTuneSpec:
    """Validate a spec as it comes from Kubernetes (camelCase, possibly defaulted by the API server)."""
    return FederatedFineTuneSpec.model_validate(spec)
