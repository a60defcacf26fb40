#!/usr/bin/env bash
# Print the directory holding KEDA's CRDs (keda.sh_scaledobjects.yaml, ...), as KEDA ships them in its
# Go module (config/crd/bases), downloading the module into Go's module cache the first time.
#
#   kubectl apply --server-side -f "$(bash tests/localcluster/keda_crds.sh)/keda.sh_scaledobjects.yaml"
#
# Only the CRDs: KEDA's operator is not run (the test proves the ScaledObjects the DeepTune operator
# writes against KEDA's own schema and validation rules, not KEDA's scaling).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
. "$HERE/versions.sh"
module="github.com/kedacore/keda/v2@$LC_KEDA_VERSION"
dir="$(cd / && GOFLAGS=-mod=mod GOTOOLCHAIN=local "${GO:-go}" mod download -json "$module" \
  | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
[ -f "$dir/config/crd/bases/keda.sh_scaledobjects.yaml" ] || {
  echo "keda_crds.sh: no KEDA CRDs after downloading $module (is the Go module proxy reachable?)" >&2
  exit 1
}
printf '%s\n' "$dir/config/crd/bases"
