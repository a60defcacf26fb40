"""vLLM's engine arguments from a ModelDeployment spec (a real vLLM serves them: test_vllm.py)."""

from __future__ import annotations

import pytest

from deeptune.api.modeldeployment import ModelDeploymentSpec
from deeptune.serving.repository import ModelLocation
from deeptune.serving.vllm import api_server_arguments, engine_args, max_lora_rank, multi_lora

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
    args = engine_args(spec(resources={"gpu": 2}, batching={"maxBatchSize": 64}, quantization="int4"), MERGED)
    assert args == {
        "model": "/mnt/pvc/out/run/merged",
        "revision": "main",
        "trust_remote_code": False,
        "max_num_seqs": 64,
        "enable_prefix_caching": True,
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.9,
        "quantization": "bitsandbytes",
    }
    assert multi_lora("bot", MERGED) == {}


def test_an_adapter_is_a_lora_module_named_after_the_deployment() -> None:
    args = engine_args(spec(resources={"gpu": 1}), ADAPTED, lora_rank=16)
    assert (args["enable_lora"], args["max_loras"], args["max_lora_rank"]) == (True, 1, 16)
    assert multi_lora("bot", ADAPTED) == {"bot": "/mnt/pvc/out/run/adapter"}
    flags = api_server_arguments(args, "bot", multi_lora("bot", ADAPTED))
    assert flags[:2] == ["--model", "deepseek-ai/deepseek-llm-7b-base"]
    assert "--enable-lora" in flags and "--trust-remote-code" not in flags  # booleans as flags
    assert flags[-2:] == ["--lora-modules", "bot=/mnt/pvc/out/run/adapter"]
    assert "--served-model-name" not in flags


def test_8_bit_weights_are_refused_with_what_to_do() -> None:
    with pytest.raises(ValueError, match="vLLM loads bitsandbytes weights in 4 bits only"):
        engine_args(spec(resources={"gpu": 1}, quantization="int8"), MERGED)
