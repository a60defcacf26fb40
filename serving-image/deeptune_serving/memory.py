"""Out-of-memory kills inside the serving container, as its memory cgroup counts them.

At the container's memory limit the kernel kills one process. With cgroup v2 the kubelet (v1.28 on)
sets `memory.oom.group`, so the whole container goes and its status says `OOMKilled`. With cgroup
v1 only the biggest process goes: loading a model, that is Triton's Python backend stub, and Triton
then waits on the dead stub, "loading" until the startup probe gives up (30 minutes). The cgroup's
own counter sees both, so the entrypoint watches it and ends the container with the reason; the
runtime, which saw the cgroup's OOM event too, then reports the container `OOMKilled` (containerd
does: tests/cluster/test_real_node.py).
"""

from __future__ import annotations

from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
"""The container's own cgroup, as the runtime mounts it."""
COUNTERS = ("memory.events", "memory/memory.oom_control")
"""Where the `oom_kill` count is: cgroup v2, then v1 (kernel 4.13 on)."""
REPORT = "OOMKilled: a process of the server was killed at the container's memory limit"
"""What the container's log and termination message say then."""


def oom_kills(cgroup: Path = CGROUP) -> int | None:
    """How many processes the kernel has killed at this cgroup's memory limit; None where no counter
    is readable (not in a container, or a kernel without one)."""
    for name in COUNTERS:
        try:
            text = (cgroup / name).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    return None
