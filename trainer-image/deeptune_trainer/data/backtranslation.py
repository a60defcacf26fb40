"""Back-translation: paraphrase by translating to a pivot language and back.

The translators are injected (`TranslatorFactory`) so the pipeline's plumbing is testable without
model weights; the default builds a transformers seq2seq model (e.g. Helsinki-NLP/opus-mt-zh-en).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from deeptune.api.finetunejob import BackTranslation
from deeptune_trainer.data.normalize import comparison_text
from deeptune_trainer.errors import TrainerInputError

Translator = Callable[[list[str]], list[str | None]]
"""Texts in, their translations out; None for a text the model cannot take whole (too long)."""
TranslatorFactory = Callable[[str], Translator]
TOO_LONG, UNCHANGED, LENGTH_RATIO, DISSIMILAR = "tooLong", "unchanged", "lengthRatio", "dissimilar"
"""Why a paraphrase was not kept (the data report counts each)."""
DEFAULT_MAX_INPUT_TOKENS = 512
"""Input length for a translation model whose tokenizer does not say (Marian/opus-mt models take 512)."""

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
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else DEFAULT_MAX_INPUT_TOKENS

    def translate(texts: list[str]) -> list[str | None]:
        # A text the model cannot take whole is not translated: cut, its paraphrase would lose the end.
        whole = [index for index, text in enumerate(texts) if len(tokenizer(text)["input_ids"]) <= limit]
        results: list[str | None] = [None] * len(texts)
        for start in range(0, len(whole), BATCH_SIZE):
            indices = whole[start : start + BATCH_SIZE]
            batch = tokenizer([texts[i] for i in indices], return_tensors="pt", padding=True)
            with torch.no_grad():
                generated = model.generate(**batch.to(device), max_new_tokens=max_new_tokens)
            for index, text in zip(
                indices, tokenizer.batch_decode(generated, skip_special_tokens=True), strict=True
            ):
                results[index] = text
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

    def __call__(self, texts: list[str]) -> list[str | None]:
        """The round trip of each text; None where a model could not take it whole."""
        if not texts:
            return []
        forward, backward = self._translators()
        pivot = forward(texts)
        if len(pivot) != len(texts):
            raise ValueError(f"a translator returned {len(pivot)} texts for {len(texts)}")
        translated = [index for index, text in enumerate(pivot) if text is not None]
        back = backward([text for text in pivot if text is not None])
        if len(back) != len(translated):
            raise ValueError(f"a translator returned {len(back)} texts for {len(translated)}")
        result: list[str | None] = [None] * len(texts)
        for index, text in zip(translated, back, strict=True):
            result[index] = text
        return result

    def verdict(self, original: str, paraphrase: str | None) -> str | None:
        """Why the paraphrase is not kept, or None to keep it."""
        if paraphrase is None:
            return TOO_LONG
        before, after = comparison_text(original), comparison_text(paraphrase)
        if not after or after == before:
            return UNCHANGED
        if not self.spec.min_length_ratio <= len(after) / max(len(before), 1) <= self.spec.max_length_ratio:
            return LENGTH_RATIO
        if _bigram_jaccard(before, after) < self.spec.min_similarity:
            return DISSIMILAR
        return None


def _bigram_jaccard(a: str, b: str) -> float:
    grams_a = {a[i : i + 2] for i in range(max(len(a) - 1, 1))}
    grams_b = {b[i : i + 2] for i in range(max(len(b) - 1, 1))}
    return len(grams_a & grams_b) / len(grams_a | grams_b)
