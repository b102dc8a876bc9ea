// Package mlog replaces monis.app/mlog, which the Go module proxy does not serve,
// for the benchmark build of SSCSD. SSCSD's main calls only these names; they
// route to klog, which SSCSD logs through anyway.
package mlog

import (
	"context"
	"os"

	"k8s.io/klog/v2"
)

// LogFormat is the log output format SSCSD's flags name.
type LogFormat string

const (
	FormatText LogFormat = "text"
	FormatJSON LogFormat = "json"
)

// Setup returns the function main defers to flush logs on exit.
func Setup() func() { return klog.Flush }

// ValidateAndSetKlogLevelAndFormatGlobally keeps klog's defaults.
func ValidateAndSetKlogLevelAndFormatGlobally(_ context.Context, _ klog.Level, _ LogFormat) error {
	return nil
}

// Error logs err with structured key/value pairs.
func Error(msg string, err error, kv ...any) { klog.ErrorS(err, msg, kv...) }

// Fatal logs err and exits.
func Fatal(err error, kv ...any) {
	klog.ErrorS(err, "fatal", kv...)
	klog.Flush()
	os.Exit(1)
}
