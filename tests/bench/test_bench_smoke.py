"""Benchmarks are not tests, but they must keep working: CI runs each at its smoke size."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_data_pipeline_benchmark_runs_at_smoke_size() -> None:
    subprocess.run([sys.executable, "bench/data_pipeline.py", "--smoke"], cwd=ROOT, check=True, timeout=300)
    report = json.loads((ROOT / "bench" / "results" / "data_pipeline-smoke.json").read_text())
    stages = [r["stage"] for r in report["results"]]
    assert stages == ["load+map", "+normalize", "+pii", "+exact dedup", "+near dedup"]
    kept = [r["kept"] for r in report["results"]]
    assert kept[0] == 1000 and kept[-1] < kept[3] < 1000, "dedup stages removed nothing"
    assert report["machine"]["cores"] >= 1


def test_near_dedup_benchmark_runs_both_libraries_at_smoke_size() -> None:
    subprocess.run([sys.executable, "bench/near_dedup.py", "--smoke"], cwd=ROOT, check=True, timeout=300)
    report = json.loads((ROOT / "bench" / "results" / "near_dedup-smoke.json").read_text())
    by_library = {row["library"]: row for row in report["results"]}
    assert set(by_library) == {"ours", "datasketch"}
    for row in by_library.values():
        assert 0 < row["confirmed"] <= row["removed"] < row["rows"], row
    assert by_library["ours"]["confirmed"] == by_library["ours"]["removed"], "ours checks exact Jaccard"


def test_detokenize_benchmark_streams_the_whole_decode_at_smoke_size() -> None:
    subprocess.run([sys.executable, "bench/detokenize.py", "--smoke"], cwd=ROOT, check=True, timeout=300)
    report = json.loads((ROOT / "bench" / "results" / "detokenize-smoke.json").read_text())
    assert [row["tokens"] for row in report["results"]] == [64, 256]
    assert all(row["window_us_per_token"] > 0 for row in report["results"])


def test_vocabulary_sampling_benchmark_runs_at_smoke_size() -> None:
    command = [sys.executable, "bench/vocabulary_sampling.py", "--smoke"]
    subprocess.run(command, cwd=ROOT, check=True, timeout=300)
    report = json.loads((ROOT / "bench" / "results" / "vocabulary_sampling-smoke.json").read_text())
    assert [row["vocabulary"] for row in report["results"]] == [768, 4096]
    assert all(row["per_row_tokens_per_second"] > 0 for row in report["results"])


def test_serving_benchmark_runs_at_smoke_size() -> None:
    subprocess.run([sys.executable, "bench/serving.py", "--smoke"], cwd=ROOT, check=True, timeout=600)
    report = json.loads((ROOT / "bench" / "results" / "serving-smoke.json").read_text())
    assert report["results"], "the serving benchmark measured nothing"


def test_llm_serving_benchmark_runs_at_smoke_size() -> None:
    """With a baseline column too: the serving package of a git revision (HEAD here), side by side."""
    command = [sys.executable, "bench/llm_serving.py", "--smoke", "--baseline", "HEAD"]
    subprocess.run(command, cwd=ROOT, check=True, timeout=600)
    report = json.loads((ROOT / "bench" / "results" / "llm-serving-smoke.json").read_text())
    measured = {(row["mode"], row["concurrency"]) for row in report["results"]}
    columns = ("static", "continuous", "vllm", "continuous@HEAD")
    assert measured == {(mode, c) for mode in columns for c in (1, 4)}
    assert set(report["continuous_over_continuous_at_HEAD"]) == {"1", "4"}
    assert all(row["output_tokens"] > 0 and row["ttft_p50_ms"] > 0 for row in report["results"])


@pytest.mark.cluster
def test_operator_benchmark_runs_at_smoke_size() -> None:
    """On its own private control plane; the figures must at least show one Job per FineTuneJob."""
    subprocess.run([sys.executable, "bench/operator_scale.py", "--smoke"], cwd=ROOT, check=True, timeout=600)
    report = json.loads((ROOT / "bench" / "results" / "operator_scale-smoke.json").read_text())
    sizes = {size["objects"]: size for size in report["results"]}
    assert sorted(sizes) == [1, 10]
    for size in sizes.values():
        assert size["requests_per_object"]["POST jobs"] == 1.0, "one Job create per FineTuneJob"
        assert size["status_writes_per_object"] >= 2  # at least Pending and Succeeded
        assert size["idle_status_writes_per_object"] == 0, "status written while nothing changed"
        assert size["done_to_succeeded_ms"]["max"] > 0
    assert report["warm_apply_to_job_ms"]["max"] > 0
