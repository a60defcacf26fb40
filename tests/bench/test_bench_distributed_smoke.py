"""The distributed benchmark (bench/distributed.py) must keep working: run it at its smoke size.

No wall-clock assertions: CI machines are shared and slow. Only what holds on any machine: every
configuration trained on real tokens, the same global batch in each (so the same tokens and the same
loss), every rank reported its peak RSS, and FSDP's sharding shows in full fine-tuning's memory.
LoRA's memory is not compared: at this size the frozen weights FSDP halves (39 MB a rank) weigh less
than FSDP's own costs (the layers it gathers whole to compute with, its buffers), and FSDP LoRA
measured ~30 MB a rank above DDP. Full fine-tuning's Adam state and gradients, sharded too, make the
difference (~160 MB a rank measured at this size)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CONFIGURATIONS = ["1 process", "2 DDP", "2 FSDP", "2 ZeRO-3"]


@pytest.mark.trainer
def test_distributed_benchmark_runs_at_smoke_size() -> None:
    report_file = ROOT / "bench" / "results" / "distributed-smoke.json"
    report_file.unlink(missing_ok=True)
    subprocess.run([sys.executable, "bench/distributed.py", "--smoke"], cwd=ROOT, check=True, timeout=600)
    report = json.loads(report_file.read_text())

    results = {(r["method"], r["configuration"]): r for r in report["results"]}
    assert list(results) == [(method, name) for method in ("lora", "full") for name in CONFIGURATIONS]
    for (method, name), result in results.items():
        assert result["real_tokens"] > 0 and result["tokens_per_second"] > 0, (method, name)
        assert len(result["training_peak_rss_per_rank"]) == result["processes"], (method, name)
        assert all(rss > 0 for rss in result["training_peak_rss_per_rank"]), (method, name)
        alone = results[(method, "1 process")]
        assert result["real_tokens"] == alone["real_tokens"], "not the same global batch"
        assert result["final_loss"] == pytest.approx(alone["final_loss"], rel=1e-3), (method, name)
        if result["processes"] > 1:
            assert result["scaling_efficiency"] > 0, (method, name)
    replicated_rss = results[("full", "2 DDP")]["training_peak_rss_per_rank"]
    for name in ("2 FSDP", "2 ZeRO-3"):
        sharded_rss = results[("full", name)]["training_peak_rss_per_rank"]
        for rank, (sharded, replicated) in enumerate(zip(sharded_rss, replicated_rss, strict=True)):
            assert sharded <= replicated, f"rank {rank}: {name} full {sharded} bytes > DDP full {replicated}"
    assert report["machine"]["cores"] >= 1
