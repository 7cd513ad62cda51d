package integration

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/guest/linux"
	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/qmp"
)

// bmQEMUs lists the QEMUs to run on (qemulab.FindQEMUs: QMIGRATE_QEMU when
// set, else PATH's and the ones scripts/setup.sh unpacked). It skips when none
// is found and CI is unset.
func bmQEMUs(t testing.TB) []*qemulab.QEMU {
	t.Helper()
	qs := qemulab.RequireQEMUs(t)
	for _, q := range qs {
		require.NotEmpty(t, q.Img, "qemu-img of %s", q.Binary)
	}
	return qs
}

// bmVM is a QEMU process (qemulab.Instance) with a disk, driven over QMP.
type bmVM struct {
	t    testing.TB
	q    *qemulab.QEMU
	inst *qemulab.Instance
	qmp  *qmp.Client
	f    *qmp.Features
	disk string // image path
	dir  string // the test's folder (images, migration socket)
}

type bmOpts struct {
	incoming bool     // -incoming defer, paused (-S) after the migration
	format   string   // raw | qcow2
	size     string   // qemu-img size, e.g. 64M
	readOnly string   // optional read-only second disk image
	noDisk   bool     // no disk (for CreateTargets)
	machine  string   // default q35
	second   bool     // a second writable raw disk: node disk1 (16 MiB) on device vd1
	netns    string   // run inside this network namespace
	mem      int      // MiB of RAM (qemulab.RAMSize), default 64
	ram      string   // a file to back the RAM with (private mapping; qemulab.MemBackend)
	extra    []string // more QEMU arguments
	discard  bool     // discard=unmap on the disk nodes (keeps a mirrored image sparse)
	guest    qemulab.Guest
}

// bmImage creates a qemu-img image unless it exists.
func bmImage(t testing.TB, q *qemulab.QEMU, path, format, size string) {
	t.Helper()
	if _, err := os.Stat(path); os.IsNotExist(err) {
		out, err := exec.Command(q.Img, "create", "-q", "-f", format, path, size).CombinedOutput()
		require.NoError(t, err, "%s", out)
	}
}

// bmStartVM creates the image in dir (unless it exists) and starts QEMU
// (qemulab.StartT) with the disk as node "disk0" on device "vd0". The process
// and its files are cleaned up with the test.
func bmStartVM(t testing.TB, q *qemulab.QEMU, dir, name string, o bmOpts) *bmVM {
	t.Helper()
	if o.format == "" {
		o.format = "raw"
	}
	if o.size == "" {
		o.size = "64M"
	}
	if o.mem == 0 {
		o.mem = 64
	}
	cfg := qemulab.Config{Name: name, Guest: o.guest, Machine: o.machine, MemMiB: o.mem, Netns: o.netns,
		Incoming: o.incoming, Paused: o.incoming, Args: o.extra}
	if o.ram != "" {
		cfg.MemBackend = &qemulab.MemBackend{Path: o.ram}
	}
	img := filepath.Join(dir, name+"."+o.format)
	if !o.noDisk {
		bmImage(t, q, img, o.format, o.size)
		cfg.Drives = append(cfg.Drives, qemulab.Drive{Path: img, Format: o.format, Node: "disk0", Device: "vd0", Discard: o.discard})
	}
	if o.second {
		img1 := filepath.Join(dir, name+"-1.raw")
		bmImage(t, q, img1, "raw", "16M")
		cfg.Drives = append(cfg.Drives, qemulab.Drive{Path: img1, Node: "disk1", Device: "vd1"})
	}
	if o.readOnly != "" {
		cfg.Drives = append(cfg.Drives, qemulab.Drive{Path: o.readOnly, Node: "ro0", Device: "vdro", ReadOnly: true})
	}
	inst := qemulab.StartT(t, q, cfg)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("%s output:\n%s", name, inst.LogTail())
		}
	})
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	f, err := inst.QMP.ProbeFeatures(ctx)
	require.NoError(t, err)
	return &bmVM{t: t, q: q, inst: inst, qmp: inst.QMP, f: f, disk: img, dir: dir}
}

// kill stops the QEMU process and waits for it.
func (vm *bmVM) kill() { _ = vm.inst.Close() }

// quit asks QEMU to quit and waits for the process (images flushed), killing
// it after 10 s.
func (vm *bmVM) quit(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_ = vm.inst.Quit(ctx)
}

func (vm *bmVM) hmp(ctx context.Context, line string) {
	vm.t.Helper()
	out, err := vm.qmp.HumanMonitorCommand(ctx, line)
	require.NoError(vm.t, err)
	require.NotContains(vm.t, strings.ToLower(out), "error", "%s -> %s", line, out)
}

// write writes pattern at off (len bytes) through the guest device.
func (vm *bmVM) write(ctx context.Context, pattern byte, off, n uint64) {
	vm.t.Helper()
	vm.hmp(ctx, fmt.Sprintf(`qemu-io -d vd0/virtio-backend "write -P 0x%02x %d %d"`, pattern, off, n))
}

func (vm *bmVM) status(ctx context.Context) string {
	st, err := vm.qmp.QueryStatus(ctx)
	require.NoError(vm.t, err)
	return st.Status
}

// bmAssertNothingLeft checks that no job, NBD node or export is left.
func bmAssertNothingLeft(t testing.TB, ctx context.Context, src, dst *bmVM) {
	t.Helper()
	jobs, err := src.qmp.QueryBlockJobs(ctx)
	require.NoError(t, err)
	assert.Empty(t, jobs, "source block jobs")
	nodes, err := src.qmp.QueryNamedBlockNodes(ctx)
	require.NoError(t, err)
	for _, n := range nodes {
		assert.NotEqual(t, "nbd", n.Driver, "source NBD node %s left", n.NodeName)
		assert.False(t, strings.HasPrefix(n.NodeName, "qmigrate-nbd"), "source node %s left", n.NodeName)
	}
	if dst != nil {
		exps, err := dst.qmp.QueryBlockExports(ctx)
		require.NoError(t, err)
		assert.Empty(t, exps, "destination exports")
		// nbd-server-stop succeeds only when... a second start proves the server is gone.
		err = dst.qmp.NBDServerStart(ctx, qmp.UnixAddress(filepath.Join(dst.dir, "probe.sock")), "")
		assert.NoError(t, err, "NBD server still running on the destination")
		if err == nil {
			require.NoError(t, dst.qmp.NBDServerStop(ctx))
		}
	}
}

// bmStart starts the mirrors of cfg from src to dst, the migration channel
// at uri ("" for none), logging with bmLogger.
func bmStart(ctx context.Context, tb testing.TB, src, dst *bmVM, cfg blockmirror.Config, uri string) (*blockmirror.Session, error) {
	mig, _ := qmp.ParseAddress(uri)
	return blockmirror.Start(ctx, cfg, blockmirror.Env{
		Source:      blockmirror.QEMU{Client: src.qmp, Features: src.f},
		Destination: blockmirror.QEMU{Client: dst.qmp, Features: dst.f},
		Migration:   mig,
		Logger:      bmLogger(tb),
	})
}

// bmLogger logs to the test log when QMIGRATE_TEST_DEBUG is set.
func bmLogger(t testing.TB) *slog.Logger {
	if os.Getenv("QMIGRATE_TEST_DEBUG") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(bmTestWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type bmTestWriter struct{ t testing.TB }

func (w bmTestWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// bmMigrate runs the storage+RAM sequence of qemu-protocol.md 2.7 with the
// mirrors already READY: migrate-incoming, migrate, pre-switchover, Finish,
// migrate-continue, completed on both sides, Cleanup, cont.
func bmMigrate(t testing.TB, ctx context.Context, s *blockmirror.Session, src, dst *bmVM, beforeCont ...func()) {
	t.Helper()
	uri := "unix:" + filepath.Join(src.dir, "mig.sock")
	require.NoError(t, dst.qmp.MigrateIncoming(ctx, qmp.MigrateIncomingArgs{URI: uri}))
	require.NoError(t, src.qmp.Migrate(ctx, qmp.MigrateArgs{URI: uri}))
	bmWaitStatus(t, ctx, src, qmp.StatusPreSwitchover)
	require.NoError(t, s.Finish(ctx))
	require.NoError(t, src.qmp.MigrateContinue(ctx, qmp.StatusPreSwitchover))
	bmWaitStatus(t, ctx, src, qmp.StatusCompleted)
	bmWaitStatus(t, ctx, dst, qmp.StatusCompleted)
	require.NoError(t, s.Cleanup(ctx))
	for _, f := range beforeCont {
		f()
	}
	require.NoError(t, dst.qmp.Cont(ctx))
	require.Equal(t, "running", dst.status(ctx))
}

func bmWaitStatus(t testing.TB, ctx context.Context, vm *bmVM, want qmp.MigrationStatus) {
	t.Helper()
	for {
		info, err := vm.qmp.QueryMigrate(ctx)
		require.NoError(t, err)
		if info.Status == want {
			return
		}
		require.False(t, info.Status.Terminal(), "migration ended %s (waiting for %s): %+v", info.Status, want, info)
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v", want, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func bmCaps(t testing.TB, ctx context.Context, src, dst *bmVM) {
	t.Helper()
	require.NoError(t, src.qmp.MigrateSetCapabilities(ctx, map[string]bool{"events": true, "pause-before-switchover": true}))
	require.NoError(t, dst.qmp.MigrateSetCapabilities(ctx, map[string]bool{"events": true, "late-block-activate": true}))
}

// bmCompare runs qemu-img compare on the two images (both QEMUs stopped).
func bmCompare(t testing.TB, q *qemulab.QEMU, a, b string) {
	t.Helper()
	out, err := exec.Command(q.Img, "compare", "-q", a, b).CombinedOutput()
	require.NoError(t, err, "qemu-img compare %s %s: %s", a, b, out)
}

func bmPair(t testing.TB, q *qemulab.QEMU, o bmOpts) (src, dst *bmVM) {
	t.Helper()
	dir := t.TempDir()
	src = bmStartVM(t, q, dir, "src", o)
	o.incoming = true
	dst = bmStartVM(t, q, dir, "dst", o)
	return src, dst
}

func TestBlockMirror(t *testing.T) {
	for _, q := range bmQEMUs(t) {
		t.Run(q.Name(), func(t *testing.T) {
			t.Run("migrate-raw", func(t *testing.T) { bmTestMigrate(t, q, "raw") })
			t.Run("migrate-qcow2", func(t *testing.T) { bmTestMigrate(t, q, "qcow2") })
			t.Run("abort-before-ready-then-retry", func(t *testing.T) { bmTestAbort(t, q, false) })
			t.Run("abort-after-ready-then-retry", func(t *testing.T) { bmTestAbort(t, q, true) })
			t.Run("destination-killed", func(t *testing.T) { bmTestDestinationLost(t, q, false) })
			t.Run("destination-frozen", func(t *testing.T) { bmTestDestinationLost(t, q, true) })
			t.Run("destination-frozen-in-flight-tcp", func(t *testing.T) { bmTestFrozenInFlight(t, q, true) })
			t.Run("destination-frozen-in-flight-unix", func(t *testing.T) { bmTestFrozenInFlight(t, q, false) })
			t.Run("link-cut-then-retry", func(t *testing.T) { bmTestLinkCut(t, q) })
			t.Run("link-reset", func(t *testing.T) { bmTestLinkFault(t, q, "reset") })
			t.Run("link-flap", func(t *testing.T) { bmTestLinkFault(t, q, "flap") })
			t.Run("preflight", func(t *testing.T) { bmTestPreflight(t, q) })
			t.Run("sparse", func(t *testing.T) { bmTestSparse(t, q) })
			t.Run("heavy-writer", func(t *testing.T) { bmTestHeavyWriter(t, q) })
			t.Run("create-targets", func(t *testing.T) { bmTestCreateTargets(t, q) })
		})
	}
}

func bmTestMigrate(t *testing.T, q *qemulab.QEMU, format string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// raw runs with a second disk: two mirrors, finished together.
	src, dst := bmPair(t, q, bmOpts{format: format, size: "64M", second: format == "raw"})
	bmCaps(t, ctx, src, dst)
	src.write(ctx, 0x11, 0, 8<<20)
	src.write(ctx, 0x22, 40<<20, 4<<20)
	if format == "raw" {
		src.hmp(ctx, `qemu-io -d vd1/virtio-backend "write -P 0x66 1M 3M"`)
	}

	cfg := blockmirror.Config{}
	// raw: NBD address derived from a unix migration URI; qcow2: from a tcp
	// one (the next port after the migration port; blockmirror moves on
	// to the following ones while nbd-server-start finds it taken). The
	// migration itself runs over unix (bmMigrate).
	uri := "unix:" + filepath.Join(src.dir, "mig.sock")
	if format == "qcow2" {
		uri = fmt.Sprintf("tcp:127.0.0.1:%d", freePort(t))
	}
	s, err := bmStart(ctx, t, src, dst, cfg, uri)
	require.NoError(t, err)
	src.write(ctx, 0x33, 4<<20, 1<<20) // during the mirror
	var last []blockmirror.Progress
	require.NoError(t, s.WaitReady(ctx, func(p []blockmirror.Progress) { last = p }))
	nodes := []string{"disk0"}
	if format == "raw" {
		nodes = append(nodes, "disk1")
	}
	require.Len(t, last, len(nodes))
	for i, n := range nodes {
		assert.Equal(t, n, last[i].Node)
		assert.True(t, last[i].Ready)
		assert.Equal(t, "background", last[i].CopyMode)
	}
	src.write(ctx, 0x44, 60<<20, 2<<20) // after READY
	if format == "raw" {
		src.hmp(ctx, `qemu-io -d vd1/virtio-backend "write -P 0x77 8M 1M"`)
	}
	bmMigrate(t, ctx, s, src, dst)
	bmAssertNothingLeft(t, ctx, src, dst)
	src.quit(ctx)
	dst.quit(ctx)
	bmCompare(t, q, src.disk, dst.disk)
	if format == "raw" {
		bmCompare(t, q, filepath.Join(src.dir, "src-1.raw"), filepath.Join(dst.dir, "dst-1.raw"))
	}
}

// bmSourceIntact checks the source guest runs, its disk is node disk0 again
// and holds the data written before.
func bmSourceIntact(t testing.TB, ctx context.Context, src *bmVM, checks map[uint64]byte, n uint64) {
	t.Helper()
	assert.Equal(t, "running", src.status(ctx))
	blocks, err := src.qmp.QueryBlock(ctx)
	require.NoError(t, err)
	found := false
	for _, b := range blocks {
		if b.Inserted != nil && b.Inserted.NodeName == "disk0" {
			found = true
			assert.False(t, b.Inserted.ReadOnly)
		}
	}
	assert.True(t, found, "device vd0 no longer on node disk0: %+v", blocks)
	for off, p := range checks {
		out, err := src.qmp.HumanMonitorCommand(ctx, fmt.Sprintf(`qemu-io -d vd0/virtio-backend "read -P 0x%02x %d %d"`, p, off, n))
		require.NoError(t, err)
		assert.NotContains(t, strings.ToLower(out), "fail", "read back at %d: %s", off, out)
	}
	src.write(ctx, 0x5a, 63<<20, 64<<10) // still writable
}

func bmJob(t testing.TB, ctx context.Context, s *blockmirror.Session) string {
	t.Helper()
	p, err := s.Progress(ctx)
	require.NoError(t, err)
	require.Len(t, p, 1)
	return p[0].Job
}

func bmTestAbort(t *testing.T, q *qemulab.QEMU, afterReady bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	src, dst := bmPair(t, q, bmOpts{size: "64M"})
	bmCaps(t, ctx, src, dst)
	src.write(ctx, 0x11, 0, 32<<20)
	uri := "unix:" + filepath.Join(src.dir, "mig.sock")
	cfg := blockmirror.Config{}

	first := cfg
	if !afterReady {
		// Slow from its start (1 MiB/s for 32 MiB): a set-speed sent once
		// it runs at unlimited speed may find the mirror READY already.
		first.Speed = 1 << 20
	}
	s, err := bmStart(ctx, t, src, dst, first, uri)
	require.NoError(t, err)
	if afterReady {
		require.NoError(t, s.WaitReady(ctx, nil))
	} else {
		p, err := s.Progress(ctx)
		require.NoError(t, err)
		require.False(t, p[0].Ready, "mirror READY already: %+v", p)
		assert.Less(t, p[0].Done, p[0].Total)
		require.ErrorIs(t, s.Finish(ctx), blockmirror.ErrNotReady)
	}
	src.write(ctx, 0x22, 40<<20, 1<<20)
	require.NoError(t, s.Abort(ctx))
	require.NoError(t, s.Abort(ctx), "Abort is idempotent")
	bmAssertNothingLeft(t, ctx, src, dst)
	bmSourceIntact(t, ctx, src, map[uint64]byte{0: 0x11, 40 << 20: 0x22}, 1<<20)

	// A retry on the same pair migrates.
	s, err = bmStart(ctx, t, src, dst, cfg, uri)
	require.NoError(t, err)
	require.NoError(t, s.WaitReady(ctx, nil))
	bmMigrate(t, ctx, s, src, dst)
	bmAssertNothingLeft(t, ctx, src, dst)
	src.quit(ctx)
	dst.quit(ctx)
	bmCompare(t, q, src.disk, dst.disk)
}

// bmTestDestinationLost kills (or SIGSTOPs) the destination while a slow
// mirror runs: the source must stay intact with nothing left behind.
func bmTestDestinationLost(t *testing.T, q *qemulab.QEMU, freeze bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	src, dst := bmPair(t, q, bmOpts{size: "64M"})
	bmCaps(t, ctx, src, dst)
	src.write(ctx, 0x11, 0, 32<<20)
	// Killed: 4 MiB/s from its start (a set-speed sent once it runs at
	// unlimited speed may find the 32 MiB mirror READY already, and then
	// nothing fails). Frozen: started at unlimited speed and slowed once it
	// runs, so that little is in flight at the freeze. Found by the CI
	// rehearsal of the slow start: a destination frozen while the mirror
	// has NBD requests in flight, over this test's unix socket, holds the
	// source's mirror until it reads again (bmTestFrozenInFlight).
	var cfg blockmirror.Config
	if !freeze {
		cfg.Speed = 4 << 20
	}
	s, err := bmStart(ctx, t, src, dst, cfg, "unix:"+filepath.Join(src.dir, "mig.sock"))
	require.NoError(t, err)
	if freeze {
		require.NoError(t, src.qmp.BlockJobSetSpeed(ctx, bmJob(t, ctx, s), 4<<20))
	}
	time.Sleep(300 * time.Millisecond)
	if freeze {
		stopQEMU(t, dst.inst)
		// Unlimited speed so that in-flight NBD requests pile up against the frozen peer.
		require.NoError(t, src.qmp.BlockJobSetSpeed(ctx, bmJob(t, ctx, s), 0))
		wctx, wcancel := context.WithTimeout(ctx, 2*time.Second)
		err := s.WaitReady(wctx, nil)
		wcancel()
		require.Error(t, err)
	} else {
		dst.inst.Kill()
		err := s.WaitReady(ctx, nil)
		require.Error(t, err)
		t.Logf("WaitReady after the destination died: %v", err)
		assert.True(t, errors.Is(err, blockmirror.ErrMirrorFailed) || errors.Is(err, blockmirror.ErrDestinationGone), "%v", err)
	}
	actx, acancel := context.WithTimeout(ctx, 8*time.Second)
	start := time.Now()
	err = s.Abort(actx)
	acancel()
	t.Logf("Abort took %v: %v", time.Since(start).Round(time.Millisecond), err)
	if !freeze {
		require.NoError(t, err)
	} else if err != nil {
		// The destination part cannot be done against a frozen QEMU; the
		// source part must be.
		assert.NotContains(t, err.Error(), "source")
	}
	bmAssertNothingLeft(t, ctx, src, nil)
	bmSourceIntact(t, ctx, src, map[uint64]byte{0: 0x11}, 1<<20)
}

func bmTestPreflight(t *testing.T, q *qemulab.QEMU) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir := t.TempDir()
	ro := filepath.Join(dir, "ro.raw")
	out, err := exec.Command(q.Img, "create", "-q", "-f", "raw", ro, "1M").CombinedOutput()
	require.NoError(t, err, "%s", out)
	src := bmStartVM(t, q, dir, "src", bmOpts{size: "64M", readOnly: ro})
	dst := bmStartVM(t, q, dir, "dst", bmOpts{size: "32M", incoming: true, readOnly: ro})
	uri := "unix:" + filepath.Join(dir, "mig.sock")
	start := func(cfg blockmirror.Config, d *bmVM) error {
		s, err := bmStart(ctx, t, src, d, cfg, uri)
		if err == nil {
			_ = s.Abort(ctx)
		}
		return err
	}
	err = start(blockmirror.Config{}, dst)
	require.ErrorIs(t, err, blockmirror.ErrPreflight)
	assert.Contains(t, err.Error(), "33554432")
	t.Logf("size mismatch: %v", err)
	err = start(blockmirror.Config{Disks: []string{"ro0"}}, dst)
	require.ErrorIs(t, err, blockmirror.ErrPreflight)
	t.Logf("read-only: %v", err)
	err = start(blockmirror.Config{Disks: []string{"disk0"}, Shared: []string{"disk0"}}, dst)
	require.ErrorIs(t, err, blockmirror.ErrPreflight)
	err = start(blockmirror.Config{Disks: []string{"nope"}}, dst)
	require.ErrorIs(t, err, blockmirror.ErrPreflight)
	bmAssertNothingLeft(t, ctx, src, dst)
	dst.kill()

	// The same image file on both sides (shared storage not declared).
	dst2 := bmStartVM(t, q, dir, "src", bmOpts{size: "64M", incoming: true, readOnly: ro})
	err = start(blockmirror.Config{}, dst2)
	require.ErrorIs(t, err, blockmirror.ErrPreflight)
	assert.Contains(t, err.Error(), "same image file")
	t.Logf("same file: %v", err)
	// Declared shared: nothing left to mirror.
	err = start(blockmirror.Config{Shared: []string{"disk0"}}, dst2)
	require.ErrorIs(t, err, blockmirror.ErrPreflight)
	bmAssertNothingLeft(t, ctx, src, dst2)
}

// bmTCPReceived is bytes_received of the established TCP connections whose
// local port is port (ss -ti), i.e. what a server on that port has read.
func bmTCPReceived(t testing.TB, port int) uint64 {
	t.Helper()
	out, err := exec.Command("ss", "-tinH", "state", "established", fmt.Sprintf("( sport = :%d )", port)).CombinedOutput()
	require.NoError(t, err, "%s", out)
	var total uint64
	for _, f := range strings.Fields(string(out)) {
		if v, ok := strings.CutPrefix(f, "bytes_received:"); ok {
			n, err := strconv.ParseUint(v, 10, 64)
			require.NoError(t, err)
			total += n
		}
	}
	return total
}

func bmAllocated(t testing.TB, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	require.NoError(t, syscall.Stat(path, &st))
	return uint64(st.Blocks) * 512
}

// A 4 GiB disk with 200 MiB written: only about the written data crosses.
// The NBD connection runs over TCP loopback so ss can count its bytes.
func bmTestSparse(t *testing.T, q *qemulab.QEMU) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	src, dst := bmPair(t, q, bmOpts{size: "4G", discard: true})
	bmCaps(t, ctx, src, dst)
	const chunk = 50 << 20
	for i := uint64(0); i < 4; i++ {
		src.write(ctx, byte(0x61+i), i*(1<<30)+(7<<20), chunk)
	}
	port := freePort(t)
	start := time.Now()
	s, err := bmStart(ctx, t, src, dst, blockmirror.Config{NBDAddress: qmp.TCPAddress("127.0.0.1", strconv.Itoa(port))}, "unix:"+filepath.Join(src.dir, "mig.sock"))
	require.NoError(t, err)
	var last []blockmirror.Progress
	require.NoError(t, s.WaitReady(ctx, func(p []blockmirror.Progress) { last = p }))
	took := time.Since(start)
	wire := bmTCPReceived(t, port)
	t.Logf("QEMU %s sparse 4 GiB, 200 MiB written: READY in %v, job len %d offset %d, NBD bytes received by the destination %.1f MiB, destination image allocated %.1f MiB",
		q.Name(), took.Round(time.Millisecond), last[0].Total, last[0].Done, float64(wire)/(1<<20), float64(bmAllocated(t, dst.disk))/(1<<20))
	assert.Less(t, wire, uint64(220<<20), "more than the written data crossed")
	assert.Greater(t, wire, uint64(200<<20))
	bmMigrate(t, ctx, s, src, dst)
	src.quit(ctx)
	dst.quit(ctx)
	alloc := bmAllocated(t, dst.disk)
	t.Logf("destination image allocated after migration: %.1f MiB", float64(alloc)/(1<<20))
	if q.Name() == "7.2" {
		// 10.0 fills the destination with zeroes (NBD bytes stay at the data size).
		assert.Less(t, alloc, uint64(260<<20), "destination image no longer sparse")
	}
	bmCompare(t, q, src.disk, dst.disk)
}

// bmWriter writes 1 MiB blocks at rotating offsets through the guest device
// until stop is called, which returns the bytes written. Its commands do not
// take a context that ends mid-write.
func bmWriter(vm *bmVM, span uint64) (stop func() uint64) {
	var quit atomic.Bool
	out := make(chan uint64, 1)
	go func() {
		var n, off uint64
		for !quit.Load() {
			_, err := vm.qmp.HumanMonitorCommand(context.Background(), fmt.Sprintf(`qemu-io -d vd0/virtio-backend "write -P 0x%02x %d 1M"`, byte(n>>20), off))
			if err != nil {
				break
			}
			n += 1 << 20
			off = (off + 7<<20) % span
		}
		out <- n
	}()
	var once sync.Once
	var total uint64
	return func() uint64 {
		once.Do(func() { quit.Store(true); total = <-out })
		return total
	}
}

// A writer that outpaces a rate-limited mirror: the mirror does not reach
// READY in background mode; write-blocking (switched live on 8.2+, from the
// start on 7.2) makes it converge.
func bmTestHeavyWriter(t *testing.T, q *qemulab.QEMU) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	src, dst := bmPair(t, q, bmOpts{size: "64M"})
	bmCaps(t, ctx, src, dst)
	uri := "unix:" + filepath.Join(src.dir, "mig.sock")
	const speed = 4 << 20
	wstop := bmWriter(src, 64<<20)
	defer wstop()
	time.Sleep(200 * time.Millisecond)

	s, err := bmStart(ctx, t, src, dst, blockmirror.Config{Speed: speed}, uri)
	require.NoError(t, err)
	rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
	err = s.WaitReady(rctx, nil)
	rcancel()
	require.ErrorIs(t, err, context.DeadlineExceeded, "mirror converged against the writer in background mode")
	p, err := s.Progress(ctx)
	require.NoError(t, err)
	t.Logf("background after 5 s: %d/%d bytes, rate %.1f MiB/s, ready %v", p[0].Done, p[0].Total, p[0].Rate/(1<<20), p[0].Ready)

	err = s.SetWriteBlocking(ctx)
	if !src.f.BlockJobChange {
		require.ErrorIs(t, err, blockmirror.ErrUnsupported)
		t.Logf("QEMU %s: %v; restarting with Config.WriteBlocking", q.Name(), err)
		require.NoError(t, s.Abort(ctx))
		s, err = bmStart(ctx, t, src, dst, blockmirror.Config{WriteBlocking: true, Speed: speed}, uri)
		require.NoError(t, err)
	} else {
		require.NoError(t, err)
	}
	start := time.Now()
	require.NoError(t, s.WaitReady(ctx, nil), "write-blocking mirror did not converge")
	p, err = s.Progress(ctx)
	require.NoError(t, err)
	assert.Equal(t, "write-blocking", p[0].CopyMode)
	t.Logf("write-blocking READY after %v with the writer running (%d/%d bytes)", time.Since(start).Round(time.Millisecond), p[0].Done, p[0].Total)
	time.Sleep(500 * time.Millisecond) // writes keep being mirrored
	t.Logf("writer wrote %d MiB", wstop()>>20)
	bmMigrate(t, ctx, s, src, dst)
	src.quit(ctx)
	dst.quit(ctx)
	bmCompare(t, q, src.disk, dst.disk)
}

// CreateTargets: the destination starts without the disk; blockmirror
// creates the image and node, the test adds the device, then migrates.
func bmTestCreateTargets(t *testing.T, q *qemulab.QEMU) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	// pc: its PCI bus takes the hot-added disk device.
	src := bmStartVM(t, q, dir, "src", bmOpts{format: "qcow2", size: "64M", machine: "pc"})
	dst := bmStartVM(t, q, dir, "dst", bmOpts{incoming: true, noDisk: true, machine: "pc"})
	bmCaps(t, ctx, src, dst)
	src.write(ctx, 0x77, 1<<20, 3<<20)
	tdir := filepath.Join(dir, "dst")
	require.NoError(t, os.Mkdir(tdir, 0o755))
	s, err := bmStart(ctx, t, src, dst, blockmirror.Config{CreateTargets: true, TargetDir: tdir}, "unix:"+filepath.Join(dir, "mig.sock"))
	require.NoError(t, err)
	require.NoError(t, dst.qmp.Execute(ctx, "device_add", map[string]any{"driver": "virtio-blk-pci", "drive": "disk0", "id": "vd0"}, nil))
	require.NoError(t, s.WaitReady(ctx, nil))
	bmMigrate(t, ctx, s, src, dst)
	src.quit(ctx)
	dst.quit(ctx)
	bmCompare(t, q, src.disk, filepath.Join(tdir, "src.qcow2"))
}

// BenchmarkBlockMirror compares the mirror's initial copy (Start to READY)
// with qemu-img convert -n of the same image into the same kind of NBD export
// on the same destination QEMU. Both write every byte (the image is full of
// non-zero data). Each iteration runs both, alternating which goes first.
//
//	go test ./integration -run '^$' -bench BlockMirror -benchtime 3x
func BenchmarkBlockMirror(b *testing.B) {
	for _, q := range bmQEMUs(b) {
		b.Run(q.Name(), func(b *testing.B) { bmBench(b, q) })
	}
}

func bmBench(b *testing.B, q *qemulab.QEMU) {
	const size = 1 << 30
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dir := b.TempDir()
	img := filepath.Join(dir, "src.raw")
	out, err := exec.Command(q.Img, "create", "-q", "-f", "raw", img, fmt.Sprint(size)).CombinedOutput()
	require.NoError(b, err, "%s", out)
	qio := filepath.Join(filepath.Dir(q.Img), "qemu-io")
	out, err = exec.Command(qio, "-f", "raw", "-c", fmt.Sprintf("write -P 0xa5 0 %d", size), img).CombinedOutput()
	require.NoError(b, err, "%s", out)
	// The source is paused (-S via incoming=false has no -S; stop it) so that
	// its vCPU does not compete with the copy on a 2-core machine.
	src := bmStartVM(b, q, dir, "src", bmOpts{})
	require.NoError(b, src.qmp.Stop(ctx))
	dst := bmStartVM(b, q, dir, "dst", bmOpts{incoming: true, size: fmt.Sprint(size)})
	sock := filepath.Join(dir, "nbd.sock")
	cfg := blockmirror.Config{NBDAddress: qmp.UnixAddress(sock)}
	if v := os.Getenv("QMIGRATE_BENCH_BUFSIZE"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		require.NoError(b, err)
		cfg.BufSize = n
	}
	if v := os.Getenv("QMIGRATE_BENCH_GRANULARITY"); v != "" {
		n, err := strconv.ParseUint(v, 10, 32)
		require.NoError(b, err)
		cfg.Granularity = uint32(n)
	}

	mirror := func() time.Duration {
		start := time.Now()
		s, err := bmStart(ctx, b, src, dst, cfg, "")
		require.NoError(b, err)
		require.NoError(b, s.WaitReady(ctx, nil))
		d := time.Since(start)
		require.NoError(b, s.Abort(ctx))
		return d
	}
	convert := func() time.Duration {
		require.NoError(b, dst.qmp.NBDServerStart(ctx, qmp.UnixAddress(sock), ""))
		require.NoError(b, dst.qmp.BlockExportAdd(ctx, qmp.BlockExportAddArgs{ID: "bench", NodeName: "disk0", Writable: true, Name: "bench"}))
		start := time.Now()
		out, err := exec.Command(q.Img, "convert", "-U", "-n", "-f", "raw", "-O", "raw", img, "nbd+unix:///bench?socket="+sock).CombinedOutput()
		d := time.Since(start)
		require.NoError(b, err, "%s", out)
		require.NoError(b, dst.qmp.BlockExportDel(ctx, "bench", ""))
		for !func() bool { e, err := dst.qmp.QueryBlockExports(ctx); require.NoError(b, err); return len(e) == 0 }() {
			time.Sleep(10 * time.Millisecond)
		}
		require.NoError(b, dst.qmp.NBDServerStop(ctx))
		return d
	}
	// One untimed round warms the page cache and allocates the destination file.
	mirror()
	convert()
	var tm, tc time.Duration
	var ratios []float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		var m, c time.Duration
		if i%2 == 0 {
			m = mirror()
			c = convert()
		} else {
			c = convert()
			m = mirror()
		}
		tm, tc = tm+m, tc+c
		ratios = append(ratios, c.Seconds()/m.Seconds())
		b.Logf("round %d: mirror %.0f MB/s, convert %.0f MB/s", i, size/m.Seconds()/1e6, size/c.Seconds()/1e6)
	}
	b.StopTimer()
	slices.Sort(ratios)
	med := ratios[len(ratios)/2]
	mm := float64(size) * float64(b.N) / tm.Seconds() / 1e6
	mc := float64(size) * float64(b.N) / tc.Seconds() / 1e6
	b.ReportMetric(mm, "mirror-MB/s")
	b.ReportMetric(mc, "convert-MB/s")
	b.ReportMetric(100*med, "median-mirror-%-of-convert")
	b.Logf("QEMU %s, 1 GiB of data over NBD (unix), %d rounds: mirror %.0f MB/s, qemu-img convert %.0f MB/s (total %.0f%%, median round %.0f%%)", q.Name(), b.N, mm, mc, 100*mm/mc, 100*med)
}

// TestBlockMirrorLinuxGuest migrates the Linux guest while it appends its
// checksummed log to its disk (/dev/vda) throughout: at the switchover, with
// the source stopped and the destination not yet running, the two images are
// identical; after cont the destination guest verifies the whole log,
// including records written after the switchover.
func TestBlockMirrorLinuxGuest(t *testing.T) {
	qs := bmQEMUs(t)
	if testing.Short() {
		t.Skip("boots Linux; skipped with -short")
	}
	actx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	kernel, initrd, err := linux.Assets(actx)
	cancel()
	if err != nil && os.Getenv("CI") == "" {
		t.Skipf("guest kernel not set up: %v", err)
	}
	require.NoError(t, err)
	for _, q := range qs {
		t.Run(q.Name()+"/direct", func(t *testing.T) { bmTestLinuxGuest(t, q, kernel, initrd, false) })
		t.Run(q.Name()+"/engine", func(t *testing.T) { bmTestLinuxGuest(t, q, kernel, initrd, true) })
	}
}

// bmTestLinuxGuest drives the sequence itself (and compares the images at
// the switchover), or with useEngine runs engine.Migrate with Storage.
func bmTestLinuxGuest(t *testing.T, q *qemulab.QEMU, kernel, initrd string, useEngine bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	dir := t.TempDir()
	w := linux.Workload{Mode: linux.ModeDiskWrite, RateBytes: 2 << 20, VerifyEvery: 2 * time.Second}
	opts := func(incoming bool) bmOpts {
		return bmOpts{size: "32M", mem: 256, incoming: incoming,
			guest: qemulab.LinuxGuest{Kernel: kernel, Initrd: initrd, Workload: w}}
	}
	src := bmStartVM(t, q, dir, "src", opts(false))
	ss := linux.NewSerial(src.inst.SerialPath())
	_, err := ss.WaitFor(ctx, linux.Kind(linux.KindReady))
	require.NoError(t, err)
	_, err = ss.WaitFor(ctx, linux.Verdict(linux.KindDiskVerify, "records", 1))
	require.NoError(t, err, "source guest writing and verifying its disk log")
	dst := bmStartVM(t, q, dir, "dst", opts(true))
	uri := "unix:" + filepath.Join(dir, "mig.sock")
	if useEngine {
		var disks []blockmirror.Progress
		res, err := engine.Migrate(ctx, engine.Config{
			Source: engine.Endpoint{Client: src.qmp}, Destination: engine.Endpoint{Client: dst.qmp},
			URI: uri, Storage: &blockmirror.Config{}, Logger: bmLogger(t),
			Observer: func(e engine.Event) {
				if e.Kind == engine.EventDisk {
					disks = append(disks, *e.Disk)
				}
			},
		})
		require.NoError(t, err)
		require.Equal(t, engine.StatusCompleted, res.Status)
		require.NotEmpty(t, disks)
		last := disks[len(disks)-1]
		assert.True(t, last.Ready)
		t.Logf("%d disk events, last %+v", len(disks), last)
		bmAssertNothingLeft(t, ctx, src, dst)
		assert.Equal(t, "running", dst.status(ctx))
	} else {
		bmCaps(t, ctx, src, dst)
		s, err := bmStart(ctx, t, src, dst, blockmirror.Config{}, uri)
		require.NoError(t, err)
		require.NoError(t, s.WaitReady(ctx, nil))
		time.Sleep(2 * time.Second) // the guest keeps writing through the READY mirror
		bmMigrate(t, ctx, s, src, dst, func() {
			// Both stopped: source postmigrate, destination not yet cont'ed.
			out, err := exec.Command(q.Img, "compare", "-U", "-q", src.disk, dst.disk).CombinedOutput()
			require.NoError(t, err, "images differ at the switchover: %s", out)
		})
	}
	seq, err := ss.Latest(ctx, linux.KindDisk, "seq", 0, 200*time.Millisecond)
	require.NoError(t, err)
	src.quit(ctx)
	ds := linux.NewSerial(dst.inst.SerialPath())
	l, err := ds.WaitFor(ctx, linux.Verdict(linux.KindDiskVerify, "last", seq+100))
	require.NoError(t, err, "destination disk verification")
	t.Logf("QEMU %s: source wrote up to record %d; destination: %s", q.Name(), seq, l.Raw)
	dst.quit(ctx)
}

// bmLinked is a mirror between two network namespaces (bmStartLinked).
type bmLinked struct {
	n        *qemulab.Network
	src, dst *bmVM
	cfg      blockmirror.Config
	uri      string
	s        *blockmirror.Session
	at       blockmirror.Progress // a second after the start, not READY
}

// bmStartLinked runs source and destination in two network namespaces over
// a veth link shaped to 8 MiB/s, the NBD server on the destination's
// address, and starts the mirror of 48 MiB written on a 64 MiB disk; it
// returns a second later, the mirror not READY.
func bmStartLinked(ctx context.Context, t *testing.T, q *qemulab.QEMU) *bmLinked {
	t.Helper()
	n, err := qemulab.NewNetwork(ctx, 8<<20)
	if errors.Is(err, qemulab.ErrNetnsUnavailable) && os.Getenv("CI") == "" {
		t.Skipf("no network namespaces: %v", err)
	}
	require.NoError(t, err)
	t.Cleanup(func() { _ = n.Close() })
	dir := t.TempDir()
	l := &bmLinked{n: n, uri: "unix:" + filepath.Join(dir, "mig.sock"),
		cfg: blockmirror.Config{NBDAddress: qmp.TCPAddress(n.B.Addr, "10809")}}
	l.src = bmStartVM(t, q, dir, "src", bmOpts{size: "64M", netns: n.A.Netns})
	l.dst = bmStartVM(t, q, dir, "dst", bmOpts{size: "64M", incoming: true, netns: n.B.Netns})
	bmCaps(t, ctx, l.src, l.dst)
	l.src.write(ctx, 0x11, 0, 48<<20)
	l.s, err = bmStart(ctx, t, l.src, l.dst, l.cfg, l.uri)
	require.NoError(t, err)
	time.Sleep(time.Second)
	p, err := l.s.Progress(ctx)
	require.NoError(t, err)
	require.False(t, p[0].Ready)
	l.at = p[0]
	return l
}

// bmTestLinkCut runs source and destination in two network namespaces with
// the NBD connection over a shaped veth link, cuts the link mid-mirror, aborts
// (the stuck NBD connection is yanked), restores the link and migrates.
func bmTestLinkCut(t *testing.T, q *qemulab.QEMU) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	l := bmStartLinked(ctx, t, q)
	n, src, dst, cfg, uri, s := l.n, l.src, l.dst, l.cfg, l.uri, l.s
	require.NoError(t, n.Cut(ctx))
	wctx, wcancel := context.WithTimeout(ctx, 3*time.Second)
	err := s.WaitReady(wctx, nil)
	wcancel()
	require.ErrorIs(t, err, context.DeadlineExceeded, "a cut link stalls the mirror")
	p, err := s.Progress(ctx)
	require.NoError(t, err)
	t.Logf("stalled at %d/%d bytes", p[0].Done, p[0].Total)
	start := time.Now()
	require.NoError(t, s.Abort(ctx))
	t.Logf("Abort with the link cut took %v", time.Since(start).Round(time.Millisecond))
	bmAssertNothingLeft(t, ctx, src, dst)
	bmSourceIntact(t, ctx, src, map[uint64]byte{0: 0x11, 40 << 20: 0x11}, 1<<20)

	require.NoError(t, n.Restore(ctx))
	require.NoError(t, n.SetRate(ctx, 0))
	s, err = bmStart(ctx, t, src, dst, cfg, uri)
	require.NoError(t, err)
	require.NoError(t, s.WaitReady(ctx, nil))
	bmMigrate(t, ctx, s, src, dst)
	bmAssertNothingLeft(t, ctx, src, dst)
	src.quit(ctx)
	dst.quit(ctx)
	bmCompare(t, q, src.disk, dst.disk)
}

// bmTestLinkFault breaks the NBD link mid-mirror, in two network
// namespaces over a shaped veth link: "reset" resets the NBD connection
// (ss -K from the source's namespace), "flap" takes the link down for 2 s.
// Either way the mirror goes on to READY and the migration completes with
// the destination's disk identical to the source's.
func bmTestLinkFault(t *testing.T, q *qemulab.QEMU, fault string) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	l := bmStartLinked(ctx, t, q)
	n, src, dst, s := l.n, l.src, l.dst, l.s
	t.Logf("QEMU %s: %s at %d/%d bytes", q.Name(), fault, l.at.Done, l.at.Total)
	start := time.Now()
	switch fault {
	case "reset":
		nres, out, err := resetLink(ctx, n.A, n.B, 10809)
		require.NoError(t, err)
		require.Positive(t, nres, "the NBD connection was reset: %s", out)
	case "flap":
		require.NoError(t, n.Cut(ctx))
		time.Sleep(2 * time.Second)
		require.NoError(t, n.Restore(ctx))
	}
	wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
	err := s.WaitReady(wctx, nil)
	wcancel()
	if err != nil {
		p, _ := s.Progress(ctx)
		t.Logf("after the %s: %v (progress %+v)", fault, err, p)
		require.NoError(t, s.Abort(ctx))
		bmAssertNothingLeft(t, ctx, src, dst)
		bmSourceIntact(t, ctx, src, map[uint64]byte{0: 0x11, 40 << 20: 0x11}, 1<<20)
		t.FailNow()
	}
	t.Logf("READY %v after the %s", time.Since(start).Round(time.Millisecond), fault)
	bmMigrate(t, ctx, s, src, dst)
	bmAssertNothingLeft(t, ctx, src, dst)
	src.quit(ctx)
	dst.quit(ctx)
	bmCompare(t, q, src.disk, dst.disk)
}

// bmTestFrozenInFlight stops the destination (SIGSTOP) while its mirror
// has NBD requests in flight, then aborts. Over TCP (two hosts) the yank
// of the NBD connection ends them: the source is cleaned up (no job, no
// NBD node), only the destination's part fails (it answers nothing).
// Over a unix socket (one host) QEMU waits for the socket to turn
// writable, which a shut-down unix socket never reports: the mirror stays
// until the destination reads again, and Abort says so; once it runs
// again, a second Abort cleans everything. The source's disk and guest
// are never touched. The same on 7.2.22 and 10.0.2 (found by the CI
// rehearsal of the slow start, docs/faults.md).
func bmTestFrozenInFlight(t *testing.T, q *qemulab.QEMU, tcp bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	src, dst := bmPair(t, q, bmOpts{size: "64M"})
	bmCaps(t, ctx, src, dst)
	src.write(ctx, 0x11, 0, 64<<20)
	cfg := blockmirror.Config{Speed: 4 << 20}
	if tcp {
		cfg.NBDAddress = qmp.TCPAddress("127.0.0.1", strconv.Itoa(freePort(t)))
	}
	s, err := bmStart(ctx, t, src, dst, cfg, "unix:"+filepath.Join(src.dir, "mig.sock"))
	require.NoError(t, err)
	time.Sleep(300 * time.Millisecond)
	stopQEMU(t, dst.inst)
	// Unlimited speed: requests pile up against the stopped destination.
	job := bmJob(t, ctx, s)
	require.NoError(t, src.qmp.BlockJobSetSpeed(ctx, job, 0))
	time.Sleep(2 * time.Second)
	p, err := s.Progress(ctx)
	require.NoError(t, err)
	require.False(t, p[0].Ready, "the mirror is held by the stopped destination")
	t.Logf("QEMU %s: stopped at %d/%d bytes", q.Name(), p[0].Done, p[0].Total)

	actx, acancel := context.WithTimeout(ctx, 8*time.Second)
	start := time.Now()
	err = s.Abort(actx)
	acancel()
	t.Logf("Abort took %v: %v", time.Since(start).Round(time.Millisecond), err)
	require.Error(t, err, "the destination's part cannot be done against a stopped QEMU")
	if tcp {
		assert.NotContains(t, err.Error(), "source", "the source's part is done")
		assert.NotContains(t, err.Error(), "still waiting")
		bmAssertNothingLeft(t, ctx, src, nil)
	} else {
		assert.Contains(t, err.Error(), "still waiting for NBD requests in flight")
		jobs, err := src.qmp.QueryBlockJobs(ctx)
		require.NoError(t, err, "the source's monitor answers")
		require.Len(t, jobs, 1, "the mirror stays while the destination reads nothing")
	}
	bmSourceIntact(t, ctx, src, map[uint64]byte{0: 0x11, 40 << 20: 0x11}, 1<<20)

	// The destination runs again: Abort finishes the clean-up.
	require.NoError(t, dst.inst.Signal(syscall.SIGCONT))
	require.NoError(t, s.Abort(ctx))
	bmAssertNothingLeft(t, ctx, src, dst)
	bmSourceIntact(t, ctx, src, map[uint64]byte{0: 0x11, 40 << 20: 0x11}, 1<<20)
}
