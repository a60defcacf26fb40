"""Generated FineTuneJob and ModelDeployment specs, valid and broken, through the pydantic models.

Specs start from realistic ones (the examples, the tests' minimal specs) and get one to three
mutations: a value the CRD schema allows, a wrong type, a number or length just out of range, a bad
enum, a string that misses its pattern, an unknown field, a missing field, a null, or a cross-field
conflict that a CEL rule forbids. The strategies are driven by the generated CRD schema, so a field
added to the models is fuzzed without touching this file. `tests/cluster/test_spec_fuzz.py` sends the
same specs to a real API server.

Properties here: the models never raise anything but ValidationError; every rejection is described
line by line with a field path (`spec.a.b: ...`) that names what was broken; a spec the models accept
reads back the same from its wire form (parse(to_wire(parse(x))) == parse(x)) and builds its children,
which carry it (the trainer reads the spec the operator validated). A null in a field with a default
means what the API server makes of it (the default), or is refused naming the field.

Generation is deterministic: `derandomize`, fields drawn in the schema's order (never a set's), and
none of Hypothesis's constants from whatever project modules are loaded, so a failure comes back in
any process, alone or in the whole suite.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from deeptune import search
from deeptune.api import base, federatedfinetune, finetunejob, finetunesweep, modeldeployment, trainer
from deeptune.api.base import PvcLocation, describe_validation_error
from deeptune.api.modeldeployment import ResolvedModel
from deeptune.api.trainer import TrainerConfig
from deeptune.builders import federatedfinetune as fed_build
from deeptune.builders import finetunejob as ftj_build
from deeptune.builders import modeldeployment as mdep_build
from deeptune.builders.common import Owner
from deeptune.builders.finetunejob import CONFIG_KEY, ChildSettings
from deeptune.builders.finetunesweep import build_trial
from deeptune.crdgen import all_crds
from tests.conftest import ROOT, load_example
from tests.unit.test_finetunejob_model import MINIMAL

Path = tuple[str | int, ...]
Node = dict[str, Any]
JSON_SCALARS = st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=8)


def ignore_the_constants_of_loaded_modules() -> None:
    """Hypothesis draws about one value in twenty from the constants in the source of the project's
    modules loaded at the time. The specs a derandomized test generates would then depend on which
    other tests were collected or ran before it, and on any change to any loaded module: a failure in
    the whole suite need not come back when the test runs alone. Here they depend on the test alone
    (the schema-driven strategies reach the bounds and patterns themselves).

    Hypothesis has no setting for this; the hook is private (Hypothesis is pinned in requirements.lock)
    and `test_generated_specs_are_the_same_in_every_process` fails if it stops working. Only the spec
    properties use Hypothesis, so the rest of a test session is not affected."""
    from hypothesis.internal.conjecture import providers

    if hasattr(providers, "_get_local_constants") and hasattr(providers, "CONSTANTS_CACHE"):
        none = providers.Constants()
        providers._get_local_constants = lambda: none
        providers.CONSTANTS_CACHE.cache.clear()


ignore_the_constants_of_loaded_modules()


# --- the specs mutations start from ---------------------------------------------------------------

RICH_FTJ: dict[str, Any] = {
    "baseModel": {"pvc": {"claimName": "models", "path": "base"}, "trustRemoteCode": True},
    "dataset": {
        "source": {"configMap": {"name": "rows", "key": "train.jsonl"}},
        "validation": {"source": {"inline": [{"prompt": "a", "completion": "b"}]}},
        "augmentation": {
            "synonyms": {"dictionary": {"big": ["large"]}},
            "backTranslation": {"forwardModel": "a/zh-en", "backwardModel": "a/en-zh"},
            "instructionPerturbation": {},
        },
    },
    "method": "qlora",
    "lora": {"targetModules": ["q_proj", "v_proj"]},
    "earlyStopping": {"patience": 2},
    "resources": {"gpu": 2, "cpu": "500m", "tolerations": [{"key": "gpu", "operator": "Exists"}]},
    "output": {"pvc": {"claimName": "out", "path": "rich"}, "quantizedExport": "int4"},
    "env": [
        {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}},
        {"name": "LOG_LEVEL", "value": "debug"},
    ],
    "imagePullSecrets": [{"name": "registry"}],
}
"""Many optional features at once, so mutations reach them."""

RICH_MDEP: dict[str, Any] = {
    "model": {
        "adapter": {
            "baseModel": {"name": "deepseek-ai/deepseek-llm-7b-base", "tokenSecretRef": {"name": "hf"}},
            "adapter": {"pvc": {"claimName": "out", "path": "bot/adapter"}},
        }
    },
    "quantization": "int8",
    "streaming": True,
    "resources": {"gpu": 1, "memory": "16Gi"},
    "service": {"type": "NodePort", "httpPort": 9100},
    "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "t"}}}],
    "networkPolicy": {
        "enabled": True,
        "allowFrom": [{"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {}}],
        "metricsFrom": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}}],
    },
}

SEEDS: dict[str, list[dict[str, Any]]] = {
    "FineTuneJob": [
        MINIMAL,
        load_example("finetune.yaml")["spec"],
        load_example("finetune-tiny.yaml")["spec"],
        RICH_FTJ,
    ],
    "ModelDeployment": [
        {"model": {"fineTuneJobRef": {"name": "bot"}}, "resources": {"gpu": 0}},
        {"model": {"merged": {"pvc": {"claimName": "out", "path": "bot/merged"}}}},
        load_example("deployment.yaml")["spec"],
        load_example("deployment-adapters.yaml")["spec"],
        RICH_MDEP,
    ],
    "FineTuneSweep": [
        {
            "template": MINIMAL,
            "parameters": [{"path": "hyperparameters.learningRate", "low": 1e-5, "high": 1e-3}],
            "objective": {"metric": "exactMatch"},
        },
        load_example("finetune-tiny-sweep.yaml")["spec"],
    ],
    "FederatedFineTune": [
        {
            "template": MINIMAL,
            "sites": [{"namespace": "a"}, {"namespace": "b", "source": {"url": "https://x/y"}}],
        },
        load_example("finetune-tiny-federated.yaml")["spec"],
    ],
}
PARSERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "FineTuneJob": finetunejob.parse_spec,
    "ModelDeployment": modeldeployment.parse_spec,
    "FineTuneSweep": finetunesweep.parse_spec,
    "FederatedFineTune": federatedfinetune.parse_spec,
}


def spec_schema(kind: str) -> Node:
    """The spec's structural schema, as the API server has it."""
    crd = next(c for c in all_crds().values() if c["spec"]["names"]["kind"] == kind)
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"])


SCHEMAS = {kind: spec_schema(kind) for kind in SEEDS}


# --- walking schemas and specs ---------------------------------------------------------------------


def schema_paths(node: Node, path: Path = ()) -> list[tuple[Path, Node]]:
    """Every field path of a schema (list items as index 0, map values under key `k`)."""
    out: list[tuple[Path, Node]] = [(path, node)] if path else []
    for name, child in node.get("properties", {}).items():
        out += schema_paths(child, (*path, name))
    if node.get("type") == "array":
        out += schema_paths(node["items"], (*path, 0))
    if isinstance(node.get("additionalProperties"), dict):
        out += schema_paths(node["additionalProperties"], (*path, "k"))
    return out


def present_paths(value: Any, path: Path = ()) -> list[Path]:
    """Every path that holds something in a spec."""
    out: list[Path] = [path] if path else []
    if isinstance(value, dict):
        for key, child in value.items():
            out += present_paths(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out += present_paths(child, (*path, index))
    return out


def put(spec: dict[str, Any], path: Path, value: Any) -> Path:
    """Set `path` to `value`, making the objects and lists on the way (replacing what is in the way).
    Returns the path of what changed: the first object made on the way, else `path` itself (a new
    object lacks its required fields, and an error there is about that object)."""
    node: Any = spec
    changed: Path | None = None
    for depth, (part, after) in enumerate(itertools.pairwise(path)):
        empty: Any = [] if isinstance(after, int) else {}
        if isinstance(part, int):
            missing = len(node) <= part or not isinstance(node[part], type(empty))
            while len(node) <= part:
                node.append(copy.deepcopy(empty))
        else:
            missing = not isinstance(node.get(part), type(empty))
        if missing:
            node[part] = empty
            changed = changed or path[: depth + 1]
        node = node[part]
    leaf = path[-1]
    if isinstance(leaf, int):
        while len(node) <= leaf:
            node.append(None)
    node[leaf] = value
    return changed or path


def get(spec: dict[str, Any], path: Path) -> Any:
    node: Any = spec
    for part in path:
        node = node[part]
    return node


def missing_ancestor(spec: dict[str, Any], path: Path) -> Path | None:
    """The shallowest proper prefix of `path` that holds no object or list yet."""
    node: Any = spec
    for depth, part in enumerate(path[:-1]):
        after = path[depth + 1]
        inside = node[part] if isinstance(part, int) and part < len(node) else None
        if isinstance(part, str):
            inside = node.get(part)
        if not isinstance(inside, list if isinstance(after, int) else dict):
            return path[: depth + 1]
        if isinstance(after, int) and len(inside) <= after:
            return path[: depth + 1]
        node = inside
    return None


def one_of_members(schema: Node) -> dict[Path, tuple[str, ...]]:
    """Object path → its fields of which exactly one may be set, from the CRD's `set exactly one of`
    rules."""
    return {path: members for path, node in schema_paths(schema) if (members := exactly_one_of(node))}


def one_of_siblings(kind: str, path: Path) -> tuple[str, ...]:
    members = ONE_OF[kind].get(path[:-1], ())
    return tuple(name for name in members if name != path[-1]) if path[-1] in members else ()


def drop(spec: dict[str, Any], path: Path) -> None:
    node: Any = spec
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]


# --- values from a schema node ---------------------------------------------------------------------


def bounds(node: Node, default: tuple[int, int]) -> tuple[Any, Any]:
    return node.get("minimum", default[0]), node.get("maximum", default[1])


INT64 = (-(2**63), 2**63 - 1)


STRATEGIES: dict[tuple[int, int], tuple[Node, st.SearchStrategy[Any]]] = {}
"""valid_value's strategies, by schema node and depth: built once, they are drawn from much faster
(Hypothesis works out a strategy's properties once per object). The node is kept, so its id stays its."""


def valid_value(node: Node, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values the schema allows (CEL rules aside), small enough to read in a failure report."""
    cached = STRATEGIES.get((id(node), depth))
    if cached is None or cached[0] is not node:
        cached = STRATEGIES[(id(node), depth)] = (node, new_valid_value(node, depth))
    return cached[1]


def new_valid_value(node: Node, depth: int) -> st.SearchStrategy[Any]:
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if node.get("x-kubernetes-int-or-string"):
        return st.integers(0, 10**6) | st.from_regex(node["pattern"], fullmatch=True)
    kind = node.get("type")
    if kind == "string":
        limit = min(node.get("maxLength", 40), 40)
        if "pattern" in node:
            return st.from_regex(node["pattern"], fullmatch=True).filter(
                lambda s: len(s) <= node.get("maxLength", 10**9)
            )
        return st.text(min_size=node.get("minLength", 0), max_size=max(limit, node.get("minLength", 0)))
    if kind == "integer":
        low, high = bounds(node, INT64)
        return st.integers(
            low + bool(node.get("exclusiveMinimum")), high - bool(node.get("exclusiveMaximum"))
        )
    if kind == "number":
        low, high = bounds(node, (-(10**9), 10**9))
        return st.floats(
            low,
            high,
            exclude_min=bool(node.get("exclusiveMinimum")),
            exclude_max=bool(node.get("exclusiveMaximum")),
            allow_nan=False,
            allow_infinity=False,
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        return st.lists(valid_value(node["items"], depth + 1), max_size=min(node.get("maxItems", 3), 3))
    if isinstance(node.get("additionalProperties"), dict):
        return st.dictionaries(
            st.text(min_size=1, max_size=12), valid_value(node["additionalProperties"], depth + 1), max_size=3
        )
    if "properties" in node:
        exclusive = exactly_one_of(node)
        if exclusive:  # one of them, chosen first
            return st.sampled_from(exclusive).flatmap(
                lambda chosen: object_value(node, depth, (chosen,), exclusive)
            )
        return object_value(node, depth)
    return st.dictionaries(st.text(min_size=1, max_size=8), JSON_SCALARS, max_size=3)  # free-form


def object_fields(
    node: Node, also_required: Sequence[str] = (), left_out: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """An object's required fields (the schema's and `also_required`) and its optional ones (less
    `left_out`), each in the schema's order.

    The strategies draw the fields in this order, so it must follow the schema alone: collected in a
    set, the order (and with it every generated spec) would follow the process's hash seed, and
    `derandomize` would fix Hypothesis's choices but not what they became."""
    required = [*node.get("required", []), *also_required]
    required_names = [name for name in node["properties"] if name in required]
    optional_names = [name for name in node["properties"] if name not in required and name not in left_out]
    return required_names, optional_names


def object_value(
    node: Node, depth: int, also_required: Sequence[str] = (), left_out: Sequence[str] = ()
) -> st.SearchStrategy[Any]:
    """An object with its required fields and some optional ones (none below depth 2)."""
    required, optional = object_fields(node, also_required, left_out)
    props = node["properties"]
    return st.fixed_dictionaries(
        {name: valid_value(props[name], depth + 1) for name in required},
        optional={} if depth > 2 else {name: valid_value(props[name], depth + 1) for name in optional},
    )


def exactly_one_of(node: Node) -> tuple[str, ...]:
    """The fields of which a `set exactly one of` rule of this object wants exactly one, in the
    schema's order."""
    for rule in node.get("x-kubernetes-validations", []):
        if rule["message"].startswith("set exactly one of"):
            named = set(re.findall(r"has\(self\.(\w+)\)", rule["rule"]))
            return tuple(name for name in node.get("properties", {}) if name in named)
    return ()


def wrong_type(node: Node) -> st.SearchStrategy[Any]:
    """A value of another JSON type than the schema's."""
    kind = "int-or-string" if node.get("x-kubernetes-int-or-string") else node.get("type", "object")
    others: dict[str, st.SearchStrategy[Any]] = {
        "string": st.text(max_size=6),
        "integer": st.integers(-5, 5),
        "number": st.floats(0.01, 0.99),
        "boolean": st.booleans(),
        "array": st.lists(JSON_SCALARS, max_size=2),
        "object": st.dictionaries(st.text(min_size=1, max_size=5), JSON_SCALARS, max_size=2),
    }
    excluded = {
        "int-or-string": {"string", "integer"},
        "number": {"number", "integer"},  # an integer is a number
        "integer": {"integer"},
    }.get(kind, {kind})
    if kind == "integer":  # a float with a fraction is not an integer; 2.0 is, to both
        others["number"] = st.floats(0.01, 0.99) | st.sampled_from([1.5, -2.25, 1e300])
    return st.one_of([strategy for name, strategy in others.items() if name not in excluded])


def out_of_range(node: Node) -> st.SearchStrategy[Any] | None:
    """A value just past one of the node's bounds, or None when it has none."""
    values: list[Any] = []
    integer = node.get("type") == "integer"
    step = 1 if integer else 1e-9
    if "minimum" in node:
        values.append(node["minimum"] if node.get("exclusiveMinimum") else node["minimum"] - step)
    if "maximum" in node:
        values.append(node["maximum"] if node.get("exclusiveMaximum") else node["maximum"] + step)
    if node.get("type") == "string" and "maxLength" in node:
        values.append("a" * (node["maxLength"] + 1))
    if node.get("type") == "string" and node.get("minLength"):
        values.append("")
    if node.get("type") == "array" and "maxItems" in node and node["maxItems"] <= 64:
        item = valid_value(node["items"], 3)
        return st.lists(item, min_size=node["maxItems"] + 1, max_size=node["maxItems"] + 1)
    if node.get("type") == "object" and "maxProperties" in node:
        count = node["maxProperties"] + 1
        return st.just({f"k{i}": "v" for i in range(count)})
    if integer and "maximum" not in node:
        values += [2**63, -(2**63) - 1]  # past int64: what the API server can store
    return st.sampled_from(values) if values else None


ONE_OF = {kind: one_of_members(schema) for kind, schema in SCHEMAS.items()}
UNKNOWN_NAMES = st.sampled_from(["colour", "replica", "learningrate", "Method", "extra", "x-y", "spec"])


# --- mutations -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """One change to a spec: what kind, and where (the path it names)."""

    kind: str
    path: Path

    def __str__(self) -> str:
        return f"{self.kind} {dotted(self.path)}"


def dotted(path: Path) -> str:
    return ".".join(["spec", *(str(p) for p in path)])


CONFLICTS: dict[str, list[tuple[Path, dict[Path, Any]]]] = {
    "FineTuneJob": [
        (("method",), {("method",): "qlora", ("resources", "gpu"): 0}),
        (
            ("output", "quantizedExport"),
            {("output", "quantizedExport"): "int8", ("resources", "gpu"): 0, ("method",): "lora"},
        ),
        (("baseModel",), {("baseModel", "name"): "a/b", ("baseModel", "pvc"): {"claimName": "m"}}),
        (
            ("dataset", "source"),
            {("dataset", "source", "url"): "https://x/y", ("dataset", "source", "inline"): []},
        ),
        (
            ("dataset", "cleaning"),
            {("dataset", "cleaning", "minChars"): 9, ("dataset", "cleaning", "maxChars"): 3},
        ),
        (("lora", "targetModules"), {("lora", "targetModules"): ["auto", "q_proj"]}),
        (("env", 0), {("env", 0): {"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s"}}}}),
        (("env", 0), {("env", 0): {"name": "A"}}),
        (("env", 0, "valueFrom"), {("env", 0): {"name": "A", "valueFrom": {}}}),
    ],
    "ModelDeployment": [
        (("quantization",), {("quantization",): "int4", ("resources", "gpu"): 0}),
        (
            ("responseCache",),
            {("streaming",): True, ("responseCache", "enabled"): True, ("batching", "mode"): "dynamic"},
        ),
        (
            ("responseCache", "enabled"),
            {("responseCache", "enabled"): True, ("batching", "mode"): "continuous"},
        ),
        (
            ("model",),
            {("model", "fineTuneJobRef"): {"name": "a"}, ("model", "merged"): {"pvc": {"claimName": "o"}}},
        ),
        (("batching",), {("batching", "maxBatchSize"): 2, ("batching", "preferredBatchSizes"): [4]}),
        (("autoscaling",), {("autoscaling", "minReplicas"): 5, ("autoscaling", "maxReplicas"): 2}),
        (("service",), {("service", "httpPort"): 8001, ("service", "grpcPort"): 8001}),
        (("responseCache", "size"), {("responseCache", "size"): "500m"}),
        (("rollout",), {("rollout", "maxSurge"): 0, ("rollout", "maxUnavailable"): "0%"}),
    ],
    "FineTuneSweep": [
        (("pruner",), {("pruner",): {}, ("template", "evaluation", "evalSteps"): None}),
        (("parameters", 0), {("parameters", 0): {"path": "lora.r", "type": "int", "low": 8, "high": 4}}),
        (("parameters", 0), {("parameters", 0): {"path": "lora.r", "type": "categorical"}}),
        (("objective",), {("objective", "metric"): "f1", ("template", "evaluation", "metrics"): ["bleu"]}),
    ],
    "FederatedFineTune": [
        (("sites",), {("sites",): [{"namespace": "a"}, {"namespace": "a"}]}),
        (("template", "method"), {("template", "method"): "full"}),
        (
            ("template", "preference"),
            {("template", "preference"): {}, ("template", "dataset", "style"): "auto"},
        ),
        (("template", "queueName"), {("template", "queueName"): "q"}),
    ],
}
"""Pairs of fields that are fine alone and wrong together; the path is the one a message must name."""


def set_valid(draw: st.DrawFn, spec: dict[str, Any], kind: str) -> Path:
    """A value the schema allows; objects made on the way are whole valid ones, and choosing one of
    several exclusive sources drops the others."""
    paths = schema_paths(SCHEMAS[kind])
    path, node = draw(st.sampled_from(paths))
    made = first = missing_ancestor(spec, path)
    while made is not None:
        ancestor = dict(paths)[made]
        item = ancestor["items"] if ancestor.get("type") == "array" else None
        put(spec, made, [draw(valid_value(item))] if item else draw(valid_value(ancestor)))
        made = missing_ancestor(spec, path)
    for depth in range(1, len(path) + 1):
        for sibling in one_of_siblings(kind, path[:depth]):
            get(spec, path[: depth - 1]).pop(sibling, None)
    put(spec, path, draw(valid_value(node)))
    return first or path


def set_wrong_type(draw: st.DrawFn, spec: dict[str, Any], kind: str) -> Path:
    path, node = draw(st.sampled_from(schema_paths(SCHEMAS[kind])))
    return put(spec, path, draw(wrong_type(node)))


def set_out_of_range(draw: st.DrawFn, spec: dict[str, Any], kind: str) -> Path:
    ranged = [(p, s) for p, n in schema_paths(SCHEMAS[kind]) if (s := out_of_range(n)) is not None]
    path, values = draw(st.sampled_from(ranged))
    return put(spec, path, draw(values))


def set_bad_enum(draw: st.DrawFn, spec: dict[str, Any], kind: str) -> Path:
    path, node = draw(st.sampled_from([(p, n) for p, n in schema_paths(SCHEMAS[kind]) if "enum" in n]))
    return put(spec, path, draw(st.text(max_size=10).filter(lambda s: s not in node["enum"])))


def set_bad_pattern(draw: st.DrawFn, spec: dict[str, Any], kind: str) -> Path:
    path, node = draw(st.sampled_from([(p, n) for p, n in schema_paths(SCHEMAS[kind]) if "pattern" in n]))
    pattern = re.compile(node["pattern"])
    return put(spec, path, draw(st.text(max_size=20).filter(lambda s: not pattern.search(s))))


def add_unknown(draw: st.DrawFn, spec: dict[str, Any], kind: str) -> Path:
    schema = SCHEMAS[kind]
    objects = [(p, n) for p, n in [((), schema), *schema_paths(schema)] if "properties" in n]
    path, node = draw(st.sampled_from(objects))
    name = draw(UNKNOWN_NAMES.filter(lambda s: s not in node["properties"]))
    return put(spec, (*path, name), draw(JSON_SCALARS))


def remove(draw: st.DrawFn, spec: dict[str, Any], kind: str) -> Path:
    path = draw(st.sampled_from(present_paths(spec)))
    drop(spec, path)
    return path


def set_null(draw: st.DrawFn, spec: dict[str, Any], kind: str) -> Path:
    path = draw(st.sampled_from(present_paths(spec)))
    put(spec, path, None)
    return path


def make_conflict(draw: st.DrawFn, spec: dict[str, Any], kind: str) -> Path:
    named, changes = draw(st.sampled_from(CONFLICTS[kind]))
    for path, value in changes.items():
        put(spec, path, copy.deepcopy(value))
    return named


MUTATIONS = {
    "valid": set_valid,
    "wrong_type": set_wrong_type,
    "out_of_range": set_out_of_range,
    "bad_enum": set_bad_enum,
    "bad_pattern": set_bad_pattern,
    "unknown": add_unknown,
    "drop": remove,
    "null": set_null,
    "conflict": make_conflict,
}
OPS = ["valid"] * 4 + [op for op in MUTATIONS if op != "valid"]
"""Valid changes weigh as much as half the broken ones, so that the API server admits enough specs."""
MOSTLY_ACCEPTED_OPS = ["valid", "valid", "drop", "null"]
"""Changes after which the models still accept many specs: for the properties of accepted specs."""


@st.composite
def mutated(draw: st.DrawFn, spec: dict[str, Any], kind: str, ops: Sequence[str] = OPS) -> Mutation:
    """Apply one mutation to `spec` in place and say what it was."""
    op = draw(st.sampled_from(ops))
    if op in ("drop", "null") and not spec:
        op = "valid"  # nothing left to take away
    return Mutation(op, MUTATIONS[op](draw, spec, kind))


@dataclass
class Generated:
    """A generated spec and the mutations that made it."""

    kind: str
    spec: dict[str, Any]
    mutations: list[Mutation] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Generated({self.kind}, [{'; '.join(map(str, self.mutations))}], spec={self.spec!r})"


@st.composite
def generated_specs(draw: st.DrawFn, kind: str, ops: Sequence[str] = OPS) -> Generated:
    spec = copy.deepcopy(draw(st.sampled_from(SEEDS[kind])))
    count = draw(st.integers(0, 3))
    return Generated(kind, spec, [draw(mutated(spec, kind, ops)) for _ in range(count)])


def any_generated_specs() -> st.SearchStrategy[Generated]:
    return st.one_of(*(generated_specs(kind) for kind in SEEDS))


# --- "names the field" -----------------------------------------------------------------------------


def related(where: Path, path: Path) -> bool:
    """One path leads to the other: a rule on an object names its field's parent, a bad object value
    may be reported at one of its own fields."""
    shorter = min(len(where), len(path))
    return len(where) > 0 and where[:shorter] == path[:shorter]


def names_a_mutation(where: Path, message: str, mutations: list[Mutation]) -> bool:
    """An error at `where` with `message` names one of the mutated fields: by a related path, or, for a
    rule on the whole spec (a cross-field one), by naming the field in its message."""
    for mutation in mutations:
        if related(where, mutation.path):
            return True
        words = [p for p in mutation.path if isinstance(p, str)]
        if len(where) <= 1 and any(re.search(rf"\b{re.escape(w)}\b", message) for w in words):
            return True
    return False


def unnamed_model_errors(error: ValidationError, mutations: list[Mutation]) -> list[str]:
    """The model's complaints that name none of the mutated fields (the property wants none)."""
    out = []
    for problem in error.errors():
        loc = tuple(problem["loc"])
        line = ".".join(["spec", *map(str, loc)]) + ": " + problem["msg"].removeprefix("Value error, ")
        if not names_a_mutation(loc, problem["msg"], mutations):
            out.append(line)
    return out


# --- children, for specs the models accept ---------------------------------------------------------

OWNER_UID = "00000000-0000-4000-8000-000000000000"
BUILDER_SETTINGS = ChildSettings(trainer_image="deeptune/trainer:test")


def resolved_for(spec: modeldeployment.ModelDeploymentSpec) -> ResolvedModel:
    """What `resolve_model` gives once a referenced FineTuneJob has succeeded (with a merged model)."""
    if spec.model.fine_tune_job_ref is not None:
        name = spec.model.fine_tune_job_ref.name
        return ResolvedModel(merged=PvcLocation(claim_name="out", path=f"{name}/merged"), fine_tune_job=name)
    return modeldeployment.resolve_model(spec.model)


def children_of(kind: str, name: str, namespace: str, parsed: Any) -> list[dict[str, Any]]:
    """The manifests the operator would create for a parsed spec."""
    owner = Owner(kind=kind, name=name, namespace=namespace, uid=OWNER_UID)
    if kind == "FineTuneJob":
        return [
            ftj_build.build_config_map(owner, parsed),
            ftj_build.build_job(owner, parsed, BUILDER_SETTINGS),
        ]
    if kind == "FineTuneSweep":  # a trial, with the values Optuna picks first
        return [build_trial(owner, parsed, 0, search.next_values(parsed, [], 0))]
    if kind == "FederatedFineTune":  # the coordinator's ConfigMap, Service and Job, then the sites
        sites = [fed_build.build_site(owner, parsed, site) for site in parsed.sites]
        return [*fed_build.build_coordinator(owner, parsed, BUILDER_SETTINGS), *sites]
    return mdep_build.build_children(owner, parsed, resolved_for(parsed), BUILDER_SETTINGS).manifests()


def check_children(kind: str, parsed: Any) -> None:
    """Build the children of a parsed spec and check what they carry: plain JSON (what the API client
    sends is what was built) and, for a FineTuneJob, the spec the operator validated, read back by the
    trainer from its ConfigMap."""
    manifests = children_of(kind, "fuzz", "ns", parsed)
    for manifest in manifests:
        assert json.loads(json.dumps(manifest, allow_nan=False)) == manifest, manifest["kind"]
    if kind == "FineTuneJob":
        config_map = next(m for m in manifests if m["kind"] == "ConfigMap")
        assert TrainerConfig.model_validate_json(config_map["data"][CONFIG_KEY]).spec == parsed
    if kind == "FineTuneSweep":  # every trial is a valid FineTuneJob
        finetunejob.parse_spec(manifests[0]["spec"])
    if kind == "FederatedFineTune":  # the coordinator's config reads back; every site is a FineTuneJob
        TrainerConfig.model_validate_json(manifests[0]["data"][CONFIG_KEY])
        for site in manifests[3:]:
            finetunejob.parse_spec(site["spec"])


# --- the properties --------------------------------------------------------------------------------

MODEL_SETTINGS = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@MODEL_SETTINGS
@given(any_generated_specs())
def test_models_reject_only_with_a_validation_error_that_names_the_field(generated: Generated) -> None:
    parse = PARSERS[generated.kind]
    try:
        parsed = parse(copy.deepcopy(generated.spec))
    except ValidationError as error:
        message = describe_validation_error(error)
        assert "\n" not in message and len(message.split("; ")) == len(error.errors()), message
        assert unnamed_model_errors(error, generated.mutations) == [], message
        return
    # Accepted: the wire form round-trips, and the children build and carry the spec.
    assert parse(parsed.to_wire()) == parsed
    check_children(generated.kind, parsed)


MOSTLY_ACCEPTED_SETTINGS = settings(MODEL_SETTINGS, max_examples=100)


@pytest.mark.parametrize("kind", sorted(SEEDS))
def test_accepted_specs_read_back_the_same_from_their_wire_form(kind: str) -> None:
    """parse(to_wire(parse(x))) == parse(x): what the operator validated is what the trainer (which
    reads the wire form from a ConfigMap) and the API server (which stores it) get. Specs with values
    changed, dropped and nulled, so that defaults are met in every form."""
    parse = PARSERS[kind]

    @MOSTLY_ACCEPTED_SETTINGS
    @given(generated_specs(kind, MOSTLY_ACCEPTED_OPS))
    def read_back(generated: Generated) -> None:
        try:
            parsed = parse(copy.deepcopy(generated.spec))
        except ValidationError:
            assume(False)  # the property is about accepted specs; rejected ones are not counted
            return
        assert parse(parsed.to_wire()) == parsed

    read_back()


# --- null, absent, and the CRD's default -----------------------------------------------------------

EMBEDDED: dict[str, Path] = {"FineTuneSweep": ("template",), "FederatedFineTune": ("template",)}
"""A kind's field that is another kind's whole spec (the same model): its fields are that kind's."""


def within_embedded(kind: str, path: Path) -> bool:
    embedded = EMBEDDED.get(kind)
    return embedded is not None and path[: len(embedded)] == embedded


DEFAULTED: list[tuple[str, Path]] = [
    (kind, path)
    for kind in sorted(SEEDS)
    for path, node in schema_paths(SCHEMAS[kind])
    if "default" in node and not within_embedded(kind, path)
]
"""Every field with a default in the CRD (a FineTuneSweep's template's are the FineTuneJob's)."""

PARENTS: dict[Path, Any] = {
    ("dataset", "validation", "source"): {"pvc": {"claimName": "held-out"}},
    ("dataset", "test", "source"): {"pvc": {"claimName": "held-out"}},
    ("model", "adapter", "baseModel"): {"pvc": {"claimName": "models"}},
    ("autoscaling", "keda"): {"prometheusAddress": "http://prometheus.monitoring.svc:9090"},
    ("promotion",): {"rules": [{"metric": "exactMatch", "threshold": 0.5}]},
    ("distillation",): {"teacher": {"pvc": {"claimName": "teachers"}}},
    ("distillation", "teacher", "tokenSecretRef"): {"name": "hf"},
    ("distillation", "teacher", "adapter"): {"claimName": "adapters"},
    ("sites", 0, "source"): {"pvc": {"claimName": "rows"}},
}
"""Objects holding defaulted fields that no seed has (and that `{}` cannot stand for)."""
ALTERNATIVES: dict[Path, Any] = {
    (*source, "hub"): {"name": "org/chats", "tokenSecretRef": {"name": "hub-token"}}
    for source in [
        *(("dataset", "source"), ("dataset", "validation", "source"), ("dataset", "test", "source")),
        ("sites", 0, "source"),
    ]
}
"""Members of one-of groups whose fields no seed has: the object holding one holds it alone."""


def spec_holding(kind: str, path: Path) -> dict[str, Any]:
    """A valid spec, from the seeds, with the object that holds `path` but without `path` itself."""
    parents = {where: value for where, value in PARENTS.items() if path[: len(where)] == where}
    chosen = {
        where[:-1]: {where[-1]: value} for where, value in ALTERNATIVES.items() if path[: len(where)] == where
    }
    for seed, changes in itertools.product(SEEDS[kind], [{}, parents, {**parents, **chosen}]):
        spec = copy.deepcopy(seed)
        for where, value in changes.items():
            put(spec, where, copy.deepcopy(value))
        put(spec, path, None)  # makes the objects and lists on the way
        drop(spec, path)
        try:
            PARSERS[kind](copy.deepcopy(spec))
        except ValidationError:
            continue
        return spec
    raise AssertionError(f"no seed can hold {dotted(path)}: add its parent to PARENTS")


@pytest.mark.parametrize(("kind", "path"), DEFAULTED, ids=lambda p: dotted(p) if isinstance(p, tuple) else p)
def test_a_null_means_what_the_api_server_makes_of_it(kind: str, path: Path) -> None:
    """The API server reads a null as absent (it prunes a null where the schema allows none) and fills
    in the CRD's default. The models read absent as the CRD's default too; a null they read as the
    default (and keep meaning that through the wire form), or refuse, naming the field. A null read
    as None would be dropped by `to_wire()` and read back as the default: the trainer would get
    another spec than the one the operator validated (`dataset.validation.ratio` did)."""
    parse = PARSERS[kind]
    absent = spec_holding(kind, path)
    defaulted, nulled = copy.deepcopy(absent), copy.deepcopy(absent)
    put(defaulted, path, copy.deepcopy(dict(schema_paths(SCHEMAS[kind]))[path]["default"]))
    put(nulled, path, None)
    expected = parse(copy.deepcopy(absent))
    assert parse(defaulted) == expected, "the CRD's default is not the models' default"
    try:
        parsed = parse(nulled)
    except ValidationError as error:
        assert unnamed_model_errors(error, [Mutation("null", path)]) == [], error
        return
    assert parsed == expected
    assert parse(parsed.to_wire()) == parsed


def api_models() -> list[type[BaseModel]]:
    """Every model of the API: specs, statuses, and the trainer's input and output."""
    modules = (base, finetunejob, modeldeployment, trainer)
    found = {
        model
        for module in modules
        for model in vars(module).values()
        if inspect.isclass(model) and issubclass(model, base.ApiModel) and model is not base.ApiModel
    }
    return sorted(found, key=lambda model: (model.__module__, model.__qualname__))


def test_no_field_reads_null_as_none_over_another_default() -> None:
    """A field whose type admits None and whose default is not None reads a null as None, which
    `to_wire()` drops, and reading the wire form gives the default: not what was validated. Such a
    field's type leaves None out; `null_means_default` reads a null as the default, as the API server
    does, where that is what a null should mean."""
    offending = []
    for model in api_models():
        for name, info in model.model_fields.items():
            admits_none = type(None) in typing.get_args(info.annotation) or info.annotation is types.NoneType
            if admits_none and info.get_default(call_default_factory=True) is not None:
                offending.append(f"{model.__qualname__}.{name}")
    assert len(api_models()) > 50
    assert offending == []


# --- the generators: the same specs in every process -----------------------------------------------


def test_the_strategies_draw_fields_in_the_schema_order() -> None:
    """Object fields are drawn in the schema's order (a set's would follow the hash seed). Read from the
    strategies themselves: `fixed_dictionaries` draws its mapping's keys, then picks among its optional
    ones, in the order they were given."""
    objects = [
        node
        for kind in sorted(SCHEMAS)
        for _, node in [((), SCHEMAS[kind]), *schema_paths(SCHEMAS[kind])]
        if "properties" in node
    ]
    assert len(objects) > 50
    for node in objects:
        order = list(node["properties"])
        exclusive = exactly_one_of(node)
        assert list(exclusive) == [name for name in order if name in exclusive]
        for chosen in exclusive or (None,):
            also = (chosen,) if chosen else ()
            required = [n for n in order if n in {*node.get("required", []), *also}]
            optional = [n for n in order if n not in required and n not in exclusive]
            assert object_fields(node, also, exclusive) == (required, optional)
            strategy = object_value(node, 0, also, exclusive)
            drawn: Any = getattr(strategy, "wrapped_strategy", strategy)  # fixed_dictionaries is lazy
            assert (list(drawn.mapping), list(drawn.optional or {})) == (required, optional)


def generated_digest(count: int) -> str:
    """A digest of the first `count` specs the strategies generate in this process."""
    seen: list[str] = []

    @settings(max_examples=count, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(any_generated_specs())
    def collect(generated: Generated) -> None:
        seen.append(repr(generated))

    collect()
    return f"{len(seen)} specs, sha256 {hashlib.sha256(chr(10).join(seen).encode()).hexdigest()[:16]}"


def test_generated_specs_are_the_same_in_every_process() -> None:
    """`derandomize` fixes Hypothesis's choices; what they become must not depend on the process: not
    on its hash seed (string hashing, so a set's order, is seeded per process), nor on which of the
    project's modules it has loaded. A failure seen once must come back, in the suite or alone."""
    digest = "from tests.unit.test_spec_properties import generated_digest; print(generated_digest(40))"
    variants = {
        "PYTHONHASHSEED=1": ("1", digest),
        "PYTHONHASHSEED=2": ("2", digest),
        "PYTHONHASHSEED=3, more modules loaded": ("3", f"import deeptune_trainer.data.pipeline; {digest}"),
    }
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": path, "PYTHONHASHSEED": seed},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (seed, code) in variants.items()
    }
    digests = {}
    for name, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        digests[name] = out.strip()
    assert len(set(digests.values())) == 1, digests


@pytest.mark.parametrize("kind", sorted(SEEDS))
def test_seed_specs_are_valid(kind: str) -> None:
    for spec in SEEDS[kind]:
        PARSERS[kind](copy.deepcopy(spec))


@pytest.mark.parametrize("kind", sorted(SEEDS))
def test_every_cross_field_conflict_is_rejected_and_named(kind: str) -> None:
    for named, changes in CONFLICTS[kind]:
        spec = copy.deepcopy(SEEDS[kind][0])
        for path, value in changes.items():
            put(spec, path, copy.deepcopy(value))
        with pytest.raises(ValidationError) as caught:
            PARSERS[kind](spec)
        assert unnamed_model_errors(caught.value, [Mutation("conflict", named)]) == [], caught.value


# --- regressions: what the generated specs found -------------------------------------------------

FTJ_MINIMAL, MDEP_MINIMAL = SEEDS["FineTuneJob"][0], SEEDS["ModelDeployment"][0]


@dataclass(frozen=True)
class Regression:
    """A spec that once got past the models (or past the API server) and then failed later, and the
    field its rejection must name now."""

    kind: str
    changes: dict[Path, Any]
    field: Path
    why: str

    def spec(self) -> dict[str, Any]:
        spec = copy.deepcopy(FTJ_MINIMAL if self.kind == "FineTuneJob" else MDEP_MINIMAL)
        for path, value in self.changes.items():
            put(spec, path, copy.deepcopy(value))
        return spec


REGRESSIONS = [
    Regression(
        "FineTuneJob",
        {("resources", "cpu"): "18.81Mi"},
        ("resources", "cpu"),
        "a CPU quantity with a memory suffix crashed the Job builder (OMP_NUM_THREADS), retried forever",
    ),
    Regression(
        "ModelDeployment",
        {("resources", "cpu"): "0k"},
        ("resources", "cpu"),
        "the same crash for the serving Deployment",
    ),
    Regression(
        "FineTuneJob",
        {("resources", "cpu"): -1},
        ("resources", "cpu"),
        "the API server admitted a negative integer quantity (a pattern checks strings only)",
    ),
    Regression(
        "FineTuneJob",
        {("resources", "sharedMemory"): "1" * 40},
        ("resources", "sharedMemory"),
        "the API server admitted quantities longer than the models' 32 characters",
    ),
    Regression(
        "FineTuneJob",
        {("hyperparameters", "seed"): -1},
        ("hyperparameters", "seed"),
        "NumPy takes seeds 0..2^32-1: the trainer crashed and the Job retried it",
    ),
    Regression(
        "FineTuneJob",
        {("hyperparameters", "seed"): 2**32},
        ("hyperparameters", "seed"),
        "the same, past the top",
    ),
    Regression(
        "FineTuneJob",
        {("ttlSecondsAfterFinished",): 2**31},
        ("ttlSecondsAfterFinished",),
        "a Job's TTL is an int32: creating it failed with 400, which the operator retried forever",
    ),
    Regression(
        "FineTuneJob",
        {("dataset", "source", "url"): "https://example.com/数据.jsonl"},
        ("dataset", "source", "url"),
        "urllib sends ASCII only: the trainer crashed (UnicodeEncodeError)",
    ),
    Regression(
        "FineTuneJob",
        {("dataset", "source", "url"): "https://example.com/a\u00a0b"},
        ("dataset", "source", "url"),
        "`\\S` admits U+00A0 on the API server (RE2), not in pydantic",
    ),
    Regression(
        "ModelDeployment",
        {
            ("model", "adapter"): {
                "baseModel": {"name": "组织/模型"},
                "adapter": {"pvc": {"claimName": "o"}},
            },
            ("model", "fineTuneJobRef"): None,
        },
        ("model", "adapter", "baseModel", "name"),
        "`\\w` is Unicode in pydantic, ASCII on the server",
    ),
    Regression(
        "FineTuneJob",
        {("env",): [{"name": "A", "valueFrom": {}}]},
        ("env", 0, "valueFrom"),
        "an empty valueFrom passed both, and the Job was rejected",
    ),
    Regression(
        "FineTuneJob",
        {("env",): [{"name": "A"}]},
        ("env", 0),
        "the models admitted an env var with neither value nor valueFrom (the server did not)",
    ),
    Regression(
        "FineTuneJob",
        {("env",): [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "Hub_Token"}}}]},
        ("env", 0, "valueFrom", "secretKeyRef", "name"),
        "not an object name: the Job was rejected",
    ),
    Regression(
        "FineTuneJob",
        {("baseModel", "tokenSecretRef"): {"name": "hf", "key": "a/b"}},
        ("baseModel", "tokenSecretRef", "key"),
        "not a Secret key: the Job was rejected",
    ),
    Regression(
        "FineTuneJob",
        {("output", "pvc", "claimName"): "My Claim"},
        ("output", "pvc", "claimName"),
        "no PersistentVolumeClaim can have that name: the pod would wait forever",
    ),
    Regression(
        "FineTuneJob",
        {("resources", "tolerations"): [{"effect": "NoSchedule"}]},
        ("resources", "tolerations", 0),
        "operator must be Exists without a key: the Job was rejected",
    ),
    Regression(
        "FineTuneJob",
        {("resources", "tolerations"): [{"key": "a", "operator": "Exists", "value": "b"}]},
        ("resources", "tolerations", 0, "value"),
        "a value with Exists: the Job was rejected",
    ),
    Regression(
        "FineTuneJob",
        {("resources", "tolerations"): [{"key": "a b"}]},
        ("resources", "tolerations", 0, "key"),
        "not a taint key: the Job was rejected",
    ),
    Regression(
        "FineTuneJob",
        {("resources", "tolerations"): [{"key": "a", "tolerationSeconds": 5}]},
        ("resources", "tolerations", 0, "tolerationSeconds"),
        "needs NoExecute: the Job was rejected",
    ),
    Regression(
        "FineTuneJob",
        {("resources", "affinity"): {"nodeAffinity": {"x": 1}}},
        ("resources", "affinity", "nodeAffinity", "x"),
        "affinity was free-form: the client or server-side apply failed (not 422), retried forever",
    ),
    Regression(
        "ModelDeployment",
        {
            ("resources", "affinity"): {
                "podAntiAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "labelSelector": {
                                "matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]
                            },
                            "topologyKey": "zone",
                        }
                    ]
                }
            }
        },
        (
            "resources",
            "affinity",
            "podAntiAffinity",
            "requiredDuringSchedulingIgnoredDuringExecution",
            0,
            "labelSelector",
            "matchExpressions",
            0,
        ),
        "values with Exists: the Deployment was rejected",
    ),
    Regression(
        "FineTuneJob",
        {
            ("resources", "affinity", "nodeAffinity"): {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "Lt"}]}]
                }
            }
        },
        (
            "resources",
            "affinity",
            "nodeAffinity",
            "requiredDuringSchedulingIgnoredDuringExecution",
            "nodeSelectorTerms",
            0,
            "matchExpressions",
            0,
        ),
        "Lt without a value: the Job was rejected",
    ),
    Regression(
        "ModelDeployment",
        {
            ("resources", "affinity", "podAffinity"): {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {"topologyKey": "zone", "mismatchLabelKeys": ["app"]}
                ]
            }
        },
        ("resources", "affinity", "podAffinity", "requiredDuringSchedulingIgnoredDuringExecution", 0),
        "found by the spec fuzzer: label keys without a labelSelector, the Deployment was rejected",
    ),
    Regression(
        "FineTuneJob",
        {("resources", "priorityClassName"): "High"},
        ("resources", "priorityClassName"),
        "not an object name: the Job was rejected",
    ),
    Regression(
        "FineTuneJob",
        {("resources", "gpuResourceName"): "gpu"},
        ("resources", "gpuResourceName"),
        "an extended resource needs a domain: the Job was rejected",
    ),
    Regression(
        "ModelDeployment",
        {("env",): [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
        ("env",),
        "server-side apply refuses a Deployment with a name twice in env (500), retried forever",
    ),
    Regression(
        "ModelDeployment",
        {("imagePullSecrets",): [{"name": "registry"}, {"name": "registry"}]},
        ("imagePullSecrets",),
        "the same for imagePullSecrets",
    ),
    Regression(
        "ModelDeployment",
        {("runtime", "image"): ""},
        ("runtime", "image"),
        "an empty image: the Deployment was rejected",
    ),
    Regression("FineTuneJob", {("image",): " trainer:1"}, ("image",), "spaces: the Job was rejected"),
]


@pytest.mark.parametrize("regression", REGRESSIONS, ids=lambda r: f"{r.kind}:{dotted(r.field)}")
def test_regressions_are_rejected_by_the_models_naming_the_field(regression: Regression) -> None:
    with pytest.raises(ValidationError) as caught:
        PARSERS[regression.kind](regression.spec())
    assert unnamed_model_errors(caught.value, [Mutation("regression", regression.field)]) == []


@pytest.mark.parametrize(
    ("kind", "changes"),
    [
        ("FineTuneJob", {("resources", "cpu"): "2.5"}),
        ("FineTuneJob", {("resources", "cpu"): 4, ("hyperparameters", "seed"): 2**32 - 1}),
        ("ModelDeployment", {("resources", "cpu"): "500m"}),
        ("FineTuneJob", {("resources", "tolerations"): [{"operator": "Exists"}, {"key": "a", "value": ""}]}),
        (
            "FineTuneJob",
            {("resources", "tolerations"): [{"key": "a", "effect": "NoExecute", "tolerationSeconds": 9}]},
        ),
        (
            "FineTuneJob",
            {("env",): [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k.v"}}}]},
        ),
        ("FineTuneJob", {("dataset", "source", "url"): "https://example.com/%E6%95%B0.jsonl?x=1&y=~"}),
        (
            "FineTuneJob",
            {("ttlSecondsAfterFinished",): 2**31 - 1, ("resources", "gpuResourceName"): "amd.com/gpu"},
        ),
    ],
)
def test_what_the_fixes_still_admit_builds(kind: str, changes: dict[Path, Any]) -> None:
    spec = copy.deepcopy(FTJ_MINIMAL if kind == "FineTuneJob" else MDEP_MINIMAL)
    for path, value in changes.items():
        put(spec, path, value)
    check_children(kind, PARSERS[kind](spec))


def test_quantities_are_bounded_alike_in_the_crd() -> None:
    """An int-or-string pattern checks strings only: `minimum` and `maxLength` make the API server
    refuse what the models refuse."""
    resources = SCHEMAS["FineTuneJob"]["properties"]["resources"]["properties"]
    for name in ("cpu", "memory", "sharedMemory"):
        assert resources[name]["minimum"] == 0 and resources[name]["maxLength"] == 32, name
