#!/usr/bin/env bash
# A real node for the local cluster: containerd + runc as the container runtime and a kubelet,
# registered as node `deeptune-real-node` with the control plane up.sh started in the same state
# dir. What kind runs inside its node container, run here directly (kind itself needs
# `docker run --privileged`, which this VM refuses).
#
#   node.sh          start it (packages, kubelet and images first if missing); wait until Ready
#   node.sh --stop   stop it and undo all it did to the machine (down.sh calls this)
#   node.sh --crash  kill all its processes at once, as a node lost (a power cut); nothing undone
#   node.sh --restart  start a crashed node again on the state it left (a reboot); then Ready again
#   node.sh --prepare  only install the packages and build the kubelet and images (no cluster needed)
#
# The node is tainted deeptune.dev/real-node=true:NoSchedule and labelled deeptune.dev/real-node=true:
# a pod runs there only if it asks to (toleration + nodeSelector).
#
# What it does to the machine, all undone by --stop:
#   - containerd (own root, state dir and socket), its shims and the pods' containers;
#   - a bridge `dtnode<N>` with 10.245.<N>.1/24 (N: the first free of 0..99, under a lock), the pods'
#     subnet. The CNI bridge plugin runs with isGateway false and ipMasq false: it touches neither
#     iptables nor ip_forward. A pod's only routes are its subnet and the service range via the
#     bridge's address, and nothing has a default route off this machine;
#   - kube-proxy in nftables mode (its tables `ip kube-proxy` and `ip6 kube-proxy`, removed at
#     stop), which routes ClusterIPs to ready pods. For that the bridge, and no other interface,
#     forwards (its own `forwarding` setting; ip_forward stays as it is), and a policy rule sends
#     what the pods address in the service range and kube-proxy did not translate to an ifb
#     device `dtsvc<N>` (a sink, routing table 24500+N): no-endpoint Services and wrong ports are
#     refused by kube-proxy there, an unused ClusterIP goes nowhere;
#   - an nftables table `deeptune-dtnode<N>`: it drops anything the bridge would forward to another
#     interface than itself and the sink, and takes the pods' connections to the API server's
#     Service (10.96.0.1:443) to the API server on 127.0.0.1 (route_localnet on the bridge), as
#     that Service has no endpoints (a loopback address may not be one);
#   - the pods' network namespaces and mounts (all under the state dir);
#   - a cgroup /deeptune-<key> in every cgroup v1 hierarchy (the kubelet's cgroupRoot);
#   - the kernel settings the kubelet sets (vm.overcommit_memory, kernel.panic, ...): restored;
#   - /var/lib/kubelet, /var/log/containers, /var/lib/cni and /run/containerd, which the kubelet,
#     the CNI library and the shims make whatever their configured roots: removed if they made them.
# Images: images.sh builds them into a containerd root, $LC_CACHE/containerd-images; each node's
# root starts as hard links to it (below).
# One real node per machine: kube-proxy's tables are named for it alone, and every local cluster
# uses the same service range. A second node.sh says which node runs and how to stop it.
# DEEPTUNE_NODE_GPUS=N advertises N `nvidia.com/gpu` in the node's capacity, by a PATCH of its status
# as Kubernetes' "Advertise Extended Resources for a Node" does: GPU requests schedule and are admitted
# (no device plugin owns the resource, so the kubelet allocates nothing); pods get no device.
# State: ${DEEPTUNE_CLUSTER_DIR:-/tmp/deeptune-cluster}/node.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
. "$HERE/versions.sh"

CLUSTER="${DEEPTUNE_CLUSTER_DIR:-/tmp/deeptune-cluster}"
CLUSTER="${CLUSTER%/}"
S="$CLUSTER/node"
NODE_NAME=deeptune-real-node
TIMEOUT="${DEEPTUNE_CLUSTER_TIMEOUT:-180}"
GPUS="${DEEPTUNE_NODE_GPUS:-0}"
SUBNET_LOCK=/run/lock/deeptune-node-subnet.lock
# Held by the running node's kube-proxy (it inherits the descriptor); holds that node's cluster dir.
PROXY_LOCK=/run/lock/deeptune-kube-proxy.lock
SERVICE_CIDR=10.96.0.0/16   # up.sh's --service-cluster-ip-range
# The kernel settings the kubelet's container manager sets at start (setupKernelTunables).
# Directories the kubelet, CNI and containerd's shims make whatever their configured roots say.
FIXED_DIRS=(/var/lib/kubelet /var/log/containers /var/lib/cni /run/containerd)
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

log() { printf '[node.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

ctr_() { ctr --address "$S/containerd/containerd.sock" --namespace k8s.io "$@"; }

pid_alive() { [ -f "$S/$1.pid" ] && kill -0 "$(cat "$S/$1.pid")" 2>/dev/null; }

# --- stop ---------------------------------------------------------------------------------------

# The pids of the processes whose command line names our containerd socket (its shims), and what
# runs in the cgroups under our cgroup root (the containers).
our_processes() {
  local pid
  for pid in $(pgrep -f -- "-address $S/containerd/containerd.sock" || true); do echo "$pid"; done
  if [ -f "$S/cgroup-root" ]; then
    find /sys/fs/cgroup/*/"$(cat "$S/cgroup-root")" -name cgroup.procs -exec cat {} + 2>/dev/null || true
  fi
}

stop_process() {  # stop_process NAME: SIGTERM the process in NAME.pid; SIGKILL it after 10 s
  pid_alive "$1" || return 0
  log "stopping $1"
  kill -TERM "$(cat "$S/$1.pid")"
  for _ in $(seq 50); do pid_alive "$1" || return 0; sleep 0.2; done
  kill -KILL "$(cat "$S/$1.pid")" 2>/dev/null || true
}

stop_node() {
  [ -d "$S" ] || { log "no node in $CLUSTER"; return 0; }
  local pids
  stop_process kube-proxy
  if [ -f "$S/kube-proxy.pid" ]; then   # its tables, which it leaves behind by design
    nft delete table ip kube-proxy 2>/dev/null || true
    nft delete table ip6 kube-proxy 2>/dev/null || true
  fi
  stop_process kubelet
  if pid_alive containerd; then   # the containers, while containerd still answers
    ctr_ tasks ls -q 2>/dev/null | while read -r task; do ctr_ tasks kill -s SIGKILL "$task" >/dev/null 2>&1 || true; done
  fi
  stop_process containerd
  for _ in 1 2 3; do
    pids=$(our_processes | sort -u)
    [ -n "$pids" ] || break
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.3
  done
  # Mounts under the state dir (container rootfs, the pods' network namespaces, volumes), deepest first.
  awk -v s="$S/" 'index($2, s) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  if [ -f "$S/nft-table" ]; then
    nft delete table ip "$(cat "$S/nft-table")" 2>/dev/null || true
  fi
  if [ -f "$S/route-table" ]; then
    ip rule del priority "$(cat "$S/route-table")" 2>/dev/null || true
  fi
  if [ -f "$S/sink" ]; then   # the route to it goes with it
    ip link del "$(cat "$S/sink")" 2>/dev/null || true
  fi
  if [ -f "$S/bridge" ]; then   # its route_localnet and forwarding settings go with it
    ip link del "$(cat "$S/bridge")" 2>/dev/null || true
  fi
  if [ -f "$S/cgroup-root" ]; then   # deepest first; a cgroup goes once its processes have
    find /sys/fs/cgroup/*/"$(cat "$S/cgroup-root")" -depth -type d -exec rmdir {} + 2>/dev/null || true
  fi
  if [ -f "$S/sysctl.before" ]; then
    while IFS='=' read -r key value; do
      [ "$(sysctl -n "$key" 2>/dev/null)" = "$value" ] || sysctl -qw "$key=$value" || true
    done < "$S/sysctl.before"
  fi
  if [ -f "$S/made-dirs" ] && ! pgrep -f "containerd --config .*/node/containerd.toml" >/dev/null; then
    while read -r dir; do rm -rf "$dir"; done < "$S/made-dirs"   # unless another real node uses them
  fi
  rm -rf "$S"
  log "stopped the node; removed $S"
}

# --- the node's processes: started at start, and again by --restart on the same state ---------------

use_node_binaries() {  # the kubelet and kube-proxy build.sh made, and the cluster's tools, on PATH
  PATH="$(bash "$HERE/build.sh" --with-node --print-path):$PATH"
  KUBELET="$LC_NODE_BIN/kubelet"
  KUBE_PROXY="$LC_NODE_BIN/kube-proxy"
}

start_containerd() {
  nohup setsid containerd --config "$S/containerd.toml" > "$S/containerd.log" 2>&1 < /dev/null 5>&- 7>&- 8>&- 9>&- &
  echo $! > "$S/containerd.pid"
  for _ in $(seq 100); do ctr_ version >/dev/null 2>&1 && break; pid_alive containerd || break; sleep 0.1; done
  ctr_ version >/dev/null 2>&1 || { tail -20 "$S/containerd.log" >&2; die "containerd did not start"; }
}

kc() { kubectl --kubeconfig "$CLUSTER/kubeconfig" "$@"; }

start_kubelet() {  # and wait (until $deadline) for the node to be Ready
  nohup setsid "$KUBELET" --config "$S/kubelet.yaml" --kubeconfig "$S/kubelet.kubeconfig" \
    --root-dir "$S/kubelet" --hostname-override "$NODE_NAME" --node-ip "$GATEWAY" \
    --node-labels deeptune.dev/real-node=true --v 2 \
    >> "$S/kubelet.log" 2>&1 < /dev/null 5>&- 7>&- 8>&- 9>&- &
  echo $! > "$S/kubelet.pid"
  until [ "$(kc get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]; do
    pid_alive kubelet || { tail -30 "$S/kubelet.log" >&2; die "the kubelet exited"; }
    [ "$(date +%s)" -lt "$deadline" ] || { tail -30 "$S/kubelet.log" >&2; die "the node was not Ready after ${TIMEOUT}s"; }
    sleep 0.5
  done
}

start_kube_proxy() {  # it takes fd 5, the machine's lock, and this script lets go of it
  nohup setsid "$KUBE_PROXY" --config "$S/kube-proxy.yaml" --v 2 \
    >> "$S/kube-proxy.log" 2>&1 < /dev/null 7>&- 8>&- 9>&- &
  echo $! > "$S/kube-proxy.pid"
  exec 5>&-
  until curl -sf --max-time 2 "http://127.0.0.1:$PROXY_HEALTHZ_PORT/healthz" >/dev/null; do
    pid_alive kube-proxy || { tail -30 "$S/kube-proxy.log" >&2; die "kube-proxy exited"; }
    [ "$(date +%s)" -lt "$deadline" ] || { tail -30 "$S/kube-proxy.log" >&2; die "kube-proxy was not healthy after ${TIMEOUT}s"; }
    sleep 0.5
  done
}

advertise_gpus() {
  [ "$GPUS" != 0 ] || return 0
  kc patch node "$NODE_NAME" --subresource=status --type=json \
    -p "[{\"op\": \"add\", \"path\": \"/status/capacity/nvidia.com~1gpu\", \"value\": \"$GPUS\"}]" >/dev/null
  until [ "$(kc get node "$NODE_NAME" -o 'jsonpath={.status.allocatable.nvidia\.com/gpu}')" = "$GPUS" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || die "the node's allocatable did not take $GPUS nvidia.com/gpu"
    sleep 0.5
  done
}

take_the_machines_lock() {  # fd 5, until kube-proxy holds it
  exec 5<>"$PROXY_LOCK"
  flock -n 5 || die "the cluster in $(cat "$PROXY_LOCK") has a real node on this machine, and kube-proxy's tables are one per machine: stop it first (DEEPTUNE_CLUSTER_DIR=$(cat "$PROXY_LOCK") $0 --stop)"
  echo "$CLUSTER" > "$PROXY_LOCK"
}

# --crash: the node lost at once, as at a power cut: every process SIGKILLed, nothing cleaned up.
crash_node() {
  [ -d "$S" ] || die "no node in $CLUSTER"
  local name pids
  for name in kube-proxy kubelet containerd; do
    ! pid_alive "$name" || kill -KILL "$(cat "$S/$name.pid")"
  done
  # Until all are gone, as after a power cut: a trainer with gigabytes to free can take a while to
  # exit on a busy machine, and must not be seen running after the crash.
  for _ in $(seq 100); do
    pids=$(our_processes | sort -u)
    [ -n "$pids" ] || break
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.3
  done
  [ -z "$(our_processes)" ] || die "processes of the node outlived 30 s of SIGKILL: $(our_processes | sort -u | tr '\n' ' ')"
  log "crashed the node: kube-proxy, the kubelet, containerd, its shims and the containers killed"
}

# --restart: the crashed node back on the state it left (containerd's root and the kubelet's, the
# network, the configuration), as after a reboot: no container survived, and the kubelet finds out.
restart_node() {
  [ -f "$S/node.env" ] || die "no node to restart in $CLUSTER"
  ! pid_alive kubelet && ! pid_alive containerd && ! pid_alive kube-proxy || die "the node in $S still runs"
  use_node_binaries
  take_the_machines_lock
  # shellcheck disable=SC1091
  . "$S/node.env"
  deadline=$(( $(date +%s) + TIMEOUT ))
  start_containerd
  start_kubelet
  start_kube_proxy
  advertise_gpus
  log "node $NODE_NAME is back and Ready (state in $S)"
}

prepare_only=false
case "${1:-}" in
  "") ;;
  --stop) stop_node; exit 0 ;;
  --crash) crash_node; exit 0 ;;
  --restart) restart_node; exit 0 ;;
  --prepare) prepare_only=true ;;
  -h|--help) sed -n '2,45p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown argument: $1 (try --help)" ;;
esac

# --- start --------------------------------------------------------------------------------------

[ "$(id -u)" = 0 ] || die "a real node needs root (containerd, network namespaces, cgroups)"

# The kubelet's cgroups go in a root of their own in each cgroup v1 hierarchy (below); this machine
# kind mounts v1. A v2-only host would need that root made and its controllers enabled the v2 way.
[ -f /sys/fs/cgroup/memory/cgroup.procs ] \
  || die "node.sh knows cgroup v1 hierarchies only (/sys/fs/cgroup/memory); this host has none"

# Debian packages: the runtime, CNI plugins, and what images.sh builds the images with.
missing=()
need() { "${@:2}" >/dev/null 2>&1 || missing+=("$1"); }
need containerd command -v containerd
need runc command -v runc
need containernetworking-plugins test -x /usr/lib/cni/bridge
need iproute2 command -v ip
need nftables command -v nft
need debootstrap command -v debootstrap
need docker.io command -v dockerd
need gcc command -v gcc
need gpg command -v gpg
need curl command -v curl
need libc6-dev test -f /usr/lib/x86_64-linux-gnu/libc.a -o -f /usr/lib/aarch64-linux-gnu/libc.a
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "install ${missing[*]} (Debian package names)"
  log "installing ${missing[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; } \
    || die "apt-get could not install ${missing[*]}"
fi

use_node_binaries
# The images, in a containerd root images.sh keeps in $LC_CACHE; a node's root starts as hard links
# to it: ~1 s, where importing the ~7 GB trainer image takes ~90 s. The metadata databases are
# copied, as containerd writes them in place; the layers' files are only ever read (overlayfs lower
# directories), and what a node adds (containers, their snapshots) is its own.
STORE=$(bash "$HERE/images.sh")
$prepare_only && { log "packages, kubelet and images ready"; exit 0; }

[ -f "$CLUSTER/.deeptune-cluster" ] && [ -f "$CLUSTER/ports.env" ] || die "no cluster in $CLUSTER: run up.sh first"
if pid_alive kubelet && pid_alive containerd; then log "the node is already running in $S"; exit 0; fi
[ ! -d "$S" ] || stop_node   # a half-started or dead node: start over
take_the_machines_lock
# shellcheck disable=SC1091
. "$CLUSTER/ports.env"
# shellcheck disable=SC1091
[ ! -f "$CLUSTER/cluster-dns.env" ] || . "$CLUSTER/cluster-dns.env"

on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    log "failed; undoing what was started (logs: $S/*.log, kept in $CLUSTER/node-failed)"
    rm -rf "$CLUSTER/node-failed"; mkdir -p "$CLUSTER/node-failed"
    cp "$S"/*.log "$CLUSTER/node-failed/" 2>/dev/null || true
    stop_node || true
  fi
  exit "$rc"
}
trap on_exit EXIT
mkdir -p "$S"/{containerd,cni/net.d,cni/ipam,kubelet,pod-logs,pki}
chmod 700 "$S"

# Undone by --stop: the kernel settings as they are now, and the directories the kubelet makes.
for key in "${SYSCTLS[@]}"; do echo "$key=$(sysctl -n "$key")"; done > "$S/sysctl.before"
for dir in "${FIXED_DIRS[@]}"; do
  [ -e "$dir" ] || echo "$dir" >> "$S/made-dirs"
done

# --- network: the pods' bridge and subnet ---------------------------------------------------------
exec 7>>"$SUBNET_LOCK"; flock 7
for n in $(seq 0 99); do
  ip link show "dtnode$n" >/dev/null 2>&1 || ip -4 route show | grep -q "^10\.245\.$n\.0/24" || break
done
[ "$n" -lt 99 ] || die "no free pod subnet among 10.245.0-99.0/24"
BRIDGE="dtnode$n" GATEWAY="10.245.$n.1" SUBNET="10.245.$n.0/24" SINK="dtsvc$n" ROUTE_TABLE=$((24500 + n))
echo "$BRIDGE" > "$S/bridge"
ip link add "$BRIDGE" type bridge
ip addr add "$GATEWAY/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
# What kube-proxy refuses it refuses in the forward hook, so the pods' service range must be
# forwarded somewhere that stays here: an ifb device, which drops all it is given unless tc
# redirects to it (as a dummy device would; this kernel has no dummy driver). Back onto the bridge
# would do, but then the host's ICMP redirects teach the pods to look for ClusterIPs on the wire
# themselves (send_redirects cannot be turned off for one interface).
echo "$SINK" > "$S/sink"
ip link add "$SINK" type ifb
ip link set "$SINK" up
echo "$ROUTE_TABLE" > "$S/route-table"
ip rule add iif "$BRIDGE" lookup "$ROUTE_TABLE" priority "$ROUTE_TABLE"
ip route add "$SERVICE_CIDR" dev "$SINK" table "$ROUTE_TABLE"
sysctl -qw "net.ipv4.conf.$BRIDGE.forwarding=1"
exec 7>&-
cat > "$S/cni/net.d/10-deeptune.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "deeptune-node", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": false, "ipMasq": false, "hairpinMode": false,
   "ipam": {"type": "host-local", "dataDir": "$S/cni/ipam",
            "ranges": [[{"subnet": "$SUBNET", "rangeStart": "10.245.$n.10"}]],
            "routes": [{"dst": "$SERVICE_CIDR", "gw": "$GATEWAY"}]}},
  {"type": "loopback"}]}
EOF

# --- the node's own table: nothing forwarded off the bridge; the `kubernetes` Service ------------
# The bridge forwards (for kube-proxy), so a pod that made itself a default route through the host
# would be forwarded out of this machine: the forward chain drops whatever leaves the bridge for
# another interface than itself and the sink. The API server's Service (10.96.0.1:443, which the
# kubelet puts in every pod's environment) has no endpoints (its address would be a loopback one,
# which Endpoints may not hold), so kube-proxy would refuse it; this table translates it first:
# from the pods' bridge, 10.96.0.1:443 goes to the API server on 127.0.0.1 (route_localnet, on this
# bridge only, lets a packet from it reach a loopback address).
# CoreDNS is a process listening on kube-dns's ClusterIP itself (up.sh), so the Service's endpoint
# is its own ClusterIP: kube-proxy's check after DNAT ("traffic to invalid ports of ClusterIPs")
# refuses what this machine sends it. The machine's own queries (up.sh's, smoke.sh's, the tests')
# and CoreDNS's answers to them (on lo; those to pods leave on the bridge) go untracked, so no NAT
# and no such check touch them, as before the node was there; pods' queries arrive on the bridge
# and are delivered locally, which that check never sees.
NFT_TABLE="deeptune-$BRIDGE"
echo "$NFT_TABLE" > "$S/nft-table"
sysctl -qw "net.ipv4.conf.$BRIDGE.route_localnet=1"
HOST_DNS_RULES=''
[ -z "${CLUSTER_DNS:-}" ] || HOST_DNS_RULES="ip daddr $CLUSTER_DNS meta l4proto { tcp, udp } th dport 53 notrack
    oifname lo ip saddr $CLUSTER_DNS meta l4proto { tcp, udp } th sport 53 notrack"
nft -f - <<EOF
table ip $NFT_TABLE {
  chain output {
    type filter hook output priority raw; policy accept;
    $HOST_DNS_RULES
  }
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    iifname "$BRIDGE" ip daddr 10.96.0.1 tcp dport 443 dnat to 127.0.0.1:$APISERVER_PORT
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "$BRIDGE" oifname != { "$BRIDGE", "$SINK" } counter drop comment "off-machine"
  }
}
EOF

# --- cgroups: the kubelet's cgroup root, in every v1 hierarchy -----------------------------------
CGROUP_ROOT="deeptune-$(basename "$CLUSTER" | tr -c 'a-zA-Z0-9-\n' -)"
echo "$CGROUP_ROOT" > "$S/cgroup-root"
for h in /sys/fs/cgroup/*/; do
  [ -f "$h/cgroup.procs" ] || continue
  mkdir -p "$h$CGROUP_ROOT"
  if [ -f "$h/cpuset.cpus" ]; then   # a new cpuset holds no CPUs until given its parent's
    cat "$h/cpuset.cpus" > "$h$CGROUP_ROOT/cpuset.cpus"
    cat "$h/cpuset.mems" > "$h$CGROUP_ROOT/cpuset.mems"
  fi
done

# --- containerd -------------------------------------------------------------------------------------
cat > "$S/containerd.toml" <<EOF
version = 2
root = "$S/containerd/root"
state = "$S/containerd/state"
[grpc]
  address = "$S/containerd/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$S/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$LC_PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # The VM withholds CAP_SYS_RESOURCE even from root: without this every sandbox fails.
  restrict_oom_score_adj = true
  # The pods' network namespaces under the state dir, not /var/run/netns: --stop finds them all.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$S/cni/net.d"
EOF
exec 6>"$LC_CACHE/.containerd-images.lock"
flock -s 6   # images.sh changes the store only under this lock, held alone
if cp -al "$STORE" "$S/containerd/root" 2>/dev/null; then
  find "$STORE" -name '*.db' -printf '%P\n' | while read -r db; do
    cp --remove-destination "$STORE/$db" "$S/containerd/root/$db"
  done
else   # the cache on another filesystem than the state dir: a copy
  rm -rf "$S/containerd/root"
  cp -a "$STORE" "$S/containerd/root"
fi
exec 6>&-
start_containerd

# --- the node's credentials: client certificates signed by the cluster CA --------------------------
PKI="$CLUSTER/pki"
# client_kubeconfig NAME SUBJECT: NAME.crt/.key in $S/pki and $S/NAME.kubeconfig, for that subject.
client_kubeconfig() {
  local name=$1 subject=$2
  (
    cd "$S/pki"; umask 077
    openssl req -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "$subject" 2>/dev/null
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
      -out "$name.crt" -days 365 -sha256 -extfile "$name.ext" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
  )
  cat > "$S/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: deeptune-local
  cluster: {server: "https://127.0.0.1:$APISERVER_PORT", certificate-authority: "$PKI/ca.crt"}
users:
- name: $name
  user: {client-certificate: "$S/pki/$name.crt", client-key: "$S/pki/$name.key"}
contexts:
- name: node
  context: {cluster: deeptune-local, user: $name}
current-context: node
EOF
}
client_kubeconfig kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
# The user the built-in ClusterRoleBinding system:node-proxier binds kube-proxy's role to.
client_kubeconfig kube-proxy "/CN=system:kube-proxy"
read -r KUBELET_PORT HEALTHZ_PORT PROXY_HEALTHZ_PORT PROXY_METRICS_PORT <<< "$(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)"
cat > "$S/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $GATEWAY   # the node's InternalIP (a kubelet refuses a loopback one); on no wire off this machine
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $HEALTHZ_PORT
# Only the API server (its kubelet client certificate, system:masters) may call the kubelet.
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP_ROOT
failSwapOn: false
containerRuntimeEndpoint: unix://$S/containerd/containerd.sock
imageServiceEndpoint: unix://$S/containerd/containerd.sock
makeIPTablesUtilChains: false
podLogsDir: $S/pod-logs
rotateCertificates: false
serverTLSBootstrap: false
imageGCHighThresholdPercent: 100
imageMinimumGCAge: 8760h
evictionHard: {memory.available: "1Mi"}
# Pods use the cluster DNS and nothing of the host's resolv.conf: no name leaves this machine.
resolvConf: ""
clusterDomain: ${CLUSTER_DOMAIN:-cluster.local}
clusterDNS: [${CLUSTER_DNS:-}]
registerWithTaints:
- {key: deeptune.dev/real-node, value: "true", effect: NoSchedule}
EOF
printf 'GATEWAY=%s\nPROXY_HEALTHZ_PORT=%s\n' "$GATEWAY" "$PROXY_HEALTHZ_PORT" > "$S/node.env"
deadline=$(( $(date +%s) + TIMEOUT ))
start_kubelet

# --- kube-proxy -------------------------------------------------------------------------------------
# nftables mode: its own tables only. Every setting it would make on the host is off: conntrack
# limits and timeouts (0: leave as they are), its OOM score (the VM withholds CAP_SYS_RESOURCE).
# NodePorts open on the node's bridge address only. At start it also clears what its iptables and
# IPVS modes would have left: KUBE-* chains (none here) and the IPVS table (this kernel has no IPVS).
cat > "$S/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {kubeconfig: "$S/kube-proxy.kubeconfig"}
hostnameOverride: $NODE_NAME
healthzBindAddress: 127.0.0.1:$PROXY_HEALTHZ_PORT
metricsBindAddress: 127.0.0.1:$PROXY_METRICS_PORT
clusterCIDR: $SUBNET
detectLocalMode: ClusterCIDR
nodePortAddresses: ["$GATEWAY/32"]
oomScoreAdj: 0
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
start_kube_proxy
advertise_gpus
log "node $NODE_NAME is Ready (kubelet on $GATEWAY:$KUBELET_PORT, pods on $SUBNET via $BRIDGE, kube-proxy in nftables mode, $GPUS nvidia.com/gpu advertised, state in $S)"
