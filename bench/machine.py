"""What a benchmark ran on, recorded next to every figure (figures mean nothing without it), and where
its report goes."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine_info(**extra: Any) -> dict[str, Any]:
    """Host, CPU, cores, Python and the load average now, plus whatever the benchmark adds."""
    return {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
        **extra,
    }


def gpu_model(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': the model in a GPU's name, for the GPU benchmarks' report
    names (leased machines share one host name, so two cards' runs must not overwrite each other)."""
    words = [word for word in name.split() if word.upper() not in {"NVIDIA", "TESLA", "GEFORCE", "RTX"}]
    return re.sub(r"[^a-z0-9]", "", words[0].lower()) if words else "gpu"


RESULTS = Path(__file__).resolve().parent / "results"


def save_report(name: str, report: dict[str, Any], *, smoke: bool) -> Path:
    """Write a benchmark's report as bench/results/<name>-<host>.json (`-smoke` for CI's small runs)
    and say where."""
    out = RESULTS / f"{name}-{'smoke' if smoke else platform.node()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def save_gpu_report(name: str, report: dict[str, Any]) -> Path:
    """A GPU benchmark's report as bench/results/<name>-<gpu>-<host>.json (`report["machine"]["gpu"]`
    names the card)."""
    return save_report(f"{name}-{gpu_model(report['machine']['gpu'])}", report, smoke=False)
