"""A model that cannot load, or can no longer generate, stops the server, and its log says why: what
the pod's status will show (and a stopped container is restarted)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from deeptune.serving.repository import (
    ModelLocation,
    repository_files,
    tritonserver_command,
    write_repository,
)
from tests.serving.conftest import cpu_spec
from tests.serving.tiny import TinyModels
from tests.serving.wheel_server import SERVING_PACKAGE_ROOT, RunningServer, WheelTriton, free_ports, start

pytestmark = pytest.mark.serving


def _serve(wheel_triton: WheelTriton, model: str, name: str, work: Path) -> RunningServer:
    """The operator's Triton command for a CPU spec serving `model`, started on loopback, not awaited."""
    http, grpc, metrics = free_ports(3)
    spec = cpu_spec(service={"httpPort": http, "grpcPort": grpc, "metricsPort": metrics})
    root = write_repository(repository_files(spec, ModelLocation(model=model), name), work / "repo")
    command = tritonserver_command(
        spec,
        str(root),
        executable=str(wheel_triton.executable),
        address="127.0.0.1",
        backend_directory=str(wheel_triton.backend_directory),
    )
    return start(wheel_triton, command, work / "tritonserver.log", (http, grpc, metrics))


def test_a_missing_model_directory_stops_the_server_with_the_path_in_its_log(
    wheel_triton: WheelTriton, tmp_path: Path
) -> None:
    missing = "/mnt/pvc/out/no-such-run/merged"
    server = _serve(wheel_triton, missing, "broken", tmp_path)
    try:
        code = server.wait_exit()
    finally:
        server.stop()
    log = server.log()
    print(f"\nexit code {code}; log lines naming the model:")
    print("\n".join(line for line in log.splitlines() if "broken" in line or missing in line))
    assert code != 0
    assert f"no model at {missing}: the directory does not exist" in log
    assert "failed to load 'broken'" in log
    # Triton ran the serving package's generation module, installed as in the serving image.
    assert f"{SERVING_PACKAGE_ROOT}/deeptune_serving/generation.py" in log


def _descendant_running(ancestor: int, module: str) -> int:
    """The pid of the process below `ancestor` whose command line runs `module`."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while listed
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    for pid in parents:
        line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        above = parents.get(pid)
        while above and above != ancestor:
            above = parents.get(above)
        if above == ancestor and f"-m {module} " in line:
            return pid
    raise AssertionError(f"no process runs {module} below {ancestor}")


def test_a_generation_process_that_dies_stops_the_server_with_why_in_its_log(
    wheel_triton: WheelTriton, tiny_models: TinyModels, tmp_path: Path
) -> None:
    """Continuous batching generates in a child of Triton's Python stub. Killed (as by a fatal CUDA
    error), the model can no longer answer: the server stops rather than stay ready, and says why."""
    server = _serve(wheel_triton, str(tiny_models.merged), "tiny", tmp_path)
    try:
        server.wait_ready()
        os.kill(_descendant_running(server.process.pid, "deeptune_serving.batcher_process"), signal.SIGKILL)
        server.wait_exit()
    finally:
        server.stop()
    assert "the generation process was killed by SIGKILL: the server must be restarted" in server.log()
