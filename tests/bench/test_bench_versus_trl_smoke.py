"""The TRL comparison (bench/versus_trl.py) must keep working: run it at its smoke size.

No wall-clock or memory-ratio assertions: CI machines are shared and slow, and the figures belong to
docs/benchmarks.md. Only what holds on any machine: each trainer trained, in its own process, on real
tokens of both shapes of data, on the malloc it was meant to (tcmalloc preloaded as the trainer
image does, or glibc's), reported its memory above what its imports took, and the ratios are
against TRL on glibc on the same data."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.trainer
def test_versus_trl_benchmark_runs_at_smoke_size() -> None:
    report_file = ROOT / "bench" / "results" / "versus-trl-smoke.json"
    report_file.unlink(missing_ok=True)
    subprocess.run([sys.executable, "bench/versus_trl.py", "--smoke"], cwd=ROOT, check=True, timeout=900)
    report = json.loads(report_file.read_text())

    results = {(r["data"], r["configuration"], r["allocator"]): r for r in report["results"]}
    shapes = ("long prompts", "long answers")
    configurations = (
        ("trl", "glibc"),
        ("trl", "tcmalloc"),
        ("ours", "tcmalloc"),
        ("ours", "glibc"),
        ("plain", "glibc"),
    )
    assert list(results) == [(data, *configuration) for data in shapes for configuration in configurations]
    assert results[("long prompts", "trl", "glibc")]["library"].startswith("trl ")
    for key, result in results.items():
        assert result["real_tokens"] > 0 and result["tokens_per_second"] > 0, key
        assert result["peak_rss_bytes"] > result["rss_before_load_bytes"] > 0, key
        assert result["final_loss"] is not None and math.isfinite(result["final_loss"]), key
        trl = results[(key[0], "trl", "glibc")]
        assert result["tokens_per_second_vs_trl"] == pytest.approx(
            result["tokens_per_second"] / trl["tokens_per_second"]
        ), key
    assert report["machine"]["cores"] >= 1
