"""Augmentation of the train split: a `fraction` of the train rows each get one augmented copy.

It runs after the split, on train rows only, so no paraphrase of a validation row can leak into
training. Only the last user turn is changed, never the target, so the expected answer stays right.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from deeptune.api.finetunejob import Augmentation
from deeptune_trainer.data.backtranslation import BackTranslator, TranslatorFactory
from deeptune_trainer.data.meaning import MeaningCheck
from deeptune_trainer.data.perturbation import InstructionPerturber
from deeptune_trainer.data.sample import Message, Sample
from deeptune_trainer.data.synonyms import SynonymReplacer

RowAugmenter = Callable[[str, random.Random], str]
BACK_TRANSLATION = "backTranslation"


@dataclass
class Augmented:
    copies: list[Sample]
    """New samples, each marked with meta["augmented"] = the method that made it."""
    by_method: Counter[str]
    rejected: Counter[str] = field(default_factory=Counter)
    """Back-translations not kept, by reason (BackTranslator.verdict)."""
    drifted: Counter[str] = field(default_factory=Counter)
    """Copies the embedding check dropped (their meaning drifted), by the method that made them."""


def last_user_turn(sample: Sample) -> int | None:
    return next(
        (i for i in reversed(range(len(sample.messages) - 1)) if sample.messages[i].role == "user"), None
    )


def _copy(sample: Sample, turn: int, text: str, method: str) -> Sample:
    messages = list(sample.messages)
    messages[turn] = Message("user", text)
    return replace(sample, messages=tuple(messages), augmented_by=method)


def _row_augmenters(spec: Augmentation, dictionary: Mapping[str, Sequence[str]]) -> dict[str, RowAugmenter]:
    augmenters: dict[str, RowAugmenter] = {}
    if spec.synonyms is not None and dictionary:
        augmenters["synonyms"] = SynonymReplacer(dictionary, spec.synonyms.probability)
    perturbation = spec.instruction_perturbation
    if perturbation is not None and (
        perturbation.reword or perturbation.insert_context or perturbation.typos
    ):
        augmenters["instructionPerturbation"] = InstructionPerturber(
            reword=perturbation.reword,
            insert_context=perturbation.insert_context,
            templates=perturbation.templates,
            typos=perturbation.typos,
        )
    return augmenters


def augment_train(
    train: list[Sample],
    spec: Augmentation,
    *,
    dictionary: Mapping[str, Sequence[str]],
    translator_factory: TranslatorFactory | None = None,
) -> Augmented:
    """Copies for round(fraction × rows) rows (at least one), each made by one method picked at random
    among those enabled. `dictionary` is the merged synonym dictionary. A method that cannot change a
    row (no dictionary word in it) yields no copy, so `augmented` counts only real variants."""
    augmenters = _row_augmenters(spec, dictionary)
    back = BackTranslator(spec.back_translation, translator_factory) if spec.back_translation else None
    methods = [*augmenters, *([BACK_TRANSLATION] if back else [])]
    eligible = [index for index, sample in enumerate(train) if last_user_turn(sample) is not None]
    if not methods or not eligible:
        return Augmented([], Counter())
    rng = random.Random(spec.seed)
    count = min(len(eligible), max(1, round(spec.fraction * len(train))))
    copies: list[Sample] = []
    originals: list[str] = []  # each copy's original prompt
    to_translate: list[tuple[Sample, int]] = []
    for index in sorted(rng.sample(eligible, count)):
        sample, method = train[index], rng.choice(methods)
        turn = last_user_turn(sample)
        assert turn is not None
        if method == BACK_TRANSLATION:
            to_translate.append((sample, turn))
            continue
        text = augmenters[method](sample.messages[turn].content, rng)
        if text != sample.messages[turn].content:
            copies.append(_copy(sample, turn, text, method))
            originals.append(sample.messages[turn].content)
    rejected: Counter[str] = Counter()
    if back is not None and to_translate:
        asked = [sample.messages[turn].content for sample, turn in to_translate]
        for (sample, turn), original, paraphrase in zip(to_translate, asked, back(asked), strict=True):
            reason = back.verdict(original, paraphrase)
            if reason is None and paraphrase is not None:
                copies.append(_copy(sample, turn, paraphrase, BACK_TRANSLATION))
                originals.append(original)
            else:
                rejected[reason or ""] += 1
    copies, drifted = _same_meaning(copies, originals, spec)
    return Augmented(copies, Counter(copy.augmented_by or "" for copy in copies), rejected, drifted)


def _same_meaning(
    copies: list[Sample], originals: list[str], spec: Augmentation
) -> tuple[list[Sample], Counter[str]]:
    """The copies the embedding check keeps (all without one), and the dropped ones' count by method."""
    if spec.embedding_check is None or not copies:
        return copies, Counter()
    check = MeaningCheck(spec.embedding_check.min_similarity)
    variants = [copy.messages[last_user_turn(copy) or 0].content for copy in copies]
    verdicts = check.kept(originals, variants)
    kept = [copy for copy, ok in zip(copies, verdicts, strict=True) if ok]
    drifted = Counter(copy.augmented_by or "" for copy, ok in zip(copies, verdicts, strict=True) if not ok)
    return kept, drifted
