package engine_test

import (
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/preflight"
	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/strategy"
)

// waitStage polls the job's snapshot (virtual time) until it reports
// stage, or the job ends.
func waitStats(t *testing.T, j *engine.Job, n uint64) engine.Progress {
	t.Helper()
	for {
		p := j.Progress()
		if p.Result != nil || (p.Stats != nil && p.Stats.Iteration >= n) {
			return p
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A migration capped below the guest's dirty rate does not converge; once
// the cap is lifted through the job it completes, and the rollback-free
// end leaves the new value in force. The change is an event.
func TestJobBandwidthCapLifted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 1 << 30, DirtyRate: 60 << 20})
		cfg.Bandwidth = 32 << 20
		cfg.Strategy = strategy.Config{Policy: strategy.PolicyQEMU, Limits: strategy.Limits{NoThrottle: true}}
		var rec recorder
		cfg.Observer = rec.observe
		j, err := engine.Start(t.Context(), cfg)
		require.NoError(t, err)
		pr := waitStats(t, j, 5)
		require.Nil(t, pr.Result, "capped below the dirty rate, it must not have finished")
		assert.Equal(t, "precopy", pr.Stage)
		assert.Equal(t, uint64(32<<20), pr.Limits.Bandwidth)
		assert.Equal(t, uint64(32<<20), p.Param(qemutest.Source, "max-bandwidth"))

		require.NoError(t, j.SetBandwidth(0))
		assert.Equal(t, engine.UnlimitedBandwidth, p.Param(qemutest.Source, "max-bandwidth"))
		res, err := j.Wait(t.Context())
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		lim := rec.last(engine.EventLimits)
		require.NotNil(t, lim, "a limits event")
		assert.Equal(t, engine.UnlimitedBandwidth, lim.Limits.Bandwidth)
		assert.ErrorIs(t, j.SetBandwidth(1<<20), engine.ErrJobEnded)
		assert.Equal(t, "ended", j.Progress().Stage)
	})
}

// A raised maximum downtime is what the strategy uses from its next step:
// a guest that cannot finish under 300 ms finishes under the new maximum.
func TestJobMaxDowntimeRaised(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 90 << 20})
		cfg.Strategy = strategy.Config{Policy: strategy.PolicyAuto, Limits: strategy.Limits{NoThrottle: true, MaxDowntime: 300 * time.Millisecond}}
		j, err := engine.Start(t.Context(), cfg)
		require.NoError(t, err)
		pr := waitStats(t, j, 4)
		require.Nil(t, pr.Result)
		assert.ErrorIs(t, j.SetMaxDowntime(-time.Second), engine.ErrBadInput)
		require.NoError(t, j.SetMaxDowntime(5*time.Second))
		assert.Equal(t, 5*time.Second, j.Progress().Limits.MaxDowntime)
		res, err := j.Wait(t.Context())
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		var raised bool
		for _, d := range res.Decisions {
			raised = raised || (d.Action == strategy.SetDowntime && d.DowntimeLimit > 300*time.Millisecond)
			assert.LessOrEqual(t, d.DowntimeLimit, 5*time.Second)
		}
		assert.True(t, raised, "the strategy raised the downtime limit above the old maximum: %+v", res.Decisions)
	})
}

// Lowering the maximum below the limit in force lowers the limit at once.
func TestJobMaxDowntimeLowered(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// 150 MiB all dirty over 10 MiB/s: 15 s, far above the 2 s limit
		// the qemu policy sets (the user's maximum).
		p, cfg := pair(t, qemutest.Options{Throughput: 10 << 20, DirtyRate: 200 << 20})
		cfg.Strategy = strategy.Config{Policy: strategy.PolicyQEMU, Limits: strategy.Limits{NoThrottle: true, MaxDowntime: 2 * time.Second}}
		j, err := engine.Start(t.Context(), cfg)
		require.NoError(t, err)
		waitStats(t, j, 2)
		assert.Equal(t, uint64(2000), p.Param(qemutest.Source, "downtime-limit"))
		require.NoError(t, j.SetMaxDowntime(100*time.Millisecond))
		assert.Equal(t, uint64(100), p.Param(qemutest.Source, "downtime-limit"))
		assert.Equal(t, 100*time.Millisecond, j.Progress().Limits.DowntimeLimit)
		require.NoError(t, j.Abort())
		res, err := j.Wait(t.Context())
		require.ErrorIs(t, err, engine.ErrCancelled)
		assert.Equal(t, engine.StatusCancelled, res.Status)
		assert.Equal(t, "running", p.SrcRunState())
		// The rollback restores what was there before the migration, not
		// the mid-flight value.
		assert.Equal(t, uint64(300), p.Param(qemutest.Source, "downtime-limit"))
	})
}

func TestJobStartPostcopy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20, PostcopyRate: 100 << 20})
		cfg.Strategy = strategy.Config{Policy: strategy.PolicyQEMU, Limits: strategy.Limits{NoThrottle: true, AllowPostcopy: true}}
		j, err := engine.Start(t.Context(), cfg)
		require.NoError(t, err)
		waitStats(t, j, 3)
		require.NoError(t, j.StartPostcopy())
		err = j.Abort()
		var se *engine.StageError
		if assert.ErrorAs(t, err, &se) {
			assert.Equal(t, "postcopy", se.Stage)
		}
		assert.ErrorIs(t, j.ForceComplete(), engine.ErrNotNow)
		res, err := j.Wait(t.Context())
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		require.NotEmpty(t, res.Decisions)
		assert.Equal(t, strategy.StartPostcopy, res.Decisions[len(res.Decisions)-1].Action)
		assert.Equal(t, "running", p.DstRunState())
		assert.ErrorIs(t, j.StartPostcopy(), engine.ErrJobEnded)
	})
}

func TestJobStartPostcopyNotPermitted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
		cfg.Strategy = strategy.Config{Policy: strategy.PolicyQEMU, Limits: strategy.Limits{NoThrottle: true}}
		j, err := engine.Start(t.Context(), cfg)
		require.NoError(t, err)
		waitStats(t, j, 2)
		assert.ErrorIs(t, j.StartPostcopy(), engine.ErrNotPermitted)
		assert.Equal(t, "precopy", j.Progress().Stage)
		require.NoError(t, j.Abort())
		res, _ := j.Wait(t.Context())
		assert.Equal(t, engine.StatusCancelled, res.Status)
		assert.Equal(t, "running", p.SrcRunState())
		assert.Empty(t, p.Src.CallsOf("migrate-start-postcopy"))
	})
}

// ForceComplete pauses the source even where the strategy may not
// (AllowPause unset): the caller decided; the stop-and-copy finishes.
func TestJobForceComplete(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
		cfg.Strategy = strategy.Config{Policy: strategy.PolicyQEMU, Limits: strategy.Limits{NoThrottle: true}}
		j, err := engine.Start(t.Context(), cfg)
		require.NoError(t, err)
		waitStats(t, j, 2)
		require.NoError(t, j.ForceComplete())
		res, err := j.Wait(t.Context())
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Equal(t, "running", p.DstRunState())
		assert.Positive(t, res.Downtime)
		require.NotEmpty(t, res.Decisions)
		assert.Equal(t, strategy.PauseSource, res.Decisions[len(res.Decisions)-1].Action)
	})
}

// Subscribers see the same events in order, from their subscription to
// the result; one that never reads blocks neither the job nor the others.
func TestJobSubscribe(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 20 << 20})
		var rec recorder
		cfg.Observer = rec.observe
		j, err := engine.Start(t.Context(), cfg)
		require.NoError(t, err)
		a, b := j.Subscribe(), j.Subscribe()
		idle := j.Subscribe() // never read
		defer idle.Close()
		var got [2][]engine.Event
		done := make(chan struct{})
		for i, s := range []*engine.Subscription{a, b} {
			go func() {
				defer func() { done <- struct{}{} }()
				for ev := range s.C {
					got[i] = append(got[i], ev)
				}
			}()
		}
		<-done
		<-done
		res, err := j.Wait(t.Context())
		require.NoError(t, err)
		require.NotEmpty(t, got[0])
		assert.Equal(t, got[0], got[1])
		last := got[0][len(got[0])-1]
		assert.Equal(t, engine.EventResult, last.Kind)
		assert.Equal(t, res.Status, last.Result.Status)
		// The subscribers' events are the tail of the observer's, in order.
		tail := rec.events[len(rec.events)-len(got[0]):]
		for i := range tail {
			assert.Equal(t, tail[i].Kind, got[0][i].Kind)
			assert.Equal(t, tail[i].Elapsed, got[0][i].Elapsed)
		}
		// After the end: a closed channel at once.
		_, ok := <-j.Subscribe().C
		assert.False(t, ok)
	})
}

// Start of a migration that cannot start returns no job and the error,
// with nothing left behind.
func TestJobStartFails(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{DstRAM: 64 << 20})
		j, err := engine.Start(t.Context(), cfg)
		require.ErrorIs(t, err, engine.ErrBadInput)
		assert.Nil(t, j)
		assert.Equal(t, "running", p.SrcRunState())
		_, err = engine.Start(t.Context(), engine.Config{})
		require.ErrorIs(t, err, engine.ErrInvalidConfig)
	})
}

// What a manager acts on is typed: which check refused the migration, a
// destination that went away against a migration QEMU failed, and each
// rollback step with its side and outcome.
func TestTypedOutcomes(t *testing.T) {
	t.Run("checks", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			for _, tc := range []struct {
				opt       qemutest.Options
				want      engine.Check
				preflight []preflight.Name // the failed checks of a CheckPreflight
			}{
				// RAM size and machine type were CheckRAM and CheckMachine
				// before preflight: now every difference comes at once
				// (the i440fx machine also has other PCI functions).
				{qemutest.Options{DstRAM: 64 << 20}, engine.CheckPreflight, []preflight.Name{preflight.RAMSize}},
				{qemutest.Options{DstMachine: "pc-i440fx-7.2"}, engine.CheckPreflight, []preflight.Name{preflight.MachineType, preflight.PCIAddresses}},
				{qemutest.Options{DstRunState: "running"}, engine.CheckRunState, nil},
				{qemutest.Options{SrcRunState: "shutdown"}, engine.CheckRunState, nil},
			} {
				_, cfg := pair(t, tc.opt)
				_, err := engine.Migrate(t.Context(), cfg)
				require.ErrorIs(t, err, engine.ErrBadInput)
				assert.Equal(t, tc.want, engine.CheckOf(err), "%v", err)
				var pe *preflight.Error
				if tc.preflight != nil && assert.ErrorAs(t, err, &pe) {
					assert.ErrorIs(t, err, preflight.ErrFailed)
					assert.Equal(t, tc.preflight, pe.Checks())
				}
			}
			_, cfg := pair(t, qemutest.Options{})
			cfg.Source = engine.Endpoint{Address: qmp.UnixAddress("/nonexistent/qmigrate-test.qmp")}
			_, err := engine.Migrate(t.Context(), cfg)
			assert.Equal(t, engine.CheckConnect, engine.CheckOf(err), "%v", err)
			assert.Equal(t, engine.Check(""), engine.CheckOf(engine.ErrCancelled))
		})
	})
	t.Run("destination gone", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
			cfg.Strategy.Policy = strategy.PolicyQEMU
			time.AfterFunc(2*time.Second, p.KillDst)
			res, err := engine.Migrate(t.Context(), cfg)
			assert.ErrorIs(t, err, engine.ErrDestinationGone)
			assert.NotErrorIs(t, err, engine.ErrSourceGone)
			assert.Equal(t, "running", p.SrcRunState())
			require.NotEmpty(t, res.Rollback)
			sides := map[engine.Side]bool{}
			for _, s := range res.Rollback {
				sides[s.Side] = true
				assert.NotEmpty(t, s.Name)
				if s.Err == nil && s.Did != "" {
					assert.Contains(t, res.Undone, s.Did)
				}
			}
			assert.True(t, sides[engine.SideSource], "%+v", res.Rollback)
		})
	})
	t.Run("QEMU reports failure", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			_, cfg := pair(t, qemutest.Options{FailWith: "something broke"})
			_, err := engine.Migrate(t.Context(), cfg)
			assert.ErrorIs(t, err, engine.ErrMigrationFailed)
			assert.NotErrorIs(t, err, engine.ErrDestinationGone)
		})
	})
}
