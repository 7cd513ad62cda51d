package engine_test

import (
	"encoding/json"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
	"github.com/qmigrate/qmigrate/strategy"
)

// nonConverging is a pair whose guest dirties faster than the link, under a
// policy that never gives up by itself: only the engine's bounds end it.
func nonConverging(t *testing.T) (*qemutest.Pair, engine.Config) {
	p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
	cfg.Strategy.Policy = strategy.PolicyQEMU
	return p, cfg
}

// engineErr checks err is an *engine.Error of phase, side and op.
func engineErr(t *testing.T, err error, phase engine.Phase, side engine.Side, op string) {
	t.Helper()
	var ee *engine.Error
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, phase, ee.Phase)
	assert.Equal(t, side, ee.Side)
	assert.Equal(t, op, ee.Op)
}

// The source's QEMU stops (SIGSTOP) mid-converge under a budget: the
// query-migrate in flight is bounded by the budget plus the poll interval,
// the migration is aborted like the budget's safety net does, and the
// rollback, which cannot reach the source either, cuts the stream from the
// destination's side and reports every step it could not take. Once the
// source runs again its migration fails and the guest runs there.
func TestSourceStopsAnsweringWithinBudget(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := nonConverging(t)
		cfg.Strategy.Limits.Budget = 3 * time.Second
		time.AfterFunc(time.Second, func() { p.Freeze(qemutest.Source) })
		var rec recorder
		cfg.Observer = rec.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		t.Logf("%v\nundone %q\nundo errors %q", err, res.Undone, res.UndoErrors)
		assert.ErrorIs(t, err, engine.ErrAborted)
		assert.NotErrorIs(t, err, engine.ErrUnresponsive)
		assert.NotErrorIs(t, err, engine.ErrBadInput)
		engineErr(t, err, engine.PhaseConverge, engine.SideSource, "query-migrate")
		assert.Equal(t, engine.StatusFailed, res.Status)
		assert.False(t, res.StateUnknown, "the guest stays on the source")
		// Aborted at budget + poll interval, then one 2s probe of the
		// source in the rollback.
		assert.Equal(t, 5200*time.Millisecond, res.Total.Round(100*time.Millisecond))
		assert.Contains(t, rec.phases(), engine.PhaseRollback)

		for _, name := range []string{"source: cancel migration", "source: resume guest", "source: restore parameters", "source: restore capabilities"} {
			s := rollbackStep(t, res, name)
			assert.ErrorIs(t, s.Err, engine.ErrUnresponsive, name)
			assert.Empty(t, s.Did, name)
		}
		var ee *engine.Error
		require.ErrorAs(t, rollbackStep(t, res, "source: cancel migration").Err, &ee)
		assert.Equal(t, engine.PhaseRollback, ee.Phase)
		assert.Equal(t, "query-migrate", ee.Op, "the probe of the source before migrate_cancel")
		// The yank is a note for the person reading the Result (Undone),
		// not a RollbackStep: its text is what there is to check.
		assert.Contains(t, strings.Join(res.Undone, "\n"), "destination: yank migration")
		assert.Empty(t, p.Src.CallsOf("migrate_cancel"))
		assert.Len(t, p.Dst.CallsOf("yank"), 1)
		assert.Positive(t, p.Stops(qemutest.Destination), "the destination was held first")
		assert.True(t, p.DstGone(), "the destination exits once its stream is cut")

		// SIGCONT: the source's migration fails on the cut stream; the
		// guest never stopped there.
		p.Thaw(qemutest.Source)
		time.Sleep(time.Second)
		assert.Equal(t, qmp.StatusFailed, p.Status())
		assert.Equal(t, "running", p.SrcRunState())
	})
}

// The same without a budget: the source's monitor is given
// UnresponsiveTimeout, then the migration ends with ErrUnresponsive naming
// the source and the command.
func TestSourceStopsAnsweringNoBudget(t *testing.T) {
	for name, tc := range map[string]struct {
		limit, want time.Duration
	}{
		"default": {0, engine.DefaultUnresponsiveTimeout},
		"5s":      {5 * time.Second, 5 * time.Second},
	} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := nonConverging(t)
				cfg.UnresponsiveTimeout = tc.limit
				var frozenAt time.Duration
				start := time.Now()
				time.AfterFunc(time.Second, func() { frozenAt = time.Since(start); p.Freeze(qemutest.Source) })
				res, err := engine.Migrate(t.Context(), cfg)
				require.Error(t, err)
				t.Logf("%v\nundone %q\nundo errors %q", err, res.Undone, res.UndoErrors)
				assert.ErrorIs(t, err, engine.ErrUnresponsive)
				assert.NotErrorIs(t, err, engine.ErrAborted)
				engineErr(t, err, engine.PhaseConverge, engine.SideSource, "query-migrate")
				assert.False(t, res.StateUnknown, "before the switchover: rolled back")
				assert.Equal(t, engine.StatusFailed, res.Status)
				// The poll in flight after the freeze waits the limit, the
				// rollback probes the source once (2s).
				assert.InDelta(t, frozenAt+tc.want+2*time.Second, res.Total, float64(300*time.Millisecond))
				assert.Len(t, p.Dst.CallsOf("yank"), 1, "the stream is cut on the destination")
				assert.ErrorIs(t, rollbackStep(t, res, "source: resume guest").Err, engine.ErrUnresponsive)
				p.Thaw(qemutest.Source)
				time.Sleep(time.Second)
				assert.Equal(t, qmp.StatusFailed, p.Status())
				assert.Equal(t, "running", p.SrcRunState())
			})
		})
	}
}

// The source's monitor never answers a query-migrate, not even the first
// one, while its migration goes on and completes: the rollback finds the
// whole stream on the destination and the engine finishes the migration
// there with no poll of the source at all (complete once dereferenced the
// missing last poll).
func TestSourceSilentBeforeFirstPollCompletes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20})
		cfg.UnresponsiveTimeout = 5 * time.Second
		var started atomic.Bool
		migrate, query := p.Src.Handler("migrate"), p.Src.Handler("query-migrate")
		p.Src.Handle("migrate", func(args json.RawMessage) (any, error) {
			started.Store(true)
			return migrate(args)
		})
		p.Src.Handle("query-migrate", func(args json.RawMessage) (any, error) {
			if !started.Load() {
				return query(args)
			}
			<-t.Context().Done()
			return nil, t.Context().Err()
		})
		res, err := engine.Migrate(t.Context(), cfg)
		t.Logf("%v\nundone %q\nundo errors %q", err, res.Undone, res.UndoErrors)
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Equal(t, "running", p.DstRunState())
		assert.Equal(t, "postmigrate", p.SrcRunState())
		assert.Empty(t, p.Src.CallsOf("cont"), "the source is never resumed once the destination has the guest")
		assert.Empty(t, p.Src.CallsOf("migrate_cancel"))
	})
}

// A source that stops answering a decision's command (here the downtime
// the proxmox preset raises) is caught there too.
func TestSourceStopsAnsweringDecision(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 200 << 20, DirtyRate: 250 << 20})
		cfg.Strategy.Policy = strategy.PolicyProxmox
		cfg.Strategy.Limits.MaxDowntime = 2 * time.Second
		cfg.Strategy.Limits.NoThrottle = true
		cfg.UnresponsiveTimeout = 3 * time.Second
		set := p.Src.Handler("migrate-set-parameters")
		p.Src.Handle("migrate-set-parameters", func(args json.RawMessage) (any, error) {
			if p.Status() == qmp.StatusActive {
				return nil, qmptest.ErrNoReply
			}
			return set(args)
		})
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		t.Logf("%v\nundone %q\nundo errors %q", err, res.Undone, res.UndoErrors)
		assert.ErrorIs(t, err, engine.ErrUnresponsive)
		engineErr(t, err, engine.PhaseConverge, engine.SideSource, "migrate-set-parameters")
		require.NotEmpty(t, res.Decisions)
		assert.Equal(t, strategy.SetDowntime, res.Decisions[len(res.Decisions)-1].Action)
		// The monitor still answers everything else: a normal rollback.
		assert.Len(t, p.Src.CallsOf("migrate_cancel"), 1)
		assert.Empty(t, p.Dst.CallsOf("yank"))
		assert.Equal(t, qmp.StatusCancelled, p.Status())
		assert.Equal(t, "running", p.SrcRunState())
	})
}

// The destination's QEMU stops mid-converge: the source still answers but
// the stream stalls, and the budget's safety net aborts. The rollback's
// commands to the destination are bounded (its hold times out and it gets
// nothing more), the source's migration is cancelled and its settings
// restored; the destination exits once it runs again.
func TestDestinationStopsAnswering(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := nonConverging(t)
		cfg.Strategy.Limits.Budget = 3 * time.Second
		before := p.Caps(qemutest.Source)
		time.AfterFunc(time.Second, func() { p.Freeze(qemutest.Destination) })
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		t.Logf("%v\nundone %q\nundo errors %q", err, res.Undone, res.UndoErrors)
		assert.ErrorIs(t, err, engine.ErrAborted)
		assert.Equal(t, engine.StatusFailed, res.Status)
		// Budget + poll, then the destination's hold (2s).
		assert.InDelta(t, 5200*time.Millisecond, res.Total, float64(300*time.Millisecond))
		assert.Len(t, p.Src.CallsOf("migrate_cancel"), 1)
		assert.Equal(t, qmp.StatusCancelled, p.Status())
		assert.Equal(t, "running", p.SrcRunState())
		assert.Equal(t, before, p.Caps(qemutest.Source), "source capabilities restored")
		cancelStep := rollbackStep(t, res, "source: cancel migration")
		assert.NoError(t, cancelStep.Err)
		assert.NotEmpty(t, cancelStep.Did, "migrate_cancel sent")
		assert.Empty(t, res.UndoErrors, "nothing else was needed from the destination")
		assert.False(t, p.DstGone())
		p.Thaw(qemutest.Destination)
		assert.True(t, p.DstGone(), "the destination exits once it runs again")
	})
}

// A destination that never answers migrate-incoming: ErrUnresponsive after
// the limit (or ErrAborted at the budget), naming it; rolled back.
func TestDestinationNeverAnswersMigrateIncoming(t *testing.T) {
	for name, tc := range map[string]struct {
		budget time.Duration
		want   error
		took   time.Duration
	}{
		"limit":  {want: engine.ErrUnresponsive, took: 4 * time.Second},
		"budget": {budget: time.Second, want: engine.ErrAborted, took: 1200 * time.Millisecond},
	} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := pair(t, qemutest.Options{})
				cfg.UnresponsiveTimeout = 4 * time.Second
				cfg.Strategy.Limits.Budget = tc.budget
				before := p.Caps(qemutest.Source)
				p.Dst.Handle("migrate-incoming", func(json.RawMessage) (any, error) { return nil, qmptest.ErrNoReply })
				res, err := engine.Migrate(t.Context(), cfg)
				require.Error(t, err)
				t.Logf("%v\nundone %q\nundo errors %q", err, res.Undone, res.UndoErrors)
				assert.ErrorIs(t, err, tc.want)
				engineErr(t, err, engine.PhaseStart, engine.SideDestination, "migrate-incoming")
				assert.Equal(t, tc.took, res.Total.Round(100*time.Millisecond))
				assert.Empty(t, p.Src.CallsOf("migrate"))
				assert.Equal(t, before, p.Caps(qemutest.Source), "source capabilities restored")
				assert.Empty(t, res.UndoErrors)
			})
		})
	}
}

// QEMU holds its monitor during the stop-and-copy (the migration thread
// has the big lock while it writes the device state): a slow but answering
// monitor then is waited for, even past the budget, whether the command
// went out during the stop-and-copy or just before it began.
func TestSlowMonitorInStopAndCopy(t *testing.T) {
	for name, tc := range map[string]struct {
		inFlight bool
		budget   time.Duration
	}{
		"sent during":            {budget: 1900 * time.Millisecond},
		"sent before":            {inFlight: true, budget: 1900 * time.Millisecond},
		"sent before, no budget": {inFlight: true},
	} {
		inFlight := tc.inFlight
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				// The first pass leaves 30 MiB (300ms at 100 MiB/s) at 1.2s;
				// the syncs bring back what the guest dirtied (24, 4.8, 1 MiB)
				// until one leaves at most 30 MiB, at 1.51s: 300ms of
				// stop-and-copy (status device) from there.
				p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 20 << 20})
				cfg.Strategy.Policy = strategy.PolicyQEMU
				cfg.Strategy.Limits.Budget = tc.budget
				var rec recorder
				cfg.Observer = rec.observe
				cfg.UnresponsiveTimeout = 10 * time.Second
				query := p.Src.Handler("query-migrate")
				held := 0
				t0 := time.Now()
				p.Src.Handle("query-migrate", func(args json.RawMessage) (any, error) {
					if inFlight && p.Status() == qmp.StatusActive && held == 0 && time.Since(t0) >= 1400*time.Millisecond {
						// Arrived just before the stop-and-copy: QEMU gets to it
						// only once the device state is written.
						for p.Status() == qmp.StatusActive {
							time.Sleep(time.Millisecond)
						}
						held++
						time.Sleep(3 * time.Second)
					}
					if !inFlight && p.Status() == qmp.StatusDevice {
						held++
						time.Sleep(3 * time.Second)
					}
					return query(args)
				})
				res, err := engine.Migrate(t.Context(), cfg)
				require.NoError(t, err, "%+v", res)
				assert.Equal(t, engine.StatusCompleted, res.Status)
				assert.Equal(t, 1, held, "one query-migrate was held 3s")
				assert.Greater(t, res.Total, 4*time.Second, "past the budget")
				assert.Empty(t, p.Src.CallsOf("migrate_cancel"))
				assert.Equal(t, "running", p.DstRunState())
				// The STOP that came while the poll waited is not lost.
				assert.Equal(t, []engine.Phase{engine.PhasePrepare, engine.PhaseStart, engine.PhaseConverge,
					engine.PhaseSwitchover, engine.PhaseComplete}, rec.phases())
			})
		})
	}
}

// After the switchover a monitor that stops answering for good ends the
// migration after UnresponsiveTimeout, without rolling back, and the result
// says the state is unknown.
func TestSourceStopsAnsweringInStopAndCopy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 20 << 20})
		cfg.Strategy.Policy = strategy.PolicyQEMU
		cfg.Strategy.Limits.Budget = 1900 * time.Millisecond // ends in the stop-and-copy
		cfg.UnresponsiveTimeout = 5 * time.Second
		cfg.Observer = func(e engine.Event) {
			if e.Kind == engine.EventPhase && e.Phase == engine.PhaseSwitchover {
				p.Freeze(qemutest.Source)
			}
		}
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		t.Logf("%v\nundone %q\nundo errors %q", err, res.Undone, res.UndoErrors)
		assert.ErrorIs(t, err, engine.ErrUnresponsive)
		engineErr(t, err, engine.PhaseSwitchover, engine.SideSource, "query-migrate")
		assert.Equal(t, engine.StatusFailed, res.Status)
		assert.True(t, res.StateUnknown)
		assert.Empty(t, res.Rollback, "nothing rolled back")
		// Never skipped silently: the note for the person reading the
		// Result is the contract here.
		assert.Contains(t, strings.Join(res.UndoErrors, "\n"), "rollback not attempted")
		assert.Empty(t, res.Undone)
		assert.Empty(t, p.Src.CallsOf("migrate_cancel"))
		assert.Empty(t, p.Dst.CallsOf("yank"))
		p.Thaw(qemutest.Source)
	})
}

// A monitor that stops answering once postcopy runs: never cancelled or
// cut, the error wraps ErrPostcopyFailed as well.
func TestSourceStopsAnsweringInPostcopy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20, PostcopyRate: 10 << 20})
		cfg.Strategy.Limits.Budget = 3 * time.Second
		cfg.Strategy.Limits.AllowPostcopy = true
		cfg.UnresponsiveTimeout = 5 * time.Second
		time.AfterFunc(5*time.Second, func() { p.Freeze(qemutest.Source) })
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		t.Logf("%v\nundone %q\nundo errors %q", err, res.Undone, res.UndoErrors)
		assert.ErrorIs(t, err, engine.ErrUnresponsive)
		assert.ErrorIs(t, err, engine.ErrPostcopyFailed)
		assert.Less(t, res.Total, 11*time.Second)
		assert.True(t, res.StateUnknown)
		assert.Empty(t, p.Src.CallsOf("migrate_cancel"))
		assert.Empty(t, p.Dst.CallsOf("yank"))
		assert.Empty(t, res.Undone)
		p.Thaw(qemutest.Source)
	})
}

// The destination stops answering after the source completed: the complete
// phase is bounded too; the source (stopped for good) is not resumed since
// the destination may hold the guest, and the state is unknown.
func TestDestinationStopsAnsweringAfterSourceCompleted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 20 << 20})
		cfg.UnresponsiveTimeout = 5 * time.Second
		var completeAt time.Duration
		cfg.Observer = func(e engine.Event) {
			if e.Kind == engine.EventPhase && e.Phase == engine.PhaseComplete {
				completeAt = e.Elapsed
				p.Freeze(qemutest.Destination)
			}
		}
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		t.Logf("%v\nundone %q\nundo errors %q", err, res.Undone, res.UndoErrors)
		assert.ErrorIs(t, err, engine.ErrUnresponsive)
		engineErr(t, err, engine.PhaseComplete, engine.SideDestination, "query-migrate")
		assert.Equal(t, engine.StatusFailed, res.Status)
		assert.True(t, res.StateUnknown)
		// The limit, then one 2s probe of the destination.
		assert.InDelta(t, completeAt+7*time.Second, res.Total, float64(300*time.Millisecond))
		// A note for the person reading the Result (no RollbackStep): its
		// text is the contract.
		assert.Contains(t, strings.Join(res.UndoErrors, "\n"), "the source is not resumed")
		assert.Empty(t, p.Src.CallsOf("cont"))
		assert.Equal(t, "postmigrate", p.SrcRunState())
		p.Thaw(qemutest.Destination)
	})
}
