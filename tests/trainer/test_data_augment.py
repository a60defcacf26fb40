"""Split determinism, and augmentation: synonyms (Chinese and English), perturbation, back-translation."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from deeptune.api.finetunejob import Augmentation, InstructionPerturbation
from deeptune_trainer.data.augment import augment_train
from deeptune_trainer.data.backtranslation import Translator
from deeptune_trainer.data.perturbation import CONTEXT, InstructionPerturber, framings
from deeptune_trainer.data.sample import Message, Sample
from deeptune_trainer.data.split import split_by_ratio
from deeptune_trainer.data.synonyms import SynonymReplacer, load_dictionary
from deeptune_trainer.errors import TrainerInputError


def _sample(prompt: str, completion: str = "answer", line: int = 0) -> Sample:
    return Sample((Message("user", prompt), Message("assistant", completion)), line=line)


def _rows(count: int) -> list[Sample]:
    return [_sample(f"question {n}", f"answer {n}", n) for n in range(1, count + 1)]


# --- split ------------------------------------------------------------------------------------


def test_split_is_deterministic_for_a_seed_and_keeps_source_order() -> None:
    rows = _rows(50)
    train, validation = split_by_ratio(rows, 0.2, seed=42)
    assert (len(train), len(validation)) == (40, 10)
    assert split_by_ratio(rows, 0.2, seed=42) == (train, validation)
    assert split_by_ratio(rows, 0.2, seed=43)[1] != validation
    assert sorted(s.line for s in train + validation) == list(range(1, 51))
    assert [s.line for s in validation] == sorted(s.line for s in validation)


@pytest.mark.parametrize(("count", "expected"), [(1, (1, 0)), (2, (1, 1)), (5, (4, 1)), (3, (2, 1))])
def test_split_holds_out_at_least_one_row_and_leaves_one(count: int, expected: tuple[int, int]) -> None:
    train, validation = split_by_ratio(_rows(count), 0.01, seed=1)
    assert (len(train), len(validation)) == expected
    assert len(split_by_ratio(_rows(3), 0.99, seed=1)[0]) == 1


# --- synonyms ---------------------------------------------------------------------------------


def test_chinese_synonyms_match_without_spaces_longest_first() -> None:
    replacer = SynonymReplacer(
        {"快速": ["迅速"], "快速发货": ["极速发货"], "退货": ["退回商品"]}, probability=1.0
    )
    assert replacer("请快速发货，我想退货", random.Random(0)) == "请极速发货，我想退回商品"


def test_english_synonyms_respect_word_boundaries_and_case() -> None:
    replacer = SynonymReplacer({"big": ["large"], "fast": ["quick"]}, probability=1.0)
    assert replacer("Big bigger BIG, fast.", random.Random(0)) == "Large bigger LARGE, quick."


def test_a_row_with_a_dictionary_word_always_changes() -> None:
    replacer = SynonymReplacer({"good": ["fine"]}, probability=0.01)
    assert replacer("good good good", random.Random(3)).count("fine") >= 1
    assert replacer("nothing to replace", random.Random(3)) == "nothing to replace"


def test_dictionary_file(tmp_path: Path) -> None:
    path = tmp_path / "synonyms.json"
    path.write_text(json.dumps({"快速": ["迅速"]}, ensure_ascii=False), encoding="utf-8")
    assert load_dictionary(str(path)) == {"快速": ["迅速"]}
    path.write_text('{"快速": "迅速"}', encoding="utf-8")
    with pytest.raises(TrainerInputError, match=r"expected a JSON object of word to synonym list"):
        load_dictionary(str(path))


# --- instruction perturbation -----------------------------------------------------------------


def test_perturbation_uses_the_row_language() -> None:
    zh = InstructionPerturber(reword=True, insert_context=True)("我的快递到哪了？", random.Random(1))
    en = InstructionPerturber(reword=True, insert_context=True)("Where is my parcel?", random.Random(1))
    assert "我的快递到哪了？" in zh and any(sentence in zh for sentence in CONTEXT["zh"])
    assert any(template.replace("{text}", "我的快递到哪了？") in zh for template in framings("zh"))
    assert "Where is my parcel?" in en and any(sentence in en for sentence in CONTEXT["en"])
    reworded = InstructionPerturber(reword=True, insert_context=False)("use {braces}", random.Random(2))
    assert reworded in {template.replace("{text}", "use {braces}") for template in framings("en")}


def test_rewording_draws_from_over_a_hundred_framings_per_language() -> None:
    for language in ("en", "zh"):
        assert len(set(framings(language))) > 100
    perturb = InstructionPerturber(reword=True, insert_context=False)
    seen = {perturb("Where is my parcel?", random.Random(seed)) for seed in range(400)}
    assert len(seen) > 80


def test_your_own_templates_replace_the_built_in_framings() -> None:
    perturb = InstructionPerturber(reword=True, insert_context=False, templates=["Hi team, {text} Thanks!"])
    assert perturb("Where is my parcel?", random.Random(0)) == "Hi team, Where is my parcel? Thanks!"
    with pytest.raises(ValidationError, match=r"templates\[0\] has no \{text\}"):
        InstructionPerturbation.model_validate({"templates": ["Hi team!"]})


def test_typos_slip_one_letter_in_the_share_of_long_words_asked() -> None:
    text = " ".join(["parcel", "delivery", "address", "tomorrow", "dog", "猫"] * 50)
    perturb = InstructionPerturber(reword=False, insert_context=False, typos=0.2)
    words = perturb(text, random.Random(3)).split()
    changed = [(a, b) for a, b in zip(text.split(), words, strict=True) if a != b]
    assert 0.1 < len(changed) / 200 < 0.3  # of the 200 words long enough
    for before, after in changed:
        assert len(before) >= 4 and abs(len(before) - len(after)) <= 1
        assert (before[0], before[-1]) == (after[0], after[-1])


# --- augmentation -----------------------------------------------------------------------------


def _augmentation(**fields: Any) -> Augmentation:
    return Augmentation.model_validate({"seed": 7, **fields})


def test_fraction_of_rows_get_one_copy_and_targets_never_change() -> None:
    train = _rows(20)
    spec = _augmentation(fraction=0.25, instructionPerturbation={})
    result = augment_train(train, spec, dictionary={})
    assert len(result.copies) == 5
    assert result.by_method == Counter({"instructionPerturbation": 5})
    originals = {sample.line: sample for sample in train}
    for copy in result.copies:
        assert copy.target == originals[copy.line].target
        assert copy.messages[0].content != originals[copy.line].messages[0].content
        assert copy.augmented_by == "instructionPerturbation"
    assert augment_train(train, spec, dictionary={}).copies == result.copies  # the seed fixes it


def test_synonym_augmentation_yields_copies_only_for_rows_it_can_change() -> None:
    train = [_sample("我想退货"), _sample("没有词典里的词")] * 5
    spec = _augmentation(fraction=1.0, synonyms={"dictionary": {"退货": ["退回商品"]}})
    result = augment_train(train, spec, dictionary={"退货": ["退回商品"]})
    assert [copy.messages[0].content for copy in result.copies] == ["我想退回商品"] * 5


def test_back_translation_goes_through_both_translators_in_batches() -> None:
    calls: list[tuple[str, list[str]]] = []

    def factory(model_name: str) -> Translator:
        def translate(texts: list[str]) -> list[str | None]:
            calls.append((model_name, list(texts)))
            return [f"{text}>" if model_name == "zh-en" else f"{text.removesuffix('>')}呀" for text in texts]

        return translate

    train = [_sample("你好吗"), _sample("今天天气如何")]
    spec = _augmentation(fraction=1.0, backTranslation={"forwardModel": "zh-en", "backwardModel": "en-zh"})
    result = augment_train(train, spec, dictionary={}, translator_factory=factory)
    assert calls == [("zh-en", ["你好吗", "今天天气如何"]), ("en-zh", ["你好吗>", "今天天气如何>"])]
    assert [copy.messages[0].content for copy in result.copies] == ["你好吗呀", "今天天气如何呀"]
    assert result.by_method == Counter({"backTranslation": 2})


def test_back_translations_that_lost_or_changed_the_meaning_are_counted_not_kept() -> None:
    """Found by a fine-tuning engineer: the paraphrase of the part of a long prompt that fit the model
    was stored with the whole prompt's answer, and nothing checked what came back."""
    prompts = {
        "请问我的快递现在到哪里了？": "请问我的快递现在在哪里？",  # a paraphrase: kept
        "LONG " + "很长的问题" * 200: None,  # the model could not take it whole
        "我的订单什么时候发货？": "我的订单什么时候发货",  # only punctuation changed
        "怎样修改收货地址？": "怎样",  # lost most of it
        "退款多久到账？": "今天天气很好啊",  # another meaning
    }

    def factory(model_name: str) -> Translator:
        return lambda texts: [prompts[text] if model_name == "back" else text for text in texts]

    spec = _augmentation(fraction=1.0, backTranslation={"forwardModel": "there", "backwardModel": "back"})
    result = augment_train([_sample(p) for p in prompts], spec, dictionary={}, translator_factory=factory)
    assert [copy.messages[0].content for copy in result.copies] == ["请问我的快递现在在哪里？"]
    assert result.rejected == Counter({"tooLong": 1, "unchanged": 1, "lengthRatio": 1, "dissimilar": 1})


def test_translation_models_are_not_built_when_no_row_needs_them() -> None:
    def factory(model_name: str) -> Translator:
        raise AssertionError("built a translator")

    spec = _augmentation(fraction=1.0, backTranslation={"forwardModel": "a", "backwardModel": "b"})
    assert augment_train([], spec, dictionary={}, translator_factory=factory).copies == []


def test_identical_back_translations_are_not_copies() -> None:
    spec = _augmentation(fraction=1.0, backTranslation={"forwardModel": "a", "backwardModel": "b"})
    result = augment_train(
        [_sample("same")], spec, dictionary={}, translator_factory=lambda _: lambda texts: texts
    )
    assert result.copies == []


def test_methods_are_mixed_when_several_are_enabled() -> None:
    spec = _augmentation(
        fraction=1.0,
        synonyms={"dictionary": {"parcel": ["package"]}},
        instructionPerturbation={"reword": True, "insertContext": False},
        backTranslation={"forwardModel": "a", "backwardModel": "b"},
    )
    train = [_sample(f"Where is my parcel {n}?") for n in range(30)]
    result = augment_train(
        train,
        spec,
        dictionary={"parcel": ["package"]},
        translator_factory=lambda name: lambda t: [s.replace("Where", "Where exactly") for s in t],
    )
    assert len(result.copies) == 30
    assert set(result.by_method) == {"synonyms", "instructionPerturbation", "backTranslation"}
