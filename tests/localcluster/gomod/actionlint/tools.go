//go:build tools

// Package tools pins the actionlint command built by ../../build.sh.
package tools

import _ "github.com/rhysd/actionlint/cmd/actionlint"
