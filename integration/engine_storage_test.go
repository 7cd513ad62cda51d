package integration

import (
	"context"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/strategy"
)

// TestEngineStorage migrates the sweep guest together with its (non-shared)
// boot disk: the engine mirrors it over NBD, finishes the mirror in the
// pre-switchover window and cleans up; on a cancel it aborts the mirror and
// leaves nothing behind on the source.
func TestEngineStorage(t *testing.T) {
	q := qemulab.RequireQEMU(t)
	t.Run("Completes", func(t *testing.T) { testEngineStorage(t, q, false) })
	t.Run("CancelRollsBack", func(t *testing.T) { testEngineStorage(t, q, true) })
}

func testEngineStorage(t *testing.T, q *qemulab.QEMU, cancelIt bool) {
	src, dst := enginePair(t, q, 500e6, true, "")
	cfg := engineConfig(t, src, dst, "unix:"+filepath.Join(dst.Dir(), "mig.sock"))
	cfg.Storage = &blockmirror.Config{Disks: []string{"sweep0"}}
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	mctx, cancelMigration := context.WithCancel(ctx)
	defer cancelMigration()
	if cancelIt {
		cfg.Bandwidth = 20e6 // never converges: the cancel lands in converge
	}
	var phases []engine.Phase
	disks := 0
	cfg.Observer = func(e engine.Event) {
		switch e.Kind {
		case engine.EventPhase:
			phases = append(phases, e.Phase)
		case engine.EventDisk:
			disks++
		case engine.EventStats:
			// The cancel comes on the first RAM sample of converge (the
			// mirrors READY, their progress reported), not at a time a
			// machine of another speed reaches sooner or later.
			if cancelIt && len(phases) > 0 && phases[len(phases)-1] == engine.PhaseConverge {
				cancelMigration()
			}
		}
	}
	res, err := engine.Migrate(mctx, cfg)
	t.Logf("%s in %v: %v; phases %v; %d disk events; undone %q; undo errors %q",
		res.Status, res.Total, err, phases, disks, res.Undone, res.UndoErrors)
	assert.Positive(t, disks)
	assertNoMirrorLeft(t, ctx, src)
	if cancelIt {
		require.ErrorIs(t, err, engine.ErrCancelled)
		assert.Contains(t, phases, engine.PhaseConverge, "cancelled in converge")
		assert.Empty(t, res.UndoErrors)
		assert.Contains(t, strings.Join(res.Undone, "\n"), "mirrors aborted")
		sourceIntact(t, src)
		return
	}
	require.NoError(t, err)
	assert.Contains(t, phases, engine.PhaseSwitchover)
	exps, err := dst.QMP.QueryBlockExports(ctx)
	require.NoError(t, err)
	assert.Empty(t, exps, "destination exports removed")
	_, err = qemulab.CheckSweep(ctx, src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err, "destination guest intact")
	require.NotEmpty(t, q.Img, "qemu-img (qemulab.FindQEMU) to compare the images")
	out, err := exec.CommandContext(ctx, q.Img, "compare", "-U", "-q",
		filepath.Join(src.Dir(), "sweep.img"), filepath.Join(dst.Dir(), "sweep.img")).CombinedOutput()
	assert.NoError(t, err, "images differ: %s", out)
}

// assertNoMirrorLeft checks the source has no block job and no NBD node.
func assertNoMirrorLeft(t *testing.T, ctx context.Context, src *qemulab.Instance) {
	t.Helper()
	jobs, err := src.QMP.QueryBlockJobs(ctx)
	require.NoError(t, err)
	assert.Empty(t, jobs, "source block jobs")
	nodes, err := src.QMP.QueryNamedBlockNodes(ctx)
	require.NoError(t, err)
	for _, n := range nodes {
		assert.NotEqual(t, "nbd", n.Driver, "source NBD node %s left", n.NodeName)
	}
}

// TestEngineStorageHeavyWriter: a writer (HMP qemu-io, 1 MiB blocks across
// the disk) outpaces a mirror limited to 8 MiB/s, so the mirror never gets
// READY in background mode. On 8.2+ auto switches it to write-blocking
// (block-job-change), on 7.2 it restarts it in write-blocking mode (a full
// re-copy); either way the migration completes with equal images and
// nothing left; everywhere, write-blocking from the start completes; with
// write-blocking refused by the user the migration is aborted within the
// budget with the source intact and nothing left behind.
func TestEngineStorageHeavyWriter(t *testing.T) {
	for _, q := range bmQEMUs(t) {
		t.Run(q.Name(), func(t *testing.T) {
			t.Run("AutoSwitches", func(t *testing.T) {
				src, dst := bmPair(t, q, bmOpts{size: "32M"})
				heavyWriterCase{restart: !src.f.BlockJobChange}.run(t, q, src, dst)
			})
			t.Run("FromStart", func(t *testing.T) {
				src, dst := bmPair(t, q, bmOpts{size: "32M"})
				heavyWriterCase{writeBlocking: true}.run(t, q, src, dst)
			})
			t.Run("NoLeverAborts", func(t *testing.T) {
				src, dst := bmPair(t, q, bmOpts{size: "32M"})
				// The user refuses the lever (the switch on 8.2+, the restart on 7.2).
				c := heavyWriterCase{abort: true, strategy: strategy.Config{Limits: strategy.Limits{Budget: 20 * time.Second, NoWriteBlocking: true}}}
				c.run(t, q, src, dst)
			})
			t.Run("PresetBudget", func(t *testing.T) {
				src, dst := bmPair(t, q, bmOpts{size: "32M"})
				c := heavyWriterCase{abort: true, strategy: strategy.Config{Policy: strategy.PolicyQEMU, Limits: strategy.Limits{Budget: 6 * time.Second}}}
				c.run(t, q, src, dst)
			})
		})
	}
}

type heavyWriterCase struct {
	writeBlocking bool // start the mirrors write-blocking
	abort         bool // the migration is expected to be aborted
	restart       bool // no block-job-change: auto restarts the mirror write-blocking
	strategy      strategy.Config
}

func (c heavyWriterCase) run(t *testing.T, q *qemulab.QEMU, src, dst *bmVM) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	const speed = 8 << 20
	wstop := bmWriter(src, 32<<20)
	defer wstop()
	time.Sleep(200 * time.Millisecond)
	cfg := engine.Config{
		Source:      engine.Endpoint{Client: src.qmp},
		Destination: engine.Endpoint{Client: dst.qmp},
		URI:         "unix:" + filepath.Join(dst.dir, "mig.sock"),
		Strategy:    c.strategy,
		Storage:     &blockmirror.Config{Disks: []string{"disk0"}, Speed: speed, WriteBlocking: c.writeBlocking},
		Logger:      testLogger(t),
	}
	var readyAt time.Duration
	var last *blockmirror.Progress
	cfg.Observer = func(e engine.Event) {
		switch e.Kind {
		case engine.EventDisk:
			last = e.Disk
		case engine.EventDecision:
			t.Logf("%v decision %s: %s (err %v)", e.Elapsed.Round(time.Millisecond), e.Decision.Action, e.Decision.Reason, e.DecisionErr)
		case engine.EventPhase:
			if e.Phase == engine.PhaseConverge {
				// The mirrors are READY: stop writing, so that no write lands
				// on the source after the mirror ends at switchover.
				readyAt = e.Elapsed
				t.Logf("mirrors READY at %v (%s, %d/%d bytes); the writer wrote %d MiB", e.Elapsed.Round(time.Millisecond),
					last.CopyMode, last.Done, last.Total, wstop()>>20)
			}
		}
	}
	res, err := engine.Migrate(ctx, cfg)
	wstop()
	var actions []strategy.Action
	for _, d := range res.Decisions {
		actions = append(actions, d.Action)
	}
	t.Logf("QEMU %s: %s in %v (READY at %v): %v; decisions %v; undone %q; undo errors %q",
		q.Name(), res.Status, res.Total.Round(time.Millisecond), readyAt.Round(time.Millisecond), err, actions, res.Undone, res.UndoErrors)
	if c.abort {
		require.ErrorIs(t, err, engine.ErrAborted)
		assert.NotContains(t, actions, strategy.MirrorWriteBlocking)
		// The budget's safety net plus the rollback (mirrors cancelled
		// under a writer, on a machine half as fast): 4 s of grace.
		assert.LessOrEqual(t, res.Total, c.strategy.Limits.Budget+4*time.Second, "aborted within the budget")
		assert.Empty(t, res.UndoErrors)
		assert.Contains(t, strings.Join(res.Undone, "\n"), "mirrors aborted")
		assert.Equal(t, "running", src.status(ctx), "guest runs on the source")
		nodes, err := src.qmp.QueryNamedBlockNodes(ctx)
		require.NoError(t, err)
		found := false
		for _, n := range nodes {
			found = found || n.NodeName == "disk0"
		}
		assert.True(t, found, "source disk still attached")
		bmAssertNothingLeft(t, ctx, src, dst)
		return
	}
	require.NoError(t, err)
	if c.writeBlocking {
		assert.NotContains(t, actions, strategy.MirrorWriteBlocking, "already write-blocking")
	} else {
		assert.Contains(t, actions, strategy.MirrorWriteBlocking)
		for _, d := range res.Decisions {
			if d.Action == strategy.MirrorWriteBlocking {
				if c.restart {
					assert.Contains(t, d.Reason, "restart them in write-blocking mode")
				} else {
					assert.Contains(t, d.Reason, "switch them to write-blocking")
				}
			}
		}
	}
	require.NotNil(t, last)
	assert.Equal(t, "write-blocking", last.CopyMode)
	bmAssertNothingLeft(t, ctx, src, nil)
	exps, err := dst.qmp.QueryBlockExports(ctx)
	require.NoError(t, err)
	assert.Empty(t, exps, "destination exports removed")
	assert.Equal(t, "running", dst.status(ctx))
	src.quit(ctx)
	dst.quit(ctx)
	bmCompare(t, q, src.disk, dst.disk)
}

// TestEngineStorageBacklogAfterReady: the mirror of an idle 32 MiB disk gets
// READY after its bulk copy (~4 s at 8 MiB/s); then, in the converge phase, a
// writer (HMP qemu-io, 1 MiB blocks across the disk) outpaces the mirror,
// whose destination disk takes writes at 8 MiB/s: the backlog fills the
// disk, seconds to drain at switchover. The guest's
// 64 MiB of RAM are random (a private mapping of a random file) and RAM
// migration is limited to 10 MB/s, so the RAM phase lasts ~7 s. On 8.2+ auto
// switches the mirror to write-blocking in the RAM phase; on 7.2 it cannot
// and the switchover drains the backlog (a longer downtime). Either way the
// migration completes and the images are equal. The writer stops when the
// switchover begins: the observer runs on the engine goroutine before the
// mirrors are finished, so no write lands after the mirror ended.
func TestEngineStorageBacklogAfterReady(t *testing.T) {
	for _, q := range bmQEMUs(t) {
		t.Run(q.Name(), func(t *testing.T) {
			dir := t.TempDir()
			ram := filepath.Join(dir, "ram.bin")
			// The file's size is the guest's (bmStartVM: 64 MiB, + 8 KiB
			// before 9.0: qemulab.RAMSize): QEMU wants it to match.
			buf := make([]byte, q.RAMBytes(qemulab.Config{MemMiB: 64}))
			_, _ = rand.NewChaCha8([32]byte{1}).Read(buf)
			require.NoError(t, os.WriteFile(ram, buf, 0o600))
			src := bmStartVM(t, q, dir, "src", bmOpts{size: "32M", ram: ram})
			// The destination disk takes writes at 8 MiB/s (a throttle node
			// under the device). The mirror's speed alone is not enough: on
			// 10.0 it held the bulk copy to 8 MiB/s, yet after READY the
			// mirror kept up with a ~700 MiB/s writer (2.2 GB in ~6 s).
			img := filepath.Join(dir, "dst.raw")
			out, err := exec.Command(q.Img, "create", "-q", "-f", "raw", img, "32M").CombinedOutput()
			require.NoError(t, err, "%s", out)
			dst := bmStartVM(t, q, dir, "dst", bmOpts{incoming: true, noDisk: true, ram: ram, extra: []string{
				"-object", "throttle-group,id=tg0,x-bps-write=8388608",
				"-blockdev", "driver=file,filename=" + img + ",node-name=f0",
				"-blockdev", "driver=raw,file=f0,node-name=r0",
				"-blockdev", "driver=throttle,throttle-group=tg0,file=r0,node-name=disk0",
				"-device", "virtio-blk-pci,drive=disk0,id=vd0"}})
			require.Equal(t, img, dst.disk)
			testBacklogAfterReady(t, q, src, dst)
		})
	}
}

func testBacklogAfterReady(t *testing.T, q *qemulab.QEMU, src, dst *bmVM) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	cfg := engine.Config{
		Source:      engine.Endpoint{Client: src.qmp},
		Destination: engine.Endpoint{Client: dst.qmp},
		URI:         "unix:" + filepath.Join(dst.dir, "mig.sock"),
		Bandwidth:   10e6,
		Storage:     &blockmirror.Config{Disks: []string{"disk0"}, Speed: 8 << 20},
		Logger:      testLogger(t),
	}
	var readyAt time.Duration
	var last *blockmirror.Progress
	var decisionPhase engine.Phase
	phase := engine.PhasePrepare
	wstop := func() uint64 { return 0 }
	defer func() { wstop() }()
	cfg.Observer = func(e engine.Event) {
		switch e.Kind {
		case engine.EventDisk:
			last = e.Disk
		case engine.EventDecision:
			decisionPhase = phase
			t.Logf("%v decision %s: %s (err %v)", e.Elapsed.Round(time.Millisecond), e.Decision.Action, e.Decision.Reason, e.DecisionErr)
		case engine.EventPhase:
			phase = e.Phase
			switch e.Phase {
			case engine.PhaseConverge:
				readyAt = e.Elapsed
				wstop = bmWriter(src, 32<<20)
			case engine.PhaseSwitchover:
				t.Logf("switchover at %v (%s, %d/%d bytes); the writer wrote %d MiB", e.Elapsed.Round(time.Millisecond),
					last.CopyMode, last.Done, last.Total, wstop()>>20)
			}
		}
	}
	res, err := engine.Migrate(ctx, cfg)
	wstop()
	t.Logf("QEMU %s: %s in %v (READY at %v), downtime %v: %v; decisions %d; undo errors %q",
		q.Name(), res.Status, res.Total.Round(time.Millisecond), readyAt.Round(time.Millisecond), res.Downtime.Round(time.Millisecond),
		err, len(res.Decisions), res.UndoErrors)
	require.NoError(t, err)
	var actions []strategy.Action
	for _, d := range res.Decisions {
		actions = append(actions, d.Action)
	}
	if src.f.BlockJobChange {
		require.Contains(t, actions, strategy.MirrorWriteBlocking)
		assert.Equal(t, engine.PhaseConverge, decisionPhase, "decided in the RAM phase")
		for _, d := range res.Decisions {
			if d.Action == strategy.MirrorWriteBlocking {
				assert.Greater(t, d.At, readyAt, "after READY")
				assert.Contains(t, d.Reason, "disk backlog")
			}
		}
		require.NotNil(t, last)
		assert.Equal(t, "write-blocking", last.CopyMode)
	} else {
		assert.NotContains(t, actions, strategy.MirrorWriteBlocking)
	}
	bmAssertNothingLeft(t, ctx, src, nil)
	assert.Equal(t, "running", dst.status(ctx))
	src.quit(ctx)
	dst.quit(ctx)
	bmCompare(t, q, src.disk, dst.disk)
}
