#!/usr/bin/env bash
# Build the binaries of the local test cluster from Go modules, once.
#
#   build.sh               build what is missing; prints an `export PATH=...` line
#   build.sh --print-path  build what is missing (progress on stderr), then print
#                          only the colon-separated bin directories on stdout
#   build.sh --check       exit 0 when every binary is already built, 1 otherwise
#   build.sh --with-kueue  (with any of the above) Kueue's controller manager
#                          too, which only the Kueue test needs (kueue.sh)
#   build.sh --with-node   (with any of the above) the kubelet and kube-proxy
#                          too, which only the real node needs (node.sh)
#
# Binaries go to ${DEEPTUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deeptune}:
#   k8s-<version>/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,kubectl}
#   etcd-<version>/bin/etcd
#   helm-<version>/bin/helm
#   coredns-<version>/bin/coredns
#   kueue-<version>/bin/kueue      (--with-kueue only)
#   node-<k8s version>/bin/{kubelet,kube-proxy}   (--with-node only)
#   actionlint-<version>/bin/actionlint   (the workflow linter of the test command's lint step)
#   argocd-health-<version>/bin/argocd-health.test   (Argo CD's Lua engine, for the health scripts)
#   krew-<version>/bin/{krew,validate-krew-manifest}   (the kubectl plugin installed as krew does)
# Each group is built into a temporary directory and renamed into place only
# when the whole build succeeded, so an interrupted build never leaves a
# half-written binary behind. GOMODCACHE and GOCACHE keep Go's defaults unless
# set in the environment.
#
# Environment: GO (go binary), LC_BUILD_PARALLEL (go build -p, default: nproc).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
. "$HERE/versions.sh"

mode=build
with_kueue=false
with_node=false
for arg in "$@"; do
  case "$arg" in
    --print-path) mode=print ;;
    --check) mode=check ;;
    --with-kueue) with_kueue=true ;;
    --with-node) with_node=true ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

log() { printf '[build.sh] %s\n' "$*" >&2; }

K8S_CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubectl)

have_all() {  # have_all DIR NAME... -> every DIR/NAME is an executable file
  local dir=$1; shift
  local n
  for n in "$@"; do [ -x "$dir/$n" ] || return 1; done
}

built_k8s()  { have_all "$LC_K8S_BIN" "${K8S_CMDS[@]}"; }
built_etcd() { have_all "$LC_ETCD_BIN" etcd; }
built_helm() { have_all "$LC_HELM_BIN" helm; }
built_coredns() { have_all "$LC_COREDNS_BIN" coredns; }
built_kueue() { ! $with_kueue || have_all "$LC_KUEUE_BIN" kueue; }
built_node() { ! $with_node || have_all "$LC_NODE_BIN" kubelet kube-proxy; }
built_actionlint() { have_all "$LC_ACTIONLINT_BIN" actionlint; }
built_argocd_health() { have_all "$LC_ARGOCD_HEALTH_BIN" argocd-health.test; }
built_krew() { have_all "$LC_KREW_BIN" krew validate-krew-manifest; }
built_all() {
  built_k8s && built_etcd && built_helm && built_coredns && built_kueue && built_node && built_actionlint && built_argocd_health && built_krew
}

path_line() {
  printf '%s:%s:%s:%s:%s:%s:%s\n' "$LC_K8S_BIN" "$LC_ETCD_BIN" "$LC_HELM_BIN" "$LC_COREDNS_BIN" \
    "$LC_ACTIONLINT_BIN" "$LC_ARGOCD_HEALTH_BIN" "$LC_KREW_BIN"
}

if [ "$mode" = check ]; then
  built_all
  exit $?
fi

if ! built_all; then
  GO="${GO:-$(command -v go || true)}"
  [ -n "$GO" ] || { [ -x /usr/local/go/bin/go ] && GO=/usr/local/go/bin/go; } || true
  if [ -z "$GO" ] || ! "$GO" version >/dev/null 2>&1; then
    log "error: no Go toolchain found (set GO=/path/to/go or put go on PATH); Go >= 1.25 is needed"
    exit 1
  fi
  # Never let the go command download another toolchain; never let it edit the
  # committed go.mod/go.sum (-mod=readonly: they are complete, a mismatch is an
  # error to fix with `go mod tidy` in gomod/<name>); no VCS stamping.
  export GOTOOLCHAIN=local
  export GOFLAGS="-mod=readonly -buildvcs=false"
  export CGO_ENABLED=0
  PAR="${LC_BUILD_PARALLEL:-$(nproc 2>/dev/null || echo 2)}"
  log "using $("$GO" version) (GOMODCACHE=$("$GO" env GOMODCACHE), GOCACHE=$("$GO" env GOCACHE), -p $PAR)"

  mkdir -p "$LC_CACHE"
  # One build at a time per cache (parallel test runners may all call us).
  exec 9>"$LC_CACHE/.build.lock"
  if ! flock -n 9; then
    log "another build.sh holds $LC_CACHE/.build.lock; waiting for it"
    flock 9
  fi
fi

# Check that gomod/<dir>/go.mod requires MODULE at VERSION.
check_pin() {
  local dir=$1 module=$2 version=$3 got
  got=$(awk -v m="$module" '$1 == "require" && $2 == m { print $3; exit } $1 == m && $0 !~ /=>/ { print $2; exit }' "$HERE/gomod/$dir/go.mod")
  if [ "$got" != "$version" ]; then
    log "error: gomod/$dir/go.mod pins $module ${got:-<nothing>} but versions.sh says $version"
    exit 1
  fi
}

# go_build GROUPDIR OUT LDFLAGS MODULEDIR PKG... : build PKGs into GROUPDIR/bin
# atomically. OUT is "" (binaries named after their packages) or the file name
# of the single binary.
go_build() {
  local group=$1 out=$2 ldflags=$3 moddir=$4; shift 4
  local tmp start
  mkdir -p "$group"
  rm -rf "$group"/bin.tmp.*   # left over by a killed build (we hold the lock)
  tmp=$(mktemp -d "$group/bin.tmp.XXXXXX")
  start=$(date +%s)
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  (cd "$moddir" && "$GO" build -p "$PAR" -trimpath -ldflags "$ldflags" -o "$tmp/$out" "$@")
  chmod 755 "$tmp"
  rm -rf "${group:?}/bin"
  mv "$tmp" "$group/bin"
  trap - EXIT
  log "built $(cd "$group/bin" && echo *) in $(( $(date +%s) - start ))s -> $group/bin"
}

# The version stamps of the upstream release, as its Makefile sets them.
k8s_ldflags() {
  local minor=${LC_K8S_VERSION#v1.} pkg ld="-s -w"
  minor=${minor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitVersion=$LC_K8S_VERSION"
    ld+=" -X $pkg.gitCommit=$LC_K8S_GIT_COMMIT -X $pkg.gitTreeState=clean -X $pkg.buildDate=$LC_K8S_BUILD_DATE"
  done
  echo "$ld"
}

if ! built_k8s; then
  check_pin kubernetes k8s.io/kubernetes "$LC_K8S_VERSION"
  ld=$(k8s_ldflags)
  log "building Kubernetes $LC_K8S_VERSION (${K8S_CMDS[*]}); from a cold Go cache this downloads ~0.5 GiB of modules and compiles for several minutes (about 4 min on 2 cores)"
  go_build "$LC_CACHE/k8s-$LC_K8S_VERSION" "" "$ld" "$HERE/gomod/kubernetes" \
    "${K8S_CMDS[@]/#/k8s.io/kubernetes/cmd/}"
fi

if ! built_node; then
  check_pin kubernetes k8s.io/kubernetes "$LC_K8S_VERSION"
  log "building the kubelet and kube-proxy $LC_K8S_VERSION (with a warm Go cache ~40 s, cold ~4 min on 2 cores)"
  go_build "$LC_CACHE/node-$LC_K8S_VERSION" "" "$(k8s_ldflags)" "$HERE/gomod/kubernetes" \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy
fi

if ! built_etcd; then
  check_pin etcd go.etcd.io/etcd/server/v3 "$LC_ETCD_VERSION"
  log "building etcd $LC_ETCD_VERSION"
  go_build "$LC_CACHE/etcd-$LC_ETCD_VERSION" etcd \
    "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=go-module-$LC_ETCD_VERSION" \
    "$HERE/gomod/etcd" go.etcd.io/etcd/server/v3
fi

if ! built_helm; then
  check_pin helm helm.sh/helm/v3 "$LC_HELM_VERSION"
  # Helm's Makefile derives its default Kubernetes version (.Capabilities)
  # from the client-go it is built with: v0.X.Y -> 1.X.
  cg=$(awk '$1 == "k8s.io/client-go" { print $2; exit }' "$HERE/gomod/helm/go.mod")
  cg_minor=${cg#v0.}; cg_minor=${cg_minor%%.*}
  log "building helm $LC_HELM_VERSION (client-go $cg)"
  go_build "$LC_CACHE/helm-$LC_HELM_VERSION" helm \
    "-s -w -X helm.sh/helm/v3/internal/version.version=$LC_HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$cg_minor -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$cg_minor" \
    "$HERE/gomod/helm" helm.sh/helm/v3/cmd/helm
fi

if ! built_coredns; then
  check_pin coredns github.com/coredns/coredns "$LC_COREDNS_VERSION"
  log "building CoreDNS $LC_COREDNS_VERSION (from a cold Go cache this downloads ~0.25 GiB of modules and compiles for about 2 min on 2 cores)"
  go_build "$LC_CACHE/coredns-$LC_COREDNS_VERSION" coredns \
    "-s -w -X github.com/coredns/coredns/coremain.GitCommit=go-module-$LC_COREDNS_VERSION" \
    "$HERE/gomod/coredns" github.com/coredns/coredns
fi

if ! built_kueue; then
  check_pin kueue sigs.k8s.io/kueue "$LC_KUEUE_VERSION"
  log "building Kueue $LC_KUEUE_VERSION (the controller manager; from a cold Go cache this downloads ~60 MB of modules and compiles for about 5 CPU-minutes)"
  go_build "$LC_CACHE/kueue-$LC_KUEUE_VERSION" kueue \
    "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$LC_KUEUE_VERSION -X sigs.k8s.io/kueue/pkg/version.GitCommit=go-module-$LC_KUEUE_VERSION" \
    "$HERE/gomod/kueue" sigs.k8s.io/kueue/cmd/kueue
fi

if ! built_actionlint; then
  check_pin actionlint github.com/rhysd/actionlint "$LC_ACTIONLINT_VERSION"
  log "building actionlint $LC_ACTIONLINT_VERSION"
  go_build "$LC_CACHE/actionlint-$LC_ACTIONLINT_VERSION" actionlint \
    "-s -w -X github.com/rhysd/actionlint.version=$LC_ACTIONLINT_VERSION" \
    "$HERE/gomod/actionlint" github.com/rhysd/actionlint/cmd/actionlint
fi

if ! built_krew; then
  check_pin krew sigs.k8s.io/krew "$LC_KREW_VERSION"
  log "building krew $LC_KREW_VERSION and its manifest validator"
  go_build "$LC_CACHE/krew-$LC_KREW_VERSION" "" "-s -w" \
    "$HERE/gomod/krew" sigs.k8s.io/krew/cmd/krew sigs.k8s.io/krew/cmd/validate-krew-manifest
fi

if ! built_argocd_health; then
  check_pin argocd-health github.com/argoproj/argo-cd/v3 "$LC_ARGOCD_VERSION"
  log "building Argo CD $LC_ARGOCD_VERSION's health-check engine into a test binary (from a cold Go cache: ~2 min)"
  mkdir -p "$LC_CACHE/argocd-health-$LC_ARGOCD_VERSION"
  rm -rf "$LC_CACHE/argocd-health-$LC_ARGOCD_VERSION"/bin.tmp.*   # left over by a killed build
  tmp=$(mktemp -d "$LC_CACHE/argocd-health-$LC_ARGOCD_VERSION/bin.tmp.XXXXXX")
  (cd "$HERE/gomod/argocd-health" && "$GO" test -c -trimpath -ldflags "-s -w" -o "$tmp/argocd-health.test" .)
  chmod 755 "$tmp"
  rm -rf "$LC_ARGOCD_HEALTH_BIN"
  mv "$tmp" "$LC_ARGOCD_HEALTH_BIN"
fi

if [ "$mode" = print ]; then
  path_line
else
  log "binaries ready: $(path_line | tr : " ")"
  echo "export PATH=\"$(path_line):\$PATH\""
fi
