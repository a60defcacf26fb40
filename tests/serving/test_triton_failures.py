"""A model that cannot load stops the server, and its log says why: what the pod's status will show."""

from __future__ import annotations

from pathlib import Path

import pytest

from deeptune.serving.repository import (
    ModelLocation,
    repository_files,
    tritonserver_command,
    write_repository,
)
from tests.serving.conftest import cpu_spec
from tests.serving.wheel_server import SERVING_PACKAGE_ROOT, WheelTriton, free_ports, start

pytestmark = pytest.mark.serving


def test_a_missing_model_directory_stops_the_server_with_the_path_in_its_log(
    wheel_triton: WheelTriton, tmp_path: Path
) -> None:
    http, grpc, metrics = free_ports(3)
    spec = cpu_spec(service={"httpPort": http, "grpcPort": grpc, "metricsPort": metrics})
    missing = "/mnt/pvc/out/no-such-run/merged"
    root = write_repository(repository_files(spec, ModelLocation(model=missing), "broken"), tmp_path / "repo")
    command = tritonserver_command(
        spec,
        str(root),
        executable=str(wheel_triton.executable),
        address="127.0.0.1",
        backend_directory=str(wheel_triton.backend_directory),
    )
    server = start(wheel_triton, command, tmp_path / "tritonserver.log", (http, grpc, metrics))
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
