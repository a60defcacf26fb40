"""Benchmark: the trainer's near dedup against datasketch's MinHash LSH, same rows, same threshold.

Both find, for each row in order, an earlier kept row whose question and answer each nearly repeat
its own (Jaccard of character 5-grams ≥ 0.85), the rule `dataset.cleaning.nearDedup` applies:

- ours: `NearDuplicateIndex` (LSH bands of the row's union MinHash, kept as 32-bit hashes; each
  candidate checked by exact Jaccard per part);
- datasketch 2: a `MinHash` per part (128 permutations), `MinHashLSH` on their union, and each
  candidate checked by datasketch's estimated Jaccard per part (the MinHashes stay in memory for it),
  as its documentation does it.

Rows are the data benchmark's synthetic mixed Chinese/English prompt/completion rows, exact
duplicates removed first (what the pipeline leaves near dedup). Each (size, library) runs in a fresh
process, so peak RSS is its own. Quality: every removed row is checked against the row it was matched
to by exact Jaccard; "confirmed" counts the removals that hold.

    python bench/near_dedup.py                 # 10k and 100k rows
    python bench/near_dedup.py --smoke         # 1k rows: what CI runs to keep this working

Prints a table and writes JSON to bench/results/near_dedup-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from data_pipeline import synthetic_rows  # bench/data_pipeline.py (scripts run from bench/)
from machine import machine_info, save_report
from rss import peak_rss_bytes

HERE = Path(__file__).resolve().parent
THRESHOLD = 0.85
NGRAM = 5
NUM_PERM = 128
Parts = tuple[str, str]


def rows_to_compare(count: int) -> list[Parts]:
    """Question and answer of each synthetic row in dedup's comparison form, exact repeats dropped."""
    from deeptune_trainer.data.normalize import comparison_text  # noqa: PLC0415

    seen: set[Parts] = set()
    rows: list[Parts] = []
    for row in synthetic_rows(count):
        parts = (comparison_text(row["prompt"]), comparison_text(row["completion"]))
        if parts not in seen:
            seen.add(parts)
            rows.append(parts)
    return rows


def ours(rows: Sequence[Parts]) -> list[int | None]:
    from deeptune_trainer.data.dedup import NearDuplicateIndex  # noqa: PLC0415

    index = NearDuplicateIndex[Parts](THRESHOLD, NGRAM, parts=lambda row: row)
    matched: list[int | None] = []
    positions: list[int] = []  # row number of each indexed position
    for number, match in enumerate(index.admit(rows)):
        if match is None:
            positions.append(number)
            matched.append(None)
        else:
            matched.append(positions[match.position])
    return matched


def _grams(text: str) -> set[str]:
    return {text[i : i + NGRAM] for i in range(max(len(text) - NGRAM + 1, 1))}


def datasketch(rows: Sequence[Parts]) -> list[int | None]:
    from datasketch import MinHash, MinHashLSH  # noqa: PLC0415

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    kept: dict[int, list[MinHash]] = {}
    matched: list[int | None] = []
    for number, row in enumerate(rows):
        per_part = []
        for text in row:
            minhash = MinHash(num_perm=NUM_PERM)
            minhash.update_batch([gram.encode("utf-8") for gram in _grams(text)])
            per_part.append(minhash)
        union = MinHash.union(*per_part)
        match = next(
            (
                candidate
                for candidate in sorted(lsh.query(union))
                if min(a.jaccard(b) for a, b in zip(per_part, kept[candidate], strict=True)) >= THRESHOLD
            ),
            None,
        )
        matched.append(match)
        if match is None:
            lsh.insert(number, union)
            kept[number] = per_part
    return matched


LIBRARIES: dict[str, Callable[[Sequence[Parts]], list[int | None]]] = {"ours": ours, "datasketch": datasketch}


def exact_similarity(a: Parts, b: Parts) -> float:
    similarities = []
    for x, y in zip(a, b, strict=True):
        gx, gy = _grams(x), _grams(y)
        similarities.append(len(gx & gy) / len(gx | gy))
    return min(similarities)


def run_one(count: int, library: str) -> dict[str, Any]:
    """Time one library on `count` rows in this process (the parent runs it in a fresh child)."""
    rows = rows_to_compare(count)
    started = time.perf_counter()
    matched = LIBRARIES[library](rows)
    seconds = time.perf_counter() - started
    removed = [(number, match) for number, match in enumerate(matched) if match is not None]
    confirmed = sum(exact_similarity(rows[number], rows[match]) >= THRESHOLD for number, match in removed)
    return {
        "rows": len(rows),
        "seconds": seconds,
        "removed": len(removed),
        "confirmed": confirmed,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, action="append", help="synthetic rows generated (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="1k rows only (CI)")
    parser.add_argument("--child", nargs=2, metavar=("ROWS", "LIBRARY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(int(args.child[0]), args.child[1])))
        return
    sizes = [1000] if args.smoke else sorted(set(args.rows or []) | {10_000, 100_000})
    results = []
    header = ("rows", "library", "seconds", "rows/s", "removed", "confirmed", "peak MB")
    print("{:>8} {:<11} {:>8} {:>9} {:>8} {:>10} {:>8}".format(*header))
    for size in sizes:
        for library in LIBRARIES:
            child = subprocess.run(
                [sys.executable, __file__, "--child", str(size), library],
                check=True, capture_output=True, text=True, cwd=HERE,
            )  # fmt: skip
            result = {"library": library, **json.loads(child.stdout.splitlines()[-1])}
            result["rows_per_second"] = result["rows"] / result["seconds"]
            results.append(result)
            print(
                f"{result['rows']:>8} {library:<11} {result['seconds']:>8.2f}"
                f" {result['rows_per_second']:>9.0f} {result['removed']:>8} {result['confirmed']:>10}"
                f" {result['peak_rss_mb']:>8.0f}",
                flush=True,
            )
    save_report("near_dedup", {"machine": machine_info(), "results": results}, smoke=args.smoke)


if __name__ == "__main__":
    main()
