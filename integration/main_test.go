// Package integration holds qmigrate's tests against real QEMU processes.
// They run one after another (never t.Parallel: the machines have 2 cores and
// at most two TCG guests may run at once), skip when QEMU is absent unless CI
// is set, and clean up every process, namespace, socket and file in
// t.Cleanup. Pick the QEMU with QMIGRATE_QEMU and QMIGRATE_QEMU_FIRMWARE (see
// package internal/qemulab).
package integration

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/internal/guest/linux"
	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/qmp"
)

// tbTimeout returns a context for one step of a test, bounded by d and by the
// test's own context.
func tbTimeout(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// tbQEMU resolves QEMU (skipping without it unless CI is set) and logs its
// version.
func tbQEMU(t *testing.T) (*qemulab.QEMU, qmp.Version) {
	t.Helper()
	q := qemulab.RequireQEMU(t)
	v, err := q.Version(tbTimeout(t, 10*time.Second))
	require.NoError(t, err)
	t.Logf("QEMU %s (%s, firmware %q)", v, q.Binary, q.Firmware)
	return q, v
}

// tbLinuxAssets returns the Linux guest's kernel and initramfs; without the
// kernel (scripts/setup.sh not run) the test is skipped unless CI is set.
func tbLinuxAssets(t *testing.T) (kernel, initrd string) {
	t.Helper()
	kernel, initrd, err := linux.Assets(tbTimeout(t, 5*time.Minute))
	if err != nil {
		qemulab.SkipOrFail(t, "linux guest: %v", err)
	}
	return kernel, initrd
}

// tbLogMigration logs the figures of a finished migration.
func tbLogMigration(t *testing.T, what string, info *qmp.MigrationInfo) {
	t.Helper()
	if info == nil {
		return
	}
	var transferred uint64
	var mbps float64
	var syncs uint64
	if info.RAM != nil {
		transferred, mbps, syncs = info.RAM.Transferred, info.RAM.Mbps, info.RAM.DirtySyncCount
	}
	rate := 0.0
	if info.TotalTime > 0 {
		rate = float64(transferred) / info.TotalTime.Seconds()
	}
	t.Logf("%s: %s in %v (setup %v, downtime %v), %.1f MB transferred, %.1f MB/s average, last %.0f Mbit/s, %d dirty syncs",
		what, info.Status, info.TotalTime, info.SetupTime, info.Downtime, float64(transferred)/1e6, rate/1e6, mbps, syncs)
}
