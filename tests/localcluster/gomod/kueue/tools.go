//go:build tools

// Package tools pins the Kueue controller manager built by ../../build.sh
// (--with-kueue).
package tools

import _ "sigs.k8s.io/kueue/cmd/kueue"
