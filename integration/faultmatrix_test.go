package integration

import (
	"context"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/qmp"
)

// TestFaultMatrix measures on real QEMU the cells of docs/faults.md that
// the other integration tests leave to the fake pair: a QEMU killed or
// stopped, or the caller's cancel, as the migration starts (the observer
// runs synchronously: a fault injected at the phase event lands before
// the phase's first command), at the pre-switchover window of a storage
// migration (pause-before-switchover: the source waits there for the
// mirrors to finish), in postcopy, and during a postcopy recovery. Every
// ending is typed; every rollback leaves the guest running on the source,
// intact; qmigrate kills nothing.
func TestFaultMatrix(t *testing.T) {
	q, _ := tbQEMU(t)
	t.Run("Setup", func(t *testing.T) {
		t.Run("KillDestination", func(t *testing.T) { testMatrixSetup(t, q, "kill-dst") })
		t.Run("KillSource", func(t *testing.T) { testMatrixSetup(t, q, "kill-src") })
		t.Run("StopDestination", func(t *testing.T) { testMatrixSetup(t, q, "stop-dst") })
		t.Run("Cancel", func(t *testing.T) { testMatrixSetup(t, q, "cancel") })
	})
	t.Run("Precopy/KillSource", func(t *testing.T) { testMatrixPrecopyKillSource(t, q) })
	t.Run("PreSwitchover", func(t *testing.T) {
		t.Run("KillDestination", func(t *testing.T) { testMatrixPreSwitchover(t, q, "kill-dst") })
		t.Run("KillSource", func(t *testing.T) { testMatrixPreSwitchover(t, q, "kill-src") })
		t.Run("Cancel", func(t *testing.T) { testMatrixPreSwitchover(t, q, "cancel") })
	})
	t.Run("Postcopy", func(t *testing.T) {
		t.Run("StopDestination", func(t *testing.T) { testMatrixPostcopyStopDst(t, q) })
		t.Run("Cancel", func(t *testing.T) { testMatrixPostcopyCancel(t, q) })
	})
	t.Run("PostcopyRecovery", func(t *testing.T) {
		t.Run("KillDestination", func(t *testing.T) { testMatrixRecovery(t, q, "kill-dst") })
		t.Run("KillSource", func(t *testing.T) { testMatrixRecovery(t, q, "kill-src") })
		t.Run("StopDestination", func(t *testing.T) { testMatrixRecovery(t, q, "stop-dst") })
	})
}

// matrixUnresponsive is UnresponsiveTimeout where a QEMU is stopped.
const matrixUnresponsive = 4 * time.Second

// inject applies fault to the pair: kill-dst, kill-src, stop-dst
// (SIGSTOP, thawed at the test's end), or cancel.
func inject(t *testing.T, fault string, src, dst *qemulab.Instance, cancel context.CancelFunc) {
	t.Helper()
	switch fault {
	case "kill-dst":
		dst.Kill()
	case "kill-src":
		src.Kill()
	case "stop-dst":
		stopQEMU(t, dst)
	case "cancel":
		cancel()
	}
}

// stopQEMU stops inst (SIGSTOP); the test's clean-up lets it run again
// (SIGCONT), pass or fail, so that no stopped QEMU is left behind.
func stopQEMU(t *testing.T, inst *qemulab.Instance) {
	t.Helper()
	require.NoError(t, inst.Signal(syscall.SIGSTOP))
	t.Cleanup(func() { _ = inst.Signal(syscall.SIGCONT) })
}

// Setup: the fault lands at the start phase, before migrate-incoming.
func testMatrixSetup(t *testing.T, q *qemulab.QEMU, fault string) {
	src, dst := enginePair(t, q, 50e6, true, "")
	was := setNonDefault(t, src)
	cfg := engineConfig(t, src, dst, "unix:"+filepath.Join(dst.Dir(), "mig.sock"))
	cfg.UnresponsiveTimeout = matrixUnresponsive
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	mctx, cancelMigration := context.WithCancel(ctx)
	defer cancelMigration()
	injected := false
	cfg.Observer = func(e engine.Event) {
		if e.Kind == engine.EventPhase && e.Phase == engine.PhaseStart && !injected {
			injected = true
			inject(t, fault, src, dst, cancelMigration)
		}
	}
	start := time.Now()
	res, err := engine.Migrate(mctx, cfg)
	took := time.Since(start)
	t.Logf("QEMU %s, %s at setup: %v after %v; status %s; undone %q; undo errors %q",
		q.Name(), fault, err, took.Round(time.Millisecond), res.Status, res.Undone, res.UndoErrors)
	require.True(t, injected)
	require.Error(t, err)
	var ee *engine.Error
	require.ErrorAs(t, err, &ee)
	switch fault {
	case "kill-dst":
		assert.ErrorIs(t, err, engine.ErrDestinationGone)
		assert.Equal(t, engine.SideDestination, ee.Side)
		assert.Equal(t, engine.StatusFailed, res.Status)
	case "kill-src":
		assert.ErrorIs(t, err, engine.ErrSourceGone)
		assert.Equal(t, engine.SideSource, ee.Side)
		assert.Equal(t, engine.StatusFailed, res.Status)
		// The destination's settings restored, nothing of qmigrate's left.
		noneLeft(t, "destination", dst)
		assert.False(t, dst.Exited(), "qmigrate kills nothing")
		return
	case "stop-dst":
		assert.ErrorIs(t, err, engine.ErrUnresponsive)
		assert.Equal(t, engine.SideDestination, ee.Side)
		assert.Equal(t, engine.StatusFailed, res.Status)
		assert.Less(t, took, matrixUnresponsive+15*time.Second, "bounded")
	case "cancel":
		assert.ErrorIs(t, err, engine.ErrCancelled)
		assert.Equal(t, engine.StatusCancelled, res.Status)
		assert.Empty(t, res.UndoErrors)
		noneLeft(t, "destination", dst)
	}
	rolledBack(t, src, was)
}

// Pre-copy: the source killed once pre-copy moved data.
func testMatrixPrecopyKillSource(t *testing.T, q *qemulab.QEMU) {
	src, dst := enginePair(t, q, 500e6, true, "")
	cfg := nonConverging(t, src, dst)
	killed := make(chan time.Time, 1)
	cfg.Observer = func(e engine.Event) {
		if e.Kind == engine.EventStats && e.Stats.Status == string(qmp.StatusActive) && e.Stats.TransferredBytes > 16<<20 && len(killed) == 0 {
			killed <- time.Now()
			go src.Kill()
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	res, err := engine.Migrate(ctx, cfg)
	require.Len(t, killed, 1, "killed in pre-copy (Migrate: %v)", err)
	took := time.Since(<-killed)
	t.Logf("QEMU %s: %v %v after the kill; undone %q; undo errors %q", q.Name(), err, took.Round(time.Millisecond), res.Undone, res.UndoErrors)
	require.Error(t, err)
	assert.ErrorIs(t, err, engine.ErrSourceGone)
	var ee *engine.Error
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, engine.SideSource, ee.Side)
	assert.Equal(t, engine.StatusFailed, res.Status)
	assert.Less(t, took, 5*time.Second, "within seconds")
	// The destination, whose stream broke, exits (exit-on-error) or is
	// left without qmigrate's settings.
	settled(dst)
	noneLeft(t, "destination", dst)
}

// settled waits, up to 3 s, for a destination whose incoming stream broke
// to exit (exit-on-error), so that what is checked of it is its end state.
func settled(dst *qemulab.Instance) {
	select {
	case <-dst.Done():
	case <-time.After(3 * time.Second):
	}
}

// Pre-switchover: a storage migration pauses before the switchover (the
// source stopped, waiting for the mirrors to finish); the fault lands at
// the switchover phase, before the mirrors finish.
func testMatrixPreSwitchover(t *testing.T, q *qemulab.QEMU, fault string) {
	src, dst := enginePair(t, q, 50e6, true, "")
	cfg := engineConfig(t, src, dst, "unix:"+filepath.Join(dst.Dir(), "mig.sock"))
	cfg.Storage = &blockmirror.Config{Disks: []string{"sweep0"}}
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	mctx, cancelMigration := context.WithCancel(ctx)
	defer cancelMigration()
	injected := false
	var srcStatus qmp.MigrationStatus
	cfg.Observer = func(e engine.Event) {
		if e.Kind == engine.EventPhase && e.Phase == engine.PhaseSwitchover && !injected {
			injected = true
			if info, err := src.QMP.QueryMigrate(ctx); err == nil {
				srcStatus = info.Status
			}
			inject(t, fault, src, dst, cancelMigration)
		}
	}
	res, err := engine.Migrate(mctx, cfg)
	t.Logf("QEMU %s, %s at the switchover (source %s): %v; status %s; undone %q; undo errors %q",
		q.Name(), fault, srcStatus, err, res.Status, res.Undone, res.UndoErrors)
	require.True(t, injected)
	// The phase comes with the source's STOP event: its status may still
	// read active, a moment before pre-switchover (7.2, 1 run of 2).
	assert.Contains(t, []qmp.MigrationStatus{qmp.StatusPreSwitchover, qmp.StatusActive}, srcStatus, "the source stopped for the switchover")
	require.Error(t, err)
	var ee *engine.Error
	require.ErrorAs(t, err, &ee)
	switch fault {
	case "kill-src":
		// The guest died with its QEMU; the destination, whose incoming
		// stream broke, exits by itself (exit-on-error), or is left
		// without qmigrate's settings.
		assert.ErrorIs(t, err, engine.ErrSourceGone)
		assert.Equal(t, engine.SideSource, ee.Side)
		assert.Equal(t, engine.StatusFailed, res.Status)
		settled(dst)
		noneLeft(t, "destination", dst)
		return
	case "kill-dst":
		assert.ErrorIs(t, err, engine.ErrDestinationGone)
		assert.Equal(t, engine.SideDestination, ee.Side)
		assert.Equal(t, engine.StatusFailed, res.Status)
	case "cancel":
		assert.ErrorIs(t, err, engine.ErrCancelled)
		assert.Equal(t, engine.StatusCancelled, res.Status)
		assert.Empty(t, res.UndoErrors)
		settled(dst)
		noneLeft(t, "destination", dst)
	}
	// Rolled back: the guest runs on the source (resumed), intact, its
	// mirror and NBD node gone.
	assertNoMirrorLeft(t, ctx, src)
	sourceIntact(t, src)
}

// Postcopy x stop dst: nothing moves, the stall is seen, the destination
// answers nothing: ErrUnresponsive, state unknown, nothing paused,
// cancelled or cut. Thawed, the QEMUs finish the migration by themselves
// and the guest is intact on the destination.
func testMatrixPostcopyStopDst(t *testing.T, q *qemulab.QEMU) {
	src, dst := enginePair(t, q, 500e6, true, "")
	p := newLinkProxy(t)
	cfg := postcopyConfig(t, src, dst, p)
	cfg.PostcopyStallTimeout = 2 * time.Second
	cfg.UnresponsiveTimeout = matrixUnresponsive
	stopped := make(chan time.Time, 1)
	var quarter postcopyQuarter
	cfg.Observer = func(e engine.Event) {
		if len(stopped) == 0 && quarter.reached(e) {
			stopQEMU(t, dst)
			stopped <- time.Now()
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	res, err := engine.Migrate(ctx, cfg)
	require.Len(t, stopped, 1, "stopped in postcopy (Migrate: %v)", err)
	took := time.Since(<-stopped)
	t.Logf("QEMU %s: %v %v after the stop; state unknown %v", q.Name(), err, took.Round(time.Millisecond), res.StateUnknown)
	require.Error(t, err)
	assert.ErrorIs(t, err, engine.ErrUnresponsive)
	assert.ErrorIs(t, err, engine.ErrPostcopyFailed)
	assert.NotErrorIs(t, err, engine.ErrGuestLost)
	var ee *engine.Error
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, engine.SideDestination, ee.Side)
	assert.True(t, res.StateUnknown)
	assert.Zero(t, res.RecoveryAttempts)
	assert.Less(t, took, cfg.PostcopyStallTimeout+matrixUnresponsive+10*time.Second, "bounded")
	info, err := src.QMP.QueryMigrate(ctx)
	require.NoError(t, err)
	assert.Equal(t, qmp.StatusPostcopyActive, info.Status, "the source left in postcopy, not paused nor cancelled")
	st, err := src.QMP.QueryStatus(ctx)
	require.NoError(t, err)
	assert.NotEqual(t, "running", st.Status, "the source never resumed")

	// Thawed: nothing was cut, the QEMUs finish postcopy by themselves.
	require.NoError(t, dst.Signal(syscall.SIGCONT))
	for info.Status != qmp.StatusCompleted {
		require.False(t, info.Status.Terminal(), "the source's migration ended %s", info.Status)
		select {
		case <-ctx.Done():
			require.FailNow(t, "postcopy did not finish after the thaw")
		case <-time.After(200 * time.Millisecond):
		}
		info, err = src.QMP.QueryMigrate(ctx)
		require.NoError(t, err)
	}
	for {
		st, err := dst.QMP.QueryStatus(ctx)
		require.NoError(t, err)
		if st.Status == "running" {
			break
		}
		select {
		case <-ctx.Done():
			require.FailNow(t, "the destination did not run the guest", "status %s", st.Status)
		case <-time.After(100 * time.Millisecond):
		}
	}
	_, err = qemulab.CheckSweep(ctx, src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err, "destination guest intact")
}

// Postcopy x cancel: ignored, the migration completes.
func testMatrixPostcopyCancel(t *testing.T, q *qemulab.QEMU) {
	src, dst := enginePair(t, q, 500e6, true, "")
	p := newLinkProxy(t)
	cfg := postcopyConfig(t, src, dst, p)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	mctx, cancelMigration := context.WithCancel(ctx)
	defer cancelMigration()
	cancelled := false
	cfg.Observer = func(e engine.Event) {
		if !cancelled && e.Kind == engine.EventStats && e.Stats.Status == string(qmp.StatusPostcopyActive) {
			cancelled = true
			cancelMigration()
		}
	}
	res, err := engine.Migrate(mctx, cfg)
	require.True(t, cancelled, "cancelled in postcopy (Migrate: %v)", err)
	require.NoError(t, err, "a cancel in postcopy is ignored")
	assert.Equal(t, engine.StatusCompleted, res.Status)
	completed(t, src, dst)
}

// Postcopy recovery: the link black-holed in postcopy; at the first
// recovery attempt (both sides paused) a QEMU is killed or the destination
// stopped. Killed: typed guest_lost / pages_lost within seconds, not a
// spent budget, the other QEMU left as it is. Stopped: ErrUnresponsive
// naming the destination, state unknown, nothing cancelled.
func testMatrixRecovery(t *testing.T, q *qemulab.QEMU, fault string) {
	src, dst := enginePair(t, q, 500e6, true, "")
	p := newLinkProxy(t)
	cfg := postcopyConfig(t, src, dst, p)
	cfg.PostcopyStallTimeout = 2 * time.Second
	cfg.UnresponsiveTimeout = matrixUnresponsive
	var quarter postcopyQuarter
	holed := false
	injectedAt := make(chan time.Time, 1)
	cfg.Observer = func(e engine.Event) {
		switch {
		case !holed && quarter.reached(e):
			holed = true
			p.BlackHole(true)
		case e.Kind == engine.EventRecovery && e.Recovery.Step == engine.RecoveryAttempt && len(injectedAt) == 0:
			injectedAt <- time.Now()
			inject(t, fault, src, dst, nil)
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	res, err := engine.Migrate(ctx, cfg)
	p.BlackHole(false)
	require.Len(t, injectedAt, 1, "%s during a recovery (Migrate: %v)", fault, err)
	took := time.Since(<-injectedAt)
	t.Logf("QEMU %s, %s during a recovery: %v %v after; lost %q; state unknown %v", q.Name(), fault, err, took.Round(time.Millisecond), res.Lost, res.StateUnknown)
	require.Error(t, err)
	assert.ErrorIs(t, err, engine.ErrPostcopyFailed)
	assert.NotErrorIs(t, err, engine.ErrRecoveryFailed, "not a spent budget")
	var ee *engine.Error
	require.ErrorAs(t, err, &ee)
	switch fault {
	case "kill-dst":
		assert.ErrorIs(t, err, engine.ErrGuestLost)
		assert.Equal(t, engine.GuestLost, res.Lost)
		assert.Equal(t, engine.SideDestination, ee.Side)
		assert.Less(t, took, 5*time.Second, "within seconds")
		assert.False(t, src.Exited(), "qmigrate kills nothing")
		st, err := src.QMP.QueryStatus(ctx)
		require.NoError(t, err)
		assert.NotEqual(t, "running", st.Status, "the source never resumed")
	case "kill-src":
		assert.ErrorIs(t, err, engine.ErrPagesLost)
		assert.Equal(t, engine.PagesLost, res.Lost)
		assert.Equal(t, engine.SideSource, ee.Side)
		assert.Less(t, took, 5*time.Second, "within seconds")
		assert.False(t, dst.Exited(), "qmigrate kills nothing")
	case "stop-dst":
		assert.ErrorIs(t, err, engine.ErrUnresponsive)
		assert.Equal(t, engine.SideDestination, ee.Side)
		assert.True(t, res.StateUnknown)
		assert.Less(t, took, matrixUnresponsive+10*time.Second, "bounded")
		st, err := src.QMP.QueryStatus(ctx)
		require.NoError(t, err)
		assert.NotEqual(t, "running", st.Status, "the source never resumed")
	}
}
