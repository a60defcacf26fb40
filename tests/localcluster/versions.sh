# shellcheck shell=bash
# shellcheck disable=SC2034  # variables used by the scripts that source this file
# Pinned versions of the local test cluster. Sourced by build.sh and up.sh.
# The same versions are pinned in gomod/*/go.mod; build.sh refuses to build
# when the two disagree. To move to another release, change both (for
# Kubernetes: every k8s.io/* line of the replace block too) and run
# `go mod tidy` in the module directory.

# Kubernetes control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler), built from k8s.io/kubernetes; staging modules at v0.32.4.
LC_K8S_VERSION=v1.32.4
# Commit and date of the upstream v1.32.4 tag (what `kubectl version` shows).
LC_K8S_GIT_COMMIT=59526cd4867447956156ae3a602fcbac10a2c335
LC_K8S_BUILD_DATE=2025-04-22T15:56:13Z

# etcd server; Kubernetes 1.32 is tested against etcd 3.5.x (Debian 12's
# etcd-server is 3.4.23, too old).
LC_ETCD_VERSION=v3.5.21

# Helm 3.17 is the Helm release whose supported range targets Kubernetes 1.32.
LC_HELM_VERSION=v3.17.4

# CoreDNS (cluster DNS: the kubernetes plugin reading the API server), the
# stock `coredns` command with its default plugins, built from
# github.com/coredns/coredns. 1.14 is the newest minor line that builds with
# Go 1.25 (1.15 needs Go 1.26); Kubernetes 1.32 ships CoreDNS 1.11, and the
# kubernetes plugin only needs the GA discovery.k8s.io/v1 EndpointSlices.
LC_COREDNS_VERSION=v1.14.7

# Kueue (job queueing: quota, admission), its controller manager built from
# sigs.k8s.io/kueue/cmd/kueue, only for the Kueue test (build.sh --with-kueue,
# kueue.sh). 0.12 is the newest minor line built on the Kubernetes 1.32 client
# libraries (k8s.io/* v0.32.5, controller-runtime v0.20); 0.13 moved to 1.33's.
LC_KUEUE_VERSION=v0.12.10

# actionlint (the GitHub Actions workflow linter; .github/workflows), run by the test command's lint
# step. Not part of the cluster, built here like its binaries.
LC_ACTIONLINT_VERSION=v1.7.12

# Argo CD, whose util/lua package (the Lua VM and sandbox Argo CD runs resource health checks in) is
# compiled into a test binary for the health scripts' test. 3.2 is the newest line the Go module proxy
# serves whole here (3.5+ need an in-repo gitops-engine pseudo-version it refuses; 3.6 needs Go 1.27).
LC_ARGOCD_VERSION=v3.2.6

# krew (the kubectl plugin manager) and its manifest validator: the kubectl plugin test installs
# `kubectl deeptune` with krew from the archive and manifest scripts/krew_plugin.py makes.
LC_KREW_VERSION=v0.4.3

# Root of the binary cache (outside the repository).
LC_CACHE="${DEEPTUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deeptune}"
LC_K8S_BIN="$LC_CACHE/k8s-$LC_K8S_VERSION/bin"
LC_ETCD_BIN="$LC_CACHE/etcd-$LC_ETCD_VERSION/bin"
LC_HELM_BIN="$LC_CACHE/helm-$LC_HELM_VERSION/bin"
LC_COREDNS_BIN="$LC_CACHE/coredns-$LC_COREDNS_VERSION/bin"
LC_KUEUE_BIN="$LC_CACHE/kueue-$LC_KUEUE_VERSION/bin"
LC_ACTIONLINT_BIN="$LC_CACHE/actionlint-$LC_ACTIONLINT_VERSION/bin"
LC_ARGOCD_HEALTH_BIN="$LC_CACHE/argocd-health-$LC_ARGOCD_VERSION/bin"
LC_KREW_BIN="$LC_CACHE/krew-$LC_KREW_VERSION/bin"
# KEDA's CRDs (ScaledObject), from its Go module; only the KEDA test applies them (keda_crds.sh).
LC_KEDA_VERSION=v2.20.2

# The real node (node.sh): images built here without a registry (images.sh). The stand-in base is a
# Debian rootfs from debootstrap; the pod sandbox image is Kubernetes' own pause.c.
LC_DEBIAN_SUITE=bookworm
LC_PAUSE_IMAGE=deeptune.local/pause:3.10
LC_NODE_BIN="$LC_CACHE/node-$LC_K8S_VERSION/bin"   # kubelet, kube-proxy
LC_PYTHON_IMAGE=deeptune.local/python:3.11-slim-bookworm
LC_OPERATOR_IMAGE=deeptune.local/operator:dev
LC_TRAINER_IMAGE=deeptune.local/trainer:dev
# The serving image's stand-in base (images/tritonserver.Dockerfile): Ubuntu 22.04 from debootstrap,
# as NVIDIA's Triton 24.10 image, checked against the Ubuntu archive's signing key, pinned here by
# fingerprint (its keyring comes from the archive's pool: Debian bookworm ships none), and the
# Triton server of the nvidia-pytriton wheel that requirements.lock pins.
LC_UBUNTU_SUITE=jammy
LC_UBUNTU_MIRROR=http://archive.ubuntu.com/ubuntu
LC_UBUNTU_KEYRING_DEB=pool/main/u/ubuntu-keyring/ubuntu-keyring_2021.03.26_all.deb
LC_UBUNTU_ARCHIVE_KEY=F6ECB3762474EDA9D21B7022871920D1991BC93C
LC_TRITON_IMAGE=deeptune.local/tritonserver:24.10-py3
LC_SERVING_IMAGE=deeptune.local/serving:dev
