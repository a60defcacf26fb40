"""`python -m deeptune_trainer`: exit codes, messages, termination summaries, and a whole run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from deeptune.api.trainer import EXIT_INVALID_INPUT, SUMMARY_LIMIT_BYTES, TrainerSummary
from deeptune_trainer import __main__ as cli
from deeptune_trainer import run

Rows = tuple[list[dict[str, str]], list[dict[str, str]]]


def _manifest(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / "finetune.yaml"
    manifest = {
        "apiVersion": "deeptune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo"},
        "spec": spec,
    }
    path.write_text(yaml.safe_dump(manifest, allow_unicode=True), encoding="utf-8")
    return path


def _summary(path: Path) -> TrainerSummary:
    return TrainerSummary.model_validate_json(path.read_text())


def _spec(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, **changes}


def test_unreadable_config_exits_with_invalid_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    termination = tmp_path / "termination-log"
    monkeypatch.setattr(cli, "TERMINATION_MESSAGE_PATH", str(termination))
    assert cli.main(["--config", str(tmp_path / "missing.json")]) == EXIT_INVALID_INPUT
    assert capsys.readouterr().err.startswith("error: InvalidArguments: cannot read")
    assert _summary(termination).error.reason == "InvalidArguments"  # type: ignore[union-attr]


def test_invalid_config_names_the_field(
    tiny_spec: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli, "TERMINATION_MESSAGE_PATH", str(tmp_path / "termination-log"))
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"name": "x", "spec": _spec(tiny_spec, method="dora"), "paths": {"outputDir": "/tmp/x"}})
    )
    assert cli.main(["--config", str(config)]) == EXIT_INVALID_INPUT
    assert "spec.method" in capsys.readouterr().err


def test_unmapped_claim_says_which_volume_to_give(
    tiny_spec: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _manifest(tmp_path, tiny_spec)
    assert cli.main(["--finetunejob", str(manifest), "--volume", f"out={tmp_path}"]) == EXIT_INVALID_INPUT
    err = capsys.readouterr().err
    assert "baseModel.pvc uses PersistentVolumeClaim models" in err
    assert "--volume models=DIR" in err


def test_config_map_sources_need_a_cluster(
    tiny_spec: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _spec(tiny_spec, dataset={"source": {"configMap": {"name": "rows", "key": "data.jsonl"}}})
    assert cli.main(_local_args(tmp_path, spec)) == EXIT_INVALID_INPUT
    assert "dataset.source.configMap cannot be read outside a cluster" in capsys.readouterr().err


def _local_args(tmp_path: Path, spec: dict[str, Any]) -> list[str]:
    """The friendly CLI form, with both claims mapped to `tmp_path`."""
    manifest = str(_manifest(tmp_path, spec))
    return ["--finetunejob", manifest, "--volume", f"out={tmp_path}", "--volume", f"models={tmp_path}"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_qlora_without_gpu_fails_before_touching_data(
    tiny_spec: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _spec(
        tiny_spec,
        method="qlora",
        dataset={"source": {"pvc": {"claimName": "out", "path": "no-such-file.jsonl"}}},
    )
    assert cli.main(_local_args(tmp_path, spec)) == EXIT_INVALID_INPUT
    assert capsys.readouterr().err.startswith("error: GpuRequired: method qlora")
    summary = _summary(tmp_path / "default" / "demo" / "summary.json")
    assert summary.outcome == "failed"
    assert summary.error is not None and summary.error.reason == "GpuRequired"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (RuntimeError("boom"), "TrainingFailed"),
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), "OutOfMemory"),
    ],
)
def test_unexpected_failures_exit_1_so_the_job_retries(
    tiny_spec: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, reason: str
) -> None:
    def fail(*_: Any, **__: Any) -> TrainerSummary:
        raise error

    monkeypatch.setattr(run, "run", fail)
    args = [
        "--finetunejob",
        str(_manifest(tmp_path, tiny_spec)),
        "--volume",
        f"out={tmp_path}",
        "--volume",
        f"models={tmp_path}",
    ]
    assert cli.main(args) == 1
    summary = _summary(tmp_path / "default" / "demo" / "summary.json")
    assert summary.error is not None and summary.error.reason == reason


@pytest.mark.trainer
def test_a_whole_run_from_a_manifest(
    tiny_spec: dict[str, Any], tmp_path: Path, tiny_llama_dir: Path, keyword_task_rows: Rows
) -> None:
    train_rows, held_out_rows = keyword_task_rows
    spec = _spec(
        tiny_spec,
        baseModel={"pvc": {"claimName": "models"}},
        dataset={
            "source": {"inline": train_rows},
            "validation": {"source": {"inline": held_out_rows[:20]}},
            "test": {"source": {"inline": held_out_rows[20:]}},
        },
        output={"pvc": {"claimName": "out", "path": "runs/demo"}, "mergeAdapter": True},
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "deeptune_trainer", "--finetunejob", str(_manifest(tmp_path, spec)),
               "--volume", f"models={tiny_llama_dir}", "--volume", f"out={out}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = out / "runs" / "demo"
    summary_text = (run_dir / "summary.json").read_text()
    assert len(summary_text.encode()) <= SUMMARY_LIMIT_BYTES
    summary = TrainerSummary.model_validate_json(summary_text)
    print("\n" + done.stdout[-1500:] + "\n" + summary_text)
    assert summary.outcome == "succeeded"
    assert summary.steps == 120
    assert summary.eval_results is not None and summary.eval_results.delta is not None
    assert summary.eval_results.fine_tuned["exactMatch"] >= 0.9
    assert summary.eval_results.delta["exactMatch"] >= 0.9
    assert (summary.eval_results.split, summary.eval_results.step, summary.eval_results.samples) == (
        "test",
        120,
        20,
    )
    assert summary.dataset is not None
    assert (summary.dataset.validation_rows, summary.dataset.test_rows) == (20, 20)
    card = (run_dir / "README.md").read_text()
    assert "Scores on the test split: 20 rows" in card
    assert (
        "![Training and validation loss](loss.png)" in card
        and "![Base model against fine-tuned](eval.png)" in card
    )
    for picture in ("loss.png", "eval.png"):
        with Image.open(run_dir / picture) as image:
            image.verify()  # a whole PNG
    assert summary.artifacts is not None and summary.artifacts.merged == "merged"
    for name in (
        "adapter",
        "merged",
        "eval_results.json",
        "data_report.json",
        "trainer_config.json",
        "README.md",
    ):
        assert (run_dir / name).exists(), name
    lines = done.stdout.splitlines()
    assert any(line.startswith("step 20/120 epoch") for line in lines)
    assert lines[-1] == "done"


def _run_on_file(tmp_path: Path, spec: dict[str, Any], model_dir: Path, rows: list[dict[str, str]]) -> Path:
    """One CLI run with the dataset as a file on the `data` volume; its run directory."""
    data = tmp_path / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    command = [sys.executable, "-m", "deeptune_trainer", "--finetunejob", str(_manifest(tmp_path, spec)),
               "--volume", f"models={model_dir}", "--volume", f"data={data}",
               "--volume", f"out={tmp_path / 'out'}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "out" / "default" / "demo"


def test_lineage_follows_the_data_not_the_run(
    tiny_spec: dict[str, Any], tmp_path: Path, tiny_llama_dir: Path, keyword_task_rows: Rows
) -> None:
    """Issue 19's check: change one row of the dataset and rerun the same spec — the dataset's digest
    and the artifacts' change, the training config's does not."""
    train_rows, held_out_rows = keyword_task_rows
    spec = _spec(
        tiny_spec,
        baseModel={"pvc": {"claimName": "models"}},
        dataset={
            "source": {"pvc": {"claimName": "data", "path": "train.jsonl"}},
            "validation": {"source": {"inline": held_out_rows[:8]}},
        },
        # One epoch (160 rows, 16 a step): every row is trained on, the changed one too.
        hyperparameters={**tiny_spec["hyperparameters"], "maxSteps": 10},
        evaluation={"metrics": ["perplexity"], "baseline": False},
        output={"pvc": {"claimName": "out"}, "mergeAdapter": True},
    )
    changed = [*train_rows[:-1], {**train_rows[-1], "completion": train_rows[-1]["completion"] + " 谢谢"}]
    runs = [_run_on_file(tmp_path / name, spec, tiny_llama_dir, rows) for name, rows in
            (("first", train_rows), ("again", train_rows), ("changed", changed))]  # fmt: skip
    first, again, other = (_summary(run_dir / "summary.json").lineage for run_dir in runs)
    assert first is not None and again is not None and other is not None
    assert first == again  # the same inputs: the same digests, artifacts included (training is seeded)
    assert first.config == other.config
    assert first.datasets["dataset.source"] != other.datasets["dataset.source"]
    assert (
        first.datasets["dataset.source"].startswith("sha256:") and len(first.datasets["dataset.source"]) == 71
    )
    assert first.artifacts.keys() == {"adapter", "merged"}
    assert all(first.artifacts[kind] != other.artifacts[kind] for kind in first.artifacts)
    assert first.base_model == other.base_model and first.base_model is not None
    assert first.base_model.startswith("sha256:")  # a model directory on a PVC: its files' digest
    card = (runs[0] / "README.md").read_text()
    assert (
        f"- training config: {first.config}" in card
        and f"- adapter files: {first.artifacts['adapter']}" in card
    )
