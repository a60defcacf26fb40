#!/usr/bin/env bash
# Stop the local test cluster started by up.sh (the processes named by the pid
# files in the state dir) and remove the state dir.
#   down.sh [--keep-state]   --keep-state: stop the processes, keep certs/logs/etcd data
# State dir: ${DEEPTUNE_CLUSTER_DIR:-/tmp/deeptune-cluster}
set -euo pipefail

STATE="${DEEPTUNE_CLUSTER_DIR:-/tmp/deeptune-cluster}"
keep=false
case "${1:-}" in
  "") ;;
  --keep-state) keep=true ;;
  -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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

# Is PID still the process we started (and not a recycled pid)?
ours() {
  local pid=$1 name=$2 exe
  kill -0 "$pid" 2>/dev/null || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
  [ -z "$exe" ] || [ "$(basename "${exe% (deleted)}")" = "$name" ]
}

# Reverse start order: clients first, etcd last.
pids=()
for name in kube-scheduler kube-controller-manager kube-apiserver etcd; do
  f="$STATE/$name.pid"
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  if [ -n "$pid" ] && ours "$pid" "$name"; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid:$name")
  fi
  rm -f "$f"
done

# Give them up to 10 s to exit, then SIGKILL what is left.
for _ in $(seq 1 100); do
  left=()
  for e in "${pids[@]+"${pids[@]}"}"; do
    ours "${e%%:*}" "${e#*:}" && left+=("$e")
  done
  [ ${#left[@]} -eq 0 ] && break
  sleep 0.1
done
for e in "${left[@]+"${left[@]}"}"; do
  log "killing ${e#*:} (pid ${e%%:*})"
  kill -KILL "${e%%:*}" 2>/dev/null || true
  sleep 0.2
done

if $keep; then
  log "stopped; state kept in $STATE"
else
  rm -rf "$STATE"
  log "stopped; removed $STATE"
fi
