"""Digests of what produced a model and of what was written: the run's lineage (status.lineage).

Content digests, not names or times: a file renamed or copied keeps its digest, one changed row
changes it. Files are read in 1 MiB pieces, so hashing a large dataset or model costs I/O, not memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache

from deeptune.api.finetunejob import FineTuneJobSpec

PIECE = 1 << 20


def sha256_of(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _pieces(path: Path) -> Iterable[bytes]:
    with path.open("rb") as file:
        while piece := file.read(PIECE):
            yield piece


def file_digest(path: Path) -> str:
    return sha256_of(_pieces(path))


def files_digest(files: Iterable[tuple[str, Path]]) -> str:
    """One digest for named files: each file's name and digest, in name order."""
    listing = sorted((name, file_digest(path)) for name, path in files)
    return sha256_of(f"{name}\0{digest}\n".encode() for name, digest in listing)


def directory_digest(directory: Path) -> str:
    """Every file under the directory, by its path in it."""
    files = sorted(path for path in directory.rglob("*") if path.is_file())
    return files_digest((path.relative_to(directory).as_posix(), path) for path in files)


def rows_digest(rows: list[dict[str, Any]]) -> str:
    """Rows written in the manifest, in a canonical JSON form (key order does not matter)."""
    return sha256_of([json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()])


def config_digest(spec: FineTuneJobSpec) -> str:
    """Everything that decides the training trajectory (not output or evaluation): two runs with the
    same digest trained the same way, on whatever the data sources held."""
    defining = spec.model_dump(
        mode="json", include={"base_model", "dataset", "method", "lora", "hyperparameters"}
    )
    return sha256_of([json.dumps(defining, sort_keys=True).encode()])


def base_model_lineage(spec: FineTuneJobSpec, source: str, cache_dir: str | None) -> str:
    """`name@commit` for a Hub model (the commit its revision resolved to in the cache), else the
    digest of the model directory (a PVC)."""
    base = spec.base_model
    if base.name is None:
        return directory_digest(Path(source))
    cached = try_to_load_from_cache(base.name, "config.json", cache_dir=cache_dir, revision=base.revision)
    commit = Path(cached).parent.name if isinstance(cached, str) else base.revision
    return f"{base.name}@{commit}"
