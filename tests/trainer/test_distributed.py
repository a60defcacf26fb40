"""Several workers on PyTorch's distributed engine (gloo on CPU): DDP and FSDP train the same model
as one process given the same global batch, a killed sharded run resumes exactly, and only rank 0
writes what a user reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from deeptune.api.trainer import EXIT_INVALID_INPUT, TrainerSummary
from deeptune_trainer.distributed import SHARDED_STATE_DIR
from deeptune_trainer.synthetic import ROTATED_ANSWERS
from deeptune_trainer.training import CHECKPOINTS_DIR, COMPLETE_MARKER
from tests.trainer.conftest import TINY_SPEC, _merge
from tests.trainer.distributed_worker import KILLED_EXIT_CODE, LOSSES
from tests.trainer.test_cli import _manifest

pytestmark = pytest.mark.trainer

WORKERS = 2
STEPS = 20
GLOBAL_BATCH = 16
LOSS_TOLERANCE = 1e-4
"""Relative. The same samples make each global batch either way (the sampler's permutation is cut
into per-worker batches in order), so the losses differ only by float summation order: ~1e-7 measured."""


def _spec(
    method: str, strategy: str, batch: int, offload: str = "none", **hyperparameters: Any
) -> dict[str, Any]:
    return _merge(
        TINY_SPEC,
        {
            "method": method,
            "hyperparameters": {
                "maxSteps": STEPS,
                "perDeviceBatchSize": batch,
                "loggingSteps": 1,
                "checkpointSteps": 5,
                **hyperparameters,
            },
            "distributed": {"strategy": strategy, "offload": offload},
        },
    )


def _run_workers(
    model_dir: Path, output: Path, spec: dict[str, Any], workers: int, kill_at: int = 0
) -> subprocess.CompletedProcess[str]:
    worker = ["-m", "tests.trainer.distributed_worker", str(model_dir), str(output), json.dumps(spec)]
    worker.append(str(kill_at))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}"]
    command = [sys.executable, *(launcher if workers > 1 else []), *worker]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)


def _losses(model_dir: Path, output: Path, spec: dict[str, Any], workers: int) -> dict[str, Any]:
    done = _run_workers(model_dir, output, spec, workers)
    assert done.returncode == 0, done.stderr[-4000:]
    record: dict[str, Any] = json.loads((output / LOSSES).read_text())
    assert record["worldSize"] == workers
    return record


@pytest.mark.parametrize(
    ("model", "method", "distributed"),
    [
        ("llama", "lora", {"strategy": "ddp"}),
        ("deepseek_v3", "lora", {"strategy": "fsdp"}),
        ("llama", "full", {"strategy": "fsdp"}),
        ("deepseek_v3", "lora", {"strategy": "deepspeed"}),
        ("llama", "full", {"strategy": "deepspeed"}),
        ("llama", "full", {"strategy": "deepspeed", "offload": "optimizer"}),
    ],
    ids=lambda value: "-".join(value.values()) if isinstance(value, dict) else value,
)
def test_workers_follow_the_single_process_loss_curve(
    model: str, method: str, distributed: dict[str, str], tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = tiny_model_dirs[model]
    alone = _losses(model_dir, tmp_path / "alone", _spec(method, "ddp", GLOBAL_BATCH), workers=1)
    offload = distributed.get("offload", "none")
    split = _spec(method, distributed["strategy"], GLOBAL_BATCH // WORKERS, offload)
    together = _losses(model_dir, tmp_path / "together", split, workers=WORKERS)
    print(f"\n{model} {method} {distributed}: 1 process {alone['losses'][-1]:.4f}, "
          f"{WORKERS} workers {together['losses'][-1]:.4f} after {STEPS} steps")  # fmt: skip
    assert len(together["losses"]) == len(alone["losses"]) == STEPS
    assert together["losses"] == pytest.approx(alone["losses"], rel=LOSS_TOLERANCE)
    assert alone["losses"][-1] < alone["losses"][0] / 2  # it learned: the curves compared are not flat


@pytest.mark.parametrize(
    ("strategy", "optimizer_shards"),
    [
        ("fsdp", f"{SHARDED_STATE_DIR}/*.distcp"),  # torch.distributed.checkpoint's, written by the trainer
        ("deepspeed", "global_step10/*optim_states.pt"),  # ZeRO's, written by the Trainer through DeepSpeed
    ],
)
def test_a_killed_sharded_run_resumes_from_its_sharded_checkpoint(
    strategy: str, optimizer_shards: str, tiny_deepseek_dir: Path, tmp_path: Path
) -> None:
    spec = _spec("lora", strategy, GLOBAL_BATCH // WORKERS)
    killed = _run_workers(tiny_deepseek_dir, tmp_path / "run", spec, WORKERS, kill_at=13)
    assert killed.returncode != 0 and f"exitcode  : {KILLED_EXIT_CODE}" in killed.stderr
    checkpoints = tmp_path / "run" / CHECKPOINTS_DIR
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-10", "checkpoint-5"]
    shards = sorted(p.name for p in (checkpoints / "checkpoint-10").glob(optimizer_shards))
    assert len(shards) == WORKERS  # one shard of the optimizer state per worker
    assert (checkpoints / "checkpoint-10" / COMPLETE_MARKER).is_file()

    resumed = _losses(tiny_deepseek_dir, tmp_path / "run", spec, WORKERS)
    uninterrupted = _losses(tiny_deepseek_dir, tmp_path / "uninterrupted", spec, WORKERS)
    assert resumed["resumedFrom"] == "checkpoint-10"
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"], rel=LOSS_TOLERANCE)


def _cli(tmp_path: Path, spec: dict[str, Any], model_dir: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "deeptune_trainer", "--finetunejob", str(_manifest(tmp_path, spec)),
               "--volume", f"models={model_dir}", "--volume", f"out={tmp_path / 'out'}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_a_whole_run_in_two_workers_is_reported_once(
    strategy: str,
    tiny_llama_dir: Path,
    tmp_path: Path,
    keyword_task_rows: tuple[list[dict[str, str]], list[dict[str, str]]],
) -> None:
    train_rows, held_out_rows = keyword_task_rows
    spec = _merge(
        _spec("lora", strategy, 8, maxSteps=40, loggingSteps=10),
        {
            "baseModel": {"pvc": {"claimName": "models", "path": ""}},
            "dataset": {
                "source": {"inline": train_rows},
                "validation": {"source": {"inline": held_out_rows}},
            },
            "evaluation": {"metrics": ["perplexity", "exactMatch"], "evalSteps": 20},
            "resources": {"gpu": 0},
            "distributed": {"processesPerNode": WORKERS},
        },
    )
    done = _cli(tmp_path, spec, tiny_llama_dir)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    print("\n" + done.stdout[-1500:])
    assert lines[0] == f"starting {WORKERS} worker processes ({strategy})"
    assert sum(line.startswith("step 10/40") for line in lines) == 1  # rank 0 logs, once
    assert lines[-1] == "done"
    run_dir = tmp_path / "out" / "default" / "demo"
    summary = TrainerSummary.model_validate_json((run_dir / "summary.json").read_text())
    assert summary.outcome == "succeeded" and summary.steps == 40
    assert summary.eval_results is not None and summary.eval_results.delta is not None
    assert summary.eval_results.delta["perplexity"] < 0  # the trained adapter, gathered, beats the base
    assert summary.eval_results.baseline["exactMatch"] < summary.eval_results.fine_tuned["exactMatch"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_early_stopping_in_sharded_workers_exports_the_best_checkpoint(
    strategy: str,
    tiny_llama_dir: Path,
    tmp_path: Path,
    keyword_task_rows: tuple[list[dict[str, str]], list[dict[str, str]]],
) -> None:
    """Sharded, the Trainer cannot restore the best model itself (load_best_model_at_end needs the
    whole model in one process): rank 0 loads the best checkpoint instead. Validation rows answered
    with another keyword's phrase make eval loss fall, then rise (as in the one-process test)."""
    train_rows, held_out_rows = keyword_task_rows
    rotated = [{**row, "completion": ROTATED_ANSWERS[row["completion"]]} for row in held_out_rows[:8]]
    spec = _merge(
        _spec("lora", strategy, 8, maxSteps=40, learningRate=1e-2, warmupRatio=0.0, scheduler="constant"),
        {
            "baseModel": {"pvc": {"claimName": "models", "path": ""}},
            "dataset": {"source": {"inline": train_rows}, "validation": {"source": {"inline": rotated}}},
            "evaluation": {"metrics": ["perplexity"], "evalSteps": 4, "baseline": False},
            "earlyStopping": {"patience": 2},
            "resources": {"gpu": 0},
            "distributed": {"processesPerNode": WORKERS},
        },
    )
    done = _cli(tmp_path, spec, tiny_llama_dir)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = tmp_path / "out" / "default" / "demo"
    summary = TrainerSummary.model_validate_json((run_dir / "summary.json").read_text())
    assert summary.eval_results is not None and summary.eval_results.step is not None
    best = summary.eval_results.step
    assert best < summary.steps < 40, (best, summary.steps)  # stopped early, after the best evaluation
    exported = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    chosen = load_file(run_dir / CHECKPOINTS_DIR / f"checkpoint-{best}" / "adapter_model.safetensors")
    last = load_file(run_dir / CHECKPOINTS_DIR / f"checkpoint-{summary.steps}" / "adapter_model.safetensors")
    assert exported.keys() == chosen.keys() and len(exported) > 0
    assert all(torch.equal(exported[name], chosen[name]) for name in exported)
    assert not all(torch.equal(exported[name], last[name]) for name in exported)


def test_bad_input_in_the_workers_fails_the_run_once(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = _merge(
        _spec("lora", "ddp", 8),
        {
            "baseModel": {"pvc": {"claimName": "models", "path": ""}},
            "resources": {"gpu": 0},
            "distributed": {"processesPerNode": WORKERS},
        },
    )
    spec["dataset"] = {"source": {"pvc": {"claimName": "out", "path": "missing.jsonl"}}}
    done = _cli(tmp_path, spec, tiny_llama_dir)
    assert done.returncode == EXIT_INVALID_INPUT, done.stderr[-4000:]
    summary_file = tmp_path / "out" / "default" / "demo" / "summary.json"
    summary = TrainerSummary.model_validate_json(summary_file.read_text())
    assert summary.error is not None and "missing.jsonl" in summary.error.message
    assert done.stderr.count(f"error: {summary.error.reason}") == 1  # said by rank 0 alone


def test_several_pods_need_a_cluster(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = _merge(_spec("lora", "ddp", 8), {"resources": {"gpu": 0}, "distributed": {"nodes": 2}})
    done = _cli(tmp_path, spec, tiny_llama_dir)
    assert done.returncode == EXIT_INVALID_INPUT
    assert "distributed.nodes 2 runs as an Indexed Job in a cluster" in done.stderr
