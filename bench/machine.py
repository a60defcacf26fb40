"""What a benchmark ran on: recorded next to every figure, since figures mean nothing without it."""

from __future__ import annotations

import os
import platform
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
