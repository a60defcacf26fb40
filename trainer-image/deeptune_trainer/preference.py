"""Preference tuning (`spec.preference`) with TRL: DPO or ORPO on prompt / chosen / rejected pairs.

TRL does the method: its DPOTrainer (the reference is the base model — with LoRA the adapter
switched off, with full fine-tuning log-probabilities computed once before training, so no second
copy of the weights is held) and its ORPOTrainer (no reference). Both are transformers Trainers, so
the run keeps what supervised runs have: resumable checkpoints, progress, early stopping, plots.

The pairs reach TRL as text rendered by `formatting` — the chat-template layout supervised runs
train on and servers prompt with, the answers wrapped as the template wraps an answer — so a model
tuned on preferences is prompted at serving exactly as it was trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

from deeptune.api.finetunejob import FineTuneJobSpec
from deeptune_trainer.data.sample import Sample
from deeptune_trainer.formatting import render_completion, render_prompt, tokenize_sample

REFERENCE_ADAPTER = "ref"
"""The frozen copy of the initial adapter TRL's DPOTrainer adds to a PEFT model as its reference."""


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether tokenizing text adds a beginning-of-sequence token of its own (Llama-style tokenizers)."""
    ids: list[int] = tokenizer("")["input_ids"]
    return tokenizer.bos_token_id is not None and tokenizer.bos_token_id in ids


def pair_rows(samples: Sequence[Sample], tokenizer: PreTrainedTokenizerBase) -> list[dict[str, str]]:
    """The pairs as TRL's preference rows: the rendered prompt, and each answer as the template ends it.

    A chat template writes the beginning-of-sequence token itself; a tokenizer that adds one too
    would give TRL's DPOTrainer two, so the template's is left out of the text then."""
    bos = tokenizer.bos_token if _adds_bos(tokenizer) else None
    rows = []
    for sample in samples:
        prompt = render_prompt(sample, tokenizer)
        chosen = render_completion(sample, tokenizer, prompt)
        rejected = render_completion(sample.rejected_sample, tokenizer, prompt)
        if bos and prompt.startswith(bos):
            prompt = prompt[len(bos) :]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def preference_trainer(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    train_samples: Sequence[Sample],
    validation_samples: Sequence[Sample],
    *,
    spec: FineTuneJobSpec,
    arguments: dict[str, Any],
    callbacks: list[TrainerCallback],
) -> Trainer:
    """TRL's trainer for the spec's algorithm, with the run's training arguments (`arguments`:
    what a supervised run's TrainingArguments get)."""
    # TRL and the `datasets` it needs load here, for preference runs only: ~90 MB and 1.6 s that every
    # other trainer pod would pay at start (measured).
    from datasets import Dataset  # noqa: PLC0415
    from trl import DPOConfig, DPOTrainer  # noqa: PLC0415
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: PLC0415

    assert spec.preference is not None
    preference = spec.preference
    settings = {**arguments, "beta": preference.beta, "max_length": spec.hyperparameters.max_seq_length}
    settings.pop("label_names")  # the trainers' own prediction steps need no label column
    train = Dataset.from_list(pair_rows(train_samples, tokenizer))
    validation = Dataset.from_list(pair_rows(validation_samples, tokenizer)) if validation_samples else None
    if preference.algorithm == "orpo":
        return ORPOTrainer(
            model=model,
            # Its batches hold each pair's sequences under names of their own, which the Trainer
            # cannot count tokens in.
            args=ORPOConfig(**{**settings, "include_num_input_tokens_seen": "no"}),
            train_dataset=train,
            eval_dataset=validation,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    full = not isinstance(model, PeftModel)
    return DPOTrainer(
        model=model,
        # Full fine-tuning: the reference's log-probabilities from the untrained weights, before the
        # first step, instead of a second copy of the model held all along.
        args=DPOConfig(**settings, precompute_ref_log_probs=full),
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def truncated_pairs(samples: Sequence[Sample], tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
    """Pairs whose prompt and either answer pass max_length (the trainer cuts them to it)."""
    return sum(
        tokenize_sample(sample, tokenizer, max_length).truncated
        or tokenize_sample(sample.rejected_sample, tokenizer, max_length).truncated
        for sample in samples
    )


def drop_reference_adapter(model: PreTrainedModel | PeftModel) -> None:
    """Remove DPO's reference adapter, so the saved adapter is the trained one alone."""
    if isinstance(model, PeftModel) and REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(REFERENCE_ADAPTER)
