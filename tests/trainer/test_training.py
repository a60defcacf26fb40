"""Model loading and shaping, and training on CPU: learning, methods, resuming, early stopping."""

from __future__ import annotations

import json
import math
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainerControl, TrainerState

from deeptune.api.finetunejob import FineTuneJobSpec
from deeptune.api.trainer import MetricNames, TrainerPaths
from deeptune_trainer.data.sample import Message, Sample
from deeptune_trainer.errors import TrainerInputError
from deeptune_trainer.evaluation import evaluate
from deeptune_trainer.metrics_server import ProgressSnapshot, TrainerMetrics
from deeptune_trainer.modeling import (
    apply_method,
    check_gpu_requirements,
    load_model,
    resolve_precision,
    resolve_target_modules,
)
from deeptune_trainer.synthetic import ROTATED_ANSWERS
from deeptune_trainer.training import (
    COMPLETE_MARKER,
    TrainResult,
    config_fingerprint,
    find_resume_checkpoint,
    train,
)

MakeSpec = Callable[..., FineTuneJobSpec]
Task = tuple[list[Sample], list[Sample]]
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


def _paths(model_dir: Path, tmp_path: Path) -> TrainerPaths:
    return TrainerPaths(output_dir=str(tmp_path / "out"), base_model=str(model_dir))


# --- modeling ---------------------------------------------------------------------------------


def test_auto_targets_of_llama(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    targets = resolve_target_modules(model, ["auto"])
    assert targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_auto_targets_of_deepseek_v3_are_the_mla_projections(
    tiny_deepseek_dir: Path, make_spec: MakeSpec
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_deepseek_dir)
    targets = resolve_target_modules(model, ["auto"])
    assert targets == ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    wrapped = apply_method(model, make_spec())
    adapted = {
        name.removesuffix(".lora_A") for name, _ in wrapped.named_modules() if name.endswith(".lora_A")
    }
    short = {name.removeprefix("base_model.model.model.") for name in adapted}
    assert {f"layers.{i}.self_attn.{t}" for i in range(3) for t in targets} == short  # no MLP, expert, router
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def test_explicit_targets_must_exist(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert resolve_target_modules(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(TrainerInputError, match="kv_b_proj match no Linear layer") as raised:
        resolve_target_modules(model, ["q_proj", "kv_b_proj"])
    assert raised.value.reason == "InvalidSpec"


@cpu_only
def test_precision_on_cpu() -> None:
    assert resolve_precision("auto") == "fp32"
    assert resolve_precision("bf16") == "bf16"


@cpu_only
@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"method": "qlora"}, "method qlora"), ({"output": {"quantizedExport": "int8"}}, "quantizedExport")],
)
def test_gpu_features_fail_clearly_on_cpu(make_spec: MakeSpec, overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(TrainerInputError, match=field) as raised:
        check_gpu_requirements(make_spec(**overrides))
    assert raised.value.reason == "GpuRequired"


def test_missing_model_directory(make_spec: MakeSpec, tmp_path: Path) -> None:
    with pytest.raises(TrainerInputError, match=r"claim models, path 'tiny'.*config\.json") as raised:
        load_model(make_spec(), _paths(tmp_path / "nothing-here", tmp_path))
    assert raised.value.reason == "ModelNotFound"


def test_unknown_hub_model_offline(
    make_spec: MakeSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = make_spec(baseModel={"pvc": None, "name": "deepseek-ai/no-such-model"})
    with pytest.raises(TrainerInputError, match="deepseek-ai/no-such-model@main") as raised:
        load_model(spec, TrainerPaths(output_dir=str(tmp_path)))
    assert raised.value.reason == "ModelNotFound"


def test_model_loads_from_a_directory(make_spec: MakeSpec, tiny_llama_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(make_spec(), _paths(tiny_llama_dir, tmp_path))
    assert loaded.model.config.model_type == "llama"
    assert loaded.tokenizer.pad_token == "<|pad|>"
    assert loaded.source == str(tiny_llama_dir)


# --- checkpoints ------------------------------------------------------------------------------


def _checkpoint(directory: Path, step: int, fingerprint: str | None) -> Path:
    path = directory / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"partial")
    if fingerprint is not None:
        (path / COMPLETE_MARKER).write_text(json.dumps({"fingerprint": fingerprint, "step": step}))
    return path


def test_resume_picks_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 10, "abc")
    newest_complete = _checkpoint(tmp_path, 20, "abc")
    half_written = _checkpoint(tmp_path, 30, None)
    logged: list[str] = []
    assert find_resume_checkpoint(tmp_path, "abc", logged.append) == newest_complete
    assert not half_written.exists()
    assert logged == ["removing incomplete checkpoint checkpoint-30 (a pod stopped while writing it)"]


def test_checkpoints_of_another_configuration_are_refused(tmp_path: Path, make_spec: MakeSpec) -> None:
    _checkpoint(tmp_path, 10, config_fingerprint(make_spec()))
    other = config_fingerprint(make_spec(hyperparameters={"learningRate": 1e-3}))
    with pytest.raises(TrainerInputError, match="different configuration") as raised:
        find_resume_checkpoint(tmp_path, other)
    assert raised.value.reason == "CheckpointMismatch"


def test_fingerprint_ignores_output_and_evaluation(make_spec: MakeSpec) -> None:
    base = config_fingerprint(make_spec())
    assert config_fingerprint(make_spec(evaluation={"maxSamples": 3}, output={"mergeAdapter": True})) == base
    assert config_fingerprint(make_spec(lora={"r": 8})) != base


# --- training ---------------------------------------------------------------------------------


def _load(directory: Path) -> tuple[Any, Any]:
    return AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


def _losses(history: list[dict[str, float]]) -> list[float]:
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.mark.trainer
def test_lora_learns_the_keyword_task_and_beats_the_base_model(
    tiny_llama_dir: Path, keyword_task: Task, make_spec: MakeSpec, tmp_path: Path
) -> None:
    train_rows, held_out = keyword_task
    model, tokenizer = _load(tiny_llama_dir)
    spec = make_spec(evaluation={"metrics": ["perplexity", "bleu", "rouge", "exactMatch"]})
    baseline = evaluate(model, tokenizer, held_out, spec)
    metrics, lines = TrainerMetrics(), list[str]()
    result = train(
        model,
        tokenizer,
        train_rows,
        held_out,
        spec=spec,
        output_dir=tmp_path,
        precision="fp32",
        metrics=metrics,
        log=lines.append,
    )
    tuned = evaluate(result.model, tokenizer, held_out, spec)
    losses = _losses(result.log_history)
    print(
        f"\nkeyword task, LoRA: loss {losses[0]:.3f} → {losses[-1]:.3f}; base {baseline}; fine-tuned {tuned}"
    )

    assert isinstance(result.model, PeftModel)
    assert result.steps == 120
    assert losses[-1] < losses[0] / 5
    assert tuned["exactMatch"] >= 0.9 > baseline["exactMatch"]
    assert tuned["bleu"] > baseline["bleu"] + 50
    assert tuned["perplexity"] < baseline["perplexity"] / 10
    # Progress: one line per logging step, and the gauges the operator scrapes.
    assert lines[0].startswith("step 1/120 epoch")
    assert any(line.startswith("step 120/120") and "eval_loss" in line for line in lines)
    page = metrics.exposition()
    assert f"{MetricNames.STEP} 120.0" in page
    assert f"{MetricNames.TOTAL_STEPS} 120.0" in page
    assert f"{MetricNames.TRAIN_LOSS} NaN" not in page
    assert f"{MetricNames.TOKENS_PER_SECOND} NaN" not in page


@pytest.mark.trainer
def test_full_fine_tuning_of_deepseek_v3_with_packing_and_checkpointing(
    tiny_deepseek_dir: Path, keyword_task: Task, make_spec: MakeSpec, tmp_path: Path
) -> None:
    train_rows, held_out = keyword_task
    model, tokenizer = _load(tiny_deepseek_dir)
    spec = make_spec(
        method="full",
        hyperparameters={
            "learningRate": 3e-3,
            "maxSteps": 30,
            "packing": True,
            "gradientCheckpointing": True,
        },
    )
    result = train(
        model,
        tokenizer,
        train_rows,
        held_out,
        spec=spec,
        output_dir=tmp_path,
        precision="fp32",
        log=lambda _: None,
    )
    losses = _losses(result.log_history)
    assert not isinstance(result.model, PeftModel)
    assert losses[-1] < losses[0] / 2
    assert result.padding_waste < 0.2


class _KillAt(TrainerCallback):
    """Stands in for a pod killed mid-run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        if state.global_step == self.step:
            raise RuntimeError("killed")


@pytest.mark.trainer
def test_a_killed_run_resumes_from_its_last_complete_checkpoint(
    tiny_llama_dir: Path, keyword_task: Task, make_spec: MakeSpec, tmp_path: Path
) -> None:
    train_rows, held_out = keyword_task
    spec = make_spec(
        hyperparameters={
            "maxSteps": 40,
            "checkpointSteps": 10,
            "loggingSteps": 5,
            "gradientCheckpointing": True,
        }
    )

    def pod(output_dir: Path, log: Callable[[str], None] = lambda _: None, **options: Any) -> TrainResult:
        model, tokenizer = _load(tiny_llama_dir)  # every pod starts from the base model
        return train(model, tokenizer, train_rows, held_out, spec=spec, output_dir=output_dir,
                     precision="fp32", log=log, **options)  # fmt: skip

    with pytest.raises(RuntimeError, match="killed"):
        pod(tmp_path / "run", callbacks=[_KillAt(25)])
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-10", "checkpoint-20"]
    (checkpoints / "checkpoint-30").mkdir()  # the save the kill interrupted
    (checkpoints / "checkpoint-30" / "model.safetensors").write_bytes(b"half")

    lines: list[str] = []
    resumed = pod(tmp_path / "run", log=lines.append)
    assert resumed.resumed_from == "checkpoint-20"
    assert "removing incomplete checkpoint checkpoint-30" in lines[0]
    steps_logged = [line.split()[1] for line in lines if line.startswith("step ")]
    assert steps_logged[0] == "25/40"  # no step before the checkpoint is trained again
    assert resumed.steps == 40
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-30", "checkpoint-40"]
    assert all(
        (checkpoints / name / COMPLETE_MARKER).is_file() for name in ("checkpoint-30", "checkpoint-40")
    )
    # Same data order, weights, optimizer and RNG: as if it had never been killed.
    uninterrupted = pod(tmp_path / "uninterrupted")
    assert resumed.train_loss == pytest.approx(uninterrupted.train_loss, rel=1e-6)
    # A pod retried after the last step (say, killed in the final evaluation) trains no more.
    again = pod(tmp_path / "run")
    assert (again.resumed_from, again.steps) == ("checkpoint-40", 40)


@pytest.mark.trainer
def test_early_stopping_ends_training_when_eval_loss_stalls(
    tiny_llama_dir: Path, keyword_task: Task, make_spec: MakeSpec, tmp_path: Path
) -> None:
    train_rows, held_out = keyword_task
    spec = make_spec(
        hyperparameters={"learningRate": 1e-9, "maxSteps": 50},
        evaluation={"evalSteps": 2},
        earlyStopping={"patience": 1, "threshold": 0.01},
    )
    model, tokenizer = _load(tiny_llama_dir)
    result = train(
        model,
        tokenizer,
        train_rows,
        held_out[:8],
        spec=spec,
        output_dir=tmp_path,
        precision="fp32",
        log=lambda _: None,
    )
    assert result.steps == 4  # evaluated at 2 (best so far) and 4 (no real improvement): stop
    assert (tmp_path / "checkpoints" / "checkpoint-4" / COMPLETE_MARKER).is_file()


@pytest.mark.trainer
def test_early_stopping_exports_the_best_checkpoint_not_the_last(
    tiny_llama_dir: Path, keyword_task: Task, make_spec: MakeSpec, tmp_path: Path
) -> None:
    """Found by a fine-tuning engineer: eval loss went down, then up, and the last model was exported.
    Validation rows answered with another keyword's phrase make that happen at once here: the model
    first learns the phrases (eval loss falls), then the train mapping (it rises)."""
    train_rows, held_out = keyword_task
    rotated = [
        Sample(messages=(row.messages[0], Message("assistant", ROTATED_ANSWERS[row.target])), line=row.line)
        for row in held_out[:8]
    ]
    spec = make_spec(
        hyperparameters={"learningRate": 1e-2, "maxSteps": 40, "warmupRatio": 0.0, "scheduler": "constant"},
        evaluation={"evalSteps": 4},
        earlyStopping={"patience": 2},
    )
    model, tokenizer = _load(tiny_llama_dir)
    result = train(
        model,
        tokenizer,
        train_rows,
        rotated,
        spec=spec,
        output_dir=tmp_path,
        precision="fp32",
        log=lambda _: None,
    )
    evaluations = {entry["step"]: entry["eval_loss"] for entry in result.log_history if "eval_loss" in entry}
    best = min(evaluations, key=lambda step: evaluations[step])
    assert best < result.steps and evaluations[best] < evaluations[result.steps], evaluations  # it got worse
    assert result.best_step == best and result.best_eval_loss == pytest.approx(evaluations[best])
    assert result.final_checkpoint == tmp_path / "checkpoints" / f"checkpoint-{best}"
    saved = load_file(result.final_checkpoint / "adapter_model.safetensors")
    held = {name: tensor for name, tensor in result.model.state_dict().items() if "lora_" in name}
    assert len(saved) == len(held) > 0
    for name, tensor in held.items():
        key = name.replace(".default", "")
        assert torch.equal(tensor, saved[key]), f"{name} is not the best checkpoint's"


def test_early_stopping_needs_validation_rows(
    make_spec: MakeSpec, keyword_task: Task, tmp_path: Path
) -> None:
    spec = make_spec(earlyStopping={"patience": 2})
    with pytest.raises(TrainerInputError, match="validation split is empty"):
        train(None, None, keyword_task[0], [], spec=spec, output_dir=tmp_path, precision="fp32")  # type: ignore[arg-type]


# --- metrics endpoint -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_metrics_are_served_over_http_and_unset_ones_are_nan() -> None:
    metrics = TrainerMetrics()
    port = _free_port()
    metrics.serve(port)
    metrics.update(ProgressSnapshot(step=7, total_steps=70, train_loss=1.25, eta_seconds=30.0))
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert f"{MetricNames.STEP} 7.0" in page
    assert f"{MetricNames.TRAIN_LOSS} 1.25" in page
    assert f"{MetricNames.EVAL_LOSS} NaN" in page
    names = [value for key, value in vars(MetricNames).items() if key.isupper()]
    assert all(f"# TYPE {name} gauge" in page for name in names)
    values = dict(line.split() for line in page.splitlines() if not line.startswith("#"))
    assert math.isnan(float(values[MetricNames.PEAK_MEMORY_BYTES]))
