#!/usr/bin/env bash
# Build the container images the real node needs when no registry can be reached, once, as
# `docker save` archives that containerd imports (`ctr images import`):
#
#   deeptune.local/debian:bookworm   a Debian rootfs from debootstrap (minbase), the stand-in base
#   deeptune.local/pause:<version>   the pod sandbox image: Kubernetes' pause.c, static, FROM scratch
#
#   images.sh          build what is missing; print the archives' paths, one per line
#   images.sh --check  exit 0 when every archive is already built, 1 otherwise
#
# Archives go to $LC_CACHE/images-<key>/ (see versions.sh), keyed by the Debian suite, the pause
# version and this script's own hash, so a warm run builds nothing. Builds run in a private dockerd
# (own data root, exec root and socket; no bridge, no iptables, no IP forwarding) that is stopped,
# with its data, before this script exits. Needs root, debootstrap, docker.io and gcc.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
. "$HERE/versions.sh"

log() { printf '[images.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

key=$(printf '%s %s %s' "$LC_DEBIAN_SUITE" "$LC_K8S_VERSION" "$(sha256sum "$0" | cut -c1-12)" | sha256sum | cut -c1-12)
OUT="$LC_CACHE/images-$key"
ARCHIVES=("$OUT/debian.tar" "$OUT/pause.tar")

built() { local a; for a in "${ARCHIVES[@]}"; do [ -s "$a" ] || return 1; done; }

case "${1:-}" in
  "") ;;
  --check) built; exit $? ;;
  -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown argument: $1 (try --help)" ;;
esac

if built; then printf '%s\n' "${ARCHIVES[@]}"; exit 0; fi

[ "$(id -u)" = 0 ] || die "building the node's images needs root (debootstrap, dockerd)"
for tool in debootstrap dockerd docker gcc; do
  command -v "$tool" >/dev/null || die "$tool is required (apt-get install debootstrap docker.io gcc)"
done
pause_c="$(go env GOMODCACHE 2>/dev/null || echo "$HOME/go/pkg/mod")/k8s.io/kubernetes@$LC_K8S_VERSION/build/pause/linux/pause.c"
[ -f "$pause_c" ] || die "pause.c not found at $pause_c (build.sh downloads the Kubernetes module)"

mkdir -p "$LC_CACHE"
exec 9>"$LC_CACHE/.images.lock"
flock 9
if built; then printf '%s\n' "${ARCHIVES[@]}"; exit 0; fi   # built by the holder we waited for

WORK=$(mktemp -d "$LC_CACHE/images.tmp.XXXXXX")
SOCK="$WORK/docker.sock"
docker_() { docker -H "unix://$SOCK" "$@"; }
stop_dockerd() {
  if [ -f "$WORK/dockerd.pid" ]; then
    kill "$(cat "$WORK/dockerd.pid")" 2>/dev/null || true
    for _ in $(seq 50); do [ -e "$SOCK" ] || break; sleep 0.2; done
  fi
  # overlay2 mounts left by a killed daemon would keep the data root busy
  grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$WORK"
}
trap stop_dockerd EXIT

log "starting a private dockerd (data in $WORK)"
nohup setsid dockerd --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
  -H "unix://$SOCK" --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
  --bridge=none --storage-driver=overlay2 > "$WORK/dockerd.log" 2>&1 < /dev/null 9>&- &
for _ in $(seq 100); do docker_ version >/dev/null 2>&1 && break; sleep 0.2; done
docker_ version >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log" >&2; die "dockerd did not start"; }

mirror=$(awk '/^URIs:/ {print $2; exit} /^deb / {print $2; exit}' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
log "debootstrap $LC_DEBIAN_SUITE (minbase) from $mirror"
debootstrap --variant=minbase "$LC_DEBIAN_SUITE" "$WORK/rootfs" "$mirror" > "$WORK/debootstrap.log" 2>&1 \
  || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
tar -C "$WORK/rootfs" -c . | docker_ import - "deeptune.local/debian:$LC_DEBIAN_SUITE" >/dev/null

log "building the pause image from $pause_c"
mkdir -p "$WORK/pause"
gcc -Os -static -DVERSION="$LC_K8S_VERSION" -o "$WORK/pause/pause" "$pause_c"
strip "$WORK/pause/pause"
printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' > "$WORK/pause/Dockerfile"
DOCKER_BUILDKIT=0 docker_ build -q -t "$LC_PAUSE_IMAGE" "$WORK/pause" > "$WORK/build.log" 2>&1 \
  || { tail -20 "$WORK/build.log" >&2; die "building the pause image failed"; }

mkdir -p "$OUT"
docker_ save -o "$OUT/debian.tar.tmp" "deeptune.local/debian:$LC_DEBIAN_SUITE"
docker_ save -o "$OUT/pause.tar.tmp" "$LC_PAUSE_IMAGE"
mv "$OUT/debian.tar.tmp" "$OUT/debian.tar"
mv "$OUT/pause.tar.tmp" "$OUT/pause.tar"
log "images ready in $OUT"
printf '%s\n' "${ARCHIVES[@]}"
