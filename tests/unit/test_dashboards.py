"""The Grafana dashboard the chart ships (charts/deeptune/files/dashboards/): rendered by Helm as
Grafana's sidecar finds it, valid dashboard JSON, and every metric a query names exported by the
code that serves it. DeepTune's own metrics are read from the code's registries here; Triton's from
a real Triton's /metrics page (tests/serving/test_triton_server.py) and vLLM's from a real vLLM's
(tests/serving/test_vllm.py), both through `metric_names`."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry

import deeptune.observability  # noqa: F401  (registers the operator's metrics on the default registry)
from deeptune_serving.engine import RUNNING_METRIC, WAITING_METRIC
from deeptune_trainer.metrics_server import TrainerMetrics
from tests.conftest import ROOT

CHART = ROOT / "charts" / "deeptune"
DASHBOARD = CHART / "files" / "dashboards" / "deeptune.json"
PROMQL_WORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"})
FAMILY_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
}


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression reads: identifiers that are not functions (followed by `(`),
    label names (in `{...}` and `by (...)`), range durations or keywords."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)
    found = re.findall(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?!\s*\(|[\w:])", bare)
    return {name for name in found if name not in PROMQL_WORDS}


def dashboard_metrics(prefix: str) -> set[str]:
    """Every metric the shipped dashboard reads whose name starts with `prefix`."""
    dashboard = json.loads(DASHBOARD.read_text())
    return {name for expr in queries(dashboard) for name in metric_names(expr) if name.startswith(prefix)}


def exported(registry: CollectorRegistry) -> set[str]:
    """The sample names a registry's metric families expose (a counter `x` as `x_total`, ...)."""
    names = set()
    for family in registry.collect():
        suffixes = FAMILY_SUFFIXES.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    """The dashboard as Grafana's sidecar would load it: from the ConfigMap Helm renders."""
    out = subprocess.run(
        ["helm", "template", "x", str(CHART), "--set", "metrics.grafanaDashboards.enabled=true",
         "--show-only", "templates/dashboards.yaml"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    config_map = yaml.safe_load(out)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    return dict(json.loads(config_map["data"]["deeptune.json"]))


def test_the_chart_ships_no_dashboard_unless_asked() -> None:
    out = subprocess.run(
        ["helm", "template", "x", str(CHART)], capture_output=True, text=True, check=True
    ).stdout
    assert "grafana_dashboard" not in out


def test_the_rendered_dashboard_is_the_file_and_well_formed(rendered: dict[str, Any]) -> None:
    assert rendered == json.loads(DASHBOARD.read_text())
    panels = rendered["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert [v["name"] for v in rendered["templating"]["list"]] == ["datasource"]


def test_the_query_parser_finds_metrics_and_nothing_else() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, kind) (rate(deeptune_operator_reconcile_duration_seconds_bucket"
        '{kind="FineTuneJob"}[5m]))) / vllm:num_requests_running / 1e6'
    )
    assert metric_names(expr) == {
        "deeptune_operator_reconcile_duration_seconds_bucket",
        "vllm:num_requests_running",
    }


def test_every_deeptune_metric_on_the_dashboard_is_exported_by_the_code() -> None:
    ours = exported(REGISTRY) | exported(TrainerMetrics().registry) | {RUNNING_METRIC, WAITING_METRIC}
    wanted = dashboard_metrics("deeptune_")
    assert wanted, "the dashboard reads DeepTune's metrics"
    assert wanted <= ours, f"not exported by the code: {sorted(wanted - ours)}"
    assert {"deeptune_gpu_seconds_total", "deeptune_trainer_train_loss"} <= wanted
