package integration

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/internal/guest/linux"
	"github.com/qmigrate/qmigrate/internal/qemulab"
)

// upgradeQEMUs returns QEMU 7.2 and 10.0 (scripts/setup.sh installs both):
// the test fails under CI when either is missing and is skipped without
// CI. The integration suite runs once per QEMU (QMIGRATE_QEMU set to each
// in turn): the upgrade test, which uses both, runs in the 10.0 pass only.
func upgradeQEMUs(t *testing.T) (q72, q10 *qemulab.QEMU) {
	t.Helper()
	suite := os.Getenv(qemulab.EnvQEMU)
	t.Setenv(qemulab.EnvQEMU, "") // FindQEMUs: every installed version, not the suite's one
	for _, q := range qemulab.RequireQEMUs(t) {
		switch v := q.Ver(); {
		case v.Major == 7 && v.Minor == 2:
			q72 = q
		case v.Major == 10 && v.Minor == 0:
			q10 = q
		}
	}
	if q72 == nil || q10 == nil {
		qemulab.SkipOrFail(t, "the upgrade needs QEMU 7.2 and 10.0 (scripts/setup.sh): found 7.2 %v, 10.0 %v", q72 != nil, q10 != nil)
	}
	if suite != "" && suite != q10.Binary {
		t.Skipf("runs in the integration pass of QEMU 10.0 (it uses both versions), not of %s", suite)
	}
	return q72, q10
}

// pinned is how both QEMUs of the upgrade start: the machine type and CPU
// model of the older one, which both have.
var pinned = qemulab.Config{Machine: "pc-i440fx-7.2", CPU: "qemu64"}

// upgradeVM starts the Linux guest running w on q, with the machine and
// CPU of base and a second QMP monitor for the CLI. Both sides get the
// RAM size of the source (7.2's, off its dirty-log fast path: see
// qemulab.RAMSize), as a migration needs.
func upgradeVM(t *testing.T, q, src *qemulab.QEMU, base qemulab.Config, name string, incoming bool, kernel, initrd string, w linux.Workload, extra ...string) *qemulab.Instance {
	t.Helper()
	cfg := base
	cfg.Name, cfg.Incoming, cfg.QMPSockets = name, incoming, []string{"cli"}
	cfg.Args = append([]string{"-m", qemulab.RAMSize(src.Ver(), qemulab.DefaultAccel, guestMemMiB)}, extra...)
	return guestVM(t, q, cfg, kernel, initrd, w)
}

func cli(i *qemulab.Instance) string { return "unix:" + i.QMPSocketOf("cli") }

// TestUpgrade is the host-upgrade path through the CLI: a Linux guest on
// QEMU 7.2 moves live to QEMU 10.0 with the machine type and CPU model
// pinned, its checksummed memory verified on the destination (no storage
// copy: the guest has no disk), then back to 7.2 (the reverse, pinned too);
// a second guest's disk log moves with --copy-storage and is verified on
// 10.0. The same pair unpinned (-machine pc -cpu max on the destination) is
// refused by the check and by migrate, with the -machine hint, changing
// nothing. One Linux boot per guest, at most two QEMUs at a time.
func TestUpgrade(t *testing.T) {
	if testing.Short() {
		t.Skip("boots Linux; skipped with -short")
	}
	q72, q10 := upgradeQEMUs(t)
	kernel, initrd := tbLinuxAssets(t)
	bin := buildCLI(t)
	t.Run("MemoryAndBack", func(t *testing.T) { testUpgradeMemory(t, q72, q10, bin, kernel, initrd) })
	t.Run("CopyStorage", func(t *testing.T) { testUpgradeStorage(t, q72, q10, bin, kernel, initrd) })
}

func testUpgradeMemory(t *testing.T, q72, q10 *qemulab.QEMU, bin, kernel, initrd string) {
	ctx, cancel := context.WithTimeout(t.Context(), 6*time.Minute)
	defer cancel()
	// A small set dirtied slowly: 7.2 as a source (qemulab.RAMSize).
	w := linux.Workload{Mode: linux.ModeMemDirty, MemBytes: 16 << 20, RateBytes: 4 << 20}
	started := time.Now()
	a := upgradeVM(t, q72, q72, pinned, "src72", false, kernel, initrd, w)
	as := linux.NewSerial(a.SerialPath())
	guestWaitReady(t, ctx, as, started)
	_, err := as.WaitFor(ctx, linux.Verdict(linux.KindCheck, "pass", 1))
	require.NoError(t, err, "7.2 guest dirtying and checking its memory")

	t.Run("UnpinnedRefused", func(t *testing.T) {
		u := upgradeVM(t, q10, q72, qemulab.Config{Machine: "pc", CPU: "max"}, "dst10u", true, kernel, initrd, w)
		before := [2]string{runState(t, a.QMP), runState(t, u.QMP)}
		code, lines, _ := runCLI(t, time.Minute, bin, "check", "--json", "--src", cli(a), "--dst", cli(u))
		assert.Equal(t, 1, code, "the migration cannot run")
		res := lines[len(lines)-1]
		assert.Equal(t, "fail", res["status"])
		assert.Equal(t, []any{"machine-type", "cpu-model", "cpu-features", "vcpu-topology"}, res["failed"]) // the CPU slot takes another type too
		for _, l := range lines {
			if l["result"] == "fail" {
				t.Logf("check: %s: %s", l["check"], l["detail"])
			}
		}
		code, lines, stderr := runCLI(t, time.Minute, bin, "migrate", "--json", "--src", cli(a), "--dst", cli(u),
			"--uri", "unix:"+filepath.Join(u.Dir(), "mig.sock"))
		assert.Equal(t, 2, code, "bad input")
		require.NotEmpty(t, lines)
		res = lines[len(lines)-1]
		assert.Equal(t, "failed", res["status"])
		msg, _ := res["error"].(string)
		for _, s := range []string{"machine-type: ", "start the destination with -machine pc-i440fx-7.2", "cpu-model: ", "cpu-features: "} {
			assert.Contains(t, msg, s)
			assert.Contains(t, stderr, s)
		}
		assert.Equal(t, before, [2]string{runState(t, a.QMP), runState(t, u.QMP)}, "nothing changed")
		u.Close()
	})

	b := upgradeVM(t, q10, q72, pinned, "dst10", true, kernel, initrd, w)
	code, lines, _ := runCLI(t, 3*time.Minute, bin, "migrate", "--json", "--src", cli(a), "--dst", cli(b),
		"--uri", "unix:"+filepath.Join(b.Dir(), "mig.sock"))
	require.Equal(t, 0, code, "7.2 -> 10.0: %v", lines)
	res := lines[len(lines)-1]
	assert.Equal(t, "completed", res["status"])
	t.Logf("7.2 -> 10.0 pinned: %v", res)
	minPass, err := qemulab.LinuxPass(a)
	require.NoError(t, err)
	l, err := qemulab.CheckLinux(ctx, b, minPass)
	require.NoError(t, err, "memory on 10.0")
	t.Logf("10.0 destination: %s", l.Raw)
	require.NoError(t, a.Quit(ctx))

	// The reverse: back to 7.2, pinned alike.
	c := upgradeVM(t, q72, q72, pinned, "back72", true, kernel, initrd, w)
	code, lines, stderr := runCLI(t, 3*time.Minute, bin, "migrate", "--json", "--src", cli(b), "--dst", cli(c),
		"--uri", "unix:"+filepath.Join(c.Dir(), "mig.sock"))
	require.NotEmpty(t, lines)
	res = lines[len(lines)-1]
	t.Logf("10.0 -> 7.2 pinned: exit %d, %v; stderr %s", code, res, stderr)
	require.Equal(t, 0, code, "10.0 -> 7.2: %v", lines)
	minPass, err = qemulab.LinuxPass(b)
	require.NoError(t, err)
	l, err = qemulab.CheckLinux(ctx, c, minPass)
	require.NoError(t, err, "memory back on 7.2")
	t.Logf("7.2 destination of the reverse: %s", l.Raw)
}

func testUpgradeStorage(t *testing.T, q72, q10 *qemulab.QEMU, bin, kernel, initrd string) {
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	dir := shortTempDir(t)
	disk := func(name string) qemulab.Drive {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, nil, 0o644))
		require.NoError(t, os.Truncate(p, 32<<20))
		return qemulab.Drive{Path: p, Node: "disk0", Device: "vd0"}
	}
	w := linux.Workload{Mode: linux.ModeDiskWrite, RateBytes: 2 << 20, VerifyEvery: 2 * time.Second}
	started := time.Now()
	src, dst := disk("src.raw"), disk("dst.raw")
	a := upgradeVM(t, q72, q72, pinned, "src72", false, kernel, initrd, w, src.Args()...)
	as := linux.NewSerial(a.SerialPath())
	guestWaitReady(t, ctx, as, started)
	_, err := as.WaitFor(ctx, linux.Verdict(linux.KindDiskVerify, "records", 1))
	require.NoError(t, err, "7.2 guest writing and verifying its disk log")
	b := upgradeVM(t, q10, q72, pinned, "dst10", true, kernel, initrd, w, dst.Args()...)
	code, lines, _ := runCLI(t, 3*time.Minute, bin, "migrate", "--json", "--src", cli(a), "--dst", cli(b),
		"--uri", "unix:"+filepath.Join(dir, "mig.sock"), "--copy-storage", "--nbd", "unix:"+filepath.Join(dir, "nbd.sock"))
	require.Equal(t, 0, code, "7.2 -> 10.0 with --copy-storage: %v", lines)
	res := lines[len(lines)-1]
	assert.Equal(t, "completed", res["status"])
	disks := 0
	for _, l := range lines {
		if l["type"] == "disk" {
			disks++
		}
	}
	assert.Positive(t, disks, "disk progress lines")
	t.Logf("7.2 -> 10.0 pinned, storage copied: %v", res)
	seq, err := qemulab.LinuxDiskSeq(a)
	require.NoError(t, err)
	require.NoError(t, a.Quit(ctx))
	l, err := qemulab.CheckLinuxDisk(ctx, b, seq)
	require.NoError(t, err, "disk log on 10.0")
	t.Logf("source wrote up to record %d; 10.0 destination: %s", seq, l.Raw)
	assert.False(t, strings.Contains(l.Raw, "FAIL"))
}
