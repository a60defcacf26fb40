"""Reading a data source (PVC or ConfigMap file, URL, Hub dataset, or inline rows) into raw rows.

JSON Lines, the format of large datasets, is read a line at a time; other text formats are decoded
whole (JSON must be, CSV quotes may span lines). An encoding error names its line either way.
"""

from __future__ import annotations

import codecs
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path, PurePosixPath

from deeptune.api.finetunejob import DataSource, HubDataset
from deeptune.api.trainer import DATASET_TOKEN_ENV
from deeptune_trainer.data.download import download
from deeptune_trainer.data.formats import (
    EXTENSIONS,
    Format,
    parse_csv,
    parse_json,
    parse_jsonl,
    parse_jsonl_file,
    parse_parquet,
)
from deeptune_trainer.data.hub import fetch_split
from deeptune_trainer.data.rows import LoadedRows
from deeptune_trainer.errors import TrainerInputError
from deeptune_trainer.lineage import file_digest, files_digest, rows_digest


def resolve_format(fmt: Format, name: str, where: str) -> Format:
    """The format to parse with: the spec's, or for `auto` the one the file name's extension says."""
    if fmt != "auto":
        return fmt
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    raise TrainerInputError(
        "InvalidDataset",
        f"dataset.format: cannot tell the format of {where} '{name}' from its extension; name the file "
        "*.jsonl, *.json, *.csv or *.parquet, or set dataset.format",
    )


UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def _not_utf8(data: bytes, error: UnicodeDecodeError, line: int, where: str, name: str) -> TrainerInputError:
    try:
        data.decode("gb18030")
        hint = " It decodes as GB18030/GBK, common for Chinese files saved by Excel."
    except UnicodeDecodeError:
        hint = ""
    return TrainerInputError(
        "InvalidDataset",
        f"{where}: '{name}' is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}).{hint} "
        "Save it as UTF-8, e.g. `iconv -f GB18030 -t UTF-8 in.csv > out.csv`.",
    )


def decode_text(data: bytes, where: str, name: str) -> str:
    """UTF-8 (a BOM, as Excel writes, is dropped) or BOM-marked UTF-16; else a message on how to fix it."""
    if data.startswith(UTF16_BOMS):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise _not_utf8(data, error, data.count(b"\n", 0, error.start) + 1, where, name) from None


def _line_decoder(where: str, name: str) -> Callable[[bytes, int], str]:
    def decode(line: bytes, number: int) -> str:
        try:
            return line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise _not_utf8(line, error, number, where, name) from None

    return decode


def _parse_file(path: Path, fmt: Format, where: str, name: str) -> LoadedRows:
    chosen = resolve_format(fmt, name, where)
    if chosen == "parquet":
        return parse_parquet(path, where)
    if chosen == "jsonl":
        with path.open("rb") as file:
            utf16 = file.read(2).startswith(UTF16_BOMS)
        if not utf16:
            loaded = parse_jsonl_file(path, where, _line_decoder(where, name))
            if loaded.read == 0:
                raise TrainerInputError(
                    "EmptyDataset", f"{where}: '{name}' is empty; it must hold at least one row"
                )
            return loaded
    data = path.read_bytes()
    text = decode_text(data, where, name)
    if not text.strip():
        raise TrainerInputError("EmptyDataset", f"{where}: '{name}' is empty; it must hold at least one row")
    parsers = {"jsonl": parse_jsonl, "json": parse_json, "csv": parse_csv}
    return parsers[chosen](text, where)


def _local_file(path: str | None, where: str) -> Path:
    if path is None:
        raise TrainerInputError("DatasetNotFound", f"{where}: no local file was given for this source")
    file = Path(path)
    if not file.exists():
        raise TrainerInputError(
            "DatasetNotFound", f"{where}: {file} does not exist; check the claim's path or the ConfigMap key"
        )
    if not file.is_file():
        raise TrainerInputError("DatasetNotFound", f"{where}: {file} is a directory; point it at one file")
    return file


def _hub_rows(hub: HubDataset, fmt: Format, where: str, token_env: str, cache_dir: str | None) -> LoadedRows:
    """A Hub split's rows, file after file (in name order), numbered as records across the split;
    a malformed row is reported by its file and line."""
    fetched = fetch_split(hub, where=where, token_env=token_env, cache_dir=cache_dir)
    loaded = LoadedRows(where, "record")
    for file, name in zip(fetched.files, fetched.names, strict=True):
        part = _parse_file(file, fmt, f"{where} ({name})", name)
        loaded.rows += [replace(row, line=len(loaded.rows) + n) for n, row in enumerate(part.rows, 1)]
        loaded.bad += part.bad
    loaded.commit = fetched.commit
    loaded.digest = files_digest(zip(fetched.names, fetched.files, strict=True))
    return loaded


def load_rows(
    source: DataSource, path: str | None, fmt: Format, *, where: str, hub_cache: str | None = None
) -> LoadedRows:
    """All rows of one source. `path` is the local file the operator resolved for PVC and ConfigMap
    sources; `where` is the source's spec path (e.g. `dataset.source`), used in every message;
    `hub_cache` is where Hub datasets are kept (None: huggingface_hub's default)."""
    if source.hub is not None:
        loaded = _hub_rows(source.hub, fmt, f"{where}.hub", DATASET_TOKEN_ENV[where], hub_cache)
        where = loaded.source
    elif source.inline is not None:
        where = f"{where}.inline"
        loaded = LoadedRows(where, "record")
        for number, row in enumerate(source.inline, 1):
            loaded.add(number, dict(row))
        loaded.digest = rows_digest(source.inline)
    elif source.url is not None:
        where = f"{where}.url"
        with tempfile.TemporaryDirectory(prefix="deeptune-data-") as directory:
            file = download(source.url, Path(directory), where=where)
            loaded = _parse_file(file, fmt, where, file.name)
            loaded.digest = file_digest(file)
    else:
        where = f"{where}.{'pvc' if source.pvc is not None else 'configMap'}"
        file = _local_file(path, where)
        loaded = _parse_file(file, fmt, where, file.name)
        loaded.digest = file_digest(file)
    if loaded.read == 0:
        raise TrainerInputError("EmptyDataset", f"{where}: the source holds no rows")
    return loaded
