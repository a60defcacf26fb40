"""Fine-tuning with the transformers Trainer: checkpoints that survive a killed pod, and progress.

A retried pod resumes from the newest *complete* checkpoint of the *same* configuration. A
checkpoint is complete once the marker file is in it, which is written after everything else
(weights, optimizer, scheduler, RNG and trainer state); directories without it were being written
when the pod died and are removed. The marker holds a fingerprint of the spec, so an output
directory reused by a different configuration is refused instead of silently mixing two runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import (
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)

from deeptune.api.finetunejob import (
    DISTILLATION_SHARDING_MESSAGE,
    PREFERENCE_SHARDING_MESSAGE,
    FineTuneJobSpec,
)
from deeptune_trainer.data.sample import Sample
from deeptune_trainer.distillation import DistillingTrainer
from deeptune_trainer.distributed import (
    World,
    barrier,
    load_sharded_training_state,
    save_sharded_training_state,
)
from deeptune_trainer.errors import TrainerInputError
from deeptune_trainer.formatting import Collator, Feature, pack, tokenize_samples
from deeptune_trainer.lineage import config_digest
from deeptune_trainer.metrics_server import ProgressSnapshot, TrainerMetrics
from deeptune_trainer.modeling import Precision, apply_method, computes_logits_at_targets_only
from deeptune_trainer.plots import LossPlotter
from deeptune_trainer.preference import drop_reference_adapter, preference_trainer, truncated_pairs
from deeptune_trainer.zero import zero3_config

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "deeptune-complete.json"
KEEP_CHECKPOINTS = 2
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")

TrainableModel = PreTrainedModel | PeftModel
Log = Callable[[str], None]


# --- checkpoints ------------------------------------------------------------------------------


def config_fingerprint(spec: FineTuneJobSpec) -> str:
    """The start of `config_digest`: what a checkpoint records, so a changed spec does not resume it."""
    return config_digest(spec).removeprefix("sha256:")[:16]


def _checkpoints_newest_first(directory: Path) -> list[Path]:
    found = [
        (int(m.group(1)), p) for p in directory.glob("checkpoint-*") if (m := _CHECKPOINT_NAME.match(p.name))
    ]
    return [path for _, path in sorted(found, reverse=True) if path.is_dir()]


def find_resume_checkpoint(directory: Path, fingerprint: str, log: Log = print) -> Path | None:
    """The newest complete checkpoint to resume from; incomplete ones are removed on the way."""
    for checkpoint in _checkpoints_newest_first(directory):
        marker = checkpoint / COMPLETE_MARKER
        if not marker.is_file():
            log(f"removing incomplete checkpoint {checkpoint.name} (a pod stopped while writing it)")
            shutil.rmtree(checkpoint)
            continue
        found = json.loads(marker.read_text())["fingerprint"]
        if found != fingerprint:
            raise TrainerInputError(
                "CheckpointMismatch",
                f"{directory} holds checkpoints of a different configuration (fingerprint {found}, this run "
                f"{fingerprint}); resuming would mix two runs: use another output path, or delete "
                f"{directory} to start over",
            )
        return checkpoint
    return None


class CheckpointMarker(TrainerCallback):
    """Marks each checkpoint complete after the Trainer wrote it, and saves the final state too."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        barrier()  # every worker has written its part (optimizer shard, RNG state) before the marker
        if not state.is_world_process_zero:
            return
        checkpoint = checkpoint_path(args, state)
        tmp = checkpoint / f".{COMPLETE_MARKER}.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "step": state.global_step}))
        os.replace(tmp, checkpoint / COMPLETE_MARKER)  # atomic: the marker is whole or absent

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        # A retry after the last step (say, killed during the final evaluation) then trains no more.
        if state.global_step >= state.max_steps:
            control.should_save = True

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if control.should_training_stop:  # early stopping: keep where it stopped
            control.should_save = True


def checkpoint_path(args: TrainingArguments, state: TrainerState) -> Path:
    """The directory the Trainer saves the checkpoint of the current step in."""
    return Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"


class ShardedTrainingState(TrainerCallback):
    """Checkpoints and restores the trainable weights, optimizer and scheduler of an fsdp run (see
    `save_sharded_training_state`); `ShardedTrainer` leaves the restoring to it.

    Must come before CheckpointMarker: a checkpoint is marked complete only once every shard is in it.
    """

    def __init__(self, resume: Path | None) -> None:
        self.resume = resume

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.resume is not None:
            load_sharded_training_state(
                kwargs["model"], _inner(kwargs["optimizer"]), kwargs["lr_scheduler"], self.resume
            )

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        save_sharded_training_state(
            kwargs["model"], _inner(kwargs["optimizer"]), kwargs["lr_scheduler"], checkpoint_path(args, state)
        )


def _inner(optimizer: Any) -> Any:
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


class ShardedTrainer(Trainer):
    """The Trainer, for a model sharded at load time: its own resume would copy the checkpoint's full
    tensors into the sharded parameters and fail, so ShardedTrainingState restores them instead."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        return None


# --- progress ---------------------------------------------------------------------------------


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU: VmHWM, the image's
    own (getrusage's ru_maxrss carries a parent's peak across fork and exec)."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))


def format_progress(snapshot: ProgressSnapshot) -> str:
    """One human-readable log line for a logging step or an evaluation."""
    parts = [f"step {snapshot.step}/{snapshot.total_steps}"]
    if snapshot.epoch is not None:
        parts.append(f"epoch {snapshot.epoch:.2f}")
    if snapshot.train_loss is not None:
        parts.append(f"loss {snapshot.train_loss:.4f}")
    if snapshot.eval_loss is not None:
        parts.append(f"eval_loss {snapshot.eval_loss:.4f}")
    if snapshot.learning_rate is not None:
        parts.append(f"lr {snapshot.learning_rate:.2e}")
    if snapshot.tokens_per_second is not None:
        parts.append(f"tokens/s {snapshot.tokens_per_second:.0f}")
    if snapshot.eta_seconds is not None:
        parts.append(f"eta {snapshot.eta_seconds:.0f}s")
    return " ".join(parts)


class ProgressReporter(TrainerCallback):
    """Turns the Trainer's logs into gauges and one stdout line per logging step.

    Rates and the ETA are measured over this process's own steps, so a resumed run does not count
    the steps it loaded from a checkpoint as if they had been done in no time.
    """

    def __init__(self, metrics: TrainerMetrics | None, samples_per_step: int, log: Log = print) -> None:
        self.metrics = metrics
        self.samples_per_step = samples_per_step
        self.log = log
        self._start = 0.0
        self._start_step = 0
        self._start_tokens = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self._start = time.monotonic()
        self._start_step = state.global_step
        self._start_tokens = state.num_input_tokens_seen
        if self.metrics:
            self.metrics.update(ProgressSnapshot(step=state.global_step, total_steps=state.max_steps))

    def snapshot(self, state: TrainerState, logs: dict[str, float]) -> ProgressSnapshot:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        steps = state.global_step - self._start_step
        tokens = state.num_input_tokens_seen - self._start_tokens
        per_step = elapsed / steps if steps else None
        return ProgressSnapshot(
            step=state.global_step,
            total_steps=state.max_steps,
            epoch=state.epoch,
            train_loss=logs.get("loss"),
            eval_loss=logs.get("eval_loss"),
            learning_rate=logs.get("learning_rate"),
            tokens_per_second=tokens / elapsed if steps and tokens else None,  # ORPO counts none
            samples_per_second=steps * self.samples_per_step / elapsed if steps else None,
            eta_seconds=(state.max_steps - state.global_step) * per_step if per_step is not None else None,
            peak_memory_bytes=peak_memory_bytes(),
        )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        logs = logs or {}
        if "train_loss" in logs:  # the end-of-training summary, not a step
            self.log(f"training finished at step {state.global_step} in {logs['train_runtime']:.0f}s")
            return
        snapshot = self.snapshot(state, logs)
        if self.metrics:
            self.metrics.update(snapshot)
        self.log(format_progress(snapshot))


# --- training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    model: TrainableModel
    steps: int
    train_loss: float | None
    """The last logged training loss."""
    eval_loss: float | None
    """The last evaluation loss during training."""
    resumed_from: str | None
    log_history: list[dict[str, float]]
    truncated: int
    """Train and validation rows cut to max_seq_length."""
    padding_waste: float
    """Share of the batched tokens that were padding (training and in-training evaluation batches)."""
    final_checkpoint: Path | None
    """The checkpoint of the weights `model` holds (gathered from every worker): the last step's, or
    with early stopping the best evaluation's."""
    best_step: int | None = None
    """With early stopping: the step of the lowest validation loss, whose weights `model` holds."""
    best_eval_loss: float | None = None


def _training_arguments(
    spec: FineTuneJobSpec,
    precision: Precision,
    output_dir: Path,
    *,
    has_eval: bool,
    sharded: bool,
    deepspeed: dict[str, Any] | None,
) -> dict[str, Any]:
    """The Trainer's arguments (TrainingArguments' or, for preference tuning, TRL's configs'
    keywords). With early stopping a checkpoint is saved at every evaluation, so the
    best one is on disk to be restored at the end (the Trainer's rotation never deletes it): the
    Trainer loads it back itself, except into a model in pieces (rank 0 reloads that one whole)."""
    hp = spec.hyperparameters
    eval_strategy = ("steps" if spec.evaluation.eval_steps else "epoch") if has_eval else "no"
    selecting = spec.early_stopping is not None
    save_strategy = eval_strategy if selecting else "steps"
    save_steps = (
        spec.evaluation.eval_steps if selecting and spec.evaluation.eval_steps else hp.checkpoint_steps
    )
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=hp.per_device_batch_size,
        per_device_eval_batch_size=hp.per_device_batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=hp.scheduler,
        warmup_steps=hp.warmup_ratio,  # a float below 1 is a share of the total steps
        weight_decay=hp.weight_decay,
        seed=hp.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=hp.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        save_strategy=save_strategy,
        save_steps=save_steps,
        save_total_limit=KEEP_CHECKPOINTS,
        restore_callback_states_from_checkpoint=True,
        logging_strategy="steps",
        logging_steps=hp.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=spec.evaluation.eval_steps,
        prediction_loss_only=True,
        metric_for_best_model="eval_loss" if selecting else None,
        greater_is_better=False if selecting else None,
        load_best_model_at_end=selecting and not sharded and deepspeed is None,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # CPU workers then meet over gloo
        save_only_model=sharded,  # ShardedTrainingState saves the optimizer of a sharded model
        deepspeed=deepspeed,
        report_to="none",
        disable_tqdm=True,
    )


def _features(
    samples: Sequence[Sample],
    tokenizer: PreTrainedTokenizerBase,
    spec: FineTuneJobSpec,
    packing: bool,
    log: Log,
) -> tuple[list[Feature], int]:
    all_turns = spec.dataset.train_on == "allAssistantTurns"
    split = tokenize_samples(
        samples,
        tokenizer,
        spec.hyperparameters.max_seq_length,
        all_turns=all_turns,
        window_overlap=spec.dataset.window_overlap,
    )
    if split.last_turn_only:
        log(
            f"{split.last_turn_only} conversations trained on their final assistant turn only: the chat"
            " template renders earlier turns differently once later ones follow"
        )
    if packing:
        return pack(split.examples, spec.hyperparameters.max_seq_length), split.truncated
    return [example.feature() for example in split.examples], split.truncated


def logits_at_targets_only(model: PreTrainedModel, args: TrainingArguments) -> bool:
    """Whether training batches ask for logits at the labelled positions only (see `Collator`).

    Not with several GPUs in one process: the Trainer then wraps the model in nn.DataParallel, which
    splits every tensor of a batch along its first dimension, and the flattened `shift_labels` would
    be cut apart from the rows their positions are in. One process per GPU (torchrun) is fine.
    """
    return computes_logits_at_targets_only(model) and args.n_gpu <= 1


def _last(history: list[dict[str, float]], key: str) -> float | None:
    return next((entry[key] for entry in reversed(history) if key in entry), None)


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_samples: Sequence[Sample],
    validation_samples: Sequence[Sample],
    *,
    spec: FineTuneJobSpec,
    output_dir: str | Path,
    precision: Precision,
    metrics: TrainerMetrics | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    log: Log = print,
    world: World | None = None,
    teacher: PreTrainedModel | None = None,
) -> TrainResult:
    """Fine-tune `model` by the spec's method, resuming from `output_dir/checkpoints` when possible;
    with `teacher` (distillation mode logits), matching its next-token distributions too."""
    if spec.early_stopping and not validation_samples:
        raise TrainerInputError(
            "InvalidSpec", "earlyStopping watches the validation loss, but the validation split is empty"
        )
    world = world or World()
    sharded = is_sharded(model)
    zero = spec.distributed.strategy == "deepspeed"
    if sharded or zero:  # `auto` may have resolved to fsdp
        if spec.preference:
            raise TrainerInputError("InvalidSpec", PREFERENCE_SHARDING_MESSAGE)
        if spec.distillation:
            raise TrainerInputError("InvalidSpec", DISTILLATION_SHARDING_MESSAGE)
    checkpoints = Path(output_dir) / CHECKPOINTS_DIR
    fingerprint = config_fingerprint(spec)
    resume = find_resume_checkpoint(checkpoints, fingerprint, log) if checkpoints.is_dir() else None
    if resume:
        log(f"resuming from {resume.name}")

    hp = spec.hyperparameters
    samples_per_step = hp.per_device_batch_size * hp.gradient_accumulation_steps * world.size
    reporter = ProgressReporter(metrics, samples_per_step, log)
    trainer_callbacks: list[TrainerCallback] = [reporter, *callbacks]
    if spec.early_stopping:
        trainer_callbacks.append(
            EarlyStoppingCallback(spec.early_stopping.patience, spec.early_stopping.threshold)
        )
    if sharded:
        trainer_callbacks.append(ShardedTrainingState(resume))
    trainer_callbacks.append(CheckpointMarker(fingerprint))  # after early stopping, to see its decision
    trainer_callbacks.append(LossPlotter(Path(output_dir)))  # a run that fails later keeps its curve

    deepspeed = zero3_config(spec, precision, model.config.get_text_config().hidden_size) if zero else None
    arguments = _training_arguments(
        spec, precision, checkpoints, has_eval=bool(validation_samples), sharded=sharded, deepspeed=deepspeed
    )
    set_seed(hp.seed)  # the adapter's initial weights are random too: same seed, same run
    wrapped = apply_method(model, spec)
    if spec.preference is None:
        trainer, truncated, collator = _supervised_trainer(
            wrapped, tokenizer, train_samples, validation_samples,
            spec=spec, arguments=arguments, callbacks=trainer_callbacks, base=model, sharded=sharded, log=log,
            teacher=teacher,
        )  # fmt: skip
    else:
        trainer = preference_trainer(
            wrapped, tokenizer, train_samples, validation_samples,
            spec=spec, arguments=arguments, callbacks=trainer_callbacks,
        )  # fmt: skip
        truncated = truncated_pairs([*train_samples, *validation_samples], tokenizer, hp.max_seq_length)
        collator = None
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts; the reporter writes the log lines
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    drop_reference_adapter(wrapped)
    history = trainer.state.log_history
    final = next(iter(_checkpoints_newest_first(checkpoints)), None)
    best = Path(trainer.state.best_model_checkpoint) if trainer.state.best_model_checkpoint else None
    if spec.early_stopping and best is not None:
        log(f"restored the best checkpoint: {best.name} (eval loss {trainer.state.best_metric:.4g})")
        final = best
    return TrainResult(
        model=wrapped,  # trained in place, resumed weights included
        steps=trainer.state.global_step,
        train_loss=_last(history, "loss"),
        eval_loss=_last(history, "eval_loss"),
        resumed_from=resume.name if resume else None,
        log_history=history,
        truncated=truncated,
        padding_waste=collator.padding_waste if collator else 0.0,
        final_checkpoint=final,
        best_step=_step_of(best) if spec.early_stopping and best else None,
        best_eval_loss=trainer.state.best_metric if spec.early_stopping else None,
    )


def _supervised_trainer(
    model: TrainableModel,
    tokenizer: PreTrainedTokenizerBase,
    train_samples: Sequence[Sample],
    validation_samples: Sequence[Sample],
    *,
    spec: FineTuneJobSpec,
    arguments: dict[str, Any],
    callbacks: list[TrainerCallback],
    base: PreTrainedModel,
    sharded: bool,
    log: Log,
    teacher: PreTrainedModel | None,
) -> tuple[Trainer, int, Collator]:
    """The transformers Trainer on the tokenized rows; the rows cut to max_seq_length; its collator.
    `base` is `model` before LoRA wrapped it: its class says how it computes logits."""
    train_features, train_truncated = _features(
        train_samples, tokenizer, spec, spec.hyperparameters.packing, log
    )
    eval_features, eval_truncated = _features(validation_samples, tokenizer, spec, False, log)
    args = TrainingArguments(**arguments)
    targets_only = teacher is None and logits_at_targets_only(base, args)  # distilling needs every position
    collator = Collator(tokenizer.pad_token_id, logits_at_targets_only=targets_only)
    inputs: dict[str, Any] = dict(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train_features,  # a list is a map-style dataset
        eval_dataset=eval_features or None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if teacher is not None:
        assert spec.distillation is not None
        distilling = spec.distillation
        trainer: Trainer = DistillingTrainer(
            **inputs, teacher=teacher, temperature=distilling.temperature, alpha=distilling.alpha
        )
    else:
        trainer = (ShardedTrainer if sharded else Trainer)(**inputs)
    return trainer, train_truncated + eval_truncated, collator


def _step_of(checkpoint: Path) -> int:
    match = _CHECKPOINT_NAME.match(checkpoint.name)
    assert match is not None, checkpoint
    return int(match[1])


def is_sharded(model: PreTrainedModel) -> bool:
    """Whether the model was loaded sharded across the workers (fsdp)."""
    return bool(getattr(model, "is_distributed_loading_by_transformers", False))
