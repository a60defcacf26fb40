"""The generated config.pbtxt, repository layout and tritonserver command line (no server needed)."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest

from deeptune.serving.repository import (
    ModelLocation,
    cache_size_bytes,
    config_pbtxt,
    model_parameters,
    repository_files,
    tritonserver_command,
    write_repository,
)
from tests.serving.conftest import cpu_spec

MERGED = ModelLocation(model="/mnt/pvc/out/run/merged")


def test_defaults_batch_continuously_on_the_cpu() -> None:
    text = config_pbtxt(cpu_spec(), MERGED, "support-bot")
    assert 'name: "support-bot"' in text and 'backend: "python"' in text
    assert "max_batch_size: 8" in text
    for name, kind in (
        ("text_input", "TYPE_STRING"),
        ("messages", "TYPE_STRING"),
        ("max_new_tokens", "TYPE_INT32"),
        ("temperature", "TYPE_FP32"),
        ("top_p", "TYPE_FP32"),
        ("seed", "TYPE_INT64"),
        ("stop", "TYPE_STRING"),
    ):
        assert f'{{ name: "{name}" data_type: {kind} dims: [ 1 ] optional: true }}' in text
    for name, kind in (
        ("text_output", "TYPE_STRING"),
        ("finish_reason", "TYPE_STRING"),
        ("prompt_tokens", "TYPE_INT32"),
        ("completion_tokens", "TYPE_INT32"),
    ):
        assert f'{{ name: "{name}" data_type: {kind} dims: [ 1 ] }}' in text
    assert (
        "dynamic_batching {\n  max_queue_delay_microseconds: 2000\n  default_queue_policy {\n"
        "    timeout_action: REJECT\n    default_timeout_microseconds: 60000000\n"
        "    max_queue_size: 256\n  }\n}"
    ) in text
    assert "kind: KIND_CPU" in text
    assert "response_cache {" not in text
    # Continuous batching answers through response senders: the model is decoupled.
    assert "model_transaction_policy { decoupled: true }" in text
    params = _parameters(text)
    assert (params["batching_mode"], params["max_running"], params["max_queue_size"]) == (
        "continuous",
        "8",
        "256",
    )
    dynamic = config_pbtxt(cpu_spec(batching={"mode": "dynamic"}), MERGED, "m")
    assert "decoupled" not in dynamic and _parameters(dynamic)["batching_mode"] == "static"


def test_batching_cache_and_streaming_follow_the_spec() -> None:
    batched = config_pbtxt(cpu_spec(batching={"preferredBatchSizes": [4, 8]}), MERGED, "m")
    assert "preferred_batch_size: [ 4, 8 ]" in batched
    assert "dynamic_batching" not in config_pbtxt(cpu_spec(batching={"enabled": False}), MERGED, "m")
    assert "response_cache { enable: true }" in config_pbtxt(
        cpu_spec(responseCache={"enabled": True}, batching={"mode": "dynamic"}), MERGED, "m"
    )
    streaming = config_pbtxt(cpu_spec(streaming=True), MERGED, "m")
    assert "model_transaction_policy { decoupled: true }" in streaming


@pytest.mark.parametrize(("gpus", "kind"), [(0, "KIND_CPU"), (1, "KIND_GPU"), (4, "KIND_MODEL")])
def test_instances_follow_the_gpus(gpus: int, kind: str) -> None:
    assert f"kind: {kind}" in config_pbtxt(cpu_spec(resources={"gpu": gpus}), MERGED, "m")


def _parameters(text: str) -> dict[str, str]:
    """Read back `parameters { key: "..." value: { string_value: "..." } }` as protobuf text format does."""
    literal = r'"((?:[^"\\]|\\.)*)"'
    found = re.findall(rf"parameters {{ key: {literal} value: {{ string_value: {literal} }} }}", text)

    def unquote(value: str) -> str:
        return json.loads(f'"{value}"')  # the escapes used (\\ \" \n \r \t) mean the same in JSON

    return {unquote(key): unquote(value) for key, value in found}


def test_parameters_carry_the_location_and_generation_defaults() -> None:
    stops = ['say "stop"', "\n\nUser:", "back\\slash", "停"]
    spec = cpu_spec(generation={"maxNewTokens": 64, "temperature": 0.7, "topP": 0.9, "stopSequences": stops})
    location = ModelLocation(
        model="deepseek-ai/deepseek-llm-7b-base", adapter="/mnt/a", trust_remote_code=True
    )
    params = _parameters(config_pbtxt(spec, location, "m"))
    assert params == model_parameters(spec, location)
    assert params["model"] == "deepseek-ai/deepseek-llm-7b-base" and params["adapter"] == "/mnt/a"
    assert params["trust_remote_code"] == "true" and params["quantization"] == "none"
    assert (params["max_new_tokens"], params["temperature"], params["top_p"]) == ("64", "0.7", "0.9")
    assert json.loads(params["stop_sequences"]) == stops
    assert (params["max_new_tokens_limit"], params["response_cache"]) == ("2048", "false")


def test_the_repository_names_the_serving_images_model(tmp_path: Path) -> None:
    files = repository_files(cpu_spec(), MERGED, "bot")
    assert set(files) == {"bot/config.pbtxt", "bot/1/model.py"}
    root = write_repository(files, tmp_path)
    shim = ast.parse((root / "bot" / "1" / "model.py").read_text())  # what Triton's Python backend loads
    (imported,) = [node for node in shim.body if isinstance(node, ast.ImportFrom)]
    assert (imported.module, [alias.name for alias in imported.names]) == (
        "deeptune_serving.triton_model",
        ["TritonPythonModel"],
    )
    spec = importlib.util.find_spec("deeptune_serving.triton_model")  # Triton's stub alone can import it
    assert spec is not None and spec.origin is not None
    defined = ast.parse(Path(spec.origin).read_text())
    assert "TritonPythonModel" in {node.name for node in defined.body if isinstance(node, ast.ClassDef)}


def test_the_command_line() -> None:
    assert tritonserver_command(cpu_spec()) == [
        "tritonserver",
        "--model-repository=/models",
        "--http-port=8000",
        "--grpc-port=8001",
        "--metrics-port=8002",
        "--log-verbose=0",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--model-control-mode=none",
    ]
    cached = tritonserver_command(
        cpu_spec(responseCache={"enabled": True, "size": "1Gi"}, batching={"mode": "dynamic"})
    )
    assert "--cache-config=local,size=1073741824" in cached


@pytest.mark.parametrize(
    ("quantity", "size"), [("64Mi", 64 * 2**20), ("1.5Gi", 3 * 2**29), ("500M", 500_000_000), ("4096", 4096)]
)
def test_cache_sizes_in_bytes(quantity: str, size: int) -> None:
    assert cache_size_bytes(quantity) == size


def test_a_cache_size_that_is_not_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match=r"responseCache\.size: '100m' is not a size in bytes"):
        cache_size_bytes("100m")
