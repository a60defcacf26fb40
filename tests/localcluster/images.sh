#!/usr/bin/env bash
# Build the container images the real node runs, where no registry can be reached, into a containerd
# image store: a containerd root from which node.sh starts each node's (as hard links).
#
#   deeptune.local/debian:bookworm   a Debian rootfs from debootstrap (minbase): the stand-in base
#   deeptune.local/pause:<version>   the pod sandbox image: Kubernetes' pause.c, static, FROM scratch
#   deeptune.local/python:3.11-slim-bookworm   stand-in for python:3.11.7-slim-bookworm
#                                    (images/python.Dockerfile says what differs)
#   deeptune.local/operator:dev      the project's operator/Dockerfile, built on that stand-in
#   deeptune.local/trainer:dev       the project's trainer-image/Dockerfile, built on that stand-in
#   deeptune.local/ubuntu:jammy      an Ubuntu 22.04 rootfs from debootstrap (minbase)
#   deeptune.local/tritonserver:24.10-py3   stand-in for nvcr.io/nvidia/tritonserver:24.10-py3: the
#                                    nvidia-pytriton wheel's server (images/tritonserver.Dockerfile)
#   deeptune.local/serving:dev       the project's serving-image/Dockerfile, built on that stand-in
#
#   images.sh          build and import what is missing; print the store's path
#   images.sh --check  exit 0 when the store holds every image as it is now, 1 otherwise
#
# Keys: the bases' are the suites, the Kubernetes and pytriton versions and this script's and images/*'s
# hashes (their `docker save` archives are kept in $LC_CACHE/images-<key>/); the operator's and the
# trainer's and the serving image's are the bases' key and what their Dockerfiles copy. The store is
# $LC_CACHE/containerd-images, and containerd-images.imported lists the keys it holds: a warm run
# builds and imports nothing. A project image goes from the builder straight into it (`docker save | ctr images import -`): no
# archive of the ~7 GB trainer image is written and read back, and a changed project rebuilds and
# unpacks only its top layers (the unchanged ones are still streamed and hashed once more).
# Builds run in a private dockerd (own exec root and socket, data root kept in $LC_CACHE/dockerd as
# the layer cache; no bridge, no iptables, no IP forwarding; builds use the host network to reach
# the package registries), imports in a private containerd (CRI off, own state and socket), both
# stopped before this script exits. Needs root, debootstrap, docker.io, containerd, gcc, libc6-dev,
# gpg and curl.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
# shellcheck source=versions.sh
. "$HERE/versions.sh"

log() { printf '[images.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The project images' inputs: what their Dockerfiles copy (and .dockerignore lets through).
OPERATOR_INPUTS=(operator/Dockerfile .dockerignore requirements-operator.lock pyproject.toml README.md operator trainer-image)
TRAINER_INPUTS=(trainer-image/Dockerfile .dockerignore requirements-trainer.lock pyproject.toml README.md operator trainer-image)
SERVING_INPUTS=(serving-image/Dockerfile .dockerignore requirements-serving.lock serving-image)
hash_of() { cat "$@" | sha256sum | cut -c1-12; }
project_key() {  # project_key INPUTS...: a key for the bases' and the tracked inputs' contents
  { echo "$base_key"; cd "$ROOT" && git ls-files -z -- "$@" | sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-12
}
# The machine's own CAs go into the Python stand-in (images/python.Dockerfile says why).
HOST_CAS=(/usr/local/share/ca-certificates/*.crt)
[ -e "${HOST_CAS[0]}" ] || HOST_CAS=()
# The Triton server of the stand-in: the wheel the project's tests run it from.
PYTRITON=$(grep -E '^nvidia-pytriton==' "$ROOT/requirements.lock") || die "requirements.lock pins no nvidia-pytriton"
base_key=$(printf '%s %s %s %s %s' "$LC_DEBIAN_SUITE" "$LC_UBUNTU_SUITE" "$LC_K8S_VERSION" "$PYTRITON" \
  "$(hash_of "$0" "$HERE"/images/* "${HOST_CAS[@]}")" | sha256sum | cut -c1-12)
operator_key=$(project_key "${OPERATOR_INPUTS[@]}")
trainer_key=$(project_key "${TRAINER_INPUTS[@]}")
serving_key=$(project_key "${SERVING_INPUTS[@]}")
BASES="$LC_CACHE/images-$base_key"
STORE="$LC_CACHE/containerd-images"
RECORD="$STORE.imported"

recorded() { [ -d "$STORE" ] && grep -qxF "$1 $2" "$RECORD" 2>/dev/null; }   # recorded NAME KEY
built() {
  recorded bases "$base_key" && recorded operator "$operator_key" && recorded trainer "$trainer_key" \
    && recorded serving "$serving_key"
}

case "${1:-}" in
  "") ;;
  --check) built; exit $? ;;
  -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown argument: $1 (try --help)" ;;
esac

if built; then echo "$STORE"; exit 0; fi

[ "$(id -u)" = 0 ] || die "building the node's images needs root (debootstrap, dockerd)"
for tool in debootstrap dockerd docker containerd ctr gcc gpg curl; do
  command -v "$tool" >/dev/null || die "$tool is required (apt-get install debootstrap docker.io containerd gcc libc6-dev gpg curl)"
done
pause_c="$(go env GOMODCACHE 2>/dev/null || echo "$HOME/go/pkg/mod")/k8s.io/kubernetes@$LC_K8S_VERSION/build/pause/linux/pause.c"
[ -f "$pause_c" ] || die "pause.c not found at $pause_c (build.sh downloads the Kubernetes module)"

mkdir -p "$LC_CACHE"
exec 9>"$LC_CACHE/.images.lock"
flock 9
if built; then echo "$STORE"; exit 0; fi   # built by the holder we waited for
exec 8>"$LC_CACHE/.containerd-images.lock"
flock 8   # no node links the store while it changes (node.sh takes it shared)

WORK=$(mktemp -d "$LC_CACHE/images.tmp.XXXXXX")
DATA="$LC_CACHE/dockerd"
SOCK="$WORK/docker.sock"
docker_() { docker -H "unix://$SOCK" "$@"; }
ctr_() { ctr --address "$WORK/containerd.sock" --namespace k8s.io "$@"; }
stop_daemons() {
  if [ -f "$WORK/dockerd.pid" ]; then
    kill "$(cat "$WORK/dockerd.pid")" 2>/dev/null || true
    for _ in $(seq 100); do [ -e "$SOCK" ] || break; sleep 0.2; done
  fi
  if [ -f "$WORK/containerd.pid" ]; then
    kill "$(cat "$WORK/containerd.pid")" 2>/dev/null || true
    for _ in $(seq 100); do [ -e "$WORK/containerd.sock" ] || break; sleep 0.1; done
  fi
  # overlay2 mounts left by a killed daemon would keep its directories busy
  awk -v w="$WORK/" -v d="$DATA/" 'index($2, w) == 1 || index($2, d) == 1 { print $2 }' /proc/mounts \
    | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$WORK"
}
trap stop_daemons EXIT

log "starting a private dockerd (layer cache in $DATA)"
nohup setsid dockerd --data-root "$DATA" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
  -H "unix://$SOCK" --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
  --bridge=none --storage-driver=overlay2 > "$WORK/dockerd.log" 2>&1 < /dev/null 8>&- 9>&- &
for _ in $(seq 150); do docker_ version >/dev/null 2>&1 && break; sleep 0.2; done
docker_ version >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log" >&2; die "dockerd did not start"; }

log "starting a private containerd on the store $STORE"
cat > "$WORK/containerd.toml" <<EOF
version = 2
root = "$STORE"
state = "$WORK/containerd-state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$WORK/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$WORK/containerd-opt"
EOF
nohup setsid containerd --config "$WORK/containerd.toml" > "$WORK/containerd.log" 2>&1 < /dev/null 8>&- 9>&- &
echo $! > "$WORK/containerd.pid"
for _ in $(seq 100); do ctr_ version >/dev/null 2>&1 && break; sleep 0.1; done
ctr_ version >/dev/null 2>&1 || { tail -20 "$WORK/containerd.log" >&2; die "containerd did not start"; }
record() {  # record NAME KEY: the store now holds NAME as of KEY
  { grep -v "^$1 " "$RECORD" 2>/dev/null || true; echo "$1 $2"; } > "$RECORD.tmp"
  mv "$RECORD.tmp" "$RECORD"
}

build() {  # build TAG DOCKERFILE CONTEXT [--build-arg ...]: the legacy builder, host network
  local tag=$1 file=$2 context=$3; shift 3
  log "building $tag from ${file#"$ROOT"/}"
  DOCKER_BUILDKIT=0 docker_ build --network host -f "$file" -t "$tag" "$@" "$context" > "$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log" >&2; die "building $tag failed (docker build -f ${file#"$ROOT"/})"; }
}
save() {  # save ARCHIVE TAG: write the image's archive atomically
  mkdir -p "$(dirname "$1")"
  docker_ save -o "$1.tmp" "$2"
  mv "$1.tmp" "$1"
}

if [ ! -s "$BASES/python.tar" ]; then
  mirror=$(awk '/^URIs:/ {print $2; exit} /^deb / {print $2; exit}' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  log "debootstrap $LC_DEBIAN_SUITE (minbase) from $mirror"
  debootstrap --variant=minbase "$LC_DEBIAN_SUITE" "$WORK/rootfs" "$mirror" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
  tar -C "$WORK/rootfs" -c . | docker_ import - "deeptune.local/debian:$LC_DEBIAN_SUITE" >/dev/null
  rm -rf "$WORK/rootfs"

  log "building the pause image from $pause_c"
  mkdir -p "$WORK/pause"
  gcc -Os -static -DVERSION="$LC_K8S_VERSION" -o "$WORK/pause/pause" "$pause_c"
  strip "$WORK/pause/pause"
  printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' > "$WORK/pause/Dockerfile"
  build "$LC_PAUSE_IMAGE" "$WORK/pause/Dockerfile" "$WORK/pause"
  mkdir -p "$WORK/python/ca-certificates"
  cp "$HERE/images/python.Dockerfile" "$WORK/python/Dockerfile"
  [ ${#HOST_CAS[@]} -eq 0 ] || cp "${HOST_CAS[@]}" "$WORK/python/ca-certificates/"
  build "$LC_PYTHON_IMAGE" "$WORK/python/Dockerfile" "$WORK/python" \
    --build-arg "DEBIAN_IMAGE=deeptune.local/debian:$LC_DEBIAN_SUITE"

  save "$BASES/debian.tar" "deeptune.local/debian:$LC_DEBIAN_SUITE"
  save "$BASES/pause.tar" "$LC_PAUSE_IMAGE"
  save "$BASES/python.tar" "$LC_PYTHON_IMAGE"
  for old in "$LC_CACHE"/images-*; do   # the bases of earlier keys
    [ "$old" = "$BASES" ] || rm -rf "$old"
  done
fi
if [ ! -s "$BASES/tritonserver.tar" ]; then
  # debootstrap checks the suite's Release file against the archive's key: the one of the keyring
  # package whose fingerprint versions.sh pins, and no other.
  log "debootstrap $LC_UBUNTU_SUITE (minbase) from $LC_UBUNTU_MIRROR, signed by $LC_UBUNTU_ARCHIVE_KEY"
  curl -fsS -o "$WORK/ubuntu-keyring.deb" "$LC_UBUNTU_MIRROR/$LC_UBUNTU_KEYRING_DEB" \
    || die "could not fetch $LC_UBUNTU_MIRROR/$LC_UBUNTU_KEYRING_DEB"
  dpkg-deb -x "$WORK/ubuntu-keyring.deb" "$WORK/ubuntu-keyring"
  mkdir -m 700 "$WORK/gnupg"
  gpg --batch --quiet --homedir "$WORK/gnupg" \
    --import "$WORK/ubuntu-keyring/usr/share/keyrings/ubuntu-archive-keyring.gpg" 2>/dev/null
  gpg --batch --homedir "$WORK/gnupg" --export "$LC_UBUNTU_ARCHIVE_KEY" > "$WORK/ubuntu-archive.gpg"
  gpgconf --homedir "$WORK/gnupg" --kill all 2>/dev/null || true
  [ -s "$WORK/ubuntu-archive.gpg" ] || die "the Ubuntu keyring package holds no key $LC_UBUNTU_ARCHIVE_KEY"
  debootstrap --variant=minbase --components=main,universe --keyring="$WORK/ubuntu-archive.gpg" \
    "$LC_UBUNTU_SUITE" "$WORK/ubuntu" "$LC_UBUNTU_MIRROR" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap $LC_UBUNTU_SUITE failed"; }
  rm -rf "$WORK/ubuntu/var/cache/apt/archives/"*.deb "$WORK/ubuntu/var/lib/apt/lists/"*
  tar -C "$WORK/ubuntu" -c . | docker_ import - "deeptune.local/ubuntu:$LC_UBUNTU_SUITE" >/dev/null
  rm -rf "$WORK/ubuntu"

  mkdir -p "$WORK/triton/ca-certificates"
  cp "$HERE/images/tritonserver.Dockerfile" "$WORK/triton/Dockerfile"
  [ ${#HOST_CAS[@]} -eq 0 ] || cp "${HOST_CAS[@]}" "$WORK/triton/ca-certificates/"
  build "$LC_TRITON_IMAGE" "$WORK/triton/Dockerfile" "$WORK/triton" \
    --build-arg "UBUNTU_IMAGE=deeptune.local/ubuntu:$LC_UBUNTU_SUITE" --build-arg "PYTRITON=$PYTRITON"
  save "$BASES/tritonserver.tar" "$LC_TRITON_IMAGE"
fi
if ! recorded bases "$base_key"; then
  for archive in "$BASES"/{debian,pause,python,tritonserver}.tar; do ctr_ images import "$archive" >/dev/null; done
  record bases "$base_key"
fi

# project_image NAME KEY TAG DOCKERFILE BASE_ARG BASE ARCHIVE: build TAG on BASE (the Dockerfile's
# build argument BASE_ARG; the bases' ARCHIVE.tar) and import it, unless the store has it
project_image() {
  local name=$1 key=$2 tag=$3 file=$4 base_arg=$5 base=$6 archive=$7
  recorded "$name" "$key" && return 0
  docker_ image inspect "$base" >/dev/null 2>&1 || docker_ load -q -i "$BASES/$archive.tar" >/dev/null
  build "$tag" "$ROOT/$file" "$ROOT" --build-arg "$base_arg=$base"
  log "importing $tag into the store"
  docker_ save "$tag" | ctr_ images import - >/dev/null || die "importing $tag into $STORE failed"
  record "$name" "$key"
  docker_ image prune -f >/dev/null   # the layers of earlier builds
}
project_image operator "$operator_key" "$LC_OPERATOR_IMAGE" operator/Dockerfile PYTHON_IMAGE "$LC_PYTHON_IMAGE" python
project_image trainer "$trainer_key" "$LC_TRAINER_IMAGE" trainer-image/Dockerfile PYTHON_IMAGE "$LC_PYTHON_IMAGE" python
project_image serving "$serving_key" "$LC_SERVING_IMAGE" serving-image/Dockerfile TRITON_IMAGE "$LC_TRITON_IMAGE" tritonserver

log "images ready"
echo "$STORE"
