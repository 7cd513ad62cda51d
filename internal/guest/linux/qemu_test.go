package linux

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/internal/guest/linux/wire"
	"github.com/qmigrate/qmigrate/qmp"
)

// These tests boot the guest under real QEMU (QMIGRATE_QEMU, else qemu-system-x86_64 on PATH;
// TCG, -cpu max). They are smoke tests of the guest program itself; the integration suite's
// harness lives in integration/. They skip with -short, and when QEMU or the kernel is missing
// outside CI.

// vm is one QEMU process of these tests.
type vm struct {
	dir    string
	serial string
	qmp    *qmp.Client
	cmd    *exec.Cmd
}

func guestAssets(t *testing.T) (kernel, initrd string) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots QEMU; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	kernel, initrd, err := Assets(ctx)
	if err != nil && os.Getenv("CI") == "" {
		t.Skipf("guest kernel not set up: %v", err)
	}
	require.NoError(t, err)
	return kernel, initrd
}

func qemuBinary(t *testing.T) (string, []string) {
	t.Helper()
	bin := os.Getenv("QMIGRATE_QEMU")
	if bin == "" {
		bin = "qemu-system-x86_64"
	}
	path, err := exec.LookPath(bin)
	if err != nil && os.Getenv("CI") == "" {
		t.Skipf("no QEMU: %v", err)
	}
	require.NoError(t, err)
	var fw []string
	if d := os.Getenv("QMIGRATE_QEMU_FIRMWARE"); d != "" {
		fw = []string{"-L", d}
	}
	return path, fw
}

// vmRAM is the guests' RAM size: 512 MiB and 8 KiB. On QEMU before 9.0 a
// TCG guest whose RAM is a multiple of 256 KiB loses writes from the dirty
// log (the bitmap sync's fast path clears dirty bits without resetting
// TCG's TLB; fixed in 9.0): at 512 MiB the kernel of a live-migrated guest
// crashed on the destination in 10 of 24 runs on 7.2.22, at 512 MiB + 8 KiB
// in none of 30 (internal/testbed does the same before 9.0; this test, which
// proves the guest program, does it on every version).
const vmRAM = "524296K"

// startVM starts QEMU with the guest and the given extra arguments and connects to its QMP.
func startVM(t *testing.T, ctx context.Context, name, kernel, initrd string, w Workload, extra ...string) *vm {
	t.Helper()
	bin, fw := qemuBinary(t)
	dir := t.TempDir()
	v := &vm{dir: dir, serial: filepath.Join(dir, "serial.log")}
	sock := filepath.Join(dir, "qmp.sock")
	ram := vmRAM
	if slices.ContainsFunc(extra, func(a string) bool { return strings.HasPrefix(a, "memory-backend") }) {
		ram = "512M" // the size of the stale-page test's backend (it does not migrate)
	}
	args := append(fw, "-name", name, "-M", "q35", "-accel", "tcg", "-cpu", "max", "-m", ram,
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-serial", "file:"+v.serial, "-qmp", "unix:"+sock+",server=on,wait=off")
	args = append(args, BootArgs(kernel, initrd, w)...)
	args = append(args, extra...)
	v.cmd = exec.Command(bin, args...)
	v.cmd.Stderr = os.Stderr
	require.NoError(t, v.cmd.Start())
	t.Cleanup(func() {
		if t.Failed() {
			data, _ := os.ReadFile(v.serial)
			t.Logf("serial console of %s (last 3000 bytes):\n%s", name, data[max(0, len(data)-3000):])
		}
		if v.qmp != nil {
			v.qmp.Close()
		}
		_ = v.cmd.Process.Kill()
		_ = v.cmd.Wait()
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := qmp.Dial(ctx, "unix", sock)
		if err == nil {
			v.qmp = c
			return v
		}
		require.True(t, time.Now().Before(deadline), "QMP of %s: %v", name, err)
		time.Sleep(20 * time.Millisecond)
	}
}

// migrate moves src to dst (started with -incoming defer) over a unix socket.
func migrate(t *testing.T, ctx context.Context, src, dst *vm) {
	t.Helper()
	uri := "unix:" + filepath.Join(dst.dir, "migrate.sock")
	for _, c := range []*qmp.Client{src.qmp, dst.qmp} {
		require.NoError(t, c.MigrateSetParameters(ctx, qmp.MigrationParameters{
			MaxBandwidth: qmp.Ptr(uint64(1 << 36)), DowntimeLimit: qmp.Ptr(uint64(300)),
		}))
	}
	require.NoError(t, dst.qmp.MigrateIncoming(ctx, qmp.MigrateIncomingArgs{URI: uri}))
	require.NoError(t, src.qmp.Migrate(ctx, qmp.MigrateArgs{URI: uri}))
	for {
		info, err := src.qmp.QueryMigrate(ctx)
		require.NoError(t, err)
		switch info.Status {
		case qmp.StatusCompleted:
			t.Logf("migration completed in %v (downtime %v)", info.TotalTime, info.Downtime)
			return
		case qmp.StatusFailed, qmp.StatusCancelled:
			t.Fatalf("migration %s: %s", info.Status, info.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("migration did not complete: %v (status %s)", ctx.Err(), info.Status)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func waitReady(t *testing.T, ctx context.Context, s *Serial, started time.Time) Line {
	t.Helper()
	l, err := s.WaitFor(ctx, Kind(KindReady))
	require.NoError(t, err)
	t.Logf("%s: READY after %.1f s (guest uptime %s s)", os.Getenv("QMIGRATE_QEMU"), time.Since(started).Seconds(), l.Fields["uptime"])
	return l
}

// TestMemDirtyMigrates migrates the memory dirtier between two QEMUs and requires the
// destination's self-check to pass two full passes after the switchover.
//
// The RAM size is vmRAM, off QEMU < 9.0's 256 KiB fast path that loses TCG writes from
// the dirty log (measured on 7.2.22 at 4 MiB/s: 10 of 24 destinations crashed at 512 MiB,
// none of 20 at vmRAM; at 64 MiB/s none of 10).
func TestMemDirtyMigrates(t *testing.T) {
	kernel, initrd := guestAssets(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	w := Workload{Mode: ModeMemDirty, MemBytes: 16 << 20, RateBytes: 4 << 20}
	started := time.Now()
	src := startVM(t, ctx, "src", kernel, initrd, w)
	dst := startVM(t, ctx, "dst", kernel, initrd, w, "-incoming", "defer")
	ss := NewSerial(src.serial)
	waitReady(t, ctx, ss, started)
	_, err := ss.WaitFor(ctx, Verdict(KindCheck, "pass", 1))
	require.NoError(t, err)

	migrate(t, ctx, src, dst)
	// The destination must finish two more passes than the source did, intact.
	last, err := ss.Latest(ctx, KindCheck, "pass", 1, 200*time.Millisecond)
	require.NoError(t, err)
	st, err := src.qmp.QueryStatus(ctx)
	require.NoError(t, err)
	assert.Equal(t, "postmigrate", string(st.Status))
	require.NoError(t, src.qmp.Quit(ctx))

	ds := NewSerial(dst.serial)
	l, err := ds.WaitFor(ctx, Verdict(KindCheck, "pass", last+2))
	require.NoError(t, err, "destination self-check")
	assert.Equal(t, "0", l.Fields["failed_passes"])
	t.Logf("destination: %s", l.Raw)
}

// TestMemDirtyDetectsStalePage is the negative control on real QEMU: it writes an older
// generation of one working-set page straight into guest RAM (a shared memory-backend-file) and
// requires the guest to report exactly that page.
func TestMemDirtyDetectsStalePage(t *testing.T) {
	kernel, initrd := guestAssets(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	mem := filepath.Join(t.TempDir(), "ram")
	w := Workload{Mode: ModeMemDirty, MemBytes: 64 << 20, RateBytes: 32 << 20}
	started := time.Now()
	v := startVM(t, ctx, "stale", kernel, initrd, w,
		"-object", "memory-backend-file,id=ram0,size=512M,share=on,mem-path="+mem, "-machine", "memory-backend=ram0")
	s := NewSerial(v.serial)
	waitReady(t, ctx, s, started)
	_, err := s.WaitFor(ctx, Verdict(KindCheck, "pass", 1))
	require.NoError(t, err)

	f, err := os.OpenFile(mem, os.O_RDWR, 0)
	require.NoError(t, err)
	defer f.Close()
	const target = 1000 // working-set page index to damage
	page := make([]byte, wire.PageSize)
	var off int64 = -1
	var gen uint64
	for o := int64(0); o < 512<<20; o += wire.PageSize {
		_, err := f.ReadAt(page, o)
		require.NoError(t, err)
		if binary.LittleEndian.Uint64(page) != target {
			continue
		}
		if g, st := wire.CheckPage(page, target, 0); st == wire.PageStale && g > 0 {
			off, gen = o, g
			break
		}
	}
	require.GreaterOrEqual(t, off, int64(0), "page %d of the working set not found in guest RAM", target)
	wire.FillPage(page, target, gen-1)
	_, err = f.WriteAt(page, off)
	require.NoError(t, err)
	t.Logf("wrote generation %d over generation %d of page %d at guest RAM offset %#x", gen-1, gen, target, off)

	l, err := s.WaitFor(ctx, func(l Line) bool { return l.Failed() })
	require.NoError(t, err)
	assert.Equal(t, KindCheck, l.Kind)
	assert.Equal(t, fmt.Sprint(target), l.Fields["page"], l.Raw)
	assert.Equal(t, "stale", l.Fields["state"], l.Raw)
}

// TestDiskWriteMigrates migrates the disk writer between two QEMUs sharing one raw disk and
// requires the destination to verify the whole log, including records written before and after
// the switchover.
func TestDiskWriteMigrates(t *testing.T) {
	kernel, initrd := guestAssets(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	disk := filepath.Join(t.TempDir(), "disk.raw")
	require.NoError(t, os.WriteFile(disk, nil, 0o644))
	require.NoError(t, os.Truncate(disk, 32<<20))
	drive := []string{"-drive", "file=" + disk + ",format=raw,if=virtio,cache=none"}
	w := Workload{Mode: ModeDiskWrite, RateBytes: 2 << 20, VerifyEvery: 2 * time.Second}
	started := time.Now()
	src := startVM(t, ctx, "src", kernel, initrd, w, drive...)
	dst := startVM(t, ctx, "dst", kernel, initrd, w, append(drive, "-incoming", "defer")...)
	ss := NewSerial(src.serial)
	waitReady(t, ctx, ss, started)
	var seq uint64 // the last record the source reported
	_, err := ss.WaitFor(ctx, func(l Line) bool {
		if n, ok := l.Uint("seq"); ok && l.Kind == KindDisk {
			seq = n
		}
		return Verdict(KindDiskVerify, "records", 1)(l)
	})
	require.NoError(t, err)

	migrate(t, ctx, src, dst)
	seq, err = ss.Latest(ctx, KindDisk, "seq", seq, 200*time.Millisecond)
	require.NoError(t, err)
	require.NoError(t, src.qmp.Quit(ctx))

	ds := NewSerial(dst.serial)
	l, err := ds.WaitFor(ctx, Verdict(KindDiskVerify, "last", seq+100))
	require.NoError(t, err, "destination disk verification")
	t.Logf("source wrote up to record %d; destination: %s", seq, l.Raw)
}
