#!/usr/bin/env bash
# The whole test suite, as CI runs it: lint, types, generated files, then every pytest suite.
# Sets up everything it needs on a fresh machine (the Python environment is cached outside the clone).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not trainer"`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# kubectl, helm and the control plane of the pinned Kubernetes release (built once, cached).
PATH="$(bash tests/localcluster/build.sh --print-path):$PATH"
export PATH

echo "== lint (ruff) =="
ruff check .
ruff format --check .
hadolint trainer-image/Dockerfile operator/Dockerfile serving-image/Dockerfile tests/localcluster/images/*.Dockerfile
actionlint   # .github/workflows (built by tests/localcluster/build.sh, on PATH above)
echo "== types (mypy) =="
mypy
echo "== generated CRDs and field reference are up to date =="
python -m deeptune.crdgen --check
python scripts/gen_reference.py --check
echo "== tests (pytest) =="
python -m pytest --durations=30 "$@"   # the slowest 30 in the log: where CI time goes
