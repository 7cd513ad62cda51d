package integration

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/qemulab"
)

// TestSetupLinkFaults breaks the migration's link as the source connects
// (the fault matrix's setup row), through a TCP proxy between the source
// and the destination's listener: a reset before the destination saw the
// connection, a reset once the stream's first bytes reached it, a black
// hole (the connection accepted, nothing passes: rolled back at the
// progress timeout) and a flap shorter than the progress timeout
// (completes). Every rollback leaves the guest running on the source,
// intact, its settings restored; nothing is killed.
func TestSetupLinkFaults(t *testing.T) {
	q := qemulab.RequireQEMU(t)
	t.Run("ResetBeforeDestination", func(t *testing.T) { testSetupLinkFault(t, q, "refuse") })
	t.Run("ResetAfterFirstBytes", func(t *testing.T) { testSetupLinkFault(t, q, "reset") })
	t.Run("BlackHole", func(t *testing.T) { testSetupLinkFault(t, q, "blackhole") })
	t.Run("Flap", func(t *testing.T) { testSetupLinkFault(t, q, "flap") })
}

// setupProgressTimeout is the black hole's limit: the source's first
// bytes fill the sockets' buffers, then nothing moves.
const setupProgressTimeout = 5 * time.Second

func testSetupLinkFault(t *testing.T, q *qemulab.QEMU, fault string) {
	src, dst := enginePair(t, q, 50e6, true, "")
	was := setNonDefault(t, src)
	p := newLinkProxy(t)
	cfg := engineConfig(t, src, dst, "tcp:"+p.Addr())
	cfg.Listen = "tcp:" + p.target
	cfg.Strategy.Limits.ProgressTimeout = setupProgressTimeout
	switch fault {
	case "refuse":
		p.RefuseNextConnection()
	case "reset":
		p.ResetNextConnection()
	case "blackhole", "flap":
		p.BlackHole(true)
	}
	var lifted time.Time
	if fault == "flap" {
		// Shorter than the progress timeout: the migration goes on.
		time.AfterFunc(2*time.Second, func() { lifted = time.Now(); p.BlackHole(false) })
	}
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	start := time.Now()
	res, err := engine.Migrate(ctx, cfg)
	took := time.Since(start)
	t.Logf("QEMU %s, %s at setup: %v after %v; status %s; undone %q; undo errors %q",
		q.Name(), fault, err, took.Round(time.Millisecond), res.Status, res.Undone, res.UndoErrors)

	if fault == "flap" {
		require.NoError(t, err, "a flap shorter than the progress timeout: completed")
		require.False(t, lifted.IsZero())
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Greater(t, took, 2*time.Second, "the migration waited for the link")
		st, err := dst.QMP.QueryStatus(ctx)
		require.NoError(t, err)
		assert.Equal(t, "running", st.Status, "the guest runs on the destination")
		completed(t, src, dst)
		return
	}

	require.Error(t, err)
	assert.Equal(t, engine.StatusFailed, res.Status)
	assert.Empty(t, res.UndoErrors)
	var ee *engine.Error
	require.ErrorAs(t, err, &ee, "a typed error")
	switch fault {
	case "refuse":
		// The source's migration fails at once; the destination never saw
		// a connection and still listens (left to its owner).
		assert.ErrorIs(t, err, engine.ErrMigrationFailed)
		assert.Equal(t, engine.SideSource, ee.Side)
		assert.Less(t, took, 10*time.Second, "failed at once")
		assert.False(t, dst.Exited(), "the destination was not reached")
	case "reset":
		// The destination read a broken stream: it exits (exit-on-error),
		// the source's migration failed.
		assert.ErrorIs(t, err, engine.ErrMigrationFailed)
		assert.Less(t, took, 10*time.Second, "failed at once")
	case "blackhole":
		// Nothing moves: rolled back at the progress timeout (the
		// strategy's or the engine's safety net, whichever first).
		assert.True(t, errors.Is(err, engine.ErrAborted), "aborted for want of progress: %v", err)
		assert.GreaterOrEqual(t, took, setupProgressTimeout)
		assert.Less(t, took, setupProgressTimeout+20*time.Second)
		assert.False(t, dst.Exited(), "the destination was not reached")
	}
	rolledBack(t, src, was)
	noneLeft(t, "destination", dst)
	assert.False(t, src.Exited(), "qmigrate kills nothing")
}
