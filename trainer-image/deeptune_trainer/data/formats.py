"""Parsers for each file format: text or a file in, rows and malformed rows out.

A malformed row is skipped and recorded with its line number rather than failing the run, so one
stray line in a large file does not cost the user a training run; `rows.check_bad_row_ratio` decides
when there are too many.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from deeptune_trainer.data.rows import BadRow, LoadedRows
from deeptune_trainer.errors import TrainerInputError

Format = Literal["auto", "jsonl", "json", "csv", "parquet"]

EXTENSIONS: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
"""The file names each format is told by, for `dataset.format: auto`."""

CSV_FIELD_LIMIT = 2**31 - 1
"""The csv module refuses cells over 128 KiB by default; long documents are normal training rows."""


PARQUET_BATCH_ROWS = 65_536

KINDS: dict[type, str] = {dict: "an object", list: "an array", str: "a string"}


def _kind(value: Any) -> str:
    return KINDS.get(type(value), type(value).__name__)


_DECODER = json.JSONDecoder()
_JSON_WHITESPACE = " \t\n\r"


def _json_value(line: str) -> Any:
    """The line's JSON value, as `json.loads` reads it. `raw_decode` first: without loads' wrapping it
    takes half the time (0.8 µs a row, measured); anything it does not read whole, such as a line
    with leading spaces or a broken one, goes to `json.loads`, which also words the error."""
    try:
        value, end = _DECODER.raw_decode(line)
    except json.JSONDecodeError:
        return json.loads(line)
    return value if end == len(line) or not line[end:].strip(_JSON_WHITESPACE) else json.loads(line)


def _jsonl_line(loaded: LoadedRows, number: int, line: str) -> None:
    if not line.strip():
        return
    try:
        value = _json_value(line)
    except json.JSONDecodeError as error:
        loaded.bad.append(BadRow(loaded.source, number, f"invalid JSON: {error.msg} at column {error.colno}"))
        return
    if isinstance(value, dict):
        loaded.add(number, value)
    else:
        loaded.bad.append(BadRow(loaded.source, number, f"expected a JSON object, found {_kind(value)}"))


def parse_jsonl(text: str, source: str) -> LoadedRows:
    """One JSON object per line; blank lines are ignored."""
    loaded = LoadedRows(source, "line")
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and other line separators.
    for number, line in enumerate(text.split("\n"), start=1):
        _jsonl_line(loaded, number, line)
    return loaded


def parse_jsonl_file(path: Path, source: str, decode: Callable[[bytes, int], str]) -> LoadedRows:
    """JSON Lines read a line at a time, so a large file is never held whole (nor decoded whole):
    at a million rows that was ~750 MB of bytes, text and lines next to the rows. `decode` turns a
    line's bytes into text, or fails naming the line."""
    loaded = LoadedRows(source, "line")
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):  # binary lines end at b"\n" only, as above
            _jsonl_line(loaded, number, decode(raw, number))
    return loaded


def _looks_like_jsonl(text: str) -> bool:
    first = text.lstrip().split("\n", 1)[0]
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _records(value: Any, source: str) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        # Exports often wrap the rows: {"data": [...]} or {"version": 1, "rows": [...]}.
        lists = [item for item in value.values() if isinstance(item, list)]
        if len(lists) == 1:
            return lists[0]
        keys = ", ".join(list(value)[:10])
        raise TrainerInputError(
            "InvalidDataset",
            f"{source}: expected a JSON array of row objects, found an object with keys {keys}",
        )
    raise TrainerInputError(
        "InvalidDataset", f"{source}: expected a JSON array of row objects, found {_kind(value)}"
    )


def parse_json(text: str, source: str) -> LoadedRows:
    """A JSON array of row objects (or an object wrapping one array); JSON Lines saved as .json also work."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if _looks_like_jsonl(text):
            return parse_jsonl(text, source)
        raise TrainerInputError(
            "InvalidDataset",
            f"{source}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
            "a .json file must hold one array of row objects (for one object per line use "
            "dataset.format: jsonl)",
        ) from None
    loaded = LoadedRows(source, "record")
    for number, record in enumerate(_records(value, source), start=1):
        if isinstance(record, dict):
            loaded.add(number, record)
        else:
            loaded.bad.append(
                BadRow(source, number, f"expected a JSON object, found {_kind(record)}", "record")
            )
    return loaded


def _csv_header(reader: Any, source: str) -> list[str]:
    for header in reader:
        if any(cell.strip() for cell in header):
            names = [cell.strip() for cell in header]
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                raise TrainerInputError(
                    "InvalidDataset",
                    f"{source}: the CSV header names these columns more than once: {', '.join(duplicates)}",
                )
            return names
    return []


def parse_csv(text: str, source: str) -> LoadedRows:
    """Comma-separated with a header row; quoted cells may hold commas, quotes and newlines."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    loaded = LoadedRows(source, "line")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = _csv_header(reader, source)
        start = reader.line_num + 1
        for cells in reader:
            # A quoted cell may span lines: report the line where the row starts.
            line, start = start, reader.line_num + 1
            if not cells or not any(cells):
                continue
            if len(cells) != len(header):
                loaded.bad.append(
                    BadRow(
                        source,
                        line,
                        f"has {len(cells)} fields but the header has {len(header)} "
                        "(check the quoting of commas, quotes and newlines)",
                    )
                )
                continue
            loaded.add(line, dict(zip(header, cells, strict=True)))
    except csv.Error as error:
        raise TrainerInputError(
            "InvalidDataset", f"{source}: unreadable CSV near line {reader.line_num}: {error}"
        ) from None
    return loaded


def parse_parquet(path: Path, source: str) -> LoadedRows:
    """A Parquet file; nested columns (e.g. chat messages) arrive as lists of dicts."""
    try:
        import pyarrow as pa  # noqa: PLC0415  (heavy, and only Parquet sources need it)
        import pyarrow.parquet as pq  # noqa: PLC0415
    except ImportError as error:
        raise TrainerInputError(
            "UnsupportedFormat",
            f"{source}: reading Parquet needs pyarrow, which this trainer image cannot import ({error}); "
            "convert the data to JSON Lines or CSV",
        ) from None
    loaded = LoadedRows(source, "record")
    try:
        # A batch of rows at a time: the whole table in Arrow next to its rows in Python would double
        # what a large file costs.
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                loaded.add(len(loaded.rows) + 1, row)
    except (pa.ArrowException, OSError) as error:
        raise TrainerInputError(
            "InvalidDataset", f"{source}: not a readable Parquet file ({error})"
        ) from None
    return loaded
