#!/usr/bin/env bash
# The main job: a real FineTuneJob, end to end, on a local Kubernetes control plane, on CPU.
# Sets up everything on a fresh machine (Python environment and Kubernetes binaries are built once
# and cached under ~/.cache/deeptune, as are the images built from the project's Dockerfiles: about
# 25 minutes the first time). Needs root (a real node: containerd, kubelet, kube-proxy), and no other
# real node on the machine (a test run's, say: it says whose). The control plane
# is the demo's own (a private state dir under /tmp, free ports), stopped at the end with all the
# demo started. `--keep` (or DEEPTUNE_KEEP_CLUSTER=1) leaves the cluster, its node and the operator
# running and prints the command that stops them all:
#   DEEPTUNE_CLUSTER_DIR=<state dir> bash tests/localcluster/down.sh
# DEEPTUNE_CLUSTER_DIR=DIR runs the demo on the cluster in DIR (reused if up, and then left running).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# kubectl, helm and the control plane of the pinned Kubernetes release (built once, cached).
PATH="$(bash tests/localcluster/build.sh --print-path):$PATH"
export PATH
exec python scripts/demo.py "$@"
