"""`resources.affinity`: the core/v1 Affinity shapes, written to the pod verbatim, and nothing else."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from deeptune.api.finetunejob import parse_spec
from tests.unit.test_finetunejob_builders import job_for, pod_of
from tests.unit.test_finetunejob_model import error_of, with_changes

NODE_AFFINITY: dict[str, Any] = {
    "requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [
            {
                "matchExpressions": [
                    {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["A100-SXM4-80GB"]},
                    {"key": "node-role.kubernetes.io/control-plane", "operator": "DoesNotExist"},
                    {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["40000"]},
                ]
            },
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-node-1"]}]},
        ]
    },
    "preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "preference": {"matchExpressions": [{"key": "zone", "operator": "Exists"}]}}
    ],
}

POD_TERM: dict[str, Any] = {
    "labelSelector": {
        "matchLabels": {"app.kubernetes.io/name": "deeptune-trainer"},
        "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["batch"]}],
    },
    "namespaceSelector": {"matchLabels": {"team": "ml"}},
    "namespaces": ["team-a"],
    "topologyKey": "kubernetes.io/hostname",
    "matchLabelKeys": ["pod-template-hash"],
}

AFFINITIES = [
    pytest.param({"nodeAffinity": NODE_AFFINITY}, id="node affinity"),
    pytest.param(
        {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [POD_TERM]}}, id="pod affinity"
    ),
    pytest.param(
        {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 1, "podAffinityTerm": {"topologyKey": "topology.kubernetes.io/zone"}}
                ]
            }
        },
        id="pod anti-affinity",
    ),
]


@pytest.mark.parametrize("affinity", AFFINITIES)
def test_valid_affinities_reach_the_pod_verbatim(affinity: dict[str, Any]) -> None:
    pod = pod_of(job_for(with_changes(resources={"affinity": copy.deepcopy(affinity)})))
    assert pod["affinity"] == affinity


def test_wire_form_round_trips() -> None:
    spec = with_changes(resources={"affinity": {"nodeAffinity": NODE_AFFINITY}})
    wire = parse_spec(spec).to_wire()["resources"]["affinity"]
    assert parse_spec(with_changes(resources={"affinity": wire})).to_wire()["resources"]["affinity"] == wire


def test_an_empty_affinity_is_left_out() -> None:
    assert "affinity" not in pod_of(job_for(with_changes(resources={"affinity": {}})))


def required_node_expression(expression: dict[str, Any]) -> dict[str, Any]:
    terms = {"nodeSelectorTerms": [{"matchExpressions": [expression]}]}
    return with_changes(
        resources={"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": terms}}}
    )


NODE_EXPRESSION = (
    "spec.resources.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
    ".nodeSelectorTerms.0.matchExpressions.0"
)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            with_changes(resources={"affinity": {"nodeAffinity": {"x": 1}}}),
            "spec.resources.affinity.nodeAffinity.x: Extra inputs are not permitted",
        ),
        (
            with_changes(resources={"affinity": {"nodeAfinity": {}}}),
            "spec.resources.affinity.nodeAfinity: Extra inputs are not permitted",
        ),
        (
            required_node_expression({"key": "gpu", "operator": "Equals", "values": ["a"]}),
            f"{NODE_EXPRESSION}.operator: Input should be"
            " 'In', 'NotIn', 'Exists', 'DoesNotExist', 'Gt' or 'Lt'",
        ),
        (
            required_node_expression({"key": "gpu", "operator": "In"}),
            f"{NODE_EXPRESSION}: In and NotIn need values, Exists and DoesNotExist none",
        ),
        (
            required_node_expression({"key": "gpu", "operator": "Exists", "values": ["a"]}),
            f"{NODE_EXPRESSION}: In and NotIn need values, Exists and DoesNotExist none",
        ),
        (
            required_node_expression({"key": "gpu", "operator": "Gt", "values": ["1", "2"]}),
            f"{NODE_EXPRESSION}: Gt and Lt need exactly one value",
        ),
        (
            with_changes(
                resources={
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}
                        }
                    }
                }
            ),
            "spec.resources.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
            ".nodeSelectorTerms: List should have at least 1 item after validation, not 0",
        ),
        (
            with_changes(
                resources={
                    "affinity": {
                        "nodeAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [
                                {"weight": 0, "preference": {}}
                            ]
                        }
                    }
                }
            ),
            "spec.resources.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution.0.weight:"
            " Input should be greater than or equal to 1",
        ),
        (
            with_changes(
                resources={
                    "affinity": {
                        "podAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {}}]
                        }
                    }
                }
            ),
            "spec.resources.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution.0.topologyKey:"
            " Field required",
        ),
        (
            with_changes(
                resources={
                    "affinity": {
                        "podAntiAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": ""}]
                        }
                    }
                }
            ),
            "spec.resources.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution.0"
            ".topologyKey: String should have at least 1 character",
        ),
        (
            with_changes(
                resources={
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchFields": [
                                            {"key": "metadata.labels", "operator": "In", "values": ["a"]}
                                        ]
                                    }
                                ]
                            }
                        }
                    }
                }
            ),
            "spec.resources.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
            ".nodeSelectorTerms.0.matchFields.0.key: Input should be 'metadata.name'",
        ),
        (
            with_changes(
                resources={
                    "affinity": {
                        "podAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": [
                                {"topologyKey": "zone", "mismatchLabelKeys": ["app"]}
                            ]
                        }
                    }
                }
            ),
            "spec.resources.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution.0:"
            " matchLabelKeys and mismatchLabelKeys need a labelSelector",
        ),
        (
            with_changes(
                resources={
                    "affinity": {
                        "podAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": [
                                {"topologyKey": "zone", "labelSelector": {"matchLabels": {"app\n": "a"}}}
                            ]
                        }
                    }
                }
            ),
            "spec.resources.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution.0.labelSelector"
            ".matchLabels: keys must be label keys such as app.kubernetes.io/name (not: 'app\\n')",
        ),
    ],
)
def test_bad_affinities_name_the_field(spec: dict[str, Any], message: str) -> None:
    assert error_of(spec) == message
