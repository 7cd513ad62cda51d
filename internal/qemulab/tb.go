package qemulab

import (
	"context"
	"errors"
	"os"
)

// TB is the part of testing.TB the helpers use (*testing.T satisfies it).
type TB interface {
	Helper()
	Cleanup(func())
	Context() context.Context
	Logf(format string, args ...any)
	Skipf(format string, args ...any)
	Fatalf(format string, args ...any)
}

// InCI reports whether the CI environment variable is set: then missing
// prerequisites fail tests instead of skipping them.
func InCI() bool { return os.Getenv(EnvCI) != "" }

// SkipOrFail skips t, or fails it when running in CI.
func SkipOrFail(t TB, format string, args ...any) {
	t.Helper()
	if InCI() {
		t.Fatalf("CI is set, cannot skip: "+format, args...)
		return
	}
	t.Skipf(format, args...)
}

// RequireQEMU resolves QEMU; when it is absent the test is skipped (failed
// under CI).
func RequireQEMU(t TB) *QEMU {
	t.Helper()
	q, err := FindQEMU()
	if err != nil {
		SkipOrFail(t, "%v", err)
	}
	return q
}

// StartT starts a QEMU for a test: output goes to t.Logf, the process lives
// at most as long as the test's context, and Close runs in t.Cleanup.
func StartT(t TB, q *QEMU, cfg Config) *Instance {
	t.Helper()
	if cfg.Logf == nil {
		cfg.Logf = t.Logf
	}
	inst, err := q.Start(t.Context(), cfg)
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() { _ = inst.Close() })
	return inst
}

// NewNetworkT creates a two-host network for a test and deletes it in
// t.Cleanup. When namespaces are unavailable the test is skipped (failed
// under CI).
func NewNetworkT(t TB, rate uint64) *Network {
	t.Helper()
	n, err := NewNetwork(t.Context(), rate)
	if errors.Is(err, ErrNetnsUnavailable) {
		SkipOrFail(t, "%v", err)
	}
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Logf("qemulab: network close: %v", err)
		}
	})
	return n
}

// RequireQEMUs lists the QEMUs to run a test on (FindQEMUs); when there is
// none the test is skipped (failed under CI).
func RequireQEMUs(t TB) []*QEMU {
	t.Helper()
	qs, err := FindQEMUs()
	if err != nil {
		SkipOrFail(t, "%v", err)
	}
	return qs
}
