"""The Triton model repository and server command line of a ModelDeployment: pure functions of its spec.

The Deployment mounts the files (e.g. from a ConfigMap) at REPOSITORY_PATH and runs
`tritonserver_command`; the serving tests and the benchmark write the same files to a directory and
run the same command with the tritonserver of the nvidia-pytriton wheel.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from deeptune.api.modeldeployment import ModelDeploymentSpec

MODEL_VERSION = "1"
REPOSITORY_PATH = "/models"
"""Where the serving container finds the repository."""

MODEL_PY = (
    '"""DeepTune\'s Triton Python-backend model, from the serving image\'s deeptune_serving package."""\n\n'
    "from deeptune_serving.triton_model import TritonPythonModel\n\n"
    '__all__ = ["TritonPythonModel"]\n'
)
"""The model version's `model.py`: the code itself is installed in the serving image (serving-image/),
so an operator and an image of different releases agree on the repository's inputs and parameters only."""

_UNITS = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}  # fmt: skip


@dataclass(frozen=True)
class ModelLocation:
    """Where the serving container finds the weights: paths as mounted in the pod, or a Hugging Face id."""

    model: str
    """The merged model's directory, or the base model's (directory or Hugging Face id) for an adapter."""
    adapter: str = ""
    """The LoRA adapter's directory; empty for a merged model."""
    revision: str = "main"
    trust_remote_code: bool = False


def cache_size_bytes(quantity: str) -> int:
    """A Kubernetes quantity such as `64Mi` in bytes, as tritonserver's `--cache-config` wants it."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(k|M|G|T|Ki|Mi|Gi|Ti)?", quantity)
    if match is None:
        raise ValueError(f"responseCache.size: {quantity!r} is not a size in bytes such as 64Mi")
    return int(float(match[1]) * _UNITS[match[2] or ""])


def pbtxt_string(text: str) -> str:
    """A protobuf text-format string literal (UTF-8 stays as is; quotes, backslashes and newlines escaped)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


def model_parameters(spec: ModelDeploymentSpec, location: ModelLocation) -> dict[str, str]:
    """What model.py reads from config.pbtxt: where the weights are and the generation defaults."""
    generation = spec.generation
    return {
        "model": location.model,
        "adapter": location.adapter,
        "revision": location.revision,
        "trust_remote_code": "true" if location.trust_remote_code else "false",
        "quantization": spec.quantization,
        "max_new_tokens": str(generation.max_new_tokens),
        "temperature": repr(generation.temperature),
        "top_p": repr(generation.top_p),
        "stop_sequences": json.dumps(generation.stop_sequences, ensure_ascii=False),
        "max_new_tokens_limit": str(generation.max_new_tokens_limit),
        "response_cache": "true" if spec.response_cache.enabled else "false",
        "streaming": "true" if spec.streaming else "false",
        "batching_mode": "continuous" if continuous(spec) else "static",
        "max_running": str(spec.batching.max_batch_size),
        "max_queue_size": str(spec.batching.max_queue_size),
        "queue_timeout_seconds": str(spec.batching.queue_timeout_seconds),
    }


def continuous(spec: ModelDeploymentSpec) -> bool:
    """Whether the model batches continuously (and so is decoupled)."""
    return spec.batching.enabled and spec.batching.mode == "continuous"


def decoupled(spec: ModelDeploymentSpec) -> bool:
    """Whether the model answers through response senders: with continuous batching or streaming.
    Triton's HTTP and gRPC `infer` refuse such models; the generate endpoints and streams serve them."""
    return continuous(spec) or spec.streaming


def _instance_kind(gpus: int) -> str:
    """CPU without GPUs; one instance per GPU with one; with several, one instance spread over all of
    them (KIND_MODEL: the model places itself with device_map=auto), for models too big for one GPU."""
    return "KIND_CPU" if gpus == 0 else "KIND_GPU" if gpus == 1 else "KIND_MODEL"


def config_pbtxt(spec: ModelDeploymentSpec, location: ModelLocation, model_name: str) -> str:
    """The model's config.pbtxt: a prompt or chat messages in, text, token counts and finish reason out,
    optional per-request decoding settings, batching (with a bounded queue), caching and streaming as
    the spec says."""
    batching = spec.batching
    lines = [
        f"name: {pbtxt_string(model_name)}",
        'backend: "python"',
        f"max_batch_size: {batching.max_batch_size}",
        "input [",
        '  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] optional: true },',
        '  { name: "messages" data_type: TYPE_STRING dims: [ 1 ] optional: true },',
        '  { name: "max_new_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true },',
        '  { name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true },',
        '  { name: "top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true },',
        '  { name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true },',
        '  { name: "stop" data_type: TYPE_STRING dims: [ 1 ] optional: true }',
        "]",
        "output [",
        '  { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] },',
        '  { name: "finish_reason" data_type: TYPE_STRING dims: [ 1 ] },',
        '  { name: "prompt_tokens" data_type: TYPE_INT32 dims: [ 1 ] },',
        '  { name: "completion_tokens" data_type: TYPE_INT32 dims: [ 1 ] }',
        "]",
        f"instance_group [ {{ count: 1 kind: {_instance_kind(spec.resources.gpu)} }} ]",
    ]
    if batching.enabled:
        lines.append("dynamic_batching {")
        lines.append(f"  max_queue_delay_microseconds: {batching.max_queue_delay_microseconds}")
        if batching.preferred_batch_sizes:
            sizes = ", ".join(str(size) for size in batching.preferred_batch_sizes)
            lines.append(f"  preferred_batch_size: [ {sizes} ]")
        lines.append("  default_queue_policy {")
        lines.append("    timeout_action: REJECT")
        lines.append(f"    default_timeout_microseconds: {batching.queue_timeout_seconds * 1_000_000}")
        lines.append(f"    max_queue_size: {batching.max_queue_size}")
        lines.append("  }")
        lines.append("}")
    if spec.response_cache.enabled:
        lines.append("response_cache { enable: true }")
    if decoupled(spec):
        lines.append("model_transaction_policy { decoupled: true }")
    for key, value in model_parameters(spec, location).items():
        lines.append(
            f"parameters {{ key: {pbtxt_string(key)} value: {{ string_value: {pbtxt_string(value)} }} }}"
        )
    return "\n".join(lines) + "\n"


def repository_files(spec: ModelDeploymentSpec, location: ModelLocation, model_name: str) -> dict[str, str]:
    """Path inside the repository → file content, for the one model a ModelDeployment serves."""
    return {
        f"{model_name}/config.pbtxt": config_pbtxt(spec, location, model_name),
        f"{model_name}/{MODEL_VERSION}/model.py": MODEL_PY,
    }


def write_repository(files: dict[str, str], root: Path) -> Path:
    """Write a repository (from `repository_files`) under `root`; return `root`."""
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    return root


def tritonserver_command(
    spec: ModelDeploymentSpec,
    repository: str = REPOSITORY_PATH,
    *,
    executable: str = "tritonserver",
    address: str | None = None,
    backend_directory: str | None = None,
    cache_directory: str | None = None,
) -> list[str]:
    """The server's command line. The defaults suit Triton's image; the tests bind to loopback and
    point at the wheel's backends and caches.

    Readiness is strict (ready only once the model is), a model that fails to load stops the server
    (so the pod's exit code and log say why), and the repository is fixed at start.
    """
    service = spec.service
    command = [
        executable,
        f"--model-repository={repository}",
        f"--http-port={service.http_port}",
        f"--grpc-port={service.grpc_port}",
        f"--metrics-port={service.metrics_port}",
    ]
    if spec.response_cache.enabled:
        command.append(f"--cache-config=local,size={cache_size_bytes(spec.response_cache.size)}")
    command += [
        "--log-verbose=0",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--model-control-mode=none",
    ]
    if address is not None:
        command += [f"--http-address={address}", f"--grpc-address={address}", f"--metrics-address={address}"]
    if backend_directory is not None:
        command.append(f"--backend-directory={backend_directory}")
    if cache_directory is not None:
        command.append(f"--cache-directory={cache_directory}")
    return command


def serving_command(spec: ModelDeploymentSpec, model_name: str, triton: list[str] | None = None) -> list[str]:
    """The serving container's command: the OpenAI frontend (`deeptune_serving`), which starts Triton
    (`triton`, by default `tritonserver_command(spec)`) and exits with it."""
    service = spec.service
    return [
        "python3",
        "-m",
        "deeptune_serving",
        f"--model={model_name}",
        f"--openai-port={service.openai_port}",
        f"--triton-http=http://127.0.0.1:{service.http_port}",
        "--",
        *(tritonserver_command(spec) if triton is None else triton),
    ]
