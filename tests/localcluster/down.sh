#!/usr/bin/env bash
# Stop everything started under one state dir and remove the dir:
#   - the processes recorded in processes/*.pid: what tests/cluster/harness.py
#     started for the test suite, the demo or a benchmark (the operator);
#   - the real node if node.sh started one (node.sh --stop: kube-proxy, kubelet,
#     containerd, its containers, bridge, mounts, cgroups, the kernel settings
#     restored);
#   - Kueue if kueue.sh started it (kueue.pid), then what up.sh started (*.pid:
#     CoreDNS, scheduler, controller manager, API server, etcd), with CoreDNS's
#     address; the service range's blackhole route goes with the last cluster DNS.
# Nothing else is touched: another state dir's cluster keeps running.
#   down.sh [--keep-state]   --keep-state: stop the processes, keep certs/logs/etcd data
# State dir: ${DEEPTUNE_CLUSTER_DIR:-/tmp/deeptune-cluster}
set -euo pipefail

STATE="${DEEPTUNE_CLUSTER_DIR:-/tmp/deeptune-cluster}"
STATE="${STATE%/}"
keep=false
case "${1:-}" in
  "") ;;
  --keep-state) keep=true ;;
  -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "down.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
esac

log() { printf '[down.sh] %s\n' "$*" >&2; }

if [ ! -d "$STATE" ]; then
  log "nothing to do: $STATE does not exist"
  exit 0
fi
if [ ! -f "$STATE/.deeptune-cluster" ] && [ -n "$(ls -A "$STATE")" ]; then
  log "error: $STATE was not made by up.sh (no .deeptune-cluster marker); not touching it"
  exit 1
fi

# running PID: PID is a live process (a zombie has ended: only its parent's wait is missing).
running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# start_time PID: the process's start time (clock ticks after boot, field 22 of
# /proc/PID/stat), which with the pid names one process for good.
start_time() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }   # the fields after "pid (comm) ", from field 3 on
  # shellcheck disable=SC2086
  set -- $stat
  echo "${20}"
}

# Is PID still the control-plane process NAME we started (and not a recycled pid)?
ours() {
  local pid=$1 name=$2 exe
  running "$pid" || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
  [ -z "$exe" ] || [ "$(basename "${exe% (deleted)}")" = "$name" ]
}

# Is PID the process recorded with start time START?
recorded() {
  running "$1" && [ "$(start_time "$1")" = "$2" ]
}

STOPPING=()   # "pid:what" of each process sent SIGTERM

# stop_all SECONDS: wait up to SECONDS for the processes in STOPPING to exit, then SIGKILL the rest.
stop_all() {
  local tries=$(( $1 * 10 )) e left=()
  for _ in $(seq 1 "$tries"); do
    left=()
    for e in "${STOPPING[@]+"${STOPPING[@]}"}"; do
      running "${e%%:*}" && left+=("$e")
    done
    [ ${#left[@]} -eq 0 ] && break
    sleep 0.1
  done
  for e in "${left[@]+"${left[@]}"}"; do
    log "killing ${e#*:} (pid ${e%%:*})"
    kill -KILL "${e%%:*}" 2>/dev/null || true
  done
  [ ${#left[@]} -eq 0 ] || sleep 0.2
  STOPPING=()
}

# 1. The processes the harness recorded (the operator, ...): SIGTERM, as their own
#    code stops them.
for f in "$STATE"/processes/*.pid; do
  [ -f "$f" ] || continue
  pid='' start=''
  read -r pid start _ < "$f" || true
  what=$(basename "$f" .pid)
  if [ -n "${pid:-}" ] && [ -n "${start:-}" ] && recorded "$pid" "$start"; then
    log "stopping $what (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    STOPPING+=("$pid:$what")
  fi
done
stop_all 20
rm -rf "$STATE/processes"

# 2. The real node (node.sh's), undone by node.sh itself.
if [ -d "$STATE/node" ]; then
  DEEPTUNE_CLUSTER_DIR="$STATE" bash "$(dirname "${BASH_SOURCE[0]}")/node.sh" --stop || log "warning: node.sh --stop failed"
fi

# 3. Kueue (kueue.sh's), then the control plane, in reverse start order: clients first, etcd last.
for name in kueue coredns kube-scheduler kube-controller-manager kube-apiserver etcd; do
  f="$STATE/$name.pid"
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  if [ -n "$pid" ] && ours "$pid" "$name"; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    STOPPING+=("$pid:$name")
  fi
  rm -f "$f"
done
stop_all 10

# 4. The cluster DNS's address on the loopback device (cluster-dns.env; up.sh
#    gives each cluster on the machine its own, 10.96.0.10 and up), and any other
#    such address that no CoreDNS listens on (its cluster was killed), under
#    up.sh's lock for them; the blackhole route for the service range with the
#    last one.
if [ -f "$STATE/cluster-dns.env" ] && command -v ip >/dev/null && command -v ss >/dev/null; then
  if { exec 7>>/run/lock/deeptune-cluster-dns.lock; } 2>/dev/null; then flock 7; fi
  listening=$(ss -Hlntu 2>/dev/null | awk '{ print $5 }' | sed -n 's/:53$//p')
  for address in $(ip -o -4 addr show dev lo | awk '{ print $4 }' | sed -n 's|^\(10\.96\.0\.[0-9]*\)/32$|\1|p'); do
    grep -qxF "$address" <<< "$listening" || ip addr del "$address/32" dev lo 2>/dev/null || true
  done
  if ! grep -q '^10\.96\.0\.' <<< "$listening" && [ -n "$(ip route show type blackhole 10.96.0.0/16)" ]; then
    log "removing the blackhole route for the service range 10.96.0.0/16 (no cluster DNS left)"
    ip route del blackhole 10.96.0.0/16 2>/dev/null || true
  fi
  exec 7>&-
fi

if $keep; then
  log "stopped; state kept in $STATE"
else
  rm -rf "$STATE"
  # up.sh's lock beside the dir, unless an up.sh holds it now (one that called us).
  if exec 9>>"$STATE.lock" && flock -n 9; then rm -f "$STATE.lock"; fi
  log "stopped; removed $STATE"
fi
