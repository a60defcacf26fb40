"""Write docs/reference.md, the field reference of every DeepTune resource, from the CRDs in crds/.

The CRDs are generated from the pydantic models (`python -m deeptune.crdgen`), so the reference says
what the API server enforces: types, defaults, enums, bounds, patterns, CEL rules, printer columns.

Usage: `python scripts/gen_reference.py [--check] [--out docs/reference.md]`; --check exits 1 when
the file is out of date instead of writing it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT / "crds"
Node = dict[str, Any]
EMBEDDED = {
    ("FineTuneSweep", "spec.template"): "FineTuneJob",
    ("FederatedFineTune", "spec.template"): "FineTuneJob",
}
"""Fields that hold another resource's whole spec: listed once, as a link to that resource's fields
(and rules), not field by field again."""


def cell(text: Any) -> str:
    """Text fit for a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def code(value: Any) -> str:
    text = value if isinstance(value, str) and value else json.dumps(value, ensure_ascii=False)
    return f"`{cell(text)}`"


def type_of(node: Node) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int-or-string"
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return "object (free-form)" if node.get("type") == "object" else "any"
    if node.get("type") == "array":
        return f"array of {type_of(node['items'])}"
    if isinstance(node.get("additionalProperties"), dict):
        return f"map of {type_of(node['additionalProperties'])}"
    return str(node.get("type", "any"))


def constraints(node: Node, required: bool) -> list[str]:
    out = ["required"] if required else []
    if "enum" in node:
        out.append("one of " + ", ".join(code(v) for v in node["enum"]))
    for bound, inclusive, exclusive in (("minimum", "≥", ">"), ("maximum", "≤", "<")):
        if bound in node:
            strict = node.get(f"exclusive{bound.title()}")
            out.append(f"{exclusive if strict else inclusive} {node[bound]}")
    for what, low, high in (("length", "minLength", "maxLength"), ("items", "minItems", "maxItems")):
        if low in node and high in node:
            out.append(f"{what} {node[low]}–{node[high]}")
        elif low in node or high in node:
            out.append(f"{what} {'≥' if low in node else '≤'} {node.get(low, node.get(high))}")
    if "maxProperties" in node:
        out.append(f"keys ≤ {node['maxProperties']}")
    if "pattern" in node:
        out.append(f"pattern {code(node['pattern'])}")
    if any(rule["rule"] == "self == oldSelf" for rule in node.get("x-kubernetes-validations", [])):
        out.append("immutable")
    return out


def walk(node: Node, path: str, stop: frozenset[str] = frozenset()) -> Iterator[tuple[str, Node, bool]]:
    """(path, node, required) for every schema node below `node`, depth first in schema order;
    list items get the path `field[]`, map values `field.<key>`. Nodes at `stop` paths are yielded
    without what is below them."""
    for name, child in node.get("properties", {}).items():
        yield f"{path}.{name}", child, name in node.get("required", [])
        if f"{path}.{name}" not in stop:
            yield from walk(child, f"{path}.{name}", stop)
    for key, suffix in (("items", "[]"), ("additionalProperties", ".<key>")):
        if isinstance(node.get(key), dict):
            yield f"{path}{suffix}", node[key], False
            yield from walk(node[key], f"{path}{suffix}", stop)


def rules(root: Node, path: str, stop: frozenset[str]) -> Iterator[tuple[str, Node]]:
    """(field path, rule) for every CEL rule at or below `root` (at a `stop` path, its own only)."""
    for node_path, node, _ in [(path, root, False), *walk(root, path, stop)]:
        for rule in node.get("x-kubernetes-validations", []):
            if node_path in stop and rule["rule"] != "self == oldSelf":
                continue  # listed with the embedded resource's own rules
            yield node_path + rule.get("fieldPath", ""), rule


def field_table(root: Node, path: str, embedded: dict[str, str]) -> list[str]:
    lines = ["| Field | Type | Default | Constraints | Description |", "|---|---|---|---|---|"]
    for field, node, required in walk(root, path, frozenset(embedded)):
        if field in embedded:
            kind = embedded[field]
            link = f"[{kind}](#{kind.lower()})"
            said = f"A {kind} spec, every field and rule as in {link}. {node.get('description', '')}"
            limits = "; ".join(constraints(node, required))
            lines.append(f"| `{field}` | object |  | {limits} | {cell(said)} |")
            continue
        if field.endswith(("[]", ".<key>")) and not constraints(node, required):
            continue  # an item or value whose own fields are listed next
        default = code(node["default"]) if "default" in node else ""
        limits = "; ".join(constraints(node, required))
        lines.append(
            f"| `{field}` | {type_of(node)} | {default} | {limits} | {cell(node.get('description', ''))} |"
        )
    return lines


def resource(crd: Node) -> list[str]:
    names, version = crd["spec"]["names"], crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    api_version = f"{crd['spec']['group']}/{version['name']}"
    lines = [
        f"## {names['kind']}",
        "",
        f"`apiVersion: {api_version}`, `kind: {names['kind']}`, namespaced, short name "
        f"{', '.join(code(n) for n in names.get('shortNames', []))}.",
        "",
        f"### Printer columns (`kubectl get {names['shortNames'][0]}`; priority 1 only with `-o wide`)",
        "",
        "| Column | Type | JSONPath | Priority |",
        "|---|---|---|---|",
    ]
    for column in version.get("additionalPrinterColumns", []):
        path, priority = code(column["jsonPath"]), column.get("priority", 0)
        lines.append(f"| {column['name']} | {column['type']} | {path} | {priority} |")
    lines += [
        "",
        "### Validation rules (CEL, checked by the API server at apply time)",
        "",
        "| Field | Rule | Message |",
        "|---|---|---|",
    ]
    embedded = {path: kind for (owner, path), kind in EMBEDDED.items() if owner == names["kind"]}
    immutable = {}
    for path, rule in rules(schema["properties"]["spec"], "spec", frozenset(embedded)):
        if rule["rule"] == "self == oldSelf":
            immutable[code(path)] = rule["message"].split(" ", 1)[1]  # "<field> is immutable: ..."
        else:
            lines.append(f"| `{path}` | {code(rule['rule'])} | {cell(rule['message'])} |")
    for message in sorted(set(immutable.values())):
        paths = ", ".join(path for path, said in immutable.items() if said == message)
        lines += [
            "",
            f"Immutable (`self == oldSelf`): {paths}. A change is rejected with `<field> {message}`.",
        ]
    for part in ("spec", "status"):
        lines += ["", f"### {part.title()}", "", *field_table(schema["properties"][part], part, embedded)]
    return [*lines, ""]


def render() -> str:
    crds = [yaml.safe_load(path.read_text()) for path in sorted(CRDS.glob("*.yaml"))]
    lines = [
        "<!-- Generated by `python scripts/gen_reference.py` from crds/. Do not edit. -->",
        "# API reference",
        "",
        "Every field of DeepTune's custom resources, as the CRDs declare them (the CRDs are generated from",
        "`operator/deeptune/api`). A default is filled in by the API server when the field is left out;",
        "`[]` marks the items of a list, `<key>` the values of a map. `kubectl explain ftj.spec` shows the",
        "same descriptions.",
        "",
    ]
    for crd in crds:
        lines += resource(crd)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reference.md")
    args = parser.parse_args(argv)
    text = render()
    if not args.check:
        args.out.write_text(text)
        return 0
    if args.out.exists() and args.out.read_text() == text:
        return 0
    print(f"{args.out} is out of date: run `python scripts/gen_reference.py`", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
