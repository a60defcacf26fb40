"""The CRD on a real API server: defaults applied, bad specs rejected with the models' messages."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from deeptune.api.federatedfinetune import TEMPLATE_FEDERATION_MESSAGE, TEMPLATE_QUEUE_MESSAGE
from deeptune.api.finetunejob import (
    DISTILLATION_PREFERENCE_MESSAGE,
    DISTILLATION_SHARDING_MESSAGE,
    FEDERATION_SHAPE_MESSAGE,
    PREFERENCE_NEEDS_PAIRS_MESSAGE,
    PREFERENCE_SHARDING_MESSAGE,
    PREFERENCE_STYLE_MESSAGE,
    ROPE_SCALING_MERGE_MESSAGE,
    WINDOW_OVERLAP_MESSAGE,
)
from deeptune.api.finetunesweep import PRUNER_NEEDS_EVALUATIONS, PRUNER_NOT_QUEUED
from tests.cluster.harness import Cluster, finetunejob
from tests.unit.test_finetunejob_model import MINIMAL

pytestmark = pytest.mark.cluster


def spec_with(**top: Any) -> dict[str, Any]:
    spec = copy.deepcopy(MINIMAL)
    spec.update(top)
    return spec


def test_server_fills_in_the_models_defaults(crds: Cluster, namespace: str) -> None:
    crds.apply(finetunejob("defaults", namespace, MINIMAL))
    stored = crds.get("finetunejob", "defaults", namespace)
    assert stored is not None
    spec = stored["spec"]
    assert spec["method"] == "lora"
    assert spec["hyperparameters"]["epochs"] == 3
    assert spec["lora"]["targetModules"] == ["auto"]
    assert spec["dataset"]["cleaning"]["pii"]["action"] == "redact"
    assert spec["resources"]["gpu"] == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            spec_with(method="qlora", resources={"gpu": 0}),
            "method qlora needs a GPU: set resources.gpu to 1 or more, or use method lora",
        ),
        (
            spec_with(baseModel={"name": "a/b", "pvc": {"claimName": "m"}}),
            "set exactly one of name (a Hugging Face id) or pvc",
        ),
        (spec_with(dataset={"source": {}}), "set exactly one of pvc, configMap, url, hub or inline"),
        (spec_with(method="dpo"), 'Unsupported value: "dpo"'),
        (spec_with(hyperparameters={"learningRate": 0}), "should be greater than 0"),
        (
            spec_with(output={"pvc": {"claimName": "o", "path": "../../etc"}}),
            "must be a relative path without '..' segments",
        ),
        (
            spec_with(dataset={"source": {"url": "https://x/y"}, "cleaning": {"minChars": 5, "maxChars": 2}}),
            "minChars must not exceed maxChars",
        ),
        (
            spec_with(dataset={"source": {"url": "https://x/y"}, "style": "preference"}),
            PREFERENCE_STYLE_MESSAGE,
        ),
        (
            spec_with(preference={}, dataset={"source": {"url": "https://x/y"}, "style": "chat"}),
            PREFERENCE_NEEDS_PAIRS_MESSAGE,
        ),
        (
            spec_with(preference={"algorithm": "orpo"}, distributed={"strategy": "fsdp"}),
            PREFERENCE_SHARDING_MESSAGE,
        ),
        (spec_with(preference={"beta": 0}), "should be greater than 0"),
        (
            spec_with(dataset={"source": {"url": "https://x/y"}, "style": "text", "windowOverlap": 2048}),
            WINDOW_OVERLAP_MESSAGE,  # against maxSeqLength's default, 2048
        ),
        (spec_with(ropeScaling={"factor": 2}), ROPE_SCALING_MERGE_MESSAGE),
        (
            spec_with(distillation={"teacher": {"name": "o/t"}}, preference={}),
            DISTILLATION_PREFERENCE_MESSAGE,
        ),
        (
            spec_with(distillation={"teacher": {"name": "o/t"}}, distributed={"strategy": "deepspeed"}),
            DISTILLATION_SHARDING_MESSAGE,
        ),
        (
            spec_with(distillation={"teacher": {}}),
            "set exactly one of name (a Hugging Face id), pvc or fineTuneJobRef",
        ),
        (
            spec_with(
                dataset={
                    "source": {"url": "https://x/y"},
                    "augmentation": {"instructionPerturbation": {"templates": ["Hi team!"]}},
                }
            ),
            "each template holds {text}, where the instruction goes",
        ),
    ],
)
def test_bad_specs_are_rejected_at_apply(
    crds: Cluster, namespace: str, spec: dict[str, Any], message: str
) -> None:
    result = crds.apply(finetunejob("bad", namespace, spec), check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_unknown_fields_are_rejected_by_strict_validation(crds: Cluster, namespace: str) -> None:
    result = crds.apply(finetunejob("typo", namespace, spec_with(hyperparameter={"epochs": 1})), check=False)
    assert result.returncode != 0
    assert 'unknown field "spec.hyperparameter"' in result.stderr


def test_training_fields_are_immutable(crds: Cluster, namespace: str) -> None:
    crds.apply(finetunejob("fixed", namespace, MINIMAL))
    result = crds.kubectl(
        "patch",
        "finetunejob",
        "fixed",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"hyperparameters": {"epochs": 5}}}',
        check=False,
    )
    assert result.returncode != 0
    assert "hyperparameters is immutable: create a new resource" in result.stderr
    preference = '{"spec": {"preference": {}}}'
    added = crds.kubectl(
        "patch", "finetunejob", "fixed", "-n", namespace, "--type=merge", "-p", preference, check=False
    )  # fmt: skip
    assert "preference is immutable" in added.stderr  # an optional field set after creation
    allowed = crds.kubectl(
        "patch",
        "finetunejob",
        "fixed",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"suspend": true}}',
    )
    assert "patched" in allowed.stdout


def test_kubectl_explain_documents_fields(crds: Cluster) -> None:
    explained = crds.kubectl("explain", "finetunejob.spec.hyperparameters.learningRate").stdout
    assert "2e-4 for lora/qlora" in explained


def test_short_name_and_printer_columns(crds: Cluster, namespace: str) -> None:
    crds.apply(finetunejob("columns", namespace, MINIMAL))
    header = crds.kubectl("get", "ftj", "-n", namespace).stdout.splitlines()[0].split()
    assert header[:5] == ["NAME", "PHASE", "PROGRESS", "%", "EVAL"]


def sweep(name: str, namespace: str, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "template": copy.deepcopy(MINIMAL),
        "parameters": [{"path": "hyperparameters.learningRate", "low": 1e-5, "high": 1e-3, "log": True}],
        "objective": {"metric": "exactMatch"},
    }
    spec.update(changes)
    meta = {"name": name, "namespace": namespace}
    return {"apiVersion": "deeptune.dev/v1alpha1", "kind": "FineTuneSweep", "metadata": meta, "spec": spec}


LR = "hyperparameters.learningRate"
QUEUED = {**MINIMAL, "queueName": "q", "evaluation": {"evalSteps": 5}}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"parameters": [{"path": LR, "low": 1e-3, "high": 1e-5}]}, "low < high"),
        ({"parameters": [{"path": "lora.r", "type": "categorical", "low": 1, "high": 8}]}, "not low and"),
        ({"parameters": [{"path": "dataset.source", "low": 0, "high": 1}]}, 'Unsupported value: "dataset'),
        ({"parameters": [{"path": LR, "low": 0, "high": 1, "log": True}]}, "low above 0"),
        ({"pruner": {}}, PRUNER_NEEDS_EVALUATIONS),
        ({"template": QUEUED, "pruner": {}}, PRUNER_NOT_QUEUED),
        ({"template": {**MINIMAL, "method": "qlora", "resources": {"gpu": 0}}}, "method qlora needs a GPU"),
        ({"trials": 0}, "spec.trials"),
    ],
)  # fmt: skip
def test_bad_sweeps_are_rejected_at_apply(
    crds: Cluster, namespace: str, changes: dict[str, Any], message: str
) -> None:
    """The sweep's own rules, and the template's (every FineTuneJob rule applies to it)."""
    result = crds.apply(sweep("bad", namespace, **changes), check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_a_sweeps_search_is_immutable_and_its_budget_is_not(crds: Cluster, namespace: str) -> None:
    crds.apply(sweep("search", namespace))
    stored = crds.get("finetunesweep", "search", namespace) or {}
    assert (stored["spec"]["trials"], stored["spec"]["parallelism"], stored["spec"]["sampler"]["type"]) == (
        10, 1, "tpe",
    )  # fmt: skip

    def patched(change: str) -> Any:
        return crds.kubectl(
            "patch", "fts", "search", "-n", namespace, "--type=merge", "-p", change, check=False
        )  # fmt: skip

    moved = patched('{"spec": {"template": {"hyperparameters": {"epochs": 5}}}}')
    assert "template is immutable" in moved.stderr
    assert "patched" in patched('{"spec": {"trials": 20, "parallelism": 4}}').stdout


def federation(name: str, namespace: str, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "template": copy.deepcopy(MINIMAL),
        "sites": [{"namespace": "a"}, {"namespace": "b"}],
    }
    spec.update(changes)
    meta = {"name": name, "namespace": namespace}
    return {
        "apiVersion": "deeptune.dev/v1alpha1",
        "kind": "FederatedFineTune",
        "metadata": meta,
        "spec": spec,
    }


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sites": [{"namespace": "a"}]}, "spec.sites: Invalid value"),
        ({"template": {**MINIMAL, "federation": {"coordinator": "c.n.svc:1"}}}, TEMPLATE_FEDERATION_MESSAGE),
        ({"template": {**MINIMAL, "queueName": "q"}}, TEMPLATE_QUEUE_MESSAGE),
        ({"rounds": 0}, "spec.rounds"),
    ],
)  # fmt: skip
def test_bad_federations_are_rejected_at_apply(
    crds: Cluster, namespace: str, changes: dict[str, Any], message: str
) -> None:
    result = crds.apply(federation("bad", namespace, **changes), check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_a_finetunejob_joins_a_federation_only_as_lora_in_one_process(crds: Cluster, namespace: str) -> None:
    site = {**MINIMAL, "federation": {"coordinator": "c.ns.svc:9092"}, "method": "full"}
    result = crds.apply(finetunejob("site", namespace, site), check=False)
    assert result.returncode != 0
    assert FEDERATION_SHAPE_MESSAGE in result.stderr, result.stderr
    result = crds.apply(
        finetunejob("site", namespace, {**site, "federation": {"coordinator": "no port"}}), check=False
    )
    assert "spec.federation.coordinator" in result.stderr, result.stderr
