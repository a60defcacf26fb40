"""The cleaning rules, applied in order: normalize, length bounds, degenerate rows, PII, exact and
near dedup. PII comes before dedup because redaction can make rows identical."""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace

from deeptune.api.finetunejob import Cleaning, PiiType
from deeptune_trainer.data import pii
from deeptune_trainer.data.dedup import NearDuplicateIndex, exact_key
from deeptune_trainer.data.normalize import comparison_text, normalize_sample
from deeptune_trainer.data.sample import Message, Sample

NEAR_EXAMPLES = 10
"""Near-duplicate pairs the data report lists, so a user can see what the rule removed."""
PREVIEW_CHARS = 120
REPEATED_CHAR_MIN = 3
"""A target of one character repeated this often is degenerate ("!!!", "哈哈哈"); shorter ones such
as "嗯嗯" are real replies, and repeated digits ("111") are numbers."""


@dataclass(frozen=True)
class NearDuplicate:
    """A row near dedup removed, and the earlier row it nearly repeats."""

    source: str
    line: int
    kept_source: str
    kept_line: int
    similarity: float
    preview: str
    """The start of the removed row's prompt and answer."""


@dataclass
class CleaningStats:
    """Rows each rule removed or changed (the data report shows them all)."""

    rows_in: int = 0
    too_short: int = 0
    too_long: int = 0
    degenerate: int = 0
    pii_dropped: int = 0
    pii_redacted: int = 0
    """Rows in which something was redacted."""
    pii_found: Counter[PiiType] = field(default_factory=Counter)
    """Items found per PII type (several may be in one row)."""
    exact_duplicates: int = 0
    near_duplicates: int = 0
    near_comparisons: int = 0
    near_examples: list[NearDuplicate] = field(default_factory=list)
    """The first NEAR_EXAMPLES near duplicates removed."""

    def __add__(self, other: CleaningStats) -> CleaningStats:
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        return CleaningStats(**{**summed, "near_examples": summed["near_examples"][:NEAR_EXAMPLES]})

    def removals(self, rules: Cleaning) -> list[str]:
        """What removed rows, in rule order, e.g. `40 too short (minChars=5)`; idle rules left out."""
        counts = [
            (self.too_short, f"too short (minChars={rules.min_chars})"),
            (self.too_long, f"too long (maxChars={rules.max_chars})"),
            (self.degenerate, "degenerate"),
            (self.pii_dropped, "with personal data (pii.action=drop)"),
            (self.exact_duplicates, "exact duplicates"),
            (self.near_duplicates, f"near duplicates (threshold={rules.near_dedup.threshold:g})"),
        ]
        return [f"{count} {what}" for count, what in counts if count]


def near_dedup_parts(sample: Sample) -> tuple[str, str]:
    """What near dedup compares, part for part: what the user asked and what the assistant answered, in
    their comparison form. System prompts are left out: a long one shared by every row would make
    every row look alike."""
    asked = "\n".join(comparison_text(m.content) for m in sample.messages if m.role == "user")
    answers = [m.content for m in sample.messages if m.role == "assistant"]
    answers += [] if sample.rejected is None else [sample.rejected]  # pairs differ in either answer
    answered = "\n".join(comparison_text(text) for text in answers)
    return asked, answered


def _preview(sample: Sample) -> str:
    asked = next((m.content for m in sample.messages if m.role == "user"), "")
    return f"{asked[:PREVIEW_CHARS]} → {sample.target[:PREVIEW_CHARS]}"


def _prompt(sample: Sample) -> str | None:
    return next((m.content for m in reversed(sample.prompt_messages) if m.role == "user"), None)


CASEFOLD_GROWTH = 3
"""The most characters str.casefold makes of one (e.g. 'ΐ' → 3)."""


def _may_start_alike(first: str, second: str) -> bool:
    """Whether the two texts may be equal once case folded, judged by their first characters: each
    folds to a start of the same text, so one must begin the other (most pairs: no)."""
    start, other = first[:1].casefold(), second[:1].casefold()
    return start.startswith(other) or other.startswith(start)


def is_degenerate(sample: Sample) -> bool:
    """An empty target, one that repeats the prompt, or one character repeated, or a pair whose two
    answers are the same: nothing to learn."""
    target = "".join(sample.target.split())
    if not target:
        return True
    if sample.rejected is not None and comparison_text(sample.rejected) == comparison_text(sample.target):
        return True
    prompt = _prompt(sample)
    # Dropping whitespace shortens the prompt and casefold at most triples a character (ß → ss): a
    # prompt under a third of the target's length cannot equal it, and most prompts are skipped so.
    if (
        prompt is not None
        and CASEFOLD_GROWTH * len(prompt) >= len(target)
        and _may_start_alike(target, prompt.lstrip())
        and target.casefold() == "".join(prompt.split()).casefold()
    ):
        return True
    return (
        len(target) >= REPEATED_CHAR_MIN and target.count(target[0]) == len(target) and not target.isdigit()
    )


def _redact(sample: Sample, kinds: list[PiiType]) -> tuple[Sample, Counter[PiiType]] | None:
    """The sample with personal data replaced, and what was found; None when nothing was."""
    if not pii.may_hold("\n".join(sample.texts), kinds):  # most rows: one check, not one per turn
        return None
    found: Counter[PiiType] = Counter()
    contents = []
    for text in sample.texts:
        content, counts = pii.redact(text, kinds)
        found.update(counts)
        contents.append(content)
    if not found:
        return None
    turns = contents[: len(sample.messages)]
    messages = tuple(Message(m.role, content) for m, content in zip(sample.messages, turns, strict=True))
    rejected = None if sample.rejected is None else contents[-1]
    return replace(sample, messages=messages, rejected=rejected), found


class Cleaner:
    """Applies the rules to one batch of samples after another. Dedup state carries over between
    batches, so a separate validation set cleaned after the train set loses the rows it shares with it.

    Every rule but near dedup looks at one row at a time; near dedup then runs over the batch's
    survivors at once, as its index is built for (numpy over many rows, not one)."""

    def __init__(self, rules: Cleaning) -> None:
        self.rules = rules
        self._seen: set[bytes] = set()
        near = rules.near_dedup
        self._near: NearDuplicateIndex[Sample] | None = (
            NearDuplicateIndex(near.threshold, near.ngram, parts=near_dedup_parts) if near.enabled else None
        )
        self._sources: list[str] = []
        # The source of each row near dedup indexed, by its position there: compact at a million rows.
        self._indexed_sources = array("B")

    def clean(
        self, samples: Iterable[Sample], source: str = "dataset.source"
    ) -> tuple[list[Sample], CleaningStats]:
        """The rows of `source` that every rule keeps, and what each rule did."""
        if source not in self._sources:
            self._sources.append(source)
        stats = CleaningStats()
        kept = []
        for sample in samples:
            stats.rows_in += 1
            cleaned = self._clean_one(sample, stats)
            if cleaned is not None:
                kept.append(cleaned)
        if self._near is not None:
            kept = self._near_dedup(kept, source, stats)
        return kept, stats

    def _clean_one(self, sample: Sample, stats: CleaningStats) -> Sample | None:
        rules = self.rules
        sample = normalize_sample(sample, rules.normalization)
        if len(sample.target) < rules.min_chars:
            stats.too_short += 1
            return None
        if sum(map(len, sample.texts)) > rules.max_chars:
            stats.too_long += 1
            return None
        if rules.drop_degenerate and is_degenerate(sample):
            stats.degenerate += 1
            return None
        if rules.pii.action != "off" and (redaction := _redact(sample, rules.pii.types)) is not None:
            redacted, found = redaction
            stats.pii_found.update(found)
            if rules.pii.action == "drop":
                stats.pii_dropped += 1
                return None
            stats.pii_redacted += 1
            sample = redacted
        return sample if self._is_new(sample, stats) else None

    def _is_new(self, sample: Sample, stats: CleaningStats) -> bool:
        if not self.rules.exact_dedup:
            return True
        # Roles and the label are part of the identity: the same words as a different turn, or with a
        # different label, are a different example. Case, width, punctuation and spacing are not
        # (comparison_text).
        turns = "\x1e".join([f"{m.role}\x1f{comparison_text(m.content)}" for m in sample.messages])
        rejected = "" if sample.rejected is None else comparison_text(sample.rejected)
        key = exact_key(f"{turns}\x1d{sample.label or ''}\x1d{rejected}")
        if key in self._seen:
            stats.exact_duplicates += 1
            return False
        self._seen.add(key)
        return True

    def _near_dedup(self, samples: list[Sample], source: str, stats: CleaningStats) -> list[Sample]:
        assert self._near is not None
        index, comparisons_before = self._near, self._near.comparisons
        indexed_before = len(index)
        matches = index.admit(samples)
        self._indexed_sources += array("B", [self._sources.index(source)]) * (len(index) - indexed_before)
        stats.near_comparisons = index.comparisons - comparisons_before
        kept = []
        for sample, match in zip(samples, matches, strict=True):
            if match is None:
                kept.append(sample)
                continue
            stats.near_duplicates += 1
            if len(stats.near_examples) < NEAR_EXAMPLES:
                kept_source = self._sources[self._indexed_sources[match.position]]
                stats.near_examples.append(
                    NearDuplicate(
                        source, sample.line, kept_source, index.row(match.position).line,
                        round(match.similarity, 3), _preview(sample),
                    )
                )  # fmt: skip
        return kept
