package engine_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

// guestWhereResultSays checks the invariant a caller relies on: after
// Migrate the guest runs exactly where the Result says, and the other side
// does not run it.
func guestWhereResultSays(t *testing.T, p *qemutest.Pair, res *engine.Result) {
	t.Helper()
	if res.Status == engine.StatusCompleted {
		assert.Equal(t, "running", p.DstRunState(), "completed: the guest runs on the destination")
		assert.NotEqual(t, "running", p.SrcRunState(), "completed: the source does not run the guest")
		return
	}
	assert.Equal(t, "running", p.SrcRunState(), "%s: the guest runs on the source", res.Status)
	if !p.DstGone() {
		assert.NotEqual(t, "running", p.DstRunState(), "%s: the destination does not run the guest", res.Status)
	}
}

// cancelAtSwitchover runs a migration whose context is cancelled the moment
// the source stops for the stop-and-copy, so migrate_cancel arrives while
// the device state is being written.
func cancelAtSwitchover(t *testing.T, p *qemutest.Pair, cfg engine.Config) (*engine.Result, error) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	cfg.Observer = func(e engine.Event) {
		if e.Kind == engine.EventPhase && e.Phase == engine.PhaseSwitchover {
			cancel()
		}
	}
	return engine.Migrate(ctx, cfg)
}

// A cancel at the stop-and-copy, for every way QEMU can end it.
func TestCancelAtSwitchoverEndings(t *testing.T) {
	for name, tc := range map[string]struct {
		opt        qemutest.Options
		holdFails  int // the destination refuses its first n stops (-1: every one)
		status     string
		srcCont    int    // cont commands the source gets
		dstRun     string // the destination's run state after
		dstGone    bool
		undoErrors string // a substring of UndoErrors ("" = none): a note for a person, not a RollbackStep, so text
	}{
		// The stream is cut: the usual ending.
		"cut": {opt: qemutest.Options{}, status: engine.StatusCancelled, dstGone: true},
		// 10.0: completed over cancelling. The held destination is resumed.
		"completes": {opt: qemutest.Options{LateCancel: qemutest.LateCancelCompletes}, status: engine.StatusCompleted,
			dstRun: "running", undoErrors: "completed before the cancel took effect"},
		// 7.2 and 10.0: cancelled and the source resumed, while the
		// destination read the whole stream: held, it stays paused.
		"source resumes, destination completes": {opt: qemutest.Options{LateCancel: qemutest.LateCancelResumes},
			status: engine.StatusCancelled, dstRun: "paused", undoErrors: "left paused"},
		// The same where the destination could not be held: it started
		// the guest by itself and is stopped.
		"source resumes, destination started": {opt: qemutest.Options{LateCancel: qemutest.LateCancelResumes}, holdFails: 1,
			status: engine.StatusCancelled, dstRun: "paused", undoErrors: "started the guest; stopped it"},
		// ... and where it refuses stop for good, the source is stopped
		// instead: one copy runs, and the migration completed.
		"source resumes, destination started and cannot be stopped": {opt: qemutest.Options{LateCancel: qemutest.LateCancelResumes},
			holdFails: -1, status: engine.StatusCompleted, dstRun: "running", undoErrors: "the source was stopped instead"},
		// Cancelled, yet the source stopped for good (QEMU did not record
		// that the guest ran) and the destination completed: the guest's
		// latest state is on the destination, the migration completed.
		"source postmigrate, destination completes": {opt: qemutest.Options{LateCancel: qemutest.LateCancelPostmigrate},
			status: engine.StatusCompleted, dstRun: "running", undoErrors: "the source stopped for good"},
		// Cancelled, the source stopped, the destination failed: the
		// source gets the guest back.
		"source postmigrate, destination fails": {opt: qemutest.Options{LateCancel: qemutest.LateCancelPostmigrateDstFails},
			status: engine.StatusCancelled, srcCont: 1, dstGone: true},
	} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				opt := tc.opt
				opt.Throughput, opt.DirtyRate, opt.DstAutostart = 100<<20, 20<<20, true
				p, cfg := pair(t, opt)
				if tc.holdFails != 0 {
					// The first stops (the hold before migrate_cancel) fail.
					stop := p.Dst.Handler("stop")
					failed := 0
					p.Dst.Handle("stop", func(args json.RawMessage) (any, error) {
						if tc.holdFails < 0 || failed < tc.holdFails {
							failed++
							return nil, &qmp.Error{Class: "GenericError", Desc: "injected stop failure"}
						}
						return stop(args)
					})
				}
				res, err := cancelAtSwitchover(t, p, cfg)
				t.Logf("result %s: %v; undone %q; undo errors %q", res.Status, err, res.Undone, res.UndoErrors)
				assert.Equal(t, tc.status, res.Status)
				assert.Equal(t, tc.status == engine.StatusCompleted, err == nil)
				guestWhereResultSays(t, p, res)
				assert.Len(t, p.Src.CallsOf("cont"), tc.srcCont)
				assert.Len(t, p.Src.CallsOf("migrate_cancel"), 1)
				assert.Equal(t, tc.dstGone, p.DstGone())
				if !tc.dstGone {
					assert.Equal(t, tc.dstRun, p.DstRunState())
				}
				if tc.undoErrors == "" {
					assert.Empty(t, res.UndoErrors)
				} else {
					assert.Contains(t, strings.Join(res.UndoErrors, "\n"), tc.undoErrors)
				}
				if tc.status == engine.StatusCancelled {
					assert.False(t, p.Caps(qemutest.Source)["events"], "source capabilities restored")
				}
			})
		})
	}
}

// The destination fails loading the end of the stream after the source
// completed: the guest never ran there, so the source gets it back and the
// migration failed.
func TestDestinationFailsAfterSourceCompleted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 20 << 20, DstFailsLoad: true})
		var rec recorder
		cfg.Observer = rec.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		t.Logf("result %s: %v; undone %q; undo errors %q", res.Status, err, res.Undone, res.UndoErrors)
		assert.Equal(t, engine.StatusFailed, res.Status)
		guestWhereResultSays(t, p, res)
		resume := rollbackStep(t, res, "source: resume guest")
		assert.NoError(t, resume.Err)
		assert.NotEmpty(t, resume.Did, "the source resumed")
		assert.Len(t, p.Src.CallsOf("cont"), 1)
		assert.Empty(t, p.Src.CallsOf("migrate_cancel"), "nothing to cancel: the source completed")
		assert.False(t, p.Caps(qemutest.Source)["events"], "source capabilities restored")
		assert.Contains(t, rec.phases(), engine.PhaseRollback)
	})
}

// The source completed but its stream never reached the destination (a
// proxy swallowed it; measured through the integration tests' proxy): at
// completeTimeout the destination, never started, is stopped and the source
// resumed. The Result says failed, naming the destination and its status,
// not cancelled (nobody cancelled).
func TestDestinationNeverTakesOver(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 20 << 20, DstNeverCompletes: true})
		start := time.Now()
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		t.Logf("after %v: result %s: %v; undone %q; undo errors %q", time.Since(start), res.Status, err, res.Undone, res.UndoErrors)
		assert.Equal(t, engine.StatusFailed, res.Status)
		assert.NotErrorIs(t, err, engine.ErrCancelled)
		var ee *engine.Error
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, engine.SideDestination, ee.Side)
		assert.Contains(t, err.Error(), "destination still active after 1m0s")
		assert.NotErrorIs(t, err, context.DeadlineExceeded, "no caller's deadline")
		guestWhereResultSays(t, p, res)
		assert.Equal(t, "running", p.SrcRunState(), "the source got the guest back")
		assert.Positive(t, p.Stops(qemutest.Destination), "the destination was stopped first")
	})
}

// The destination completed but cannot be resumed: the guest never ran
// there, the source gets it back (the destination stays paused).
func TestDestinationContFailsAfterSourceCompleted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 20 << 20})
		p.Dst.Handle("cont", qmptest.Fail("GenericError", "injected cont failure"))
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		assert.ErrorIs(t, err, &qmp.Error{Command: "cont", Desc: "injected cont failure"}, "QEMU's error is kept")
		assert.Equal(t, engine.StatusFailed, res.Status)
		guestWhereResultSays(t, p, res)
		assert.Equal(t, "paused", p.DstRunState())
		assert.Positive(t, p.Stops(qemutest.Destination), "the destination was stopped first")
	})
}

// A source still in finish-migrate when the rollback looks at it (QEMU sets
// the migration's end state before it resumes the source) is waited for,
// not cont'ed (QEMU refuses cont there).
func TestResumeSourceWaitsOutFinishMigrate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 20 << 20})
		n := 0
		p.Src.Handle("query-status", func(json.RawMessage) (any, error) {
			n++
			if n <= 3 && p.Status() == "cancelled" {
				return map[string]any{"running": false, "status": "finish-migrate"}, nil
			}
			st := p.SrcRunState()
			return map[string]any{"running": st == "running", "status": st}, nil
		})
		res, err := cancelAtSwitchover(t, p, cfg)
		require.Error(t, err)
		assert.Equal(t, engine.StatusCancelled, res.Status)
		guestWhereResultSays(t, p, res)
		assert.Empty(t, res.UndoErrors)
		assert.Empty(t, p.Src.CallsOf("cont"), "QEMU resumed it")
	})
}
