#!/usr/bin/env bash
# The wheels a bare GPU machine needs to run bench/gpu/all.sh and `pytest -m gpu`: the packages the
# trainer's lock pins that the machine's image (Python 3.12 with torch; see the device tool's
# KINDS.md) lacks or holds in other versions. Versions come from requirements-trainer.lock, so the
# GPU runs test what the trainer image installs. bitsandbytes keeps only its CUDA 13 and CPU
# libraries (43 MiB -> 4 MiB): what travels to such a machine is limited (64 MiB here).
#
#     bash bench/gpu/wheels.sh [DIR]      # default .whl, ~30 MiB
#
# and there, before anything else:
#
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#     export PYTHONPATH=/tmp/site:operator:trainer-image:serving-image:.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir="${1:-.whl}"
packages=(
  transformers huggingface-hub tokenizers peft bitsandbytes
  trl datasets dill multiprocess
  pydantic pydantic-core annotated-types typing-inspection typing-extensions
  nltk defusedxml click idna anyio h11
)
pinned() {  # NAME: NAME==VERSION as the trainer's lock pins it
  grep -E "^$1==" requirements-trainer.lock || { echo "$1 is not in requirements-trainer.lock" >&2; exit 1; }
}
rm -rf "$dir"
mkdir -p "$dir"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
for name in "${packages[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dir" "$(pinned "$name")"
done
python3 -m pip wheel -q --no-deps -w "$dir" "$(pinned rouge-score)"  # an sdist only
zip -q -d "$dir"/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*' \
  'bitsandbytes/libbitsandbytes_cuda132.so' 'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*'
du -sh "$dir"
