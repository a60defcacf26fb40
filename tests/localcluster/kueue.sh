#!/usr/bin/env bash
# Kueue (job queueing) on the local test cluster: its controller manager, built
# from sigs.k8s.io/kueue (build.sh --with-kueue), run as a process against the
# cluster that up.sh started in the state dir, with its CRDs, RBAC and admission
# webhooks installed there.
#
#   kueue.sh build    build Kueue once (a no-op when built; see build.sh)
#   kueue.sh start    install Kueue's CRDs, RBAC and webhooks into the cluster
#                     and start the controller manager (building it first if
#                     needed); a no-op when it already runs there and is ready
#   kueue.sh stop     stop it and delete its webhook configurations, so that
#                     the cluster admits Jobs without it (CRDs and objects stay)
#   kueue.sh status   exit 0 when it runs and is ready, 1 otherwise
#
# State dir: ${DEEPTUNE_CLUSTER_DIR:-/tmp/deeptune-cluster} (made by up.sh;
# down.sh stops Kueue with the rest): kueue.pid, kueue.log, kueue.env (its
# ports), kueue/ (configuration, kubeconfig, certificates).
# Identity: the user `kueue-controller-manager` (a client certificate signed by
# the cluster's CA) bound to Kueue's own ClusterRole from its module
# (config/components/rbac/role.yaml, as upstream deploys it), not admin.
# Webhooks: the API server calls https://127.0.0.1:<port>/... (a URL, as there
# is no kube-proxy to reach a Service), served with a certificate for
# 127.0.0.1 from a CA of Kueue's own; the Job webhooks only see Jobs labelled
# kueue.x-k8s.io/queue-name.
# Knobs: DEEPTUNE_KUEUE_TIMEOUT (readiness wait, default 120 s),
#   DEEPTUNE_KUEUE_LOG_LEVEL (--zap-log-level, default info).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
. "$HERE/versions.sh"

STATE="${DEEPTUNE_CLUSTER_DIR:-/tmp/deeptune-cluster}"
STATE="${STATE%/}"
DIR="$STATE/kueue"
TIMEOUT="${DEEPTUNE_KUEUE_TIMEOUT:-120}"
NAMESPACE=kueue-system
USER_NAME=kueue-controller-manager
# What Kueue's internal certificate management (cert-controller's rotator)
# expects: the Secret it keeps the webhook's CA and certificate in, the DNS
# name it checks the certificate against, and the webhook configurations it
# injects the CA into.
SECRET=kueue-webhook-server-cert
SERVICE_DNS=kueue-webhook-service.$NAMESPACE.svc
MUTATING=kueue-mutating-webhook-configuration
VALIDATING=kueue-validating-webhook-configuration

log() { printf '[kueue.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

cmd=${1:-}
case "$cmd" in
  build|start|stop|status) ;;
  -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "kueue.sh: unknown command: '${cmd}' (build, start, stop or status; try --help)" >&2; exit 2 ;;
esac

if [ "$cmd" = build ]; then
  exec bash "$HERE/build.sh" --with-kueue
fi

KUEUE="$LC_KUEUE_BIN/kueue"
export PATH="$LC_K8S_BIN:$PATH"

# running PID: PID is a live process (not a zombie).
running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# The pid in kueue.pid when it is still our kueue process, else nothing.
our_pid() {
  local pid exe
  pid=$(cat "$STATE/kueue.pid" 2>/dev/null) || return 0
  [ -n "$pid" ] && running "$pid" || return 0
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
  [ -z "$exe" ] || [ "$(basename "${exe% (deleted)}")" = kueue ] || return 0
  echo "$pid"
}

kc() { kubectl --kubeconfig "$STATE/kubeconfig" "$@"; }

api_up() { [ "$(kc get --raw /readyz 2>/dev/null)" = ok ]; }

# webhook_works: the API server reaches Kueue's Job webhook, which suspends a
# labelled Job on creation (a server-side dry run: nothing is stored).
webhook_works() {
  kc create --dry-run=server -o jsonpath='{.spec.suspend}' -f - 2>/dev/null <<'YAML' | grep -qx true
apiVersion: batch/v1
kind: Job
metadata:
  generateName: kueue-sh-probe-
  namespace: default
  labels:
    kueue.x-k8s.io/queue-name: kueue-sh-probe
spec:
  suspend: false
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: probe
        image: probe
YAML
}

ready() {
  local pid
  pid=$(our_pid)
  [ -n "$pid" ] && [ -f "$STATE/kueue.env" ] || return 1
  # shellcheck disable=SC1091
  . "$STATE/kueue.env"
  curl -sf --max-time 5 "http://127.0.0.1:$KUEUE_HEALTH_PORT/readyz" >/dev/null && webhook_works
}

stop_process() {
  local pid
  pid=$(our_pid)
  if [ -n "$pid" ]; then
    log "stopping kueue (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do running "$pid" || break; sleep 0.1; done
    if running "$pid"; then
      log "killing kueue (pid $pid)"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$STATE/kueue.pid"
}

if [ ! -d "$STATE" ]; then
  case "$cmd" in
    start) die "no cluster in $STATE (run up.sh first)" ;;
    stop) log "nothing to do: $STATE does not exist"; exit 0 ;;
    status) log "kueue is not running: $STATE does not exist"; exit 1 ;;
  esac
fi

# One kueue.sh at a time per state dir.
exec 8>"$STATE/kueue.lock"
flock 8

case "$cmd" in
  status)
    if ready; then log "kueue runs (pid $(our_pid)) and is ready"; exit 0; fi
    log "kueue is not running or not ready"; exit 1 ;;
  stop)
    stop_process
    # Without Kueue its webhooks (failurePolicy Fail) would refuse every queued
    # Job and Kueue object: take them away with it.
    if [ -f "$STATE/kubeconfig" ] && api_up; then
      kc delete mutatingwebhookconfiguration "$MUTATING" --ignore-not-found >/dev/null
      kc delete validatingwebhookconfiguration "$VALIDATING" --ignore-not-found >/dev/null
    fi
    log "stopped"
    exit 0 ;;
esac

# --- start ---------------------------------------------------------------------

for f in kubeconfig ports.env pki/ca.crt pki/ca.key; do
  [ -f "$STATE/$f" ] || die "$STATE/$f is missing: not a local cluster made by up.sh"
done
api_up || die "the API server of the cluster in $STATE does not answer (run up.sh)"
if ready; then
  log "kueue already runs (pid $(our_pid)) and is ready"
  exit 0
fi
stop_process   # not ready: start afresh

[ -x "$KUEUE" ] || bash "$HERE/build.sh" --with-kueue >&2
[ -x "$KUEUE" ] || die "$KUEUE was not built"
# The CRDs and RBAC come from the module itself, in Go's module cache.
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
module_dir() {
  (cd "$HERE/gomod/kueue" && GOFLAGS=-mod=readonly GOTOOLCHAIN=local "$GO" "$@" 2>/dev/null)
}
MODULE=$(module_dir list -m -f '{{.Dir}}' sigs.k8s.io/kueue || true)
if [ -z "$MODULE" ]; then   # the binary is cached but the module cache was cleaned
  MODULE=$(module_dir mod download -json sigs.k8s.io/kueue | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' || true)
fi
[ -d "$MODULE/config/components/crd/bases" ] \
  || die "sigs.k8s.io/kueue $LC_KUEUE_VERSION is not in Go's module cache and could not be downloaded (needs Go: set GO=...)"

# shellcheck disable=SC1091
. "$STATE/ports.env"
mkdir -p "$DIR/pki" "$DIR/webhook-certs" "$DIR/tmp"
chmod 700 "$DIR"

# Three free ports on 127.0.0.1 (held until all are chosen, so no two are the same).
read -r WEBHOOK_PORT METRICS_PORT HEALTH_PORT <<< "$(python3 - <<'PY'
import socket
held = [socket.socket() for _ in range(3)]
for s in held:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in held))
PY
)"

# --- certificates (made once per state dir) -------------------------------------
if [ ! -f "$DIR/pki/kueue.crt" ] || [ ! -f "$DIR/pki/tls.crt" ]; then
  log "generating certificates in $DIR/pki"
  (
    cd "$DIR/pki"
    umask 077
    # Kueue's client certificate, signed by the cluster's CA: the user it acts as.
    openssl req -newkey rsa:2048 -nodes -keyout kueue.key -out kueue.csr -subj "/CN=$USER_NAME" 2>/dev/null
    printf '%s\n' basicConstraints=critical,CA:FALSE keyUsage=critical,digitalSignature,keyEncipherment \
      extendedKeyUsage=clientAuth > kueue.ext
    openssl x509 -req -in kueue.csr -CA "$STATE/pki/ca.crt" -CAkey "$STATE/pki/ca.key" -CAcreateserial \
      -CAserial kueue.srl -out kueue.crt -days 3650 -sha256 -extfile kueue.ext 2>/dev/null
    # The webhook's CA, as Kueue's rotator would make it (CN and DNS name kueue-ca,
    # a PKCS#1 key), and its serving certificate: for the Service name the
    # rotator checks it against, and for 127.0.0.1, where the API server calls it.
    openssl genrsa -traditional -out ca.key 2048 2>/dev/null
    openssl req -x509 -key ca.key -out ca.crt -days 3650 -subj "/O=kueue/CN=kueue-ca" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,digitalSignature,keyEncipherment" \
      -addext "subjectAltName=DNS:kueue-ca" 2>/dev/null
    openssl genrsa -traditional -out tls.key 2048 2>/dev/null
    openssl req -new -key tls.key -out tls.csr -subj "/CN=$SERVICE_DNS" 2>/dev/null
    printf '%s\n' basicConstraints=critical,CA:FALSE keyUsage=critical,digitalSignature,keyEncipherment \
      extendedKeyUsage=serverAuth "subjectAltName=DNS:$SERVICE_DNS,IP:127.0.0.1" > tls.ext
    openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -CAserial ca.srl \
      -out tls.crt -days 3650 -sha256 -extfile tls.ext 2>/dev/null
    rm -f ./*.csr ./*.ext
  )
fi
cp "$DIR/pki/tls.crt" "$DIR/pki/tls.key" "$DIR/webhook-certs/"

b64() { base64 -w0 < "$1"; }
cat > "$DIR/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: deeptune-local
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(b64 "$STATE/pki/ca.crt")
users:
- name: $USER_NAME
  user:
    client-certificate-data: $(b64 "$DIR/pki/kueue.crt")
    client-key-data: $(b64 "$DIR/pki/kueue.key")
contexts:
- name: $USER_NAME@deeptune-local
  context:
    cluster: deeptune-local
    user: $USER_NAME
current-context: $USER_NAME@deeptune-local
EOF
chmod 600 "$DIR/kubeconfig"

# --- into the cluster: CRDs, RBAC, the webhook's Secret and configurations ------
log "installing Kueue $LC_KUEUE_VERSION's CRDs, RBAC and webhooks"
kc apply --server-side --force-conflicts -f "$MODULE/config/components/crd/bases" >/dev/null
crds=()
for f in "$MODULE"/config/components/crd/bases/*.yaml; do   # GROUP_PLURAL.yaml
  name=$(basename "$f" .yaml)
  crds+=("crd/${name#*_}.${name%%_*}")
done
# retried: kubectl wait fails at once while a new CRD has no status conditions yet
for _ in 1 2 3 4 5 6; do
  kc wait --for=condition=Established "${crds[@]}" --timeout=30s >/dev/null 2>&1 && break
  sleep 1
done
kc wait --for=condition=Established "${crds[@]}" --timeout=30s >/dev/null

# Kueue's own ClusterRoles (what upstream binds to its ServiceAccount), renamed.
sed 's/^  name: manager-role$/  name: kueue-manager-role/' "$MODULE/config/components/rbac/role.yaml" | kc apply -f - >/dev/null
sed 's/^  name: metrics-auth-role$/  name: kueue-metrics-auth-role/' "$MODULE/config/components/rbac/metrics_auth_role.yaml" | kc apply -f - >/dev/null

webhook() {  # webhook NAME PATH GROUP VERSION RESOURCES OPERATIONS [queued]: one webhook entry
  cat <<EOF
- name: $1
  admissionReviewVersions: [v1]
  sideEffects: None
  failurePolicy: Fail
  clientConfig:
    url: https://127.0.0.1:$WEBHOOK_PORT$2
    caBundle: $(b64 "$DIR/pki/ca.crt")
  rules:
  - apiGroups: [$3]
    apiVersions: [$4]
    resources: [$5]
    operations: [$6]
EOF
  if [ "${7:-}" = queued ]; then
    cat <<'EOF'
  objectSelector:
    matchExpressions:
    - {key: kueue.x-k8s.io/queue-name, operator: Exists}
EOF
  fi
}

kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $NAMESPACE
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: kueue-manager-rolebinding
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: kueue-manager-role}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: $USER_NAME}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: kueue-metrics-auth-rolebinding
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: kueue-metrics-auth-role}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: $USER_NAME}
---
apiVersion: v1
kind: Secret
metadata:
  name: $SECRET
  namespace: $NAMESPACE
data:
  ca.crt: $(b64 "$DIR/pki/ca.crt")
  ca.key: $(b64 "$DIR/pki/ca.key")
  tls.crt: $(b64 "$DIR/pki/tls.crt")
  tls.key: $(b64 "$DIR/pki/tls.key")
---
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: $MUTATING
webhooks:
$(webhook mjob.kb.io /mutate-batch-v1-job batch v1 jobs CREATE queued)
$(webhook mclusterqueue.kb.io /mutate-kueue-x-k8s-io-v1beta1-clusterqueue kueue.x-k8s.io v1beta1 clusterqueues CREATE)
$(webhook mresourceflavor.kb.io /mutate-kueue-x-k8s-io-v1beta1-resourceflavor kueue.x-k8s.io v1beta1 resourceflavors CREATE)
$(webhook mworkload.kb.io /mutate-kueue-x-k8s-io-v1beta1-workload kueue.x-k8s.io v1beta1 workloads CREATE)
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata:
  name: $VALIDATING
webhooks:
$(webhook vjob.kb.io /validate-batch-v1-job batch v1 jobs "CREATE, UPDATE" queued)
$(webhook vclusterqueue.kb.io /validate-kueue-x-k8s-io-v1beta1-clusterqueue kueue.x-k8s.io v1beta1 clusterqueues "CREATE, UPDATE")
$(webhook vcohort.kb.io /validate-kueue-x-k8s-io-v1alpha1-cohort kueue.x-k8s.io v1alpha1 cohorts "CREATE, UPDATE")
$(webhook vresourceflavor.kb.io /validate-kueue-x-k8s-io-v1beta1-resourceflavor kueue.x-k8s.io v1beta1 resourceflavors "CREATE, UPDATE")
$(webhook vworkload.kb.io /validate-kueue-x-k8s-io-v1beta1-workload kueue.x-k8s.io v1beta1 "workloads, workloads/status" "CREATE, UPDATE")
EOF

# --- the controller manager -------------------------------------------------------
# Outside a cluster: no leader election, metrics and health on loopback ports,
# the webhook on a loopback port; no visibility API server (an aggregated API
# on a fixed port), MultiKueue or ProvisioningRequest checks.
cat > "$DIR/config.yaml" <<EOF
apiVersion: config.kueue.x-k8s.io/v1beta1
kind: Configuration
namespace: $NAMESPACE
manageJobsWithoutQueueName: false
integrations:
  frameworks: [batch/job]
leaderElection:
  leaderElect: false
health:
  healthProbeBindAddress: 127.0.0.1:$HEALTH_PORT
metrics:
  bindAddress: 127.0.0.1:$METRICS_PORT
webhook:
  host: 127.0.0.1
  port: $WEBHOOK_PORT
  certDir: $DIR/webhook-certs
internalCertManagement:
  enable: true
  webhookServiceName: kueue-webhook-service
  webhookSecretName: $SECRET
clientConnection:
  qps: 50
  burst: 100
featureGates:
  VisibilityOnDemand: false
  MultiKueue: false
  ProvisioningACC: false
EOF
cat > "$STATE/kueue.env" <<EOF
KUEUE_WEBHOOK_PORT=$WEBHOOK_PORT
KUEUE_METRICS_PORT=$METRICS_PORT
KUEUE_HEALTH_PORT=$HEALTH_PORT
EOF

# Detached like up.sh's components (own session, no SIGHUP, no inherited lock).
# $! is kueue's pid: nohup and setsid exec it.
cd "$DIR"
KUBECONFIG="$DIR/kubeconfig" TMPDIR="$DIR/tmp" nohup setsid "$KUEUE" \
  --config="$DIR/config.yaml" --zap-log-level="${DEEPTUNE_KUEUE_LOG_LEVEL:-info}" \
  > "$STATE/kueue.log" 2>&1 < /dev/null 8>&- &
echo $! > "$STATE/kueue.pid"
log "started kueue $LC_KUEUE_VERSION (pid $(cat "$STATE/kueue.pid"), log $STATE/kueue.log)"

start=$(date +%s)
until ready; do
  if [ -z "$(our_pid)" ]; then
    log "kueue exited; last lines of $STATE/kueue.log:"
    tail -n 30 "$STATE/kueue.log" >&2 || true
    die "kueue failed to start"
  fi
  if [ $(( $(date +%s) - start )) -ge "$TIMEOUT" ]; then
    tail -n 30 "$STATE/kueue.log" >&2 || true
    stop_process
    die "timed out after ${TIMEOUT}s waiting for kueue to be ready and its Job webhook to answer (log: $STATE/kueue.log)"
  fi
  sleep 0.5
done
log "kueue ready in $(( $(date +%s) - start ))s: webhook https://127.0.0.1:$WEBHOOK_PORT, health http://127.0.0.1:$HEALTH_PORT, metrics https://127.0.0.1:$METRICS_PORT"
