#!/usr/bin/env bash
# Re-resolve the dependency locks after changing pyproject.toml:
#   requirements.lock           every extra: the development and CI environment
#   requirements-operator.lock  the operator image only (no torch), constrained to the same versions
#   requirements-trainer.lock   the trainer image only (no dev or serving tools), likewise
#   requirements-serving.lock   the serving image (serving-image/Dockerfile): the serving-runtime extra for
#                               Triton 24.10's Python, 3.10; not constrained by requirements.lock, whose
#                               torch and transformers have no 3.10 builds (it gets their last 3.10 releases)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh >/dev/null
uv="$(_deeptune_uv)"
target=(--python-version 3.11 --python-platform x86_64-manylinux_2_35 --quiet)
"$uv" pip compile pyproject.toml --all-extras "${target[@]}" -o requirements.lock
"$uv" pip compile pyproject.toml --extra operator --constraint requirements.lock "${target[@]}" \
  -o requirements-operator.lock
"$uv" pip compile pyproject.toml --extra trainer --constraint requirements.lock "${target[@]}" \
  -o requirements-trainer.lock
"$uv" pip compile pyproject.toml --extra serving-runtime --python-version 3.10 \
  --python-platform x86_64-manylinux_2_35 --quiet -o requirements-serving.lock
