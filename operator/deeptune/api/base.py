"""Building blocks shared by every DeepTune resource model.

The pydantic models are the single source of truth for field names, defaults and semantic checks.
The CRDs are generated from them (`deeptune.crdgen`), so CEL rules that the API server enforces are
declared here, next to the pydantic validator that enforces the same thing for the operator, the
trainer and users who validate a manifest offline.
"""

from __future__ import annotations

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


def exactly_one(model: ApiModel, fields: tuple[str, ...]) -> None:
    """Validator helper for one-of groups; names the fields by their manifest (camelCase) names."""
    chosen = [name for name in fields if getattr(model, name) is not None]
    if len(chosen) != 1:
        wire = ", ".join(type(model).model_fields[name].alias or name for name in fields)
        raise ValueError(f"set exactly one of {wire} (found {len(chosen)})")


def _quantity_to_str(value: Any) -> Any:
    return str(value) if isinstance(value, int | float) else value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$", max_length=32),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$",
        }
    ),
]
"""A Kubernetes resource quantity such as `4`, `500m` or `64Gi`."""

Name = Annotated[str, Field(min_length=1, max_length=SHORT_TEXT)]


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

    claim_name: Name
    """Name of the PersistentVolumeClaim in the resource's namespace."""
    path: RelativePath = ""
    """Path inside the claim (relative; empty means the claim's root)."""


class SecretKeyRef(ApiModel):
    """A reference to one key of a Secret in the same namespace; the value is never copied."""

    name: Name
    key: Name = "token"


class ConfigMapKeyRef(ApiModel):
    """A reference to one key of a ConfigMap in the same namespace."""

    name: Name
    key: Name


class ValueFrom(ApiModel):
    """Where an environment variable's value comes from."""

    secret_key_ref: SecretKeyRef | None = None
    config_map_key_ref: ConfigMapKeyRef | None = None


class EnvVar(ApiModel):
    """An extra environment variable for the workload's container."""

    model_config = cel_rules(
        cel("has(self.value) != has(self.valueFrom)", "set exactly one of value or valueFrom")
    )

    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$", max_length=SHORT_TEXT)]
    value: Annotated[str, Field(max_length=LONG_TEXT)] | None = None
    value_from: ValueFrom | None = None


class LocalObjectReference(ApiModel):
    """A reference by name to an object in the same namespace (e.g. an image pull Secret)."""

    name: Name


class Toleration(ApiModel):
    """A Kubernetes toleration, so GPU nodes with taints can run the workload."""

    key: Annotated[str, Field(max_length=SHORT_TEXT)] | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: Annotated[str, Field(max_length=SHORT_TEXT)] | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


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
