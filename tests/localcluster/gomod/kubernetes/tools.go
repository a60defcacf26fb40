//go:build tools

// Package tools pins the commands built by ../../build.sh (kube-apiserver,
// kube-controller-manager, kube-scheduler and kubectl; the kubelet and
// kube-proxy with --with-node, for node.sh) so that `go mod tidy` keeps their
// dependencies in go.mod and go.sum.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
