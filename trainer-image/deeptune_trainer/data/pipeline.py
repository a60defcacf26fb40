"""The data pipeline end to end: read → map → clean → split → augment, with a report of each step."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

from deeptune.api.finetunejob import Augmentation, DatasetReport, DatasetSpec, DataSource
from deeptune.api.trainer import TrainerPaths
from deeptune_trainer.data.augment import Augmented, augment_train, last_user_turn
from deeptune_trainer.data.backtranslation import TranslatorFactory
from deeptune_trainer.data.cleaning import Cleaner, CleaningStats
from deeptune_trainer.data.loading import load_rows
from deeptune_trainer.data.mapping import Style, check_columns, columns_of, map_rows, resolve_style
from deeptune_trainer.data.reasoning import strip_reasoning
from deeptune_trainer.data.rows import BAD_ROWS_LISTED, BadRow, check_bad_row_ratio, drain
from deeptune_trainer.data.sample import Sample
from deeptune_trainer.data.split import split_by_ratio
from deeptune_trainer.data.synonyms import load_dictionary
from deeptune_trainer.data.thesauri import thesaurus_synonyms
from deeptune_trainer.errors import TrainerInputError


@dataclass
class PreparedData:
    """Samples ready for training and evaluation, and what the pipeline did to get them."""

    train: list[Sample]
    """Cleaned train rows followed by their augmented copies."""
    validation: list[Sample]
    test: list[Sample]
    """Empty unless `dataset.test` is given."""
    report: DatasetReport
    bad_rows: list[BadRow]
    """The first `BAD_ROWS_LISTED` malformed rows (`report.bad_rows` counts all of them)."""
    style: Style = "promptCompletion"
    cleaning: CleaningStats = field(default_factory=CleaningStats)
    augmented_by: dict[str, int] = field(default_factory=dict)
    augmentation_rejected: dict[str, int] = field(default_factory=dict)
    meaning_drifted: dict[str, int] = field(default_factory=dict)
    """Augmented copies the embedding check dropped, by method."""
    """Back-translations not kept, by reason."""
    hub_commits: dict[str, str] = field(default_factory=dict)
    """The commit each Hub source was read at, by its spec path (e.g. `dataset.source`)."""
    digests: dict[str, str] = field(default_factory=dict)
    """`sha256:` of each source's content, by its spec path."""


@dataclass
class _Source:
    samples: list[Sample]
    bad: list[BadRow]
    read: int
    style: Style
    where: str
    """The source's spec path, e.g. `dataset.source`."""
    commit: str | None
    digest: str | None


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector held off while rows are read and cleaned. Rows hold no reference
    cycles, yet each full collection walks every row held so far: at a million rows that was ~10% of
    reading and cleaning (measured). Restored after, as the caller had it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _read(
    source: DataSource,
    path: str | None,
    spec: DatasetSpec,
    where: str,
    *,
    style: Style | None,
    hub_cache: str | None,
    pairs: bool = False,
) -> _Source:
    """One source's samples; the validation source must have the style the train source resolved to."""
    loaded = load_rows(source, path, spec.format, where=where, hub_cache=hub_cache)
    read = loaded.read
    samples: list[Sample] = []
    bad = list(loaded.bad)
    resolved: Style = style or "promptCompletion"
    if loaded.rows:
        columns = columns_of(loaded.rows)
        resolved = resolve_style(style or spec.style, columns, spec.fields, pairs=pairs)
        check_columns(resolved, columns, spec.fields, loaded.source)
        samples, mapping_bad = map_rows(loaded, resolved, spec.fields)
        if spec.reasoning_traces == "strip":
            samples = [strip_reasoning(sample) for sample in samples]
        bad = sorted(bad + mapping_bad, key=lambda row: row.line)
    check_bad_row_ratio(loaded.source, read, bad, spec.max_bad_row_ratio)
    if not samples:
        raise TrainerInputError(
            "EmptyDataset",
            f"{loaded.source}: none of the {read} rows is usable; first: "
            + "; ".join(row.describe() for row in bad[:3]),
        )
    return _Source(samples, bad, read, resolved, where, loaded.commit, loaded.digest)


def _nothing_left(where: str, source: _Source, stats: CleaningStats, spec: DatasetSpec) -> TrainerInputError:
    parts = [f"{source.read} read"]
    parts += [f"{len(source.bad)} malformed"] if source.bad else []
    parts += stats.removals(spec.cleaning)
    return TrainerInputError("EmptyDataset", f"{where}no rows left after cleaning: {', '.join(parts)}")


def _clean_held_out(
    cleaner: Cleaner, source: _Source, where: str, spec: DatasetSpec
) -> tuple[list[Sample], CleaningStats]:
    """A held-out split from a source of its own, cleaned after the train rows with the same dedup
    state: rows repeating train rows go."""
    rows, stats = cleaner.clean(drain(source.samples), where)
    if not rows:
        raise _nothing_left(f"{where}: ", source, stats, spec)
    return rows, stats


def _synonym_dictionary(spec: Augmentation, path: str | None, train: list[Sample]) -> dict[str, list[str]]:
    """The thesauri's synonyms of the words in the train rows' prompts, then the user's dictionary
    (the ConfigMap's, then the spec's), each later one winning for a word both have."""
    if spec.synonyms is None:
        return {}
    prompts = [s.messages[turn].content for s in train if (turn := last_user_turn(s)) is not None]
    dictionary = thesaurus_synonyms(spec.synonyms.thesauri, prompts) if spec.synonyms.thesauri else {}
    if spec.synonyms.dictionary_config_map is not None:
        if path is None:
            raise TrainerInputError(
                "InvalidSpec",
                "dataset.augmentation.synonyms.dictionaryConfigMap: the ConfigMap's file was not given to "
                "the trainer; put the words in dataset.augmentation.synonyms.dictionary instead",
            )
        dictionary.update(load_dictionary(path))
    dictionary.update(spec.synonyms.dictionary)  # entries written in the spec win
    return dictionary


class _Splits(NamedTuple):
    """The sources read and cleaned into their splits, before augmentation."""

    train: list[Sample]
    validation: list[Sample]
    test: list[Sample]
    sources: list[_Source]
    """The train source first, then the held-out sources read."""
    stats: CleaningStats


@_collector_paused()
def _read_and_clean(spec: DatasetSpec, paths: TrainerPaths, *, seed: int, pairs: bool) -> _Splits:
    """Every source read and cleaned, the held-out splits taken: the work done a row at a time."""
    hub_cache = paths.hub_cache
    train_source = _read(
        spec.source, paths.dataset, spec, "dataset.source", style=None, hub_cache=hub_cache, pairs=pairs
    )
    cleaner = Cleaner(spec.cleaning)
    train, stats = cleaner.clean(drain(train_source.samples))
    if not train:
        raise _nothing_left("", train_source, stats, spec)
    sources = [train_source]
    test: list[Sample] = []
    if spec.test is not None and spec.test.source is not None:
        where = "dataset.test.source"
        read = _read(
            spec.test.source, paths.test_dataset, spec, where, style=train_source.style, hub_cache=hub_cache
        )
        test, test_stats = _clean_held_out(cleaner, read, where, spec)
        sources, stats = [*sources, read], stats + test_stats
    elif spec.test is not None:
        train, test = split_by_ratio(train, spec.test.ratio, seed + 1)
    if spec.validation.source is not None:
        where = "dataset.validation.source"
        read = _read(
            spec.validation.source,
            paths.validation_dataset,
            spec,
            where,
            style=train_source.style,
            hub_cache=hub_cache,
        )
        validation, validation_stats = _clean_held_out(cleaner, read, where, spec)
        sources, stats = [*sources, read], stats + validation_stats
    else:
        train, validation = split_by_ratio(train, spec.validation.ratio, seed)
    return _Splits(train, validation, test, sources, stats)


def prepare_dataset(
    spec: DatasetSpec,
    paths: TrainerPaths,
    *,
    seed: int,
    pairs: bool = False,
    translator_factory: TranslatorFactory | None = None,
) -> PreparedData:
    """Read, clean, split and augment the dataset. `seed` fixes the test and validation splits;
    `pairs` says the run tunes on preference pairs (`spec.preference`), which `auto` then looks for;
    `translator_factory` replaces the transformers models used for back-translation;"""
    train, validation, test, sources, stats = _read_and_clean(spec, paths, seed=seed, pairs=pairs)
    kept = len(train) + len(validation) + len(test)
    augmented = Augmented([], Counter())
    if spec.augmentation is not None:
        dictionary = _synonym_dictionary(spec.augmentation, paths.synonym_dictionary, train)
        augmented = augment_train(
            train, spec.augmentation, dictionary=dictionary, translator_factory=translator_factory
        )
        train = train + augmented.copies
    bad = [row for source in sources for row in source.bad]
    report = DatasetReport(
        rows_read=sum(source.read for source in sources),
        bad_rows=len(bad),
        rows_kept=kept,
        duplicates_removed=stats.exact_duplicates,
        near_duplicates_removed=stats.near_duplicates,
        filtered_by_length=stats.too_short + stats.too_long,
        degenerate_removed=stats.degenerate,
        pii_redacted=stats.pii_redacted,
        pii_dropped=stats.pii_dropped,
        augmented=len(augmented.copies),
        train_rows=len(train),
        validation_rows=len(validation),
        test_rows=len(test) if spec.test is not None else None,
    )
    return PreparedData(
        train=train,
        validation=validation,
        test=test,
        report=report,
        bad_rows=bad[:BAD_ROWS_LISTED],
        style=sources[0].style,
        cleaning=stats,
        augmented_by=dict(augmented.by_method),
        augmentation_rejected=dict(augmented.rejected),
        meaning_drifted=dict(augmented.drifted),
        hub_commits={source.where: source.commit for source in sources if source.commit is not None},
        digests={source.where: source.digest for source in sources if source.digest is not None},
    )
