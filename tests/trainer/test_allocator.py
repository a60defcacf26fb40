"""The trainer says which malloc it runs on: the image preloads tcmalloc (trainer-image/Dockerfile),
and a preload that silently did not take would undo the memory figures in docs/benchmarks.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from deeptune_trainer.allocator import malloc_in_use, tcmalloc_library

PROBE = "from deeptune_trainer.allocator import malloc_in_use, tcmalloc_library; print(malloc_in_use())"


def _maps(tmp_path: Path, *libraries: str) -> Path:
    lines = [
        f"7f00000{i:02d}000-7f00000{i + 1:02d}000 r-xp 00000000 08:01 {i} {lib}"
        for i, lib in enumerate(libraries)
    ]
    maps = tmp_path / "maps"
    maps.write_text("\n".join([*lines, "7ffd0000-7ffd1000 rw-p 00000000 00:00 0 [stack]"]) + "\n")
    return maps


def test_names_the_preloaded_allocator_from_the_mapped_libraries(tmp_path: Path) -> None:
    libc = "/usr/lib/x86_64-linux-gnu/libc.so.6"
    assert malloc_in_use(_maps(tmp_path, libc)) == "glibc"
    assert malloc_in_use(_maps(tmp_path, "/usr/local/lib/libtcmalloc_minimal.so.4", libc)) == "tcmalloc"
    assert malloc_in_use(_maps(tmp_path, "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", libc)) == "jemalloc"
    assert malloc_in_use(tmp_path / "no-such-maps") == "glibc"


def _probe(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_a_real_process_reports_the_malloc_it_was_started_on() -> None:
    library = tcmalloc_library()  # scripts/test.sh installs it; raises saying how where it is missing
    plain = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    assert _probe(plain) == "glibc"
    assert _probe(plain | {"LD_PRELOAD": library}) == "tcmalloc"
