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
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/strategy"
)

// crash starts a migration with clients of its own and "kills" that
// process once the migration made some progress: its connections close, so
// it changes nothing more on either QEMU (its rollback finds them closed),
// as after a SIGKILL. It returns a config for the adopting process: new
// clients, the same URI and limits.
func crash(t *testing.T, p *qemutest.Pair, cfg engine.Config, passes uint64) engine.Config {
	t.Helper()
	src, dst, err := p.Clients(context.Background())
	require.NoError(t, err)
	first := cfg
	first.Source, first.Destination = engine.Endpoint{Client: src}, engine.Endpoint{Client: dst}
	j, err := engine.Start(context.Background(), first)
	require.NoError(t, err)
	if passes > 0 {
		waitStats(t, j, passes)
	}
	src.Close()
	dst.Close()
	<-j.Done()
	src2, dst2, err := p.Clients(context.Background())
	require.NoError(t, err)
	t.Cleanup(func() { src2.Close(); dst2.Close() })
	cfg.Source, cfg.Destination = engine.Endpoint{Client: src2}, engine.Endpoint{Client: dst2}
	return cfg
}

// noLeftovers checks that nothing of qmigrate's is left on either side
// (a destination that exited took its objects with it).
func noLeftovers(t *testing.T, p *qemutest.Pair) {
	t.Helper()
	assert.Empty(t, p.Objects(qemutest.Source), "source: objects left")
	if !p.DstGone() {
		assert.Empty(t, p.Objects(qemutest.Destination), "destination: objects left")
	}
}

// An active migration left by a dead process goes on under the strategy
// and completes; its journal and TLS credentials are removed.
func TestAdoptActiveCompletes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 1 << 30, DirtyRate: 60 << 20})
		cfg.Bandwidth = 32 << 20 // does not converge under the first process
		cfg.Strategy = strategy.Config{Policy: strategy.PolicyQEMU, Limits: strategy.Limits{NoThrottle: true}}
		cfg = crash(t, p, cfg, 3)
		require.Equal(t, qmp.StatusActive, p.Status(), "the migration goes on without its process")
		assert.NotEmpty(t, p.Objects(qemutest.Source), "the journal is on the source")

		cfg.Bandwidth = 0 // the adopting process lifts the cap
		var rec recorder
		cfg.Observer = rec.observe
		j, err := engine.Adopt(t.Context(), cfg)
		require.NoError(t, err)
		res, err := j.Wait(t.Context())
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Equal(t, "running", p.DstRunState())
		noLeftovers(t, p)
		assert.Contains(t, rec.phases(), engine.PhaseConverge)
	})
}

// Adopt then Abort: the rollback restores what the first process found
// (a stale downtime limit and bandwidth someone left), not QEMU's defaults
// nor the first process's values.
func TestAdoptAbortRestoresJournal(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
		src, err := p.Src.Client(t.Context())
		require.NoError(t, err)
		before := qmp.MigrationParameters{DowntimeLimit: qmp.Ptr(uint64(5000)), MaxBandwidth: qmp.Ptr(uint64(7 << 20))}
		require.NoError(t, src.MigrateSetParameters(t.Context(), before))
		src.Close()
		cfg.Strategy = strategy.Config{Policy: strategy.PolicyQEMU, Limits: strategy.Limits{NoThrottle: true}}
		cfg = crash(t, p, cfg, 2)
		assert.Equal(t, uint64(300), p.Param(qemutest.Source, "downtime-limit"), "the first process set its own")

		j, err := engine.Adopt(t.Context(), cfg)
		require.NoError(t, err)
		require.NoError(t, j.Abort())
		res, err := j.Wait(t.Context())
		require.ErrorIs(t, err, engine.ErrCancelled)
		assert.Equal(t, engine.StatusCancelled, res.Status)
		assert.Equal(t, "running", p.SrcRunState())
		assert.Equal(t, uint64(5000), p.Param(qemutest.Source, "downtime-limit"))
		assert.Equal(t, uint64(7<<20), p.Param(qemutest.Source, "max-bandwidth"))
		assert.False(t, p.Caps(qemutest.Source)["events"], "capabilities as they were")
		noLeftovers(t, p)
	})
}

// A migration that completed on the source while nobody watched is
// finished: the destination (started with -S) is resumed.
func TestAdoptCompletedFinishes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 1 << 30, DirtyRate: 1 << 20})
		cfg = crash(t, p, cfg, 0)
		for p.Status() != qmp.StatusCompleted {
			time.Sleep(100 * time.Millisecond)
		}
		require.NotEqual(t, "running", p.DstRunState(), "nobody resumed the destination")
		j, err := engine.Adopt(t.Context(), cfg)
		require.NoError(t, err)
		res, err := j.Wait(t.Context())
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Equal(t, "running", p.DstRunState())
		noLeftovers(t, p)
	})
}

// A migration QEMU failed while nobody watched: leftovers removed, the
// guest runs on the source, the outcome says QEMU failed it.
func TestAdoptFailedCleansUp(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{FailWith: "something broke"})
		src, dst, err := p.Clients(t.Context())
		require.NoError(t, err)
		first := cfg
		first.Source, first.Destination = engine.Endpoint{Client: src}, engine.Endpoint{Client: dst}
		// The first process dies as its migration fails: it sees nothing.
		first.Observer = func(ev engine.Event) {
			if ev.Kind == engine.EventPhase && ev.Phase == engine.PhaseConverge {
				src.Close()
				dst.Close()
			}
		}
		_, _ = engine.Migrate(t.Context(), first)
		require.NotEmpty(t, p.Objects(qemutest.Source), "the journal is left")

		j, err := engine.Adopt(t.Context(), cfg)
		require.NoError(t, err)
		res, err := j.Wait(t.Context())
		require.ErrorIs(t, err, engine.ErrMigrationFailed)
		assert.Equal(t, engine.StatusFailed, res.Status)
		// QEMU's error-desc, carried through in the message: the engine
		// keeps no typed copy of it.
		assert.Contains(t, err.Error(), "something broke")
		assert.Equal(t, "running", p.SrcRunState())
		assert.Empty(t, p.Objects(qemutest.Source))
		assert.NotEmpty(t, res.Undone)
	})
}

// Nothing in flight and nothing of qmigrate's: a typed refusal, nothing
// touched.
func TestAdoptNothing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{})
		j, err := engine.Adopt(t.Context(), cfg)
		assert.Nil(t, j)
		require.ErrorIs(t, err, engine.ErrNothingToAdopt)
		require.ErrorIs(t, err, engine.ErrBadInput)
		assert.Equal(t, engine.CheckAdopt, engine.CheckOf(err))
		for _, cmd := range []string{"migrate-set-capabilities", "migrate-set-parameters", "object-add", "object-del", "migrate_cancel", "cont", "stop"} {
			assert.Empty(t, p.Src.CallsOf(cmd), cmd)
			assert.Empty(t, p.Dst.CallsOf(cmd), cmd)
		}
	})
}

// A migration someone else started (no journal) is not adopted.
func TestAdoptNotOurs(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
		src, dst, err := p.Clients(t.Context())
		require.NoError(t, err)
		defer src.Close()
		defer dst.Close()
		uri := qmp.UnixAddress("/tmp/qmigrate-test-other.sock")
		require.NoError(t, dst.MigrateIncoming(t.Context(), qmp.MigrateIncomingArgs{URI: uri.String()}))
		require.NoError(t, src.Migrate(t.Context(), qmp.MigrateArgs{URI: uri.String()}))
		time.Sleep(time.Second)
		require.Equal(t, qmp.StatusActive, p.Status())
		_, err = engine.Adopt(t.Context(), cfg)
		require.ErrorIs(t, err, engine.ErrNotOurs)
		assert.Empty(t, p.Src.CallsOf("migrate_cancel"))
		assert.Equal(t, qmp.StatusActive, p.Status())
	})
}
