"""The trainer benchmark (bench/trainer.py) must keep working: run it at its smoke size.

No wall-clock assertions: CI machines are shared and slow. Only what holds on any machine: every
configuration trained and processed real tokens, padding waste is a share, and packing wastes less
than padding each batch to its longest row.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CONFIGURATIONS = ["plain", "ours", "ours+packing"]


@pytest.mark.trainer
def test_trainer_benchmark_runs_at_smoke_size() -> None:
    report_file = ROOT / "bench" / "results" / "trainer-smoke.json"
    report_file.unlink(missing_ok=True)
    subprocess.run([sys.executable, "bench/trainer.py", "--smoke"], cwd=ROOT, check=True, timeout=300)
    report = json.loads(report_file.read_text())

    results = {r["configuration"]: r for r in report["results"]}
    assert list(results) == CONFIGURATIONS
    for name, result in results.items():
        assert result["tokens_per_second"] > 0, name
        assert result["real_tokens"] > 0, name
        assert 0 <= result["padding_waste"] < 1, name
    assert results["ours+packing"]["padding_waste"] < results["plain"]["padding_waste"]
    # Ours takes the loss on the completion only, the plain script on every token.
    assert results["plain"]["loss_token_share"] == 1
    assert 0 < results["ours"]["loss_token_share"] < 1
    assert set(report["ratios_ours_over_plain_tokens_per_second"]["tiny"]) == set(CONFIGURATIONS)
    assert set(report["ratios_ours_over_plain_tokens_per_cpu_second"]["tiny"]) == set(CONFIGURATIONS)
    assert report["machine"]["torch_threads"] == 1
