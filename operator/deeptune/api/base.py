"""Building blocks shared by every DeepTune resource model.

The pydantic models are the single source of truth for field names, defaults and semantic checks.
The CRDs are generated from them (`deeptune.crdgen`), so CEL rules that the API server enforces are
declared here, next to the pydantic validator that enforces the same thing for the operator, the
trainer and users who validate a manifest offline.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP = "deeptune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Bounds on free-form strings and lists keep the API server's CEL cost estimate finite.
SHORT_TEXT = 253
LONG_TEXT = 4096


def cel(rule: str, message: str, *, field_path: str | None = None) -> JsonValue:
    """One `x-kubernetes-validations` entry (a CEL rule the API server checks at apply time)."""
    entry: dict[str, JsonValue] = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def cel_rules(*rules: JsonValue) -> ConfigDict:
    """A model config carrying CEL rules, for models whose fields constrain each other."""
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": list(rules)})


def unchanged(field: str) -> JsonValue:
    """A rule for the parent object that keeps an optional field as it was created: set, changed and
    removed alike are refused. (A rule on the field itself runs only when both versions have it.)"""
    same = f"(!has(self.{field}) || self.{field} == oldSelf.{field})"
    return cel(
        f"has(self.{field}) == has(oldSelf.{field}) && {same}",
        f"{field} is immutable: it shapes the trainer's pod, which cannot change once created; create a new"
        " resource (with a new name) to use different settings",
        field_path=f".{field}",
    )


def immutable(field: str) -> dict[str, JsonValue]:
    """Schema extra that makes a training-defining field immutable once the object exists."""
    return {
        "x-kubernetes-validations": [
            cel(
                "self == oldSelf",
                f"{field} is immutable: create a new resource (with a new name) to use different settings",
            )
        ]
    }


def nested_default() -> dict[str, JsonValue]:
    """Schema extra `default: {}` so the API server fills in the nested defaults users then see."""
    return {"default": {}}


class ApiModel(BaseModel):
    """Base of every spec/status model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase JSON form, without unset optional fields (what goes into Kubernetes)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def null_means_default(default: Any) -> BeforeValidator:
    """A field validator that reads `null` as the field's default, as the API server does: it prunes a
    null where the schema does not allow one and fills in the schema's default. For a field with a
    default that is not None: were null kept as None, `to_wire()` would drop it and whoever parsed the
    wire form (the trainer) would get the default instead of what the operator validated."""
    return BeforeValidator(lambda value: default if value is None else value)


def exactly_one(model: ApiModel, fields: tuple[str, ...]) -> None:
    """Validator helper for one-of groups; names the fields by their manifest (camelCase) names."""
    chosen = [name for name in fields if getattr(model, name) is not None]
    if len(chosen) != 1:
        wire = ", ".join(type(model).model_fields[name].alias or name for name in fields)
        raise ValueError(f"set exactly one of {wire} (found {len(chosen)})")


def _quantity_to_str(value: Any) -> Any:
    return str(value) if isinstance(value, int | float) else value


QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"
CPU_PATTERN = r"^[0-9]+(\.[0-9]+)?m?$"


def _int_or_string(pattern: str) -> WithJsonSchema:
    """The schema of an int-or-string quantity: the pattern checks strings and `minimum` integers (a
    pattern does not apply to numbers, so without it the API server would admit `-1`)."""
    schema: dict[str, JsonValue] = {"x-kubernetes-int-or-string": True, "pattern": pattern}
    return WithJsonSchema({**schema, "maxLength": 32, "minimum": 0})


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    Field(pattern=QUANTITY_PATTERN, max_length=32),
    _int_or_string(QUANTITY_PATTERN),
]
"""A Kubernetes resource quantity such as `4`, `500m` or `64Gi`."""

SCALE_PATTERN = r"^([0-9]+|([0-9]|[1-9][0-9]|100)%)$"

PodCountOrPercent = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    Field(pattern=SCALE_PATTERN, max_length=4),
    _int_or_string(SCALE_PATTERN),
]
"""A number of pods or a percentage of the replicas, such as `1` or `25%` (a Deployment's maxSurge)."""

CpuQuantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    Field(pattern=CPU_PATTERN, max_length=32),
    _int_or_string(CPU_PATTERN),
]
"""CPUs: whole, decimal or thousandths, such as `4`, `2.5` or `500m` (the pod's threads follow it)."""

Name = Annotated[str, Field(min_length=1, max_length=SHORT_TEXT)]

ObjectName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=SHORT_TEXT,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    ),
]
"""The name of a Kubernetes object (a DNS-1123 subdomain): lower-case letters, digits, `-` and `.`."""

ConfigKey = Annotated[str, Field(min_length=1, max_length=SHORT_TEXT, pattern=r"^[-._a-zA-Z0-9]+$")]
"""A key of a Secret or ConfigMap: letters, digits, `-`, `_` and `.`."""

QUALIFIED_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
"""A label or taint key: an optional DNS-subdomain prefix and `/`, then a name of at most 63 characters
(no backslashes, so that a CEL string can hold it as is)."""
QualifiedName = Annotated[str, Field(max_length=317, pattern=QUALIFIED_NAME.pattern)]

LabelValue = Annotated[str, Field(max_length=63, pattern=r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")]
"""A label or taint value: empty, or letters, digits, `-`, `_` and `.` between alphanumerics."""

ImageReference = Annotated[str, Field(min_length=1, max_length=LONG_TEXT, pattern=r"^[!-~]+$")]
"""A container image reference: printable ASCII without spaces, e.g. `ghcr.io/org/image:1.0`."""


def _check_relative_path(value: str) -> str:
    if value.startswith("/") or ".." in value.split("/"):
        raise ValueError("must be a relative path without '..' segments (it is resolved inside the volume)")
    return value


RelativePath = Annotated[
    str,
    AfterValidator(_check_relative_path),
    Field(
        max_length=LONG_TEXT,
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!self.startsWith('/') && !self.split('/').exists(s, s == '..')",
                    "must be a relative path without '..' segments (it is resolved inside the volume)",
                )
            ]
        },
    ),
]
"""A path inside a volume: relative, without `..` segments, so it cannot escape the claim."""


class PvcLocation(ApiModel):
    """A path inside a PersistentVolumeClaim."""

    claim_name: ObjectName
    """Name of the PersistentVolumeClaim in the resource's namespace."""
    path: RelativePath = ""
    """Path inside the claim (relative; empty means the claim's root)."""


class SecretKeyRef(ApiModel):
    """A reference to one key of a Secret in the same namespace; the value is never copied."""

    name: ObjectName
    key: ConfigKey = "token"


class ConfigMapKeyRef(ApiModel):
    """A reference to one key of a ConfigMap in the same namespace."""

    name: ObjectName
    key: ConfigKey


class ValueFrom(ApiModel):
    """Where an environment variable's value comes from: a Secret key or a ConfigMap key."""

    model_config = cel_rules(
        cel(
            "has(self.secretKeyRef) != has(self.configMapKeyRef)",
            "set exactly one of secretKeyRef or configMapKeyRef",
        )
    )

    secret_key_ref: SecretKeyRef | None = None
    config_map_key_ref: ConfigMapKeyRef | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ValueFrom:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("set exactly one of secretKeyRef or configMapKeyRef")
        return self


class EnvVar(ApiModel):
    """An extra environment variable for the workload's container."""

    model_config = cel_rules(
        cel("has(self.value) != has(self.valueFrom)", "set exactly one of value or valueFrom")
    )

    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$", max_length=SHORT_TEXT)]
    value: Annotated[str, Field(max_length=LONG_TEXT)] | None = None
    value_from: ValueFrom | None = None

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if (self.value is None) == (self.value_from is None):
            raise ValueError("set exactly one of value or valueFrom")
        return self


class LocalObjectReference(ApiModel):
    """A reference by name to an object in the same namespace (e.g. an image pull Secret)."""

    name: ObjectName


def _unique_names(items: list[Any]) -> list[Any]:
    names = [item.name for item in items]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"names must be unique (repeated: {', '.join(duplicates)})")
    return items


UNIQUE_NAMES = cel("self.all(x, self.exists_one(y, y.name == x.name))", "names must be unique")
"""Lists that a Deployment keeps as maps by name (env, imagePullSecrets): server-side apply refuses a
repeated name with an error that is not the spec's fault, so the spec refuses it first."""

EnvList = Annotated[
    list[EnvVar],
    Field(max_length=128, json_schema_extra={"x-kubernetes-validations": [UNIQUE_NAMES]}),
    AfterValidator(_unique_names),
]
"""Extra environment variables, each name once."""

PullSecrets = Annotated[
    list[LocalObjectReference],
    Field(max_length=16, json_schema_extra={"x-kubernetes-validations": [UNIQUE_NAMES]}),
    AfterValidator(_unique_names),
]
"""Image pull Secrets, each once."""


def _label_keys(labels: dict[str, str]) -> dict[str, str]:
    bad = sorted(key for key in labels if not QUALIFIED_NAME.fullmatch(key))  # `$` admits a final \n
    if bad:
        shown = ", ".join(repr(key) for key in bad)
        raise ValueError(f"keys must be label keys such as app.kubernetes.io/name (not: {shown})")
    return labels


Labels = Annotated[
    dict[str, LabelValue],
    Field(
        max_length=64,
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    f"self.all(k, k.size() <= 317 && k.matches('{QUALIFIED_NAME.pattern}'))",
                    "keys must be label keys such as app.kubernetes.io/name",
                )
            ]
        },
    ),
    AfterValidator(_label_keys),
]
"""Label keys and values, as a selector's matchLabels takes them."""


class LabelSelectorRequirement(ApiModel):
    """One expression of a label selector: the key's value In/NotIn the values, or the key Exists or not."""

    model_config = cel_rules(
        cel(
            "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
            "In and NotIn need values, Exists and DoesNotExist none",
        )
    )

    key: Annotated[str, Field(min_length=1, max_length=317, pattern=QUALIFIED_NAME.pattern)]
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: Annotated[list[LabelValue], Field(max_length=64)] | None = None

    @model_validator(mode="after")
    def _values_fit(self) -> LabelSelectorRequirement:
        if (self.operator in ("In", "NotIn")) != bool(self.values):
            raise ValueError("In and NotIn need values, Exists and DoesNotExist none")
        return self


class LabelSelector(ApiModel):
    """A Kubernetes label selector: every matchLabels pair and every expression must hold; `{}` selects
    everything."""

    match_labels: Labels | None = None
    match_expressions: Annotated[list[LabelSelectorRequirement], Field(max_length=16)] | None = None


class Toleration(ApiModel):
    """A Kubernetes toleration, so GPU nodes with taints can run the workload."""

    model_config = cel_rules(
        cel(
            "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
            "operator must be Exists when key is empty (it then tolerates every taint)",
        ),
        cel(
            "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            "value must be empty when operator is Exists",
            field_path=".value",
        ),
        cel(
            "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            "tolerationSeconds needs effect NoExecute",
            field_path=".tolerationSeconds",
        ),
    )

    key: QualifiedName | None = None
    operator: Literal["Exists", "Equal"] | None = None
    """`Equal` (the default) matches a taint's key and value; `Exists` its key alone."""
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None
    """How long a NoExecute taint is tolerated before the pod is evicted."""

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if not self.key and self.operator != "Exists":
            raise ValueError("operator must be Exists when key is empty (it then tolerates every taint)")
        if self.operator == "Exists" and self.value:
            raise ValueError("value must be empty when operator is Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


class NodeSelectorRequirement(ApiModel):
    """One expression on a node's labels: In/NotIn the values, Exists/DoesNotExist, or Gt/Lt one
    integer value."""

    model_config = cel_rules(
        cel(
            "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)"
            " || self.operator in ['Gt', 'Lt']",
            "In and NotIn need values, Exists and DoesNotExist none",
            field_path=".values",
        ),
        cel(
            "!(self.operator in ['Gt', 'Lt']) || (has(self.values) && size(self.values) == 1)",
            "Gt and Lt need exactly one value",
            field_path=".values",
        ),
    )

    key: Annotated[str, Field(min_length=1, max_length=317, pattern=QUALIFIED_NAME.pattern)]
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: Annotated[list[LabelValue], Field(max_length=64)] | None = None

    @model_validator(mode="after")
    def _values_fit(self) -> NodeSelectorRequirement:
        if self.operator in ("Gt", "Lt"):
            if len(self.values or []) != 1:
                raise ValueError("Gt and Lt need exactly one value")
        elif (self.operator in ("In", "NotIn")) != bool(self.values):
            raise ValueError("In and NotIn need values, Exists and DoesNotExist none")
        return self


class NodeFieldRequirement(ApiModel):
    """One expression on a node's fields: its name (the only field Kubernetes selects nodes by) In or
    NotIn one value."""

    key: Literal["metadata.name"]
    operator: Literal["In", "NotIn"]
    values: Annotated[list[ObjectName], Field(min_length=1, max_length=1)]


class NodeSelectorTerm(ApiModel):
    """Expressions on a node's labels and fields that must all hold."""

    match_expressions: Annotated[list[NodeSelectorRequirement], Field(max_length=16)] | None = None
    match_fields: Annotated[list[NodeFieldRequirement], Field(max_length=16)] | None = None


class NodeSelector(ApiModel):
    """Node selector terms, any one of which may match."""

    node_selector_terms: Annotated[list[NodeSelectorTerm], Field(min_length=1, max_length=16)]


class PreferredSchedulingTerm(ApiModel):
    """A node selector term the scheduler favours by its weight."""

    weight: Annotated[int, Field(ge=1, le=100)]
    preference: NodeSelectorTerm


class NodeAffinity(ApiModel):
    """Which nodes the pod must, or should preferably, run on."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    preferred_during_scheduling_ignored_during_execution: (
        Annotated[list[PreferredSchedulingTerm], Field(max_length=16)] | None
    ) = None


class PodAffinityTerm(ApiModel):
    """Pods (selected by labels, in some namespaces) that must share a topology domain with this pod,
    e.g. the same node (`kubernetes.io/hostname`) or zone (`topology.kubernetes.io/zone`)."""

    model_config = cel_rules(
        cel(
            "has(self.labelSelector) || ((!has(self.matchLabelKeys) || size(self.matchLabelKeys) == 0)"
            " && (!has(self.mismatchLabelKeys) || size(self.mismatchLabelKeys) == 0))",
            "matchLabelKeys and mismatchLabelKeys need a labelSelector",
        )
    )

    label_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    """Namespaces whose pods count, by label; with `namespaces` unset and this unset, the pod's own."""
    namespaces: Annotated[list[ObjectName], Field(max_length=16)] | None = None
    topology_key: Annotated[str, Field(min_length=1, max_length=317, pattern=QUALIFIED_NAME.pattern)]
    """The node label whose value defines the domain."""
    match_label_keys: Annotated[list[QualifiedName], Field(max_length=16)] | None = None
    mismatch_label_keys: Annotated[list[QualifiedName], Field(max_length=16)] | None = None

    @model_validator(mode="after")
    def _keys_need_selector(self) -> PodAffinityTerm:
        if self.label_selector is None and (self.match_label_keys or self.mismatch_label_keys):
            raise ValueError("matchLabelKeys and mismatchLabelKeys need a labelSelector")
        return self


class WeightedPodAffinityTerm(ApiModel):
    """A pod affinity term the scheduler favours by its weight."""

    weight: Annotated[int, Field(ge=1, le=100)]
    pod_affinity_term: PodAffinityTerm


class PodAffinity(ApiModel):
    """Pods this pod must, or should preferably, run near (or, as anti-affinity, away from)."""

    required_during_scheduling_ignored_during_execution: (
        Annotated[list[PodAffinityTerm], Field(max_length=16)] | None
    ) = None
    preferred_during_scheduling_ignored_during_execution: (
        Annotated[list[WeightedPodAffinityTerm], Field(max_length=16)] | None
    ) = None


class Affinity(ApiModel):
    """A Kubernetes pod affinity (core/v1 Affinity), written to the pod as given."""

    node_affinity: NodeAffinity | None = None
    pod_affinity: PodAffinity | None = None
    pod_anti_affinity: PodAffinity | None = None
    """Pods this pod must, or should preferably, not run near."""


class Condition(ApiModel):
    """A status condition, as the Kubernetes API conventions define it."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


def describe_validation_error(error: ValidationError, root: str = "spec") -> str:
    """One line per problem, each naming the field by its manifest path, e.g. `spec.method: ...`."""
    lines = []
    for problem in error.errors():
        path = ".".join([root, *(str(part) for part in problem["loc"])])
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {message}")
    return "; ".join(lines)
