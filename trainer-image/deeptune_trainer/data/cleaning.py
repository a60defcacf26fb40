"""The cleaning rules, applied in order: normalize, length bounds, degenerate rows, PII, exact and
near dedup. PII comes before dedup because redaction can make rows identical."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields, replace

from deeptune.api.finetunejob import Cleaning, PiiType
from deeptune_trainer.data import pii
from deeptune_trainer.data.dedup import NearDuplicateIndex, exact_key
from deeptune_trainer.data.normalize import normalize_sample
from deeptune_trainer.data.sample import Message, Sample

REPEATED_CHAR_MIN = 3
"""A target of one character repeated this often is degenerate ("!!!", "哈哈哈"); shorter ones such
as "嗯嗯" are real replies, and repeated digits ("111") are numbers."""


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

    def __add__(self, other: CleaningStats) -> CleaningStats:
        return CleaningStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

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


def sample_text(sample: Sample) -> str:
    return "\n".join(message.content for message in sample.messages)


def _prompt(sample: Sample) -> str | None:
    return next((m.content for m in reversed(sample.prompt_messages) if m.role == "user"), None)


def is_degenerate(sample: Sample) -> bool:
    """An empty target, one that repeats the prompt, or one character repeated: nothing to learn."""
    target = "".join(sample.target.split())
    if not target:
        return True
    prompt = _prompt(sample)
    if prompt is not None and target.casefold() == "".join(prompt.split()).casefold():
        return True
    return len(set(target)) == 1 and len(target) >= REPEATED_CHAR_MIN and not target.isdigit()


def _redact(sample: Sample, kinds: list[PiiType]) -> tuple[Sample, Counter[PiiType]]:
    found: Counter[PiiType] = Counter()
    messages = []
    for message in sample.messages:
        content, counts = pii.redact(message.content, kinds)
        found.update(counts)
        messages.append(Message(message.role, content))
    return replace(sample, messages=tuple(messages)), found


class Cleaner:
    """Applies the rules to one batch of samples after another. Dedup state carries over between
    batches, so a separate validation set cleaned after the train set loses the rows it shares with it."""

    def __init__(self, rules: Cleaning) -> None:
        self.rules = rules
        self._seen: set[bytes] = set()
        near = rules.near_dedup
        self._near = NearDuplicateIndex(near.threshold, near.ngram) if near.enabled else None

    def clean(self, samples: list[Sample]) -> tuple[list[Sample], CleaningStats]:
        stats = CleaningStats(rows_in=len(samples))
        comparisons_before = self._near.comparisons if self._near else 0
        kept = [cleaned for sample in samples if (cleaned := self._clean_one(sample, stats)) is not None]
        stats.near_comparisons = (self._near.comparisons if self._near else 0) - comparisons_before
        return kept, stats

    def _clean_one(self, sample: Sample, stats: CleaningStats) -> Sample | None:
        rules = self.rules
        sample = normalize_sample(sample, rules.normalization)
        if len(sample.target) < rules.min_chars:
            stats.too_short += 1
            return None
        if sum(len(message.content) for message in sample.messages) > rules.max_chars:
            stats.too_long += 1
            return None
        if rules.drop_degenerate and is_degenerate(sample):
            stats.degenerate += 1
            return None
        if rules.pii.action != "off":
            redacted, found = _redact(sample, rules.pii.types)
            stats.pii_found.update(found)
            if found and rules.pii.action == "drop":
                stats.pii_dropped += 1
                return None
            if found:
                stats.pii_redacted += 1
                sample = redacted
        return sample if self._is_new(sample, stats) else None

    def _is_new(self, sample: Sample, stats: CleaningStats) -> bool:
        if self.rules.exact_dedup:
            # Roles and the label are part of the identity: the same words as a different turn, or
            # with a different label, are a different example.
            turns = "\x1e".join(f"{m.role}\x1f{m.content}" for m in sample.messages)
            key = exact_key(f"{turns}\x1d{sample.label or ''}")
            if key in self._seen:
                stats.exact_duplicates += 1
                return False
            self._seen.add(key)
        if self._near is not None and not self._near.admit(sample_text(sample)):
            stats.near_duplicates += 1
            return False
        return True
