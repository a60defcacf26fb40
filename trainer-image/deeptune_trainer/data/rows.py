"""Rows as read from a source, before they become samples, and the rows that could not be used."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from deeptune_trainer.errors import TrainerInputError

BAD_ROWS_LISTED = 100
"""Bad rows listed in the data report; the report's count covers all of them."""

Item = TypeVar("Item")

Unit = Literal["line", "record"]
"""Text formats number rows by line (what an editor shows); JSON arrays, Parquet and inline rows by record."""


@dataclass(frozen=True, slots=True)
class RawRow:
    """One row's cells under its column names, with the 1-based line or record number it came from.

    Rows read with the same columns share one tuple of names and each holds a tuple of cells: a dict
    per row (and a parser's new key strings for every row) cost ~230 MB more at a million rows of two
    columns, held until the rows become samples (measured)."""

    line: int
    columns: tuple[str, ...]
    cells: tuple[Any, ...]

    @classmethod
    def of(cls, line: int, values: Mapping[str, Any]) -> RawRow:
        return cls(line, tuple(values), tuple(values.values()))

    @property
    def values(self) -> dict[str, Any]:
        return dict(zip(self.columns, self.cells, strict=True))

    def has(self, column: str) -> bool:
        return column in self.columns

    def get(self, column: str, default: Any = None) -> Any:
        """The cell under `column`, or `default` when the row has no such column."""
        return self.cells[self.columns.index(column)] if column in self.columns else default


@dataclass(frozen=True, slots=True)
class BadRow:
    """A row skipped as malformed: where it is and why, so the user can find and fix it."""

    source: str
    """The spec path of the source, e.g. `dataset.source`."""
    line: int
    reason: str
    unit: Unit = "line"

    def describe(self) -> str:
        return f"{self.unit} {self.line}: {self.reason}"


@dataclass
class LoadedRows:
    """What a source yielded: usable rows and malformed ones, in source order."""

    source: str
    unit: Unit
    rows: list[RawRow] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    commit: str | None = None
    """For a Hub dataset, the commit its revision resolved to (lineage: the data report records it)."""
    digest: str | None = None
    """`sha256:` of the source's content as read (the file, the Hub split's files, the inline rows)."""
    _layouts: dict[tuple[str, ...], tuple[str, ...]] = field(default_factory=dict, repr=False)
    """One tuple of names per set of columns in their order, shared by the rows that have them."""

    def add(self, line: int, values: Mapping[str, Any]) -> None:
        """Keep a row, its column names shared with the rows read before it that have the same."""
        columns = tuple(values)
        self.rows.append(RawRow(line, self._layouts.setdefault(columns, columns), tuple(values.values())))

    @property
    def read(self) -> int:
        return len(self.rows) + len(self.bad)


def check_bad_row_ratio(source: str, read: int, bad: list[BadRow], limit: float) -> None:
    """Fail when too many rows are malformed: past a point, skipping them would silently train on a
    fraction of the data, and the cause is usually the file's format, not a few typos."""
    if read == 0 or len(bad) / read <= limit:
        return
    examples = "; ".join(row.describe() for row in bad[:3])
    raise TrainerInputError(
        "InvalidDataset",
        f"{source}: {len(bad)} of {read} rows are malformed ({len(bad) / read:.1%}), more than "
        f"dataset.maxBadRowRatio allows ({limit:.1%}); first: {examples}. "
        "Fix these rows, or raise dataset.maxBadRowRatio to skip them.",
    )


def drain(items: list[Item]) -> Iterator[Item]:
    """The list's items in order, each taken out as it is handed over, so a million rows can become a
    million samples (or cleaned samples) without both being held whole."""
    items.reverse()
    while items:
        yield items.pop()
