package engine_test

import (
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
)

// postcopyRate is the bytes/s the source sent while in postcopy-active,
// from the stats events: the first and last postcopy samples.
func postcopyRate(rec *recorder) float64 {
	var first, last *engine.Event
	for i := range rec.events {
		e := &rec.events[i]
		if e.Kind != engine.EventStats || e.Stats.Status != "postcopy-active" {
			continue
		}
		if first == nil {
			first = e
		}
		last = e
	}
	if first == nil || last == first {
		return 0
	}
	return float64(last.Stats.TransferredBytes-first.Stats.TransferredBytes) / (last.Elapsed - first.Elapsed).Seconds()
}

// The user's bandwidth limit holds in postcopy: max-postcopy-bandwidth is
// set with max-bandwidth, and the postcopy phase's bytes/s obey it.
func TestPostcopyBandwidthHolds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 1 << 30, DirtyRate: 400 << 20, RAM: 1 << 30})
		cfg.Bandwidth = 48 << 20
		cfg.Strategy.Limits.AllowPostcopy = true
		cfg.Strategy.Limits.Budget = 3 * time.Second
		var rec recorder
		cfg.Observer = rec.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Equal(t, uint64(48<<20), p.Param(qemutest.Source, "max-postcopy-bandwidth"))
		rate := postcopyRate(&rec)
		require.NotZero(t, rate, "postcopy samples")
		assert.InDelta(t, 48<<20, rate, 48<<20*0.05, "postcopy bytes/s obey the limit: %.0f", rate)
	})
}

// Without a limit, max-postcopy-bandwidth is QEMU's unlimited (0).
func TestPostcopyBandwidthUnlimited(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{})
		_, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Equal(t, uint64(0), p.Param(qemutest.Source, "max-postcopy-bandwidth"))
		assert.Equal(t, engine.UnlimitedBandwidth, p.Param(qemutest.Source, "max-bandwidth"))
	})
}

// SetBandwidth changes both limits, in postcopy too.
func TestPostcopySetBandwidth(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 1 << 30, DirtyRate: 400 << 20, RAM: 1 << 30})
		cfg.Bandwidth = 48 << 20
		cfg.Strategy.Limits.AllowPostcopy = true
		cfg.Strategy.Limits.Budget = 3 * time.Second
		j, err := engine.Start(t.Context(), cfg)
		require.NoError(t, err)
		for j.Progress().Stage != "postcopy" {
			time.Sleep(50 * time.Millisecond)
		}
		require.NoError(t, j.SetBandwidth(96<<20))
		assert.Equal(t, uint64(96<<20), p.Param(qemutest.Source, "max-bandwidth"))
		assert.Equal(t, uint64(96<<20), p.Param(qemutest.Source, "max-postcopy-bandwidth"))
		_, err = j.Wait(t.Context())
		require.NoError(t, err)
	})
}

// A rollback restores max-postcopy-bandwidth as it restores max-bandwidth.
func TestPostcopyBandwidthRestored(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{})
		cfg.Bandwidth = 48 << 20
		p.Src.Handle("migrate", qmptest.Fail("GenericError", "injected"))
		_, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		assert.Equal(t, uint64(0), p.Param(qemutest.Source, "max-postcopy-bandwidth"))
		assert.Equal(t, uint64(134217728), p.Param(qemutest.Source, "max-bandwidth"))
	})
}
