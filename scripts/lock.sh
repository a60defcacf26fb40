#!/usr/bin/env bash
# Re-resolve the dependency locks after changing pyproject.toml:
#   requirements.lock           every extra: the development and CI environment
#   requirements-operator.lock  the operator image only (no torch), constrained to the same versions
#   requirements-trainer.lock   the trainer image only (no dev or serving tools), likewise
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
