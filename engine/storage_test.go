package engine_test

import (
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/strategy"
)

// heavyWriter is a pair whose guest dirties its 64 MiB disk at 200 MiB/s
// while a mirror copies 32 MiB/s: background mode never gets READY.
func heavyWriter(version [3]int) qemutest.Options {
	return qemutest.Options{Version: version, Disk: 64 << 20, MirrorRate: 32 << 20, DiskWriteRate: 200 << 20}
}

func actionsOf(res *engine.Result) []strategy.Action {
	var out []strategy.Action
	for _, d := range res.Decisions {
		out = append(out, d.Action)
	}
	return out
}

func assertBlockClean(t *testing.T, p *qemutest.Pair) {
	t.Helper()
	nodes, jobs, exports, server := p.BlockLeft()
	assert.Zero(t, nodes, "NBD nodes left")
	assert.Zero(t, jobs, "mirror jobs left")
	assert.Zero(t, exports, "exports left")
	assert.False(t, server, "NBD server left")
}

// On 8.2+ auto sees the mirror not converging during the mirror phase and
// switches it to write-blocking; the migration then completes.
func TestStorageAutoSwitchesToWriteBlocking(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, heavyWriter([3]int{10, 0, 2}))
		cfg.Storage = &blockmirror.Config{}
		var rec recorder
		cfg.Observer = rec.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		require.Equal(t, []strategy.Action{strategy.MirrorWriteBlocking}, actionsOf(res))
		d := res.Decisions[0]
		// The Reason is the strategy's arithmetic in words, for logs: it
		// has no typed cause to check instead.
		assert.Regexp(t, "never READY|READY only in", d.Reason)
		assert.GreaterOrEqual(t, d.At, 3*time.Second, "one MirrorWindow measured")
		assert.Less(t, d.At, 4*time.Second)
		assert.Equal(t, 1, p.MirrorModeChanges())
		var ev *engine.Event
		var lastDisk *blockmirror.Progress
		for i, e := range rec.events {
			switch e.Kind {
			case engine.EventDecision:
				ev = &rec.events[i]
			case engine.EventDisk:
				lastDisk = e.Disk
			case engine.EventPhase:
				if e.Phase == engine.PhaseStart {
					assert.Nil(t, ev, "decided in the start phase")
				}
			}
		}
		require.NotNil(t, ev, "decision event")
		assert.NoError(t, ev.DecisionErr)
		assert.Equal(t, strategy.MirrorWriteBlocking, ev.Decision.Action)
		require.NotNil(t, lastDisk)
		assert.Equal(t, "write-blocking", lastDisk.CopyMode)
		assertBlockClean(t, p)
		assert.Equal(t, "running", p.DstRunState())
	})
}

// 7.2 cannot switch a running mirror: auto restarts the stuck mirrors in
// write-blocking mode (a full re-copy) in the mirror phase; the migration then
// completes and nothing is left.
func TestStorage72RestartsWriteBlocking(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, heavyWriter([3]int{7, 2, 22}))
		cfg.Storage = &blockmirror.Config{}
		var rec recorder
		cfg.Observer = rec.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		require.Equal(t, []strategy.Action{strategy.MirrorWriteBlocking}, actionsOf(res))
		assert.Contains(t, res.Decisions[0].Reason, "restart them in write-blocking mode") // words only: no typed cause
		assert.Equal(t, 3*time.Second, res.Decisions[0].At.Round(time.Second))
		assert.Empty(t, p.Src.CallsOf("block-job-change"))
		mirrors := p.Src.CallsOf("blockdev-mirror")
		require.Len(t, mirrors, 2, "started, then restarted")
		assert.NotContains(t, string(mirrors[0].Args), "write-blocking")
		assert.Contains(t, string(mirrors[1].Args), `"copy-mode":"write-blocking"`)
		ev := rec.last(engine.EventDecision)
		require.NotNil(t, ev, "decision event")
		assert.NoError(t, ev.DecisionErr)
		assertBlockClean(t, p)
		assert.Equal(t, "running", p.DstRunState())
	})
}

// 7.2 with write-blocking refused by the user: auto aborts the stuck mirror
// phase (after two windows) and the rollback leaves the source as it was.
func TestStorage72RefusedAbortsAndRollsBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, heavyWriter([3]int{7, 2, 22}))
		cfg.Storage = &blockmirror.Config{}
		cfg.Strategy.Limits.NoWriteBlocking = true
		res, err := engine.Migrate(t.Context(), cfg)
		require.ErrorIs(t, err, engine.ErrAborted)
		assert.Equal(t, []strategy.Action{strategy.Abort}, actionsOf(res))
		assert.Contains(t, res.Decisions[0].Reason, "refused by the user") // words only: no typed cause
		assert.Equal(t, 6*time.Second, res.Decisions[0].At.Round(time.Second))
		mirrors := rollbackStep(t, res, "storage: abort mirrors")
		assert.NoError(t, mirrors.Err)
		assert.NotEmpty(t, mirrors.Did)
		assert.Empty(t, res.UndoErrors)
		assert.Equal(t, "running", p.SrcRunState())
		assert.Empty(t, p.Src.CallsOf("migrate"), "RAM migration never started")
		assert.Len(t, p.Src.CallsOf("blockdev-mirror"), 1, "never restarted")
		assertBlockClean(t, p)
	})
}

// 7.2 with the mirrors started write-blocking completes; nothing to decide.
func TestStorage72WriteBlockingFromStart(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, heavyWriter([3]int{7, 2, 22}))
		cfg.Storage = &blockmirror.Config{WriteBlocking: true}
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Empty(t, res.Decisions)
		calls := p.Src.CallsOf("blockdev-mirror")
		require.Len(t, calls, 1)
		assert.Contains(t, string(calls[0].Args), `"copy-mode":"write-blocking"`)
		assertBlockClean(t, p)
	})
}

// A preset has no storage lever; the budget, counted from the start of
// Migrate, still aborts it in the mirror phase.
func TestStoragePresetBudgetInMirrorPhase(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, heavyWriter([3]int{10, 0, 2}))
		cfg.Storage = &blockmirror.Config{}
		cfg.Strategy = strategy.Config{Policy: strategy.PolicyQEMU, Limits: strategy.Limits{Budget: 2 * time.Second}}
		res, err := engine.Migrate(t.Context(), cfg)
		require.ErrorIs(t, err, engine.ErrAborted)
		assert.Equal(t, []strategy.Action{strategy.Abort}, actionsOf(res))
		assert.Contains(t, res.Decisions[0].Reason, "budget 2s reached") // words only: no typed cause
		assert.Less(t, res.Total, 2*time.Second+500*time.Millisecond)
		assert.Zero(t, p.MirrorModeChanges())
		assert.Equal(t, "running", p.SrcRunState())
		assertBlockClean(t, p)
	})
}

// A mirror that converges on its own gets no decision in the mirror phase.
func TestStorageConvergingMirrorLeftAlone(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Disk: 256 << 20, MirrorRate: 64 << 20, DiskWriteRate: 8 << 20})
		cfg.Storage = &blockmirror.Config{}
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.NotContains(t, actionsOf(res), strategy.MirrorWriteBlocking)
		assert.Zero(t, p.MirrorModeChanges())
		assertBlockClean(t, p)
	})
}

func TestStorageWriteBlockingRefusedConflicts(t *testing.T) {
	cfg := engine.Config{Source: engine.Endpoint{Address: qmp.UnixAddress("/a")}, Destination: engine.Endpoint{Address: qmp.UnixAddress("/b")}, URI: "unix:/c",
		Storage:  &blockmirror.Config{WriteBlocking: true},
		Strategy: strategy.Config{Limits: strategy.Limits{NoWriteBlocking: true}}}
	err := cfg.Validate()
	require.ErrorIs(t, err, engine.ErrInvalidConfig)
	// Validate names the field in its message, for the person who wrote
	// the config; there is no typed field to check instead.
	assert.Contains(t, err.Error(), "Storage.WriteBlocking")
}
