"""Which malloc this process runs on: the trainer image preloads tcmalloc (trainer-image/Dockerfile),
which held peak RSS 18-30% below glibc's malloc in CPU training (docs/benchmarks.md), and a
run's log says whether the preload took."""

from pathlib import Path

PRELOADED = {"libtcmalloc": "tcmalloc", "libjemalloc": "jemalloc"}
"""Shared-object name prefixes of the allocators a process can be started on, by their names."""


def malloc_in_use(maps: Path = Path("/proc/self/maps")) -> str:
    """`tcmalloc` or `jemalloc` where one is mapped into this process, else `glibc`."""
    try:
        mapped = {Path(line.split()[-1]).name for line in maps.read_text().splitlines() if "/" in line}
    except OSError:  # not Linux: nothing preloaded the way the image does it
        return "glibc"
    for prefix, name in PRELOADED.items():
        if any(library.startswith(prefix) for library in mapped):
            return name
    return "glibc"
