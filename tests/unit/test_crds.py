"""The generated CRDs: in sync with the models, structural, and accepting what the models accept."""

from __future__ import annotations

import json
import typing
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel

from deeptune import crdgen
from deeptune.api.finetunejob import FineTuneJobSpec
from tests.conftest import ROOT
from tests.unit.test_finetunejob_model import MINIMAL, with_changes

CRD = crdgen.all_crds()["finetunejobs.deeptune.dev.yaml"]
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_committed_crds_match_the_models() -> None:
    assert crdgen.main(["--check", str(ROOT / "crds"), str(ROOT / "charts/deeptune/files/crds")]) == 0


def test_schema_is_structural() -> None:
    for path, node in walk(SCHEMA):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title"} & node.keys(), path
        assert node.get("additionalProperties") is not False, path
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed or node.get("x-kubernetes-preserve-unknown-fields"), path


def test_every_model_field_is_in_the_schema() -> None:
    spec_schema = SCHEMA["properties"]["spec"]["properties"]
    for field in FineTuneJobSpec.model_fields.values():
        assert field.alias in spec_schema


def test_fields_are_documented_for_kubectl_explain() -> None:
    hyper = SCHEMA["properties"]["spec"]["properties"]["hyperparameters"]["properties"]
    assert "2e-4 for lora" in hyper["learningRate"]["description"]


def _validate(spec: dict[str, Any]) -> None:
    manifest = {"apiVersion": "deeptune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {}, "spec": spec}
    jsonschema.Draft4Validator(SCHEMA).validate(manifest)


def test_schema_accepts_what_the_models_accept(tiny_manifest: dict[str, Any]) -> None:
    _validate(MINIMAL)
    _validate(tiny_manifest["spec"])
    _validate(with_changes(resources={"cpu": 4, "memory": "8Gi"}))


@pytest.mark.parametrize(
    "spec",
    [
        with_changes(method="dpo"),
        with_changes(hyperparameters__learningRate=0),
        with_changes(hyperparameters__perDeviceBatchSize=0),
        with_changes(resources={"memory": "lots"}),
        with_changes(dataset={"source": {"url": "ftp://x"}}),
    ],
)
def test_schema_rejects_what_the_models_reject(spec: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        _validate(spec)


def test_cross_field_rules_are_cel_rules_with_the_models_messages() -> None:
    rules = {r["message"] for r in SCHEMA["properties"]["spec"]["x-kubernetes-validations"]}
    assert "method qlora needs a GPU: set resources.gpu to 1 or more, or use method lora" in rules
    props = SCHEMA["properties"]["spec"]["properties"]
    immutable = [name for name, node in props.items() if "self == oldSelf" in str(node)]
    assert set(immutable) == {
        "baseModel",
        "dataset",
        "method",
        "lora",
        "hyperparameters",
        "evaluation",
        "resources",
        "distributed",
        "queueName",
        "workloadPriorityClassName",
        "output",
    }


def test_printer_columns_show_phase_progress_and_eval_loss() -> None:
    columns = {c["name"]: c["jsonPath"] for c in CRD["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Progress %"] == ".status.progress.percent"
    assert columns["Eval Loss"] == ".status.progress.evalLoss"
    assert CRD["spec"]["names"]["shortNames"] == ["ftj"]
    assert CRD["spec"]["versions"][0]["subresources"] == {"status": {}}


def _models(model: type[BaseModel]) -> Iterator[type[BaseModel]]:
    yield model
    for field in model.model_fields.values():
        for arg in typing.get_args(field.annotation) or (field.annotation,):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield from _models(arg)


def test_every_cel_rule_of_every_model_reaches_the_crd() -> None:
    text = json.dumps(SCHEMA)
    rules = [
        rule["message"]
        for model in _models(FineTuneJobSpec)
        for rule in (model.model_config.get("json_schema_extra") or {}).get("x-kubernetes-validations", [])
    ]
    assert len(rules) >= 5
    for message in rules:
        assert json.dumps(message) in text, message
