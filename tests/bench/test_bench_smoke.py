"""Benchmarks are not tests, but they must keep working: CI runs each at its smoke size."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_data_pipeline_benchmark_runs_at_smoke_size() -> None:
    subprocess.run([sys.executable, "bench/data_pipeline.py", "--smoke"], cwd=ROOT, check=True, timeout=300)
    report = json.loads((ROOT / "bench" / "results" / "data_pipeline-smoke.json").read_text())
    stages = [r["stage"] for r in report["results"]]
    assert stages == ["load+map", "+normalize", "+pii", "+exact dedup", "+near dedup"]
    kept = [r["kept"] for r in report["results"]]
    assert kept[0] == 1000 and kept[-1] < kept[3] < 1000, "dedup stages removed nothing"
    assert report["machine"]["cores"] >= 1


def test_serving_benchmark_runs_at_smoke_size() -> None:
    subprocess.run([sys.executable, "bench/serving.py", "--smoke"], cwd=ROOT, check=True, timeout=600)
    report = json.loads((ROOT / "bench" / "results" / "serving-smoke.json").read_text())
    assert report["results"], "the serving benchmark measured nothing"
