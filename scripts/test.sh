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
# The trainer image's malloc (trainer-image/Dockerfile): the allocator test and the TRL benchmark's
# smoke run the trainer on it as the image does. Debian's package, installed where it is missing.
if ! compgen -G "/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4" >/dev/null; then
  echo "== installing libtcmalloc-minimal4 (apt) =="
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -q --no-install-recommends libtcmalloc-minimal4 >/dev/null; }
fi

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
echo "== bytecode of the project's packages =="
# Written once here rather than compiled again by every process the tests start (this machine's
# environment sets PYTHONDONTWRITEBYTECODE=1; env.sh compiles the cached environments likewise).
python -m compileall -q operator trainer-image serving-image tests bench > /dev/null
echo "== tests (pytest) =="
python -m pytest --durations=30 "$@"   # the slowest 30 in the log: where CI time goes
