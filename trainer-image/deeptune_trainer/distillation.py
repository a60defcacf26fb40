"""Knowledge distillation (`spec.distillation`): the student — the base model being fine-tuned — learns
from a teacher model.

- `sequences`: the teacher answers every training prompt (greedy) and the student is trained on its
  answers instead of the data's: sequence-level distillation (Kim & Rush, 2016). Any two tokenizers.
- `logits`: on the data's answers the loss is (1 − alpha)·cross-entropy + alpha·T²·KL(teacher‖student),
  both next-token distributions softened by the temperature T, over the answer tokens only: Hinton et
  al.'s soft targets. The two models must share a tokenizer.

TRL 1.16's DistillationTrainer distils on the student's own generations (on-policy); distilling on
the user's data is what this module does, with the transformers Trainer every run uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812  (the usual name)
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

from deeptune.api.finetunejob import FineTuneJobSpec, GenerationSpec
from deeptune.api.trainer import TEACHER_HUB_TOKEN_ENV, TrainerPaths
from deeptune_trainer.data.sample import Message, Sample
from deeptune_trainer.errors import TrainerInputError
from deeptune_trainer.evaluation import generate
from deeptune_trainer.formatting import IGNORE_INDEX
from deeptune_trainer.modeling import LoadedModel, load_model


def load_teacher(spec: FineTuneJobSpec, paths: TrainerPaths) -> LoadedModel:
    """The teacher, loaded as a base model is (unquantized, in the run's precision), frozen."""
    assert spec.distillation is not None
    if spec.distillation.teacher.fine_tune_job_ref is not None:
        raise TrainerInputError(
            "InvalidSpec",
            "distillation.teacher.fineTuneJobRef is resolved by the operator to that run's model; outside "
            "a cluster give the teacher as name or pvc (with adapter for a run that saved only one)",
        )
    as_base = spec.model_copy(
        update={"base_model": spec.distillation.teacher, "method": "lora", "rope_scaling": None}
    )
    try:
        teacher_paths = paths.model_copy(update={"base_model": paths.teacher_model})
        loaded = load_model(as_base, teacher_paths, token_env=TEACHER_HUB_TOKEN_ENV)
    except TrainerInputError as error:  # its messages name the field they read: here, the teacher
        raise TrainerInputError(
            error.reason, error.message.replace("baseModel", "distillation.teacher", 1)
        ) from error
    if paths.teacher_adapter is not None:
        loaded = replace(loaded, model=_with_adapter(loaded.model, paths.teacher_adapter))
    loaded.model.eval()
    loaded.model.requires_grad_(False)
    return loaded


def _with_adapter(model: PreTrainedModel, adapter_dir: str) -> PreTrainedModel:
    """The teacher with its adapter merged in: one model, as fast to run as the base alone."""
    if not Path(adapter_dir, "adapter_config.json").is_file():
        raise TrainerInputError(
            "ModelNotFound",
            f"distillation.teacher: no adapter at {adapter_dir} (no adapter_config.json): point adapter "
            "at a PEFT adapter directory, or rerun the teacher's FineTuneJob",
        )
    merged: PreTrainedModel = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return merged


def check_shared_vocabulary(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> None:
    """`logits` compares the two distributions token by token: the vocabularies must be the same."""
    if teacher.get_vocab() != student.get_vocab():
        raise TrainerInputError(
            "InvalidSpec",
            "distillation.mode logits compares the teacher's and the student's next-token distributions "
            f"token by token, but their tokenizers differ ({len(teacher)} and {len(student)} tokens): use "
            "mode sequences, or a teacher of the student's family",
        )


def teacher_answers(teacher: LoadedModel, samples: Sequence[Sample], spec: FineTuneJobSpec) -> list[Sample]:
    """The samples with the teacher's greedy answer as their final turn (documents stay as they are:
    they answer no prompt)."""
    assert spec.distillation is not None
    asked = [sample for sample in samples if not sample.is_document]
    answers = generate(
        teacher.model,
        teacher.tokenizer,
        asked,
        GenerationSpec(max_new_tokens=spec.distillation.max_new_tokens),
        max_length=spec.hyperparameters.max_seq_length,
        batch_size=spec.hyperparameters.per_device_batch_size,
    )
    by_sample = dict(zip(map(id, asked), answers, strict=True))
    return [
        sample
        if sample.is_document
        else replace(sample, messages=(*sample.prompt_messages, Message("assistant", by_sample[id(sample)])))
        for sample in samples
    ]


class DistillingTrainer(Trainer):
    """The transformers Trainer with the soft-target loss of `logits` added to the data's. The
    batches must carry logits at every position (the Collator's targets-only mode is off)."""

    def __init__(self, *args: Any, teacher: PreTrainedModel, temperature: float, alpha: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.teacher: torch.nn.Module = teacher
        self.teacher.to(self.args.device)  # type: ignore[arg-type]  # transformers types `to` by its wrapper
        self.temperature = temperature
        self.alpha = alpha

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        data_loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        answer = inputs["labels"][:, 1:] != IGNORE_INDEX
        with torch.no_grad():
            given = {name: value for name, value in inputs.items() if name != "labels"}
            teacher_logits = self.teacher(**given).logits[:, :-1][answer]
        student_logits = outputs.logits[:, :-1][answer]
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(student_logits.float() / t, dim=-1),
            F.log_softmax(teacher_logits.float() / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        loss = (1 - self.alpha) * data_loss + self.alpha * t * t * soft
        return (loss, outputs) if return_outputs else loss
