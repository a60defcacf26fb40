#!/usr/bin/env bash
# Every prepared GPU check in one go, sized to fit a short lease of one GPU (about 6 minutes on an
# H100): the GPU tests (QLoRA, DPO on 4-bit weights, bitsandbytes' int8/int4 export), the training
# benchmark on a deepseek-llm-7b-shaped model (lora and qlora), and the serving benchmark (where a
# decoding step's time goes, then static against continuous batching). Each part runs under its own
# time limit, so one that hangs or fails leaves the others their time; each writes its log, and the
# benchmarks their JSON, into the folder given (default bench/results). Run from the repository
# root with the project's packages importable:
#
#     source scripts/env.sh && bash bench/gpu/all.sh            # or on a bare GPU machine:
#     PYTHONPATH=operator:trainer-image:serving-image:. bash bench/gpu/all.sh /tmp/gpu-results
#
# (on a machine without the trainer's packages, first the wheels bench/gpu/wheels.sh gathers.)
#
# For the full-size figures, run the two benchmarks alone, as their docstrings say.
set -u
out="${1:-bench/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

part() {  # NAME SECONDS COMMAND...: one part, its output in NAME.log and on stdout, its status noted
  local name="$1" seconds="$2"
  shift 2
  echo "== $name (at most ${seconds}s) =="
  local started=$SECONDS
  timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$out/$name.log"
  local status=${PIPESTATUS[0]}
  echo "== $name: exit $status after $((SECONDS - started))s =="
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c 'import torch, transformers, peft, bitsandbytes; print("torch", torch.__version__, "cuda",
torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__,
"bitsandbytes", bitsandbytes.__version__)'

part gpu-tests 150 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider
part training 220 python3 bench/gpu/lora_qlora_fsdp.py --models dense-7b --configurations lora qlora \
  --warmup-steps 2 --timed-steps 5 --work-dir "$work"
part serving 230 python3 bench/gpu/serving.py --profile --requests 32 --concurrency 32 --work-dir "$work/serving"
cp bench/results/gpu-*.json "$out/" 2>/dev/null || true
