"""The serving entrypoint ends the container when the kernel kills one of its processes at the memory
limit: on cgroup v1 that is Triton's Python stub, and Triton alone would wait on it for half an hour.
The entrypoint runs as the container runs it, with a stand-in for Triton and the cgroup's counter in
a directory of the test's."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deeptune_serving import memory
from tests.serving.wheel_server import free_ports

pytestmark = pytest.mark.serving

V1_OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill {}\n"
V2_EVENTS = "low 0\nhigh 0\nmax 3\noom 1\noom_kill {}\noom_group_kill 0\n"


def test_the_count_is_read_from_cgroup_v2_then_v1(tmp_path: Path) -> None:
    assert memory.oom_kills(tmp_path) is None
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.oom_control").write_text(V1_OOM_CONTROL.format(2))
    assert memory.oom_kills(tmp_path) == 2
    (tmp_path / "memory.events").write_text(V2_EVENTS.format(5))
    assert memory.oom_kills(tmp_path) == 5


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_an_oom_kill_in_the_container_ends_it_with_the_reason(tmp_path: Path) -> None:
    cgroup, log = tmp_path / "cgroup", tmp_path / "termination-log"
    (cgroup / "memory").mkdir(parents=True)
    counter = cgroup / "memory" / "memory.oom_control"
    counter.write_text(V1_OOM_CONTROL.format(0))
    (port,) = free_ports(1)
    command = [
        sys.executable, "-m", "deeptune_serving", "--model", "m", "--openai-address", "127.0.0.1",
        f"--openai-port={port}", f"--cgroup={cgroup}", f"--termination-log={log}",
        "--", "sleep", "600",
    ]  # fmt: skip
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not listening(port):
            assert server.poll() is None and time.monotonic() < deadline, "the entrypoint did not start"
            time.sleep(0.1)
        found = subprocess.run(
            ["pgrep", "-P", str(server.pid), "sleep"], check=True, capture_output=True, text=True
        )
        (triton,) = found.stdout.split()
        counter.write_text(V1_OOM_CONTROL.format(1))  # the kernel killed the stub
        _, stderr = server.communicate(timeout=30)
    finally:
        server.kill()
    assert server.returncode == 137
    assert log.read_text() == memory.REPORT
    assert f"error: {memory.REPORT}" in stderr
    assert not Path(f"/proc/{triton}").exists(), "Triton was left running"
