//go:build tools

// Package tools pins the coredns command built by ../../build.sh.
package tools

import _ "github.com/coredns/coredns"
