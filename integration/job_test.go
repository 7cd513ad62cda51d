package integration

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/strategy"
)

// TestJob steers migrations of real QEMUs through the job handle
// (engine.Start): what a manager does mid-flight.
func TestJob(t *testing.T) {
	q := qemulab.RequireQEMU(t)
	t.Run("BandwidthCapLifted", func(t *testing.T) { testJobBandwidth(t, q) })
	t.Run("MaxDowntimeRaised", func(t *testing.T) { testJobMaxDowntime(t, q) })
	t.Run("StartPostcopy", func(t *testing.T) { testJobPostcopy(t, q) })
	t.Run("ForceComplete", func(t *testing.T) { testJobForceComplete(t, q) })
}

// cappedJob starts a migration of a guest dirtying ~500 MB/s over a
// 64 MB/s cap, which cannot converge under a 300 ms downtime (its dirty set
// of ~99 MiB needs ~1.6 s), and waits until it made two passes.
func cappedJob(t *testing.T, q *qemulab.QEMU, limits strategy.Limits, policy string) (*engine.Job, *qemulab.Instance, *qemulab.Instance, context.Context) {
	return cappedJobAt(t, q, limits, policy, 2)
}

// cappedJobAt is cappedJob returning after the given pass (0: at the first
// stats of the migration).
func cappedJobAt(t *testing.T, q *qemulab.QEMU, limits strategy.Limits, policy string, pass uint64) (*engine.Job, *qemulab.Instance, *qemulab.Instance, context.Context) {
	t.Helper()
	src, dst := enginePair(t, q, 500e6, true, "")
	cfg := engineConfig(t, src, dst, "unix:"+filepath.Join(dst.Dir(), "mig.sock"))
	cfg.Bandwidth = 64e6
	limits.NoThrottle = true
	limits.Budget = 3 * time.Minute
	cfg.Strategy = strategy.Config{Policy: policy, Limits: limits}
	ctx, cancel := context.WithTimeout(t.Context(), 150*time.Second)
	t.Cleanup(cancel)
	j, err := engine.Start(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = j.Abort()
		<-j.Done()
	})
	for {
		p := j.Progress()
		require.Nil(t, p.Result, "a capped migration of this guest must not finish by itself")
		if p.Stats != nil && p.Stats.Iteration >= pass {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal("no pass")
		case <-time.After(20 * time.Millisecond):
		}
	}
	return j, src, dst, ctx
}

func destinationIntact(t *testing.T, ctx context.Context, src, dst *qemulab.Instance) {
	t.Helper()
	st, err := dst.QMP.QueryStatus(ctx)
	require.NoError(t, err)
	assert.Equal(t, "running", st.Status)
	_, err = qemulab.CheckSweep(ctx, src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err, "destination guest intact")
}

func testJobBandwidth(t *testing.T, q *qemulab.QEMU) {
	j, src, dst, ctx := cappedJob(t, q, strategy.Limits{}, strategy.PolicyQEMU)
	assert.Equal(t, uint64(64e6), j.Progress().Limits.Bandwidth)
	events := j.Subscribe()
	require.NoError(t, j.SetBandwidth(0))
	p, err := src.QMP.QueryMigrateParameters(ctx)
	require.NoError(t, err)
	assert.Equal(t, engine.UnlimitedBandwidth, *p.MaxBandwidth, "the cap lifted on the source at once")
	var limits bool
	for ev := range events.C {
		limits = limits || (ev.Kind == engine.EventLimits && ev.Limits.Bandwidth == engine.UnlimitedBandwidth)
	}
	assert.True(t, limits, "a limits event")
	res, err := j.Wait(ctx)
	require.NoError(t, err)
	t.Logf("completed in %v, downtime %v", res.Total, res.Downtime)
	assert.Equal(t, engine.StatusCompleted, res.Status)
	destinationIntact(t, ctx, src, dst)
}

func testJobMaxDowntime(t *testing.T, q *qemulab.QEMU) {
	// Auto gives up within about two seconds on a guest it cannot finish
	// with what is permitted: the manager raises the maximum at once.
	j, src, dst, ctx := cappedJobAt(t, q, strategy.Limits{MaxDowntime: 300 * time.Millisecond}, strategy.PolicyAuto, 0)
	require.NoError(t, j.SetMaxDowntime(5*time.Second))
	assert.Equal(t, 5*time.Second, j.Progress().Limits.MaxDowntime)
	res, err := j.Wait(ctx)
	require.NoError(t, err)
	t.Logf("completed in %v, downtime %v, decisions %+v", res.Total, res.Downtime, res.Decisions)
	assert.Equal(t, engine.StatusCompleted, res.Status)
	var raised bool
	for _, d := range res.Decisions {
		raised = raised || (d.Action == strategy.SetDowntime && d.DowntimeLimit > 300*time.Millisecond)
	}
	assert.True(t, raised, "the strategy used the raised maximum")
	assert.LessOrEqual(t, res.Downtime, 5*time.Second)
	destinationIntact(t, ctx, src, dst)
}

func testJobPostcopy(t *testing.T, q *qemulab.QEMU) {
	j, src, dst, ctx := cappedJob(t, q, strategy.Limits{AllowPostcopy: true}, strategy.PolicyQEMU)
	assert.ErrorIs(t, j.SetBudget(-time.Second), engine.ErrBadInput)
	require.NoError(t, j.StartPostcopy())
	var se *engine.StageError
	require.ErrorAs(t, j.Abort(), &se, "no cancel in postcopy")
	assert.ErrorIs(t, j.ForceComplete(), engine.ErrNotNow)
	res, err := j.Wait(ctx)
	require.NoError(t, err)
	t.Logf("completed in %v, decisions %+v", res.Total, res.Decisions)
	assert.Equal(t, engine.StatusCompleted, res.Status)
	assert.Equal(t, strategy.StartPostcopy, res.Decisions[len(res.Decisions)-1].Action)
	destinationIntact(t, ctx, src, dst)
	assert.ErrorIs(t, j.StartPostcopy(), engine.ErrJobEnded)
}

func testJobForceComplete(t *testing.T, q *qemulab.QEMU) {
	j, src, dst, ctx := cappedJob(t, q, strategy.Limits{}, strategy.PolicyQEMU)
	assert.ErrorIs(t, j.StartPostcopy(), engine.ErrNotPermitted, "postcopy was not permitted")
	require.NoError(t, j.ForceComplete())
	res, err := j.Wait(ctx)
	require.NoError(t, err)
	t.Logf("completed in %v, downtime %v", res.Total, res.Downtime)
	assert.Equal(t, engine.StatusCompleted, res.Status)
	assert.Equal(t, strategy.PauseSource, res.Decisions[len(res.Decisions)-1].Action)
	destinationIntact(t, ctx, src, dst)
	assert.ErrorIs(t, j.ForceComplete(), engine.ErrJobEnded)
}
