"""One fine-tuning run, start to end, and how its outcome reaches Kubernetes.

Order: GPU check → data → model → baseline evaluation → training (resuming when it can) → final
evaluation → artifacts → summary. Cheap checks come first so bad input fails in seconds, not after a
model download. Bad input exits with EXIT_INVALID_INPUT (the Job does not retry); anything else exits
1 and the Job retries, resuming from the newest checkpoint.

With several workers (`distributed`) every one runs this same program up to the end of training, in
step (a sharded model's forward needs them all, the baseline evaluation's too); then rank 0 alone
evaluates the trained model and writes everything a user or the operator reads.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from deeptune.api.finetunejob import DatasetReport, EvalResults, Lineage
from deeptune.api.trainer import (
    EXIT_INVALID_INPUT,
    ArtifactPaths,
    TrainerConfig,
    TrainerError,
    TrainerSummary,
)
from deeptune_trainer.allocator import malloc_in_use
from deeptune_trainer.artifacts import (
    CardFacts,
    make_output_dir,
    save_model_artifacts,
    write_eval_results,
    write_model_card,
    write_resolved_config,
    write_summary,
)
from deeptune_trainer.data.sample import Sample
from deeptune_trainer.distillation import check_shared_vocabulary, load_teacher, teacher_answers
from deeptune_trainer.distributed import World, release_process_group, resolve_strategy, splits_weights
from deeptune_trainer.errors import TrainerInputError
from deeptune_trainer.evaluation import compare, evaluate, generation_rows
from deeptune_trainer.federation import coordinate, train_in_rounds
from deeptune_trainer.lineage import base_model_lineage, config_digest, directory_digest
from deeptune_trainer.metrics_server import TrainerMetrics
from deeptune_trainer.modeling import (
    LoadedModel,
    check_gpu_requirements,
    load_for_training,
    load_model,
    load_trained,
)
from deeptune_trainer.plots import write_plots
from deeptune_trainer.training import TrainResult, train
from deeptune_trainer.zero import forget_zero3

if TYPE_CHECKING:
    from deeptune_trainer.data.pipeline import PreparedData

Log = Callable[[str], None]


def _say(line: str) -> None:
    print(line, flush=True)


def _quiet(_: str) -> None:
    """The log of workers other than rank 0: one copy of each line is enough."""


def _scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in scores.items()) or "no metrics"


def run(
    config: TrainerConfig,
    *,
    metrics: TrainerMetrics | None = None,
    log: Log = _say,
    world: World | None = None,
) -> TrainerSummary | None:
    """Fine-tune, evaluate and export as `config` says; raises on failure. None on workers other
    than rank 0, which stop once training ends."""
    from deeptune_trainer.data.pipeline import prepare_dataset  # noqa: PLC0415  (heavy, and not needed to fail fast)
    from deeptune_trainer.data.report import write_data_report  # noqa: PLC0415

    spec, paths = config.spec, config.paths
    world = world or World()
    output_dir = Path(paths.output_dir)
    check_gpu_requirements(spec)
    if world.is_main:
        make_output_dir(spec, output_dir)
        write_resolved_config(config, output_dir)

    log("preparing the dataset")
    prepared = prepare_dataset(
        spec.dataset, paths, seed=spec.hyperparameters.seed, pairs=spec.preference is not None
    )
    if world.is_main:
        write_data_report(prepared, output_dir / "data_report.json")
    test_rows = f", {len(prepared.test)} test rows" if spec.dataset.test else ""
    log(f"dataset: {len(prepared.train)} train rows, {len(prepared.validation)} validation rows{test_rows}")

    loaded = load_for_training(config, world)
    log(
        f"loaded {loaded.source} ({loaded.model.config.model_type}, {loaded.precision}, method {spec.method})"
    )
    positions = loaded.model.config.get_text_config().max_position_embeddings
    if spec.hyperparameters.max_seq_length > positions:
        log(
            f"warning: hyperparameters.maxSeqLength {spec.hyperparameters.max_seq_length} is past the "
            f"{positions} positions the model was trained for; ropeScaling extends its context"
        )
    # The final scores come from rows nothing was chosen by, when the spec keeps some apart.
    held_out, split = (prepared.test, "test") if spec.dataset.test else (prepared.validation, "validation")
    # ZeRO's partitions compute only inside its engine: rank 0 scores the base model after training.
    zero = resolve_strategy(config) == "deepspeed"
    baseline = None
    if spec.evaluation.baseline and held_out and not zero:
        baseline = evaluate(loaded.model, loaded.tokenizer, held_out, spec)
        log(f"base model: {_scores(baseline)}")
    train_rows, teacher, teacher_scores = prepared.train, None, None
    if spec.distillation is not None:
        train_rows, teacher, teacher_scores = _from_teacher(config, loaded, prepared.train, held_out, log)

    result = _train(
        config, loaded, train_rows, prepared.validation, teacher, metrics=metrics, log=log, world=world
    )
    if zero:
        forget_zero3()
    release_process_group()  # training was the last step the workers take together
    if not world.is_main:
        return None
    if spec.evaluation.baseline and held_out and zero:
        baseline = evaluate(load_model(spec, paths).model, loaded.tokenizer, held_out, spec)
        log(f"base model: {_scores(baseline)}")
    if splits_weights(config, world):  # the weights gathered into the final checkpoint, whole, here
        assert result.final_checkpoint is not None  # CheckpointMarker saves the last step
        result = replace(result, model=load_trained(spec, paths, result.final_checkpoint))
    results = EvalResults()
    if held_out:
        fine_tuned = evaluate(result.model, loaded.tokenizer, held_out, spec)
        log(f"fine-tuned: {_scores(fine_tuned)}")
        results = compare(fine_tuned, baseline, samples=len(generation_rows(held_out, spec))).model_copy(
            update={"split": split, "step": result.best_step or result.steps, "teacher": teacher_scores}
        )
        write_eval_results(results, output_dir)
    report = prepared.report.model_copy(update={"truncated": result.truncated})
    artifacts, lineage = _export(config, loaded, result, results, report=report, prepared=prepared)
    log(f"artifacts written to {output_dir}")
    return TrainerSummary(
        outcome="succeeded",
        steps=result.steps,
        train_loss=result.train_loss,
        eval_results=results if held_out else None,
        dataset=report,
        artifacts=artifacts,
        lineage=lineage,
    )


def _train(
    config: TrainerConfig,
    loaded: LoadedModel,
    train_rows: list[Sample],
    validation_rows: list[Sample],
    teacher: PreTrainedModel | None,
    *,
    metrics: TrainerMetrics | None,
    log: Log,
    world: World,
) -> TrainResult:
    """Training alone, or a federation site's rounds with the others from the coordinator's adapter."""
    if config.spec.federation is not None:
        return train_in_rounds(
            loaded.model, loaded.tokenizer, train_rows, validation_rows,
            config=config, precision=loaded.precision, metrics=metrics, log=log,
        )  # fmt: skip
    return train(
        loaded.model, loaded.tokenizer, train_rows, validation_rows,
        spec=config.spec, output_dir=config.paths.output_dir, precision=loaded.precision,
        metrics=metrics, log=log, world=world, teacher=teacher,
    )  # fmt: skip


def _from_teacher(
    config: TrainerConfig, student: LoadedModel, train_rows: list[Sample], held_out: list[Sample], log: Log
) -> tuple[list[Sample], PreTrainedModel | None, dict[str, float] | None]:
    """What distillation's teacher gives the run: its scores on the held-out rows, and by mode its
    answers to the training prompts (`sequences`: the rows to train on) or itself (`logits`: the
    model to match while training)."""
    spec = config.spec
    assert spec.distillation is not None
    teacher = load_teacher(spec, config.paths)
    log(f"teacher: {teacher.source} ({teacher.model.config.model_type})")
    scores = evaluate(teacher.model, teacher.tokenizer, held_out, spec) if held_out else None
    if scores is not None:
        log(f"teacher model: {_scores(scores)}")
    if spec.distillation.mode == "logits":
        check_shared_vocabulary(teacher.tokenizer, student.tokenizer)
        return train_rows, teacher.model, scores
    log(f"the teacher answers the {len(train_rows)} training prompts")
    return teacher_answers(teacher, train_rows, spec), None, scores


def _export(
    config: TrainerConfig,
    loaded: LoadedModel,
    result: TrainResult,
    results: EvalResults,
    *,
    report: DatasetReport,
    prepared: PreparedData,
) -> tuple[ArtifactPaths, Lineage]:
    """Weights in the forms the spec asks for, their lineage, and the model card that describes them."""
    spec, paths = config.spec, config.paths
    output_dir = Path(paths.output_dir)

    def reload_base() -> PreTrainedModel:  # unquantized, for merging a QLoRA adapter
        return load_model(spec.model_copy(update={"method": "lora"}), paths, sharded=False).model

    artifacts = save_model_artifacts(result.model, loaded.tokenizer, spec, output_dir, reload_base)
    lineage = Lineage(
        config=config_digest(spec),
        datasets=prepared.digests,
        dataset_commits=prepared.hub_commits,
        base_model=base_model_lineage(spec, loaded.source, paths.hub_cache),
        artifacts={
            kind: directory_digest(output_dir / location)
            for kind, location in artifacts.model_dump().items()
            if location is not None
        },
    )
    facts = CardFacts(
        name=config.name,
        base_model=spec.base_model.name or loaded.source,
        steps=result.steps,
        train_loss=result.train_loss,
        eval_results=results,
        dataset=report,
        artifacts=artifacts,
        lineage=lineage,
        pictures=tuple(write_plots(result.log_history, result.best_step, results, output_dir)),
    )
    write_model_card(spec, facts, output_dir)
    return artifacts, lineage


def _failure(reason: str, message: str) -> TrainerSummary:
    return TrainerSummary(outcome="failed", error=TrainerError(reason=reason, message=message))


def _report(summary: TrainerSummary, config: TrainerConfig, log: Log) -> None:
    if not write_summary(summary, config.termination_message_path):
        log(f"could not write the summary to {config.termination_message_path}")


def main(config: TrainerConfig, *, log: Log = _say) -> int:
    """Run and turn the outcome into an exit code and a termination message."""
    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()
    world = World.from_env()
    if not world.is_main:
        return _worker(config, world)
    metrics = TrainerMetrics()
    log(f"host memory allocator: {malloc_in_use()}")
    try:
        metrics.serve(config.metrics_port)
        start = coordinate if config.coordinator else run  # a federation's coordinator reads no rows
        summary = start(config, metrics=metrics, log=log, world=world)
    except TrainerInputError as error:
        # Said before the summary is written: a worker waiting for the summary leaves once it is there
        # (`_await_report`), and the launcher then stops this process too.
        print(f"error: {error.reason}: {error.message}", file=sys.stderr, flush=True)
        _report(_failure(error.reason, error.message), config, log)
        return EXIT_INVALID_INPUT
    except torch.cuda.OutOfMemoryError as error:
        message = (
            f"the GPU ran out of memory ({error}); lower hyperparameters.perDeviceBatchSize or maxSeqLength, "
            "turn on gradientCheckpointing, or use method qlora"
        )
        _report(_failure("OutOfMemory", message), config, log)
        print(f"error: OutOfMemory: {message}", file=sys.stderr, flush=True)
        return 1
    except Exception as error:
        traceback.print_exc()
        _report(_failure("TrainingFailed", f"{type(error).__name__}: {error}"), config, log)
        return 1
    assert summary is not None  # rank 0 always has one
    _report(summary, config, log)
    log("done")
    return 0


def _worker(config: TrainerConfig, world: World) -> int:
    """A worker other than rank 0: trains its part; rank 0 reports the outcome for the whole run."""
    started = time.time()
    try:
        run(config, log=_quiet, world=world)
    except TrainerInputError:
        if world.pod == 0:
            _await_report(Path(config.termination_message_path), since=started)
        return EXIT_INVALID_INPUT  # rank 0 meets the same input and says what is wrong with it
    return 0


REPORT_WAIT_SECONDS = 60.0
"""How long a worker that met bad input waits for rank 0 to say what is wrong before it leaves."""


def _await_report(summary: Path, since: float) -> None:
    """Until rank 0 has written this run's summary (or REPORT_WAIT_SECONDS). The launcher stops every
    worker once one has exited, so a worker that left first could cut rank 0 off before its report:
    seen in CI, a run that failed on a missing dataset with no summary and no message."""
    deadline = time.monotonic() + REPORT_WAIT_SECONDS
    while time.monotonic() < deadline:
        if summary.exists() and summary.stat().st_mtime >= since and _is_whole(summary):
            return
        time.sleep(0.1)


def _is_whole(summary: Path) -> bool:
    """Whether the summary is written to its end (it is written in place, not renamed)."""
    try:
        TrainerSummary.model_validate_json(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True
