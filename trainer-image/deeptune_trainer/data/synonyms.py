"""Synonym replacement from the user's dictionary, for Chinese (no spaces) and English (word boundaries)."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from deeptune_trainer.errors import TrainerInputError

_WORD_CHAR = re.compile(r"[A-Za-z0-9_]")


def _pattern(word: str) -> str:
    # English words need boundaries ("big" must not match inside "bigger"); Chinese has no spaces, so
    # CJK entries match anywhere, longest first (the alternation is sorted by length).
    before = r"(?<![A-Za-z0-9_])" if _WORD_CHAR.match(word[0]) else ""
    after = r"(?![A-Za-z0-9_])" if _WORD_CHAR.match(word[-1]) else ""
    return before + re.escape(word) + after


def _same_case(original: str, replacement: str) -> str:
    if len(original) > 1 and original.isupper():
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def load_dictionary(path: str) -> dict[str, list[str]]:
    """A dictionary mounted from `synonyms.dictionaryConfigMap`: a JSON object of word → synonyms."""
    where = "dataset.augmentation.synonyms.dictionaryConfigMap"
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainerInputError("InvalidSpec", f"{where}: cannot read the dictionary: {error}") from None
    if not isinstance(value, dict) or not all(
        isinstance(synonyms, list) and all(isinstance(s, str) for s in synonyms)
        for synonyms in value.values()
    ):
        raise TrainerInputError(
            "InvalidSpec",
            f'{where}: expected a JSON object of word to synonym list, e.g. {{"快速": ["迅速"]}}',
        )
    return value


class SynonymReplacer:
    """Replaces each dictionary word found with probability p; a row with at least one dictionary word
    always changes, so a row chosen for augmentation yields a real variant."""

    def __init__(self, dictionary: Mapping[str, Sequence[str]], probability: float) -> None:
        self.probability = probability
        self._synonyms = {word.casefold(): list(syns) for word, syns in dictionary.items() if word and syns}
        words = sorted((word for word, syns in dictionary.items() if word and syns), key=len, reverse=True)
        self._regex = re.compile("|".join(map(_pattern, words)), re.IGNORECASE) if words else None

    def __call__(self, text: str, rng: random.Random) -> str:
        if self._regex is None:
            return text
        matches = list(self._regex.finditer(text))
        if not matches:
            return text
        chosen = [match for match in matches if rng.random() < self.probability] or [rng.choice(matches)]
        pieces, position = [], 0
        for match in chosen:
            synonym = rng.choice(self._synonyms[match.group().casefold()])
            pieces += [text[position : match.start()], _same_case(match.group(), synonym)]
            position = match.end()
        return "".join([*pieces, text[position:]])
