"""Which malloc this process runs on: the trainer image preloads tcmalloc (trainer-image/Dockerfile),
which held peak RSS 18-30% below glibc's malloc in CPU training (docs/benchmarks.md), and a
run's log says whether the preload took."""

from glob import glob
from pathlib import Path

PRELOADED = {"libtcmalloc": "tcmalloc", "libjemalloc": "jemalloc"}
"""Shared-object name prefixes of the allocators a process can be started on, by their names."""

TCMALLOC_PATHS = ("/usr/local/lib/libtcmalloc_minimal.so.4", "/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4")
"""Where the trainer image links it, then where Debian's libtcmalloc-minimal4 puts it."""


def tcmalloc_library() -> str:
    """The tcmalloc shared object to preload, as the trainer image does."""
    for pattern in TCMALLOC_PATHS:
        if found := sorted(glob(pattern)):
            return found[0]
    raise RuntimeError(
        "no libtcmalloc_minimal.so.4: apt-get install libtcmalloc-minimal4 (the trainer image's malloc)"
    )


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
