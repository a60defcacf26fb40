"""Generate the CustomResourceDefinitions from the pydantic models, so the two cannot disagree.

Pydantic emits JSON Schema (draft 2020-12); Kubernetes wants a structural OpenAPI v3.0 schema. The
conversion inlines `$ref`s, turns `Optional[X]` into X (absent means unset), maps int-or-string
unions and free-form objects to their Kubernetes extensions, and keeps descriptions (from the models'
docstrings) so `kubectl explain` documents every field.

Usage: `python -m deeptune.crdgen [--check] [OUT_DIR ...]` (default: `crds/` and the Helm chart's
copy in `charts/deeptune/files/crds/`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from pydantic import BaseModel

from deeptune.api import federatedfinetune, finetunejob, finetunesweep, modeldeployment
from deeptune.api.base import GROUP, VERSION

DEFAULT_OUT_DIRS = [Path("crds"), Path("charts/deeptune/files/crds")]
_KEPT_KEYS = {
    "description", "enum", "pattern", "default", "x-kubernetes-validations",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
}  # fmt: skip
JsonSchema = dict[str, Any]


def _resolve(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        merged = {**target, **siblings}
        if rules := _merge_validations(target, siblings):
            merged["x-kubernetes-validations"] = rules
        return _resolve(merged, defs)
    return node


def _merge_validations(*nodes: JsonSchema) -> list[dict[str, str]]:
    rules: list[dict[str, str]] = []
    for node in nodes:
        rules.extend(node.get("x-kubernetes-validations", []))
    return rules


def _is_free_form(value: Any) -> bool:
    """`dict[str, Any]` / JSON values: no fixed shape, so the API server must not prune them."""
    return value is True or value == {} or (isinstance(value, dict) and "JsonValue" in str(value))


def to_structural(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    """Convert one pydantic JSON Schema node into a Kubernetes structural schema node."""
    node = _resolve(node, defs)
    if "anyOf" in node:
        branches = [_resolve(b, defs) for b in node["anyOf"] if b.get("type") != "null"]
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        if len(branches) == 1:
            merged = to_structural({**branches[0], **outer}, defs)
            rules = _merge_validations(branches[0], outer)
            if rules:
                merged["x-kubernetes-validations"] = rules
            return merged
        types = {b.get("type") for b in branches}
        if types in ({"string", "integer"}, {"string", "integer", "number"}):
            return {"x-kubernetes-int-or-string": True, **_scalar_keys(outer)}
        raise ValueError(f"cannot express union {types} in a structural schema")

    if node.get("x-kubernetes-int-or-string"):
        return {"x-kubernetes-int-or-string": True, **_scalar_keys(node)}
    return {**_structure(node, defs), **_scalar_keys(node)}


def _structure(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    """The type-defining part of a node: its type and its children."""
    out: JsonSchema = {}
    kind = node.get("type")
    if kind == "object" or "properties" in node:
        out["type"] = "object"
        if "properties" in node:
            out["properties"] = {
                name: to_structural(child, defs) for name, child in node["properties"].items()
            }
            if node.get("required"):
                out["required"] = node["required"]
        elif _is_free_form(node.get("additionalProperties", True)):
            out["x-kubernetes-preserve-unknown-fields"] = True
        else:
            out["additionalProperties"] = to_structural(node["additionalProperties"], defs)
    elif kind == "array":
        out["type"] = "array"
        out["items"] = to_structural(node.get("items", {}), defs)
    elif kind is not None:
        out["type"] = kind
    else:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _scalar_keys(node: JsonSchema) -> JsonSchema:
    out: JsonSchema = {}
    if "const" in node:  # a one-value Literal: structural schemas say it as a one-value enum
        out["enum"] = [node["const"]]
    for key, value in node.items():
        if key == "default" and value is None:
            continue
        if key in _KEPT_KEYS:
            out[key] = value
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
    return out


def openapi_schema(model: type[BaseModel]) -> JsonSchema:
    """The structural schema of one model (spec or status)."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return to_structural(schema, schema.get("$defs", {}))


def crd_manifest(
    *,
    kind: str,
    plural: str,
    short_names: list[str],
    spec_model: type[BaseModel],
    status_model: type[BaseModel],
    printer_columns: list[dict[str, Any]],
) -> JsonSchema:
    """A complete apiextensions.k8s.io/v1 CustomResourceDefinition."""
    spec_schema = openapi_schema(spec_model)
    spec_schema.pop("description", None)
    status_schema = openapi_schema(status_model)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "deeptune"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["deeptune"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (spec_model.__doc__ or "").strip(),
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


RESOURCES: list[tuple[ModuleType, type[BaseModel], type[BaseModel]]] = [
    (finetunejob, finetunejob.FineTuneJobSpec, finetunejob.FineTuneJobStatus),
    (modeldeployment, modeldeployment.ModelDeploymentSpec, modeldeployment.ModelDeploymentStatus),
    (finetunesweep, finetunesweep.FineTuneSweepSpec, finetunesweep.FineTuneSweepStatus),
    (federatedfinetune, federatedfinetune.FederatedFineTuneSpec, federatedfinetune.FederatedFineTuneStatus),
]
"""Each resource's API module (KIND, PLURAL, SHORT_NAME, PRINTER_COLUMNS) and its spec and status."""


def all_crds() -> dict[str, JsonSchema]:
    """File name → CRD, for every DeepTune resource."""
    return {
        f"{module.PLURAL}.{GROUP}.yaml": crd_manifest(
            kind=module.KIND,
            plural=module.PLURAL,
            short_names=[module.SHORT_NAME],
            spec_model=spec,
            status_model=status,
            printer_columns=module.PRINTER_COLUMNS,
        )
        for module, spec, status in RESOURCES
    }


class _NoAliasDumper(yaml.SafeDumper):
    """Writes repeated rules out in full: YAML anchors would make the CRDs hard to read and review."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(crd: JsonSchema) -> str:
    header = "# Generated by `python -m deeptune.crdgen` from operator/deeptune/api. Do not edit.\n"
    return header + yaml.dump(crd, Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=True, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dirs", nargs="*", default=DEFAULT_OUT_DIRS, type=Path)
    parser.add_argument("--check", action="store_true", help="fail if the files are out of date")
    args = parser.parse_args(argv)
    stale: list[str] = []
    for name, crd in all_crds().items():
        for path in (out_dir / name for out_dir in args.out_dirs):
            _write_or_check(path, render(crd), args.check, stale)
    if stale:
        print(f"out of date: {', '.join(stale)}; run `python -m deeptune.crdgen`", file=sys.stderr)
        return 1
    return 0


def _write_or_check(path: Path, text: str, check: bool, stale: list[str]) -> None:
    if check:
        if not path.exists() or path.read_text() != text:
            stale.append(str(path))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
