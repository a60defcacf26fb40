"""Benchmark: the data pipeline's throughput and memory, stage by stage, as rows grow.

Synthetic prompt/completion rows mixing Chinese and English, with exact duplicates (~10%), near
duplicates (~5%) and PII (~5%), go through `prepare_dataset` with the cleaning rules switched on one
at a time, so each row of the table adds one stage's cost. Each (size, stage) runs in a fresh
process, so peak RSS is that run's alone.

    python bench/data_pipeline.py                    # 10k and 100k rows
    python bench/data_pipeline.py --rows 1000000     # add sizes
    python bench/data_pipeline.py --smoke            # 1k rows: what CI runs to keep this working

Prints a table and writes JSON to bench/results/data_pipeline-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import machine_info, save_report  # bench/machine.py (scripts run from bench/)
from rss import peak_rss_bytes

STAGES: dict[str, dict[str, Any]] = {
    "load+map": {
        "normalization": {"unicode": False, "punctuation": False, "whitespace": False},
        "exactDedup": False,
        "nearDedup": {"enabled": False},
        "dropDegenerate": False,
        "pii": {"action": "off"},
    },
    "+normalize": {"exactDedup": False, "nearDedup": {"enabled": False}, "pii": {"action": "off"}},
    "+pii": {"exactDedup": False, "nearDedup": {"enabled": False}},
    "+exact dedup": {"nearDedup": {"enabled": False}},
    "+near dedup": {},
}

ZH = "我们的产品支持七天无理由退货请您保留好发票如有问题欢迎随时联系客服人员处理订单物流信息"
EN = "please keep the receipt and contact support if the order has not arrived within seven days".split()


def synthetic_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    for i in range(count):
        roll = rng.random()
        if rows and roll < 0.10:
            rows.append(dict(rng.choice(rows)))  # exact duplicate
            continue
        if rows and roll < 0.15:
            base = dict(rng.choice(rows))
            base["completion"] += " 谢谢" if rng.random() < 0.5 else " thanks"  # near duplicate
            rows.append(base)
            continue
        if rng.random() < 0.5:
            start = rng.randrange(len(ZH) - 20)
            prompt = f"问题{i}：" + ZH[start : start + rng.randint(10, 20)] + "？"
            completion = "".join(rng.choices(ZH, k=rng.randint(20, 60))) + "。"
        else:
            prompt = f"question {i}: " + " ".join(rng.sample(EN, 6)) + "?"
            completion = " ".join(rng.choices(EN, k=rng.randint(12, 40))) + "."
        if roll > 0.95:
            completion += rng.choice([" 联系电话 13812345678", " mail me at li.wei@example.com"])
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def run_one(rows_file: Path, stage: str) -> dict[str, Any]:
    """Time one pipeline run in this process (the parent measures it in a fresh child)."""
    from deeptune.api.finetunejob import DatasetSpec  # noqa: PLC0415
    from deeptune.api.trainer import TrainerPaths  # noqa: PLC0415
    from deeptune_trainer.data.pipeline import prepare_dataset  # noqa: PLC0415

    spec = DatasetSpec.model_validate(
        {"source": {"pvc": {"claimName": "data", "path": rows_file.name}}, "cleaning": STAGES[stage]}
    )
    paths = TrainerPaths(output_dir=str(rows_file.parent), dataset=str(rows_file))
    started = time.perf_counter()
    prepared = prepare_dataset(spec, paths, seed=0)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "kept": prepared.report.rows_kept,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, action="append", help="row counts (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="1k rows only (CI)")
    parser.add_argument("--child", nargs=2, metavar=("FILE", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(Path(args.child[0]), args.child[1])))
        return
    sizes = [1000] if args.smoke else sorted(set(args.rows or []) | {10_000, 100_000})
    results = []
    print(f"{'rows':>9} {'stage':<14} {'seconds':>8} {'rows/s':>10} {'kept':>9} {'peak RSS MB':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            data = Path(tmp) / f"rows-{size}.jsonl"
            lines = (json.dumps(row, ensure_ascii=False) for row in synthetic_rows(size))
            data.write_text("\n".join(lines) + "\n", encoding="utf-8")
            for stage in STAGES:
                child = subprocess.run(
                    [sys.executable, __file__, "--child", str(data), stage],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                result = {"rows": size, "stage": stage, **json.loads(child.stdout.splitlines()[-1])}
                result["rows_per_second"] = size / result["seconds"]
                results.append(result)
                print(
                    f"{size:>9} {stage:<14} {result['seconds']:>8.2f} {result['rows_per_second']:>10.0f}"
                    f" {result['kept']:>9} {result['peak_rss_mb']:>12.0f}",
                    flush=True,
                )
    save_report("data_pipeline", {"machine": machine_info(), "results": results}, smoke=args.smoke)


if __name__ == "__main__":
    main()
