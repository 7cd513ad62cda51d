package engine_test

import (
	"context"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/qemutest"
)

// pair starts a simulated pair and returns a config that drives it through
// clients the test holds.
func pair(t *testing.T, opt qemutest.Options) (*qemutest.Pair, engine.Config) {
	t.Helper()
	p := qemutest.New(opt)
	ctx := context.Background()
	src, err := p.Src.Client(ctx)
	require.NoError(t, err)
	dst, err := p.Dst.Client(ctx)
	require.NoError(t, err)
	t.Cleanup(func() {
		src.Close()
		dst.Close()
		p.Close()
	})
	return p, engine.Config{
		Source:      engine.Endpoint{Client: src},
		Destination: engine.Endpoint{Client: dst},
		URI:         "unix:/tmp/qmigrate-test-nonexistent.sock",
	}
}

type recorder struct{ events []engine.Event }

func (r *recorder) observe(e engine.Event) { r.events = append(r.events, e) }

func (r *recorder) phases() []engine.Phase {
	var out []engine.Phase
	for _, e := range r.events {
		if e.Kind == engine.EventPhase {
			out = append(out, e.Phase)
		}
	}
	return out
}

// last returns the last event of kind k, or nil.
func (r *recorder) last(k engine.EventKind) *engine.Event {
	for i := len(r.events) - 1; i >= 0; i-- {
		if r.events[i].Kind == k {
			return &r.events[i]
		}
	}
	return nil
}

func (r *recorder) kinds(k engine.EventKind) int {
	n := 0
	for _, e := range r.events {
		if e.Kind == k {
			n++
		}
	}
	return n
}

func TestMigrateHappyPath(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{DirtyRate: 50 << 20})
		var rec recorder
		cfg.Observer = rec.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		require.NotNil(t, res)
		t.Logf("result: %+v", *res)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Equal(t, "running", p.DstRunState(), "destination resumed by the engine (-S)")
		assert.Equal(t, "postmigrate", p.SrcRunState())
		assert.Greater(t, res.TransferredBytes, uint64(150<<20))
		assert.Greater(t, res.Downtime, time.Duration(0))
		assert.LessOrEqual(t, res.Downtime, 300*time.Millisecond+20*time.Millisecond)
		assert.Equal(t, 300*time.Millisecond, res.MaxDowntime, "the default maximum")
		assert.Equal(t, res.Downtime <= res.MaxDowntime, res.DowntimeHeld)
		assert.Positive(t, res.DowntimeLimit, "the limit in force at the switchover")
		assert.Equal(t, []engine.Phase{engine.PhasePrepare, engine.PhaseStart, engine.PhaseConverge,
			engine.PhaseSwitchover, engine.PhaseComplete}, rec.phases())
		assert.Positive(t, rec.kinds(engine.EventStats))
		last := rec.events[len(rec.events)-1]
		assert.Equal(t, engine.EventResult, last.Kind)
		assert.Same(t, res, last.Result)
		// max-bandwidth always explicit, events on both sides.
		assert.Equal(t, engine.UnlimitedBandwidth, p.Param(qemutest.Source, "max-bandwidth"))
		assert.True(t, p.Caps(qemutest.Source)["events"])
		assert.True(t, p.Caps(qemutest.Destination)["events"])
		assert.Empty(t, p.Src.CallsOf("migrate_cancel"))
	})
}
