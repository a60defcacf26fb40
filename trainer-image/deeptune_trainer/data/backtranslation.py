"""Back-translation: paraphrase by translating to a pivot language and back.

The translators are injected (`TranslatorFactory`) so the pipeline's plumbing is testable without
model weights; the default builds a transformers seq2seq model (e.g. Helsinki-NLP/opus-mt-zh-en).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from deeptune.api.finetunejob import BackTranslation
from deeptune_trainer.errors import TrainerInputError

Translator = Callable[[list[str]], list[str]]
TranslatorFactory = Callable[[str], Translator]

BATCH_SIZE = 16


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def transformers_translator(model_name: str, *, max_new_tokens: int = 256) -> Translator:
    """A translator backed by AutoModelForSeq2SeqLM; only local files are used when HF_HUB_OFFLINE is set."""
    import torch  # noqa: PLC0415  (heavy; only back-translation needs it)
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer  # noqa: PLC0415

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name, local_files_only=_offline())
        model = AutoModelForSeq2SeqLM.from_pretrained(model_name, local_files_only=_offline())
    except (OSError, ValueError) as error:
        raise TrainerInputError(
            "ModelNotFound",
            f"dataset.augmentation.backTranslation: cannot load translation model '{model_name}' "
            f"({error}); give a Hugging Face id the trainer can download, or a local directory",
        ) from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()

    def translate(texts: list[str]) -> list[str]:
        results: list[str] = []
        for start in range(0, len(texts), BATCH_SIZE):
            batch = tokenizer(
                texts[start : start + BATCH_SIZE], return_tensors="pt", padding=True, truncation=True
            )
            with torch.no_grad():
                generated = model.generate(**batch.to(device), max_new_tokens=max_new_tokens)
            results.extend(tokenizer.batch_decode(generated, skip_special_tokens=True))
        return results

    return translate


class BackTranslator:
    """Forward then backward translation; models are built only when the first batch arrives."""

    def __init__(self, spec: BackTranslation, factory: TranslatorFactory | None) -> None:
        self.spec = spec
        self._factory = factory
        self._pair: tuple[Translator, Translator] | None = None

    def _translators(self) -> tuple[Translator, Translator]:
        if self._pair is None:
            factory = self._factory or self._default_factory
            self._pair = (factory(self.spec.forward_model), factory(self.spec.backward_model))
        return self._pair

    def _default_factory(self, model_name: str) -> Translator:
        return transformers_translator(model_name, max_new_tokens=self.spec.max_new_tokens)

    def __call__(self, texts: list[str]) -> list[str]:
        if not texts:
            return []
        forward, backward = self._translators()
        pivot = forward(texts)
        result = backward(pivot)
        if not len(texts) == len(pivot) == len(result):
            raise ValueError(f"a translator returned {len(pivot)}/{len(result)} texts for {len(texts)}")
        return result
