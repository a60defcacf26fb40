#!/usr/bin/env bash
# Prints the path of the TRL environment, building it first if it is not in the cache.
#
# TRL (with `datasets`) gets an environment of its own, keyed by requirements-trl.lock and cached like
# the project's: in the project's, the serving extra's numpy<2 would hold `datasets` back to a release
# that downgrades huggingface-hub. Its torch, transformers and peft are the project's versions.
# Used by bench/versus_trl.py (the trainer against TRL's SFTTrainer) and its smoke test.
#   TRL_ENV="$(bash scripts/trl_env.sh)"; "$TRL_ENV/bin/python" bench/trl_worker.py RUN_JSON
set -euo pipefail
source "$(dirname "$0")/env.sh" >/dev/null
deeptune_cached_venv trl "$DEEPTUNE_ROOT/requirements-trl.lock"
