"""What a run leaves behind: weights, evaluation results, the resolved config, a model card, a summary.

Layout of the output directory:

    adapter/          LoRA adapter (safetensors) and tokenizer           (lora, qlora)
    merged/           base model with the adapter merged in, tokenizer   (mergeAdapter, or quantizedExport)
    model/            the fine-tuned model and tokenizer                 (full)
    quantized-int8/   bitsandbytes-quantized copy (int8 or int4)         (quantizedExport, GPU only)
    checkpoints/      training checkpoints, for resuming
    eval_results.json, trainer_config.json, data_report.json, README.md
    loss.png, eval.png  the loss curve (redrawn at each checkpoint) and base-vs-fine-tuned scores
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

from deeptune.api.finetunejob import DatasetReport, EvalResults, FineTuneJobSpec, Lineage
from deeptune.api.trainer import SUMMARY_LIMIT_BYTES, ArtifactPaths, TrainerConfig, TrainerSummary
from deeptune_trainer.errors import TrainerInputError
from deeptune_trainer.modeling import peft_targets_as_resolved
from deeptune_trainer.plots import LOSS_PNG, SCORES_PNG

EVAL_RESULTS = "eval_results.json"
RESOLVED_CONFIG = "trainer_config.json"
MODEL_CARD = "README.md"

ReloadBase = Callable[[], PreTrainedModel]
"""Loads the base model unquantized; QLoRA adapters are merged into that, not into 4-bit weights."""


ADAPTER_CONFIG = "adapter_config.json"


def _sort_target_modules(directory: Path) -> None:
    """PEFT writes `target_modules` from a set, in the order of the process's string hashing: sorted,
    two identical runs write identical files (and the same digest in status.lineage)."""
    path = directory / ADAPTER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def _save(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if (directory / ADAPTER_CONFIG).is_file():
        _sort_target_modules(directory)


def _merge(
    model: PeftModel, spec: FineTuneJobSpec, adapter_dir: Path, reload_base: ReloadBase
) -> PreTrainedModel:
    if spec.method == "qlora":
        with peft_targets_as_resolved():  # the modules it was trained on, path-qualified ones too
            model = PeftModel.from_pretrained(reload_base(), adapter_dir)
    merged: PreTrainedModel = model.merge_and_unload()
    return merged


def _quantize(source: Path, target: Path, bits: str) -> None:
    """Reload the merged weights through bitsandbytes and save the quantized form serving can load."""
    config = (
        BitsAndBytesConfig(load_in_8bit=True) if bits == "int8" else BitsAndBytesConfig(load_in_4bit=True)
    )
    quantized = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, device_map={"": 0})
    quantized.save_pretrained(target)


def save_model_artifacts(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: FineTuneJobSpec,
    output_dir: Path,
    reload_base: ReloadBase,
) -> ArtifactPaths:
    """Save the trained weights in the forms the spec asks for; paths are relative to output_dir."""
    paths = ArtifactPaths()
    if spec.method == "full":
        assert isinstance(model, PreTrainedModel)
        _save(model, tokenizer, output_dir / "model")
        paths.merged = "model"
    else:
        assert isinstance(model, PeftModel)
        _save(model, tokenizer, output_dir / "adapter")
        paths.adapter = "adapter"
        if spec.output.merge_adapter or spec.output.quantized_export != "none":
            _save(_merge(model, spec, output_dir / "adapter", reload_base), tokenizer, output_dir / "merged")
            paths.merged = "merged"
    if spec.output.quantized_export != "none":
        assert paths.merged is not None
        name = f"quantized-{spec.output.quantized_export}"
        _quantize(output_dir / paths.merged, output_dir / name, spec.output.quantized_export)
        tokenizer.save_pretrained(output_dir / name)
        paths.quantized = name
    return paths


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def write_eval_results(results: EvalResults, output_dir: Path) -> None:
    _write_json(output_dir / EVAL_RESULTS, results.to_wire())


def make_output_dir(spec: FineTuneJobSpec, output_dir: Path) -> None:
    """The output directory, made and written to before anything long runs: a claim the trainer's
    user may not write is bad input, said at once with what to change, not a traceback after the
    dataset is read (and not retried: no retry can fix it)."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".deeptune-write-check"
        probe.touch()
        probe.unlink()
    except OSError as error:
        where = f"claim {spec.output.pvc.claim_name}, path '{spec.output.pvc.path}'"
        raise TrainerInputError(
            "OutputNotWritable",
            f"output.pvc: the trainer (uid {os.getuid()}, gid {os.getgid()}) cannot write {where} "
            f"({error.strerror}: {error.filename}); give that directory to its user or group "
            "(e.g. chown 1000:1000), or point output.pvc at a writable path",
        ) from error


def write_resolved_config(config: TrainerConfig, output_dir: Path) -> None:
    """The config as run (defaults filled in). It holds no secret: tokens are only referenced."""
    _write_json(output_dir / RESOLVED_CONFIG, config.to_wire())


# --- model card -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CardFacts:
    """What the model card tells beyond the spec."""

    name: str
    base_model: str
    steps: int
    train_loss: float | None
    eval_results: EvalResults
    dataset: DatasetReport | None
    artifacts: ArtifactPaths
    lineage: Lineage | None = None
    pictures: tuple[str, ...] = ()
    """PNGs in the output directory (deeptune_trainer.plots), shown in the card."""


def _number(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.4g}"


def _metrics_table(results: EvalResults) -> list[str]:
    baseline = results.baseline or {}
    delta = results.delta or {}
    rows = ["| metric | base model | fine-tuned | delta |", "| --- | --- | --- | --- |"]
    for name, value in results.fine_tuned.items():
        rows.append(
            f"| {name} | {_number(baseline.get(name))} | {_number(value)} | {_number(delta.get(name))} |"
        )
    return rows


def _key_values(title: str, values: dict[str, Any]) -> list[str]:
    return [f"## {title}", "", *(f"- {key}: {value}" for key, value in values.items()), ""]


PAIR_SCORES = (
    " Preference accuracy is the share of pairs whose chosen answer the model finds more likely than"
    " the rejected one; preference margin is the mean difference of their log-likelihoods (nats)."
)


def model_card(spec: FineTuneJobSpec, facts: CardFacts) -> str:
    """A README.md for the output directory: what was trained, on what, how, and how well."""
    hp = spec.hyperparameters
    how = spec.method if spec.preference is None else f"{spec.method}, {spec.preference.algorithm.upper()}"
    lines = [
        f"# {facts.name}",
        "",
        f"Fine-tuned from `{facts.base_model}` with DeepTune ({how}).",
        "",
        "## Evaluation",
        "",
    ]
    results = facts.eval_results
    if results.fine_tuned:
        split = results.split or "validation"
        chosen = (
            f"the weights of step {results.step}, the lowest validation loss (early stopping)"
            if spec.early_stopping and results.step is not None
            else f"the weights of the last step ({results.step or facts.steps})"
        )
        picked_by = (
            " — the same rows early stopping chose the checkpoint by"
            if split == "validation" and spec.early_stopping
            else ""
        )
        lines += [
            f"Scored and exported: {chosen}. Scores on the {split} split{picked_by}: {results.samples} rows"
            f" (drawn with the run's seed) for generation metrics, the whole split for perplexity. BLEU is"
            " 0–100, other generation metrics 0–1; F1 is macro-F1 over the answers as labels (classification"
            " data), exact match compares whole answers." + (PAIR_SCORES if spec.preference else ""),
            "",
            *_metrics_table(results),
        ]
    else:
        lines.append("Not evaluated: the validation split was empty.")
    lines.append("")
    captions = {LOSS_PNG: "Training and validation loss", SCORES_PNG: "Base model against fine-tuned"}
    for picture in facts.pictures:
        lines += [f"![{captions.get(picture, picture)}]({picture})", ""]
    if facts.dataset is not None:
        lines += _key_values("Data", facts.dataset.model_dump(by_alias=True))
    training = {
        "method": spec.method,
        "steps": facts.steps,
        "final train loss": _number(facts.train_loss),
        "learning rate": spec.learning_rate,
        "scheduler": f"{hp.scheduler}, warmup ratio {hp.warmup_ratio}",
        "epochs": hp.epochs if hp.max_steps is None else f"max {hp.max_steps} steps",
        "batch": f"{hp.per_device_batch_size} per device × {hp.gradient_accumulation_steps} accumulation",
        "max sequence length": hp.max_seq_length,
        "weight decay": hp.weight_decay,
        "packing": hp.packing,
    }
    if spec.distillation is not None:
        distilling = spec.distillation
        teacher = distilling.teacher.name or f"pvc {distilling.teacher.pvc}"
        how_far = f"temperature {distilling.temperature:g}, alpha {distilling.alpha:g}"
        training["distillation"] = f"{distilling.mode} from {teacher}" + (
            f", {how_far}" if distilling.mode == "logits" else ""
        )
    if spec.rope_scaling is not None:
        training["RoPE scaling"] = f"{spec.rope_scaling.type}, factor {spec.rope_scaling.factor:g}"
    if spec.preference is not None:
        training["preference"] = f"{spec.preference.algorithm}, beta {spec.preference.beta}"
    if spec.method != "full":
        training["LoRA"] = f"r {spec.lora.r}, alpha {spec.lora.alpha}, dropout {spec.lora.dropout}"
    lines += _key_values("Training", training)
    lines += _key_values("Files", {k: v for k, v in facts.artifacts.model_dump().items() if v})
    if facts.lineage is not None:
        lineage = facts.lineage
        lines += _key_values(
            "Lineage",
            {
                "training config": lineage.config,
                "base model": lineage.base_model,
                **{f"data ({where})": digest for where, digest in lineage.datasets.items()},
                **{f"data commit ({where})": commit for where, commit in lineage.dataset_commits.items()},
                **{f"{kind} files": digest for kind, digest in lineage.artifacts.items()},
            },
        )
    return "\n".join(lines)


def write_model_card(spec: FineTuneJobSpec, facts: CardFacts, output_dir: Path) -> None:
    (output_dir / MODEL_CARD).write_text(model_card(spec, facts), encoding="utf-8")


# --- termination summary ----------------------------------------------------------------------


def _encode(summary: TrainerSummary) -> str:
    return json.dumps(summary.to_wire(), separators=(",", ":"), ensure_ascii=False)


def _fits(summary: TrainerSummary) -> bool:
    return len(_encode(summary).encode()) <= SUMMARY_LIMIT_BYTES


def _round_scores(scores: dict[str, float] | None) -> dict[str, float] | None:
    return None if scores is None else {name: float(f"{value:.4g}") for name, value in scores.items()}


def _rounded(results: EvalResults) -> EvalResults:
    return results.model_copy(
        update={
            "fine_tuned": _round_scores(results.fine_tuned),
            "baseline": _round_scores(results.baseline),
            "delta": _round_scores(results.delta),
        }
    )


def _first(scores: dict[str, float] | None, count: int) -> dict[str, float] | None:
    return None if scores is None else dict(list(scores.items())[:count])


def fit_summary(summary: TrainerSummary) -> str:
    """The summary as JSON within SUMMARY_LIMIT_BYTES, losing the least on the way.

    Kubernetes cuts termination messages at 4 KiB, which would leave invalid JSON. So: round the
    scores, then keep fewer metrics (the full set is in eval_results.json), then drop the dataset
    report (it is in data_report.json), then the lineage (it is in the model card), and at last
    shorten an error message.
    """
    if _fits(summary):
        return _encode(summary)
    results = summary.eval_results
    if results is not None:
        results = _rounded(results)
        summary = summary.model_copy(update={"eval_results": results})
        count = len(results.fine_tuned)
        while not _fits(summary) and count > 0:
            count -= 1
            shrunk = results.model_copy(
                update={
                    name: _first(getattr(results, name), count)
                    for name in ("fine_tuned", "baseline", "delta")
                }
            )
            summary = summary.model_copy(update={"eval_results": shrunk})
    if not _fits(summary):
        summary = summary.model_copy(update={"dataset": None})
    if not _fits(summary):
        summary = summary.model_copy(update={"lineage": None})
    while not _fits(summary) and summary.error is not None and summary.error.message:
        error = summary.error
        cut = error.message[: max(len(error.message) - 256, 0)]
        summary = summary.model_copy(update={"error": error.model_copy(update={"message": cut})})
    return _encode(summary)


def write_summary(summary: TrainerSummary, path: str | Path) -> bool:
    """Write the summary where Kubernetes reads the termination message; False if that is impossible."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)  # a local run may fail before its output exists
        target.write_text(fit_summary(summary), encoding="utf-8")
    except OSError:
        return False
    return True
