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
	"github.com/qmigrate/qmigrate/strategy"
)

// lateWriter is a pair whose guest writes its 32 MiB disk at 8 MiB/s, which
// a 32 MiB/s mirror gets READY against in about 1.3 s, and whose 150 MiB of
// RAM take about 9 s at 16 MiB/s: a RAM phase long enough for auto to
// measure the disk backlog. At the converge phase the guest speeds up to
// after bytes/s.
func lateWriter(t *testing.T, version [3]int, after float64) (*qemutest.Pair, engine.Config, *lateRec) {
	p, cfg := pair(t, qemutest.Options{Version: version, Disk: 32 << 20, MirrorRate: 32 << 20, DiskWriteRate: 8 << 20, Throughput: 16 << 20})
	cfg.Storage = &blockmirror.Config{}
	rec := &lateRec{}
	cfg.Observer = func(e engine.Event) {
		rec.events = append(rec.events, e)
		switch e.Kind {
		case engine.EventPhase:
			if e.Phase == engine.PhaseConverge {
				rec.readyAt = e.Elapsed
				p.SetDiskWriteRate(after)
			}
		case engine.EventDecision:
			if rec.decision == nil {
				rec.decision, rec.decisionPhase = &e, rec.phase
			}
		case engine.EventDisk:
			rec.lastDisk = e.Disk
		}
		if e.Kind == engine.EventPhase {
			rec.phase = e.Phase
		}
	}
	return p, cfg, rec
}

type lateRec struct {
	events        []engine.Event
	readyAt       time.Duration
	phase         engine.Phase
	decision      *engine.Event
	decisionPhase engine.Phase
	lastDisk      *blockmirror.Progress
}

// A writer that speeds up after READY (200 MiB/s against 32 MiB/s) fills the
// mirror's backlog; draining 32 MiB at switchover would take ~1 s. On 10.0
// auto switches the mirror to write-blocking in the converge phase, one
// MirrorWindow after RAM migration started; the migration completes.
func TestStorageBacklogAfterReadySwitches(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg, rec := lateWriter(t, [3]int{10, 0, 2}, 200<<20)
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		require.Equal(t, []strategy.Action{strategy.MirrorWriteBlocking}, actionsOf(res))
		d := res.Decisions[0]
		t.Logf("READY at %v; %v: %s", rec.readyAt, d.At, d.Reason)
		// The Reason is the strategy's arithmetic in words, for logs: it
		// has no typed cause to check instead.
		assert.Contains(t, d.Reason, "RAM phase")
		assert.Contains(t, d.Reason, "disk backlog")
		assert.GreaterOrEqual(t, d.At, rec.readyAt+3*time.Second, "one MirrorWindow of the RAM phase measured")
		assert.Less(t, d.At, rec.readyAt+4*time.Second)
		assert.Equal(t, 1, p.MirrorModeChanges())
		require.NotNil(t, rec.decision, "decision event")
		assert.Equal(t, engine.PhaseConverge, rec.decisionPhase, "decided in the converge phase")
		assert.NoError(t, rec.decision.DecisionErr)
		assert.Equal(t, strategy.MirrorWriteBlocking, rec.decision.Decision.Action)
		require.NotNil(t, rec.lastDisk)
		assert.Equal(t, "write-blocking", rec.lastDisk.CopyMode)
		assert.Less(t, rec.lastDisk.Total-rec.lastDisk.Done, uint64(32<<20), "the backlog drains under write-blocking")
		assertBlockClean(t, p)
		assert.Equal(t, "running", p.DstRunState())
	})
}

// A writer the mirror keeps up with after READY: no decision.
func TestStorageBacklogSteadyLeftAlone(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg, _ := lateWriter(t, [3]int{10, 0, 2}, 8<<20)
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Empty(t, res.Decisions)
		assert.Zero(t, p.MirrorModeChanges())
		assertBlockClean(t, p)
	})
}

// 7.2 cannot switch a running mirror: the same late writer gets no decision
// (the backlog is drained at switchover) and the migration completes.
func TestStorageBacklog72NoSwitch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg, _ := lateWriter(t, [3]int{7, 2, 22}, 200<<20)
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Empty(t, res.Decisions)
		assert.Empty(t, p.Src.CallsOf("block-job-change"))
		assertBlockClean(t, p)
		assert.Equal(t, "running", p.DstRunState())
	})
}
