"""Triton's vLLM backend from a ModelDeployment spec: engine arguments, repository files, the frontend's
command (a real vLLM serves the files: tests/serving/test_vllm.py)."""

from __future__ import annotations

import json

import pytest

from deeptune.api.modeldeployment import ModelDeploymentSpec
from deeptune.serving.repository import ModelLocation
from deeptune.serving.vllm import (
    engine_args,
    frontend_command,
    lora_adapters,
    max_lora_rank,
    repository_files,
    served_name,
)

MERGED = ModelLocation(model="/mnt/pvc/out/run/merged")
ADAPTED = ModelLocation(model="deepseek-ai/deepseek-llm-7b-base", adapter="/mnt/pvc/out/run/adapter")


def spec(**fields: object) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate({"model": {"fineTuneJobRef": {"name": "bot"}}, **fields})


@pytest.mark.parametrize(("rank", "slot"), [(1, 8), (8, 8), (9, 16), (64, 64), (100, 128), (512, 512)])
def test_an_adapter_gets_the_smallest_rank_slot_that_holds_it(rank: int, slot: int) -> None:
    assert max_lora_rank(rank) == slot


def test_a_rank_vllm_cannot_hold_is_refused() -> None:
    with pytest.raises(ValueError, match="vLLM serves LoRA ranks up to 512, the adapter's is 1024"):
        max_lora_rank(1024)


def test_a_gpu_deployment_of_a_merged_model() -> None:
    gpus = spec(resources={"gpu": 2}, batching={"maxBatchSize": 64}, quantization="int4")
    assert engine_args(gpus, MERGED, lora_adapters(MERGED, {})) == {
        "model": "/mnt/pvc/out/run/merged",
        "revision": "main",
        "trust_remote_code": False,
        "max_num_seqs": 64,
        "enable_prefix_caching": True,
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.9,
        "quantization": "bitsandbytes",
    }
    files = repository_files(gpus, MERGED, "bot", {})
    assert set(files) == {"bot/config.pbtxt", "bot/1/model.json"}  # no LoRA, no multi_lora.json
    assert 'backend: "vllm"' in files["bot/config.pbtxt"] and "KIND_MODEL" in files["bot/config.pbtxt"]


def test_every_adapter_gets_a_slot_and_a_name_beside_the_base() -> None:
    adapters = lora_adapters(ADAPTED, {"support": "/mnt/pvc/out/support/adapter"})
    assert adapters == {"adapter": "/mnt/pvc/out/run/adapter", "support": "/mnt/pvc/out/support/adapter"}
    files = repository_files(spec(resources={"gpu": 1}), ADAPTED, "bot", adapters, lora_rank=16)
    args = json.loads(files["bot/1/model.json"])
    assert (args["enable_lora"], args["max_loras"], args["max_lora_rank"]) == (True, 2, 16)
    assert args["model"] == "deepseek-ai/deepseek-llm-7b-base"
    assert json.loads(files["bot/1/multi_lora.json"]) == adapters
    assert [served_name("bot", None), served_name("bot", "support")] == ["bot", "bot:support"]


def test_an_adapter_of_unknown_rank_gets_a_slot_for_the_usual_ranks() -> None:
    args = engine_args(spec(resources={"gpu": 1}), ADAPTED, lora_adapters(ADAPTED, {}))
    assert args["max_lora_rank"] == 64


def test_8_bit_weights_are_refused_with_what_to_do() -> None:
    with pytest.raises(ValueError, match="vLLM loads bitsandbytes weights in 4 bits only"):
        engine_args(spec(resources={"gpu": 1}, quantization="int8"), MERGED, {})


def test_the_frontend_serves_openai_and_kserve_on_the_spec_ports() -> None:
    command = frontend_command(
        spec(
            resources={"gpu": 1},
            service={"openaiPort": 9100, "httpPort": 8100},
            generation={"maxNewTokens": 99},
        ),
        tokenizer="/mnt/pvc/out/run/adapter",
    )
    assert command[:2] == ["python3", "/opt/tritonserver/python/openai/openai_frontend/main.py"]
    assert {
        "--model-repository=/models",
        "--backend=vllm",
        "--tokenizer=/mnt/pvc/out/run/adapter",
        "--openai-port=9100",
        "--enable-kserve-frontends",
        "--kserve-http-port=8100",
        "--lora-separator=:",
        "--default-max-tokens=99",
    } <= set(command)
