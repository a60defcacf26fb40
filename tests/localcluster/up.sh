#!/usr/bin/env bash
# Start a single-host Kubernetes control plane on 127.0.0.1 for the test suite:
# etcd, kube-apiserver, kube-controller-manager and kube-scheduler, and the
# cluster DNS (CoreDNS), each a detached background process (it outlives this
# script). No kubelet, no container runtime, no cloud provider: pods run only
# once a node joins (node.sh: containerd, kubelet and kube-proxy, the real node).
#
#   up.sh          start (building the binaries first if needed; see build.sh)
#                  and print `export KUBECONFIG=...`; if the cluster in the
#                  state dir is already up and healthy, say so and exit 0
#
# State (certificates, kubeconfigs, etcd data, logs *.log, pids *.pid):
#   ${DEEPTUNE_CLUSTER_DIR:-/tmp/deeptune-cluster} (missing or empty: a new cluster)
# Ports on 127.0.0.1 (set a variable to 0 to pick a free port):
#   DEEPTUNE_APISERVER_PORT (6443)   DEEPTUNE_ETCD_PORT (2379)
#   DEEPTUNE_ETCD_PEER_PORT (2380)   DEEPTUNE_KCM_PORT (10257)
#   DEEPTUNE_SCHEDULER_PORT (10259)
# Two clusters run side by side with different state dirs and ports; the test
# suite and the demo start theirs in a private dir on free ports.
# Cluster DNS (needs root): CoreDNS serves cluster.local from the API server on
#   port 53 of an address of its own on the loopback device, 10.96.0.10 (the
#   kube-dns Service's ClusterIP, as on kubeadm clusters) or the next free one
#   of a cluster beside; written to cluster-dns.env as CLUSTER_DNS for the real
#   node's kubelet (its pods' resolv.conf). The rest of the service range is made unroutable
#   (blackhole route). DEEPTUNE_CLUSTER_DNS=off starts none (the default, auto,
#   skips it with a warning when not root). Names outside the cluster get
#   NXDOMAIN: nothing is forwarded off this machine.
# Other knobs: DEEPTUNE_CLUSTER_VERBOSITY (klog -v, default 2),
#   DEEPTUNE_CLUSTER_TIMEOUT (seconds to wait for readiness, default 180).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
. "$HERE/versions.sh"

STATE="${DEEPTUNE_CLUSTER_DIR:-/tmp/deeptune-cluster}"
TIMEOUT="${DEEPTUNE_CLUSTER_TIMEOUT:-180}"
VERBOSITY="${DEEPTUNE_CLUSTER_VERBOSITY:-2}"
SERVICE_CIDR=10.96.0.0/16
SERVICE_IP=10.96.0.1    # first address of SERVICE_CIDR: the `kubernetes` Service
CLUSTER_DOMAIN=cluster.local
# CoreDNS's addresses, one per cluster on this machine: 10.96.0.10 to
# 10.96.0.254, in the band at the bottom of SERVICE_CIDR that the API server
# keeps for ClusterIPs asked for by address (kubeadm's kube-dns is 10.96.0.10).
DNS_PREFIX=10.96.0.
# Held while an address is chosen and its CoreDNS starts, and by down.sh while it
# removes one: shared by every cluster on this machine.
DNS_LOCK=/run/lock/deeptune-cluster-dns.lock
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler)

case "${1:-}" in
  "") ;;
  -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "up.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
esac

log() { printf '[up.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in openssl curl setsid nohup; do
  command -v "$tool" >/dev/null || die "$tool is required (apt-get install $tool)"
done

case "${DEEPTUNE_CLUSTER_DNS:-auto}" in
  off) WANT_DNS=false ;;
  auto)
    WANT_DNS=true
    if [ "$(id -u)" != 0 ]; then
      log "warning: not root, so no cluster DNS (CoreDNS binds port 53 on the pods' bridge); DEEPTUNE_CLUSTER_DNS=off silences this"
      WANT_DNS=false
    fi ;;
  *) die "DEEPTUNE_CLUSTER_DNS must be auto or off, got '$DEEPTUNE_CLUSTER_DNS'" ;;
esac
if $WANT_DNS; then
  for tool in ip ss; do
    command -v "$tool" >/dev/null || die "$tool is required for the cluster DNS (apt-get install iproute2), or set DEEPTUNE_CLUSTER_DNS=off"
  done
  COMPONENTS+=(coredns)
fi

KUBECONFIG_PATH="$STATE/kubeconfig"

# --- helpers -----------------------------------------------------------------

pid_alive() {  # pid_alive NAME: the process in $STATE/NAME.pid is running
  local pid
  pid=$(cat "$STATE/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

api_get() {  # api_get PATH: GET from the apiserver as admin, body on stdout
  curl -sf --max-time 5 --cacert "$STATE/pki/ca.crt" \
    --cert "$STATE/pki/admin.crt" --key "$STATE/pki/admin.key" \
    "https://127.0.0.1:$APISERVER_PORT$1"
}

# dns_answers SERVER NAME IP: SERVER's answer for NAME (A) is IP, and only IP.
dns_answers() {
  [ "$(python3 "$HERE/dns_query.py" "$1" "$2" 2>/dev/null)" = "NOERROR $3" ]
}

# dns_listener ADDRESS: something listens on ADDRESS port 53 (UDP or TCP).
dns_listener() {
  ss -Hlntu 2>/dev/null | awk -v a="$1:53" '$5 == a { found = 1 } END { exit !found }'
}

healthy() {  # every process alive, apiserver ready, kcm and scheduler healthy, DNS answers
  local c
  [ -f "$STATE/ports.env" ] && [ -f "$KUBECONFIG_PATH" ] || return 1
  # shellcheck disable=SC1091
  . "$STATE/ports.env"
  if $WANT_DNS; then
    [ -f "$STATE/cluster-dns.env" ] || return 1
    # shellcheck disable=SC1091
    . "$STATE/cluster-dns.env"
  fi
  for c in "${COMPONENTS[@]}"; do pid_alive "$c" || return 1; done
  [ "$(api_get /readyz 2>/dev/null)" = ok ] || return 1
  curl -skf --max-time 5 "https://127.0.0.1:$KCM_PORT/healthz" >/dev/null || return 1
  curl -skf --max-time 5 "https://127.0.0.1:$SCHEDULER_PORT/healthz" >/dev/null || return 1
  if $WANT_DNS; then
    dns_answers "$CLUSTER_DNS" "kubernetes.default.svc.$CLUSTER_DOMAIN" "$SERVICE_IP" || return 1
  fi
}

port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# free_ports N: N distinct ports that nothing listens on now (the OS picks them;
# each is held until all are chosen, so no two are the same).
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
held = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in held:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in held))
PY
}

CHOSEN_PORTS=" "
pick_port() {  # pick_port VALUE DEFAULT NAME: sets PORT; 0 takes the next of FREE_PORTS
  local p=${1:-$2}
  if [ "$p" = 0 ]; then p=${FREE_PORTS[0]}; FREE_PORTS=("${FREE_PORTS[@]:1}"); fi
  [[ "$p" =~ ^[0-9]+$ ]] || die "$3 must be a port number, got '$p'"
  [[ "$CHOSEN_PORTS" != *" $p "* ]] || die "port $p ($3) is given to two components; set $3 to another port, or 0 for a free one"
  port_in_use "$p" && die "port $p ($3) on 127.0.0.1 is already in use; set $3 to another port, or 0 for a free one"
  CHOSEN_PORTS+="$p "
  PORT=$p
}

# --- already up? --------------------------------------------------------------

# One up.sh at a time per state dir (parallel test workers may all call it).
mkdir -p "$(dirname "$STATE")"
exec 8>"$STATE.lock"
flock 8

if [ -d "$STATE" ] && [ -n "$(ls -A "$STATE")" ]; then   # an empty dir (mkdtemp's) is a new one
  if healthy; then
    log "cluster already up and healthy (state: $STATE, apiserver https://127.0.0.1:$APISERVER_PORT)"
    echo "export KUBECONFIG=$KUBECONFIG_PATH"
    exit 0
  fi
  log "found a stale or unhealthy cluster in $STATE; stopping it and starting from scratch"
  bash "$HERE/down.sh"
fi

# --- binaries -----------------------------------------------------------------

BIN_PATH=$(bash "$HERE/build.sh" --print-path)
export PATH="$BIN_PATH:$PATH"
for c in "${COMPONENTS[@]}"; do
  command -v "$c" >/dev/null || die "$c not found in $BIN_PATH"
done

START=$(date +%s)
# On failure stop whatever was started, keeping the state dir (logs) for a look;
# the next up.sh clears it.
on_exit() {
  local rc=$?
  exec 7>&-   # DNS_LOCK, if held: down.sh takes it
  if [ "$rc" -ne 0 ]; then
    log "failed; stopping the processes started so far (logs kept in $STATE)"
    bash "$HERE/down.sh" --keep-state || true
  fi
  exit "$rc"
}
trap on_exit EXIT
mkdir -p "$STATE"/{pki,etcd,kcm-certs,scheduler-certs,apiserver-certs}
chmod 700 "$STATE" "$STATE/etcd"
touch "$STATE/.deeptune-cluster"   # lets down.sh know it may delete this dir

read -r -a FREE_PORTS <<< "$(free_ports 5)"   # for the ports set to 0
pick_port "${DEEPTUNE_APISERVER_PORT:-}" 6443 DEEPTUNE_APISERVER_PORT; APISERVER_PORT=$PORT
pick_port "${DEEPTUNE_ETCD_PORT:-}" 2379 DEEPTUNE_ETCD_PORT; ETCD_PORT=$PORT
pick_port "${DEEPTUNE_ETCD_PEER_PORT:-}" 2380 DEEPTUNE_ETCD_PEER_PORT; ETCD_PEER_PORT=$PORT
pick_port "${DEEPTUNE_KCM_PORT:-}" 10257 DEEPTUNE_KCM_PORT; KCM_PORT=$PORT
pick_port "${DEEPTUNE_SCHEDULER_PORT:-}" 10259 DEEPTUNE_SCHEDULER_PORT; SCHEDULER_PORT=$PORT

# --- certificates -------------------------------------------------------------

PKI="$STATE/pki"
log "generating certificates in $PKI"
(
  cd "$PKI"
  umask 077
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
    -subj "/CN=deeptune-local-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null

  # sign NAME SUBJECT EXTENSIONS: NAME.key + NAME.crt signed by the CA.
  sign() {
    openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out "$1.crt" -days 3650 -sha256 -extfile "$1.ext" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
  }
  client_ext=$'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth'
  sign apiserver "/CN=kube-apiserver" \
    $'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n'"subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:$SERVICE_IP"
  sign admin "/O=system:masters/CN=kubernetes-admin" "$client_ext"
  sign kube-controller-manager "/CN=system:kube-controller-manager" "$client_ext"
  sign kube-scheduler "/CN=system:kube-scheduler" "$client_ext"
  sign coredns "/CN=system:coredns" "$client_ext"   # see "cluster DNS" below
  # The API server's identity towards kubelets (logs, exec, port-forward on a real node: node.sh).
  sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client_ext"

  # Front-proxy (request-header) CA and client: published by the apiserver in
  # kube-system/extension-apiserver-authentication, which the controller
  # manager and scheduler read for their delegated authentication (without it
  # they log errors); also what aggregated API servers would need.
  openssl req -x509 -newkey rsa:2048 -nodes -keyout front-proxy-ca.key -out front-proxy-ca.crt -days 3650 \
    -subj "/CN=deeptune-local-front-proxy-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout front-proxy-client.key -out front-proxy-client.csr \
    -subj "/CN=front-proxy-client" 2>/dev/null
  printf '%s\n' "$client_ext" > front-proxy-client.ext
  openssl x509 -req -in front-proxy-client.csr -CA front-proxy-ca.crt -CAkey front-proxy-ca.key \
    -CAcreateserial -out front-proxy-client.crt -days 3650 -sha256 -extfile front-proxy-client.ext 2>/dev/null
  rm -f front-proxy-client.csr front-proxy-client.ext

  # Service-account token signing key pair.
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
)

b64() { base64 -w0 < "$1"; }

write_kubeconfig() {  # write_kubeconfig FILE CERTNAME USER
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: deeptune-local
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: $3
  user:
    client-certificate-data: $(b64 "$PKI/$2.crt")
    client-key-data: $(b64 "$PKI/$2.key")
contexts:
- name: $3@deeptune-local
  context:
    cluster: deeptune-local
    user: $3
    namespace: default
current-context: $3@deeptune-local
EOF
  chmod 600 "$1"
}
write_kubeconfig "$STATE/kube-controller-manager.kubeconfig" kube-controller-manager system:kube-controller-manager
write_kubeconfig "$STATE/kube-scheduler.kubeconfig" kube-scheduler system:kube-scheduler
write_kubeconfig "$STATE/coredns.kubeconfig" coredns system:coredns

cat > "$STATE/ports.env" <<EOF
APISERVER_PORT=$APISERVER_PORT
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
KCM_PORT=$KCM_PORT
SCHEDULER_PORT=$SCHEDULER_PORT
EOF

# --- processes ----------------------------------------------------------------

start() {  # start NAME ARGS...: run NAME detached, logging to NAME.log
  local name=$1; shift
  # setsid: own session, so the process survives this script, its terminal and
  # its process group; nohup: ignore SIGHUP. $! is the component's pid since
  # both exec (a background job of a non-interactive shell is no group leader).
  # 8>&- 7>&-: the component must not inherit (and so hold) up.sh's locks.
  nohup setsid "$name" "$@" > "$STATE/$name.log" 2>&1 < /dev/null 8>&- 7>&- &
  echo $! > "$STATE/$name.pid"
  log "started $name (pid $!, log $STATE/$name.log)"
}

wait_for() {  # wait_for DESCRIPTION COMMAND...: poll until COMMAND succeeds
  local what=$1; shift
  local deadline=$(( $(date +%s) + TIMEOUT )) c
  until "$@" >/dev/null 2>&1; do
    for c in "${COMPONENTS[@]}"; do
      if [ -f "$STATE/$c.pid" ] && ! pid_alive "$c"; then
        log "$c exited; last lines of $STATE/$c.log:"
        tail -n 30 "$STATE/$c.log" >&2 || true
        die "$c failed to start (waiting for $what)"
      fi
    done
    if [ "$(date +%s)" -ge "$deadline" ]; then
      die "timed out after ${TIMEOUT}s waiting for $what (logs in $STATE)"
    fi
    sleep 0.5
  done
}

start etcd \
  --name=deeptune \
  --data-dir="$STATE/etcd" \
  --listen-client-urls="http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster="deeptune=http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster-state=new \
  --unsafe-no-fsync=true \
  --log-level=warn
wait_for "etcd health" curl -sf --max-time 2 "http://127.0.0.1:$ETCD_PORT/health"

start kube-apiserver \
  --v="$VERBOSITY" \
  --bind-address=127.0.0.1 \
  --advertise-address=127.0.0.1 \
  --secure-port="$APISERVER_PORT" \
  --cert-dir="$STATE/apiserver-certs" \
  --tls-cert-file="$PKI/apiserver.crt" \
  --tls-private-key-file="$PKI/apiserver.key" \
  --client-ca-file="$PKI/ca.crt" \
  --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
  --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User \
  --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --proxy-client-cert-file="$PKI/front-proxy-client.crt" \
  --proxy-client-key-file="$PKI/front-proxy-client.key" \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --service-cluster-ip-range="$SERVICE_CIDR" \
  --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
  --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
  --kubelet-preferred-address-types=InternalIP,Hostname \
  --authorization-mode=Node,RBAC \
  --allow-privileged=true \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$PKI/sa.pub" \
  --service-account-signing-key-file="$PKI/sa.key" \
  --endpoint-reconciler-type=none
wait_for "kube-apiserver /readyz" bash -c "[ \"\$(curl -sf --max-time 5 --cacert '$PKI/ca.crt' --cert '$PKI/admin.crt' --key '$PKI/admin.key' https://127.0.0.1:$APISERVER_PORT/readyz)\" = ok ]"

# The tests' claims are bound to their PVs up front (volumeName + claimRef). A claim that reaches the
# PV controller before its PV is in the controller's cache waits for the next periodic sync: 15 s by
# default, 0.6-14 s per namespace measured. A 1 s sync binds them in about a second.
start kube-controller-manager \
  --v="$VERBOSITY" \
  --kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
  --authentication-kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
  --authorization-kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 \
  --secure-port="$KCM_PORT" \
  --cert-dir="$STATE/kcm-certs" \
  --leader-elect=false \
  --controllers='*' \
  --use-service-account-credentials=true \
  --service-account-private-key-file="$PKI/sa.key" \
  --root-ca-file="$PKI/ca.crt" \
  --cluster-signing-cert-file="$PKI/ca.crt" \
  --cluster-signing-key-file="$PKI/ca.key" \
  --service-cluster-ip-range="$SERVICE_CIDR" \
  --node-monitor-grace-period=8760h \
  --node-startup-grace-period=8760h \
  --pvclaimbinder-sync-period=1s

start kube-scheduler \
  --v="$VERBOSITY" \
  --kubeconfig="$STATE/kube-scheduler.kubeconfig" \
  --authentication-kubeconfig="$STATE/kube-scheduler.kubeconfig" \
  --authorization-kubeconfig="$STATE/kube-scheduler.kubeconfig" \
  --bind-address=127.0.0.1 \
  --secure-port="$SCHEDULER_PORT" \
  --cert-dir="$STATE/scheduler-certs" \
  --leader-elect=false

wait_for "kube-controller-manager /healthz" curl -skf --max-time 2 "https://127.0.0.1:$KCM_PORT/healthz"
wait_for "kube-scheduler /healthz" curl -skf --max-time 2 "https://127.0.0.1:$SCHEDULER_PORT/healthz"
wait_for "the default ServiceAccount in namespace default" api_get /api/v1/namespaces/default/serviceaccounts/default

write_kubeconfig "$KUBECONFIG_PATH.tmp" admin kubernetes-admin

# --- cluster DNS ----------------------------------------------------------------
# CoreDNS as kubeadm deploys it, but as a process: the kubernetes plugin reads
# Services, EndpointSlices and Namespaces from the API server as system:coredns
# (a client certificate, bound to a ClusterRole that may only list and watch
# those). The control plane has no kube-proxy (only node.sh's real node runs one),
# so the kube-dns Service's ClusterIP is made a real address instead, on the
# loopback device, where CoreDNS listens: this machine reaches it with or without
# a node. Pods find it through CLUSTER_DNS in cluster-dns.env, which node.sh gives
# the kubelet as its clusterDNS, and reach it through kube-proxy and the bridge.
# Every other address of the service range gets a blackhole route, so that
# nothing dialling a ClusterIP leaves the machine through the default route.
if $WANT_DNS; then
  exec 7>"$DNS_LOCK"
  flock 7
  [ -n "$(ip route show type blackhole "$SERVICE_CIDR")" ] || ip route add blackhole "$SERVICE_CIDR"
  # An address where no CoreDNS listens: unused, or left by a cluster that was
  # killed without down.sh.
  CLUSTER_DNS=''
  for i in $(seq 10 254); do
    dns_listener "$DNS_PREFIX$i" || { CLUSTER_DNS=$DNS_PREFIX$i; break; }
  done
  [ -n "$CLUSTER_DNS" ] || die "no address left for CoreDNS in ${DNS_PREFIX}10-254"
  grep -qF " $CLUSTER_DNS/32 " <<< "$(ip -o addr show dev lo)" || ip addr add "$CLUSTER_DNS/32" dev lo
  printf 'CLUSTER_DNS=%s\nCLUSTER_DOMAIN=%s\n' "$CLUSTER_DNS" "$CLUSTER_DOMAIN" > "$STATE/cluster-dns.env"

  kubectl --kubeconfig "$KUBECONFIG_PATH.tmp" apply -f - >/dev/null <<YAML
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:coredns
rules:
- apiGroups: [""]
  resources: [services, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: system:coredns
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:coredns
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: User
  name: system:coredns
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
    kubernetes.io/name: CoreDNS
spec:
  clusterIP: $CLUSTER_DNS
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
# The Service has no selector (CoreDNS is a process here), so its endpoint is written here: the
# Service's own address, where CoreDNS listens. Without one, kube-proxy (on the real node) would
# reject the pods' queries as traffic to a Service without endpoints.
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-coredns
  namespace: kube-system
  labels:
    kubernetes.io/service-name: kube-dns
    endpointslice.kubernetes.io/managed-by: up.sh.localcluster.deeptune.dev
addressType: IPv4
endpoints:
- addresses: [$CLUSTER_DNS]
  conditions: {ready: true}
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
YAML

  # The cluster's zones are the kubernetes plugin's alone (a name it does not know
  # gets NXDOMAIN from it); every other name gets NXDOMAIN from the template in
  # the root zone's block. No forward plugin: nothing leaves this machine. No
  # cache: a new pod's name resolves at once.
  cat > "$STATE/Corefile" <<COREFILE
$CLUSTER_DOMAIN:53 in-addr.arpa:53 ip6.arpa:53 {
    bind $CLUSTER_DNS
    errors
    log . {
        class denial error
    }
    kubernetes $CLUSTER_DOMAIN in-addr.arpa ip6.arpa {
        kubeconfig $STATE/coredns.kubeconfig
        pods insecure
        ttl 5
    }
}
.:53 {
    bind $CLUSTER_DNS
    errors
    log . {
        class denial error
    }
    template ANY ANY {
        rcode NXDOMAIN
    }
}
COREFILE
  start coredns -conf "$STATE/Corefile"
  wait_for "CoreDNS at $CLUSTER_DNS to answer kubernetes.default.svc.$CLUSTER_DOMAIN" \
    dns_answers "$CLUSTER_DNS" "kubernetes.default.svc.$CLUSTER_DOMAIN" "$SERVICE_IP"
  exec 7>&-
  log "cluster DNS: CoreDNS $LC_COREDNS_VERSION on $CLUSTER_DNS:53 ($CLUSTER_DOMAIN)"
fi

# The admin kubeconfig is moved into place last: its presence means "up" to healthy().
mv "$KUBECONFIG_PATH.tmp" "$KUBECONFIG_PATH"

log "Kubernetes $LC_K8S_VERSION control plane up in $(( $(date +%s) - START ))s: https://127.0.0.1:$APISERVER_PORT (state and logs: $STATE)"
echo "export KUBECONFIG=$KUBECONFIG_PATH"
