"""Test infrastructure: Triton Inference Server from the nvidia-pytriton wheel, run as a local process.

The wheel holds `tritonserver` (Triton 2.51, the release of the default serving image), the Python
backend and one backend stub per Python version. The stub must sit next to `libtriton_python.so`, so
the backend is copied into a work directory (site-packages stays untouched) with the stub of the
running Python. The stub links against `libpython3.11.so.1.0`: the running interpreter's own library
directory goes first on LD_LIBRARY_PATH (the system's patch release differs from pyenv's, and `_ssl`
fails with undefined symbols), and the environment's `bin` first on PATH (the stub finds its
site-packages through the `python3` there). The stub's interpreter ignores PYTHONPATH, so that `bin`
is a small environment of its own (`serving_environment`): this environment's packages plus
`deeptune_serving` through a `.pth` file, as the serving image installs it (serving-image/Dockerfile).
The model imports nothing else of this checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import venv
from dataclasses import dataclass
from pathlib import Path

from deeptune.api.modeldeployment import ModelDeploymentSpec
from deeptune.serving.repository import serving_command, tritonserver_command

READY_TIMEOUT = 240.0
"""Seconds to wait for readiness: each model's stub imports torch and transformers, slowly on a busy CPU."""

SERVING_PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "serving-image"
"""The directory that holds `deeptune_serving` in this checkout (the image's is /opt/deeptune/serving)."""

_METRIC_LINE = re.compile(r"^(\w+)\{([^}]*)\}\s+(\S+)$")


@dataclass(frozen=True)
class WheelTriton:
    """A tritonserver binary with a backend directory it can use, and the environment it needs."""

    executable: Path
    backend_directory: Path
    cache_directory: Path
    env: dict[str, str]


def serving_environment(target: Path, package_root: str) -> Path:
    """A Python environment at `target` that sees this one's packages and `deeptune_serving` at
    `package_root` (a path as the processes using it see it), both through `.pth` files, which the
    backend stub's interpreter reads though it ignores PYTHONPATH. Returns its `bin` directory."""
    if not (target / "pyvenv.cfg").is_file():
        venv.EnvBuilder(with_pip=False, symlinks=True).create(target)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    packages = sysconfig.get_paths()["purelib"]
    (target / "lib" / version / "site-packages" / "deeptune-serving.pth").write_text(
        f"import site; site.addsitedir({packages!r})\n{package_root}\n"
    )
    return target / "bin"


def install(work_dir: Path, package_root: Path = SERVING_PACKAGE_ROOT) -> WheelTriton:
    """Prepare the wheel's server to run from `work_dir` (the Python backend plus this Python's stub,
    and the serving environment the stub finds through PATH, with `deeptune_serving` from
    `package_root`)."""
    import pytriton

    dist = Path(pytriton.__file__).parent / "tritonserver"
    backends = work_dir / "backends"
    python_backend = backends / "python"
    if not (python_backend / "triton_python_backend_stub").is_file():
        shutil.copytree(dist / "backends" / "python", python_backend, dirs_exist_ok=True)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        shutil.copy2(stub, python_backend / "triton_python_backend_stub")
    wheel_libs = (
        dist.parent.parent / "nvidia_pytriton.libs"
    )  # what the stub's RPATH reached from its old place
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    library_path = [sysconfig.get_config_var("LIBDIR"), str(wheel_libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(part for part in library_path if part)
    python_bin = serving_environment(work_dir / "python", str(package_root))
    env["PATH"] = f"{python_bin}:{env.get('PATH', '')}"
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return WheelTriton(
        executable=dist / "bin" / "tritonserver",
        backend_directory=backends,
        cache_directory=dist / "caches",
        env=env,
    )


def loopback_command(triton: WheelTriton, spec: ModelDeploymentSpec, repository: Path) -> list[str]:
    """The operator's tritonserver command line, run with this wheel's server on loopback."""
    return tritonserver_command(
        spec,
        str(repository),
        executable=str(triton.executable),
        address="127.0.0.1",
        backend_directory=str(triton.backend_directory),
        cache_directory=str(triton.cache_directory),
    )


def loopback_serving_command(
    triton: WheelTriton, spec: ModelDeploymentSpec, repository: Path, model: str
) -> list[str]:
    """The serving container's command (the OpenAI frontend starting Triton), every port on loopback."""
    command = serving_command(spec, model, loopback_command(triton, spec, repository))
    command.insert(command.index("--"), "--openai-address=127.0.0.1")
    return command


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (the OS picks them; all are held until every one is chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class ServerExitedError(RuntimeError):
    """tritonserver stopped before it became ready; the message ends with its log."""

    def __init__(self, returncode: int, log: str) -> None:
        super().__init__(f"tritonserver exited with code {returncode}:\n{log[-6000:]}")
        self.returncode = returncode
        self.log = log


class RunningServer:
    """A started tritonserver process and the URLs of its three endpoints on loopback."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, ports: tuple[int, int, int]) -> None:
        self.process = process
        self.log_path = log_path
        http, grpc, metrics = ports
        self.http_url = f"127.0.0.1:{http}"
        self.grpc_url = f"127.0.0.1:{grpc}"
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def ready(self) -> bool:
        """The model is ready and the metrics endpoint answers too: a CI run once found the HTTP
        endpoint ready and the metrics port refusing connections (on a loaded machine), and the
        benchmarks read metrics at once."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                if response.status != 200:
                    return False
            with urllib.request.urlopen(self.metrics_url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> RunningServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerExitedError(self.process.returncode, self.log())
            if self.ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f}s:\n{self.log()[-6000:]}")

    def wait_exit(self, timeout: float = READY_TIMEOUT) -> int:
        return self.process.wait(timeout=timeout)

    def metrics(self) -> dict[tuple[str, str], float]:
        """Triton's Prometheus metrics as (name, model) → value (model is empty for server-wide ones)."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        values: dict[tuple[str, str], float] = {}
        for line in text.splitlines():
            if match := _METRIC_LINE.match(line):
                model = re.search(r'model="([^"]*)"', match[2])
                key = (match[1], model[1] if model else "")
                values[key] = values.get(key, 0.0) + float(match[3])
        return values

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL after 30 s: a server that drains in time ends as it would in a pod."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start(
    triton: WheelTriton, command: list[str], log_path: Path, ports: tuple[int, int, int]
) -> RunningServer:
    """Start `command` (from `tritonserver_command` with the wheel's executable) without waiting."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            env=triton.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return RunningServer(process, log_path, ports)
