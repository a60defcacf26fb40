#!/usr/bin/env bash
# The main job: a real FineTuneJob, end to end, on a local Kubernetes control plane, on CPU.
# Sets up everything on a fresh machine (Python environment and Kubernetes binaries are built once
# and cached under ~/.cache/deeptune). Needs root (pods get network namespaces). `--keep` leaves
# the cluster running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# kubectl, helm and the control plane of the pinned Kubernetes release (built once, cached).
PATH="$(bash tests/localcluster/build.sh --print-path):$PATH"
export PATH
exec python scripts/demo.py "$@"
