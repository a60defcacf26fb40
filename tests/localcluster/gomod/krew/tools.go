//go:build tools

// Package tools pins krew and its manifest validator, built by ../../build.sh for the test that
// installs the kubectl plugin the way krew users do (scripts/krew_plugin.py).
package tools

import (
	_ "sigs.k8s.io/krew/cmd/krew"
	_ "sigs.k8s.io/krew/cmd/validate-krew-manifest"
)
