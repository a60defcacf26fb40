"""Resident memory of this process, for benchmarks whose configurations each run in a fresh process.

From /proc/self/status, not `getrusage`: Linux carries `ru_maxrss` across fork and exec, so a worker
started by a driver that holds torch and a model reports at least the driver's peak (measured: a
child of an 800 MB parent reported 813 MB with a 13 MB image of its own). VmHWM belongs to the
process image alone.
"""

from __future__ import annotations

from pathlib import Path


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_bytes() -> int:
    """The highest resident memory this process image has had (VmHWM)."""
    return _status_bytes("VmHWM")


def current_rss_bytes() -> int:
    """Resident memory now (VmRSS)."""
    return _status_bytes("VmRSS")
