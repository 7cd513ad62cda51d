package integration

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/guest/sweep"
	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
	"github.com/qmigrate/qmigrate/strategy"
)

// TestEngine drives engine.Migrate against real QEMUs (the version picked by
// QMIGRATE_QEMU). Subtests run one after another, never more than two QEMUs
// at a time, each bounded to keep the suite short.
func TestEngine(t *testing.T) {
	q := qemulab.RequireQEMU(t)
	t.Run("Converges", func(t *testing.T) { testEngineConverges(t, q, "unix", 0) })
	t.Run("TCPPortZeroMultifd", func(t *testing.T) { testEngineConverges(t, q, "tcp", 2) })
	t.Run("SocketpairFD", func(t *testing.T) { testEngineConverges(t, q, "fd", 0) })
	t.Run("AutoThrottlesNonConverging", func(t *testing.T) { testEngineAutoThrottle(t, q) })
	t.Run("PostcopyAtBudget", func(t *testing.T) { testEnginePostcopy(t, q) })
	t.Run("CancelRollsBack", func(t *testing.T) { testEngineCancel(t, q) })
	t.Run("DestinationKilled", func(t *testing.T) { testEngineDstKilled(t, q) })
	t.Run("StrategyAbortsWithinBudget", func(t *testing.T) { testEngineAbort(t, q) })
	t.Run("DestinationNotIncoming", func(t *testing.T) { testEngineNotIncoming(t, q) })
	t.Run("WrongSocketPath", func(t *testing.T) { testEngineWrongSocket(t) })
	t.Run("SilentPeer", func(t *testing.T) { testEngineSilentPeer(t, q) })
}

// enginePair starts a source running the sweep guest at about rate bytes/s
// and a destination with -incoming defer (or without, when incoming is
// false), and waits until the guest completed a pass.
func enginePair(t *testing.T, q *qemulab.QEMU, rate float64, incoming bool, uuid string) (src, dst *qemulab.Instance) {
	t.Helper()
	guest := qemulab.NewSweepGuest(rate)
	src = qemulab.StartT(t, q, qemulab.Config{Name: "src", Guest: guest, UUID: uuid})
	dst = qemulab.StartT(t, q, qemulab.Config{Name: "dst", Guest: guest, Incoming: incoming, UUID: uuid})
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	_, err := src.CountSerial(ctx, sweep.StartChar, sweep.PassChar, 1)
	require.NoError(t, err)
	return src, dst
}

func engineConfig(t *testing.T, src, dst *qemulab.Instance, uri string) engine.Config {
	return engine.Config{
		Source:      engine.Endpoint{Client: src.QMP},
		Destination: engine.Endpoint{Client: dst.QMP},
		URI:         uri,
		Logger:      testLogger(t),
	}
}

// testLogger sends the engine's debug log to t.Log when -v is given.
// testLogger logs the engine's steps and QMP wire transcript into the test
// log when QMIGRATE_TEST_DEBUG is set (the transcript holds ~200 KB schema
// replies, too much for every verbose CI run).
func testLogger(t *testing.T) *slog.Logger {
	if os.Getenv("QMIGRATE_TEST_DEBUG") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p[:len(p)-1]))
	return len(p), nil
}

// sourceIntact checks that after a rollback the guest runs on the source and
// its memory passes the sweep invariant.
func sourceIntact(t *testing.T, src *qemulab.Instance) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	st, err := src.QMP.QueryStatus(ctx)
	require.NoError(t, err)
	assert.Equal(t, "running", st.Status, "guest runs on the source")
	info, err := src.QMP.QueryMigrate(ctx)
	require.NoError(t, err)
	assert.True(t, info.Status.Terminal(), "no migration left running on the source (%s)", info.Status)
	_, err = qemulab.CheckSweep(ctx, nil, src.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err, "source guest intact")
}

func testEngineConverges(t *testing.T, q *qemulab.QEMU, scheme string, multifd int) {
	uuid := ""
	if multifd > 0 {
		uuid = "5a3c8f00-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
	}
	src, dst := enginePair(t, q, 50e6, true, uuid)
	uri := "unix:" + filepath.Join(dst.Dir(), "mig.sock")
	switch scheme {
	case "tcp":
		uri = "tcp:127.0.0.1:0"
	case "fd":
		uri = "fd:"
	}
	cfg := engineConfig(t, src, dst, uri)
	cfg.MultifdChannels = multifd
	var stats int
	cfg.Observer = func(e engine.Event) {
		if e.Kind == engine.EventStats {
			stats++
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	res, err := engine.Migrate(ctx, cfg)
	require.NoError(t, err)
	t.Logf("completed: total %v, downtime %v, transferred %d MiB, %d stats, decisions %d",
		res.Total, res.Downtime, res.TransferredBytes>>20, stats, len(res.Decisions))
	assert.Equal(t, engine.StatusCompleted, res.Status)
	assert.Positive(t, res.Downtime)
	assert.LessOrEqual(t, res.Downtime, strategy.DefaultMaxDowntime, "downtime within the default 300ms limit")
	assert.GreaterOrEqual(t, res.TransferredBytes, uint64(sweep.RangeSize), "at least the swept pages crossed")
	st, err := dst.QMP.QueryStatus(ctx)
	require.NoError(t, err)
	assert.Equal(t, "running", st.Status)
	_, err = qemulab.CheckSweep(ctx, src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err, "destination guest intact")
	if scheme == "unix" {
		_, err := os.Stat(uri[len("unix:"):])
		assert.True(t, os.IsNotExist(err), "migration socket removed")
	}
}

// nonConverging is a config that cannot converge: the link is limited to
// 20 MB/s while the guest re-dirties its 99 MiB range several times a second.
func nonConverging(t *testing.T, src, dst *qemulab.Instance) engine.Config {
	cfg := engineConfig(t, src, dst, "unix:"+filepath.Join(dst.Dir(), "mig.sock"))
	cfg.Bandwidth = 20e6
	cfg.Strategy.Policy = strategy.PolicyQEMU
	return cfg
}

// The guest dirties its range faster than the 40 MB/s link: the auto policy
// must apply its levers (downtime, CPU throttle) on the real QEMU and
// complete with the guest intact.
func testEngineAutoThrottle(t *testing.T, q *qemulab.QEMU) {
	// 4 to 15 × the link: far above (35 × on an idle host), TCG's bursts
	// under a 99% throttle may still dirty more than a 1 s switchover
	// takes, and auto rightly aborts.
	src, g, rate := tunedSweep(t, q, qemulab.Config{Name: "src"}, 500e6, 160e6, 600e6)
	t.Logf("sweep guest dirties %.0f MB/s, %.1f × the 40 MB/s link", rate/1e6, rate/40e6)
	dst := qemulab.StartT(t, q, qemulab.Config{Name: "dst", Guest: g, Incoming: true})
	cfg := engineConfig(t, src, dst, "unix:"+filepath.Join(dst.Dir(), "mig.sock"))
	cfg.Bandwidth = 40e6
	cfg.Strategy.Limits.MaxDowntime = time.Second
	cfg.Strategy.Limits.Budget = 60 * time.Second
	var applied []string
	var maxThrottle int
	cfg.Observer = func(e engine.Event) {
		switch e.Kind {
		case engine.EventDecision:
			applied = append(applied, string(e.Decision.Action))
			assert.NoError(t, e.DecisionErr, "decision %+v applied", e.Decision)
		case engine.EventStats:
			maxThrottle = max(maxThrottle, e.Stats.ThrottlePercent)
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	res, err := engine.Migrate(ctx, cfg)
	require.NoError(t, err)
	t.Logf("completed in %v, downtime %v, decisions %v, max throttle %d%%", res.Total, res.Downtime, applied, maxThrottle)
	for _, d := range res.Decisions {
		t.Logf("  at %v: %s: %s", d.At.Round(time.Millisecond), d.Action, d.Reason)
	}
	assert.NotEmpty(t, res.Decisions, "levers were needed")
	assert.LessOrEqual(t, res.Downtime, time.Second+200*time.Millisecond)
	_, err = qemulab.CheckSweep(ctx, src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err, "destination guest intact")
}

// With throttling refused and postcopy permitted, the budget ends pre-copy
// by postcopy on the real QEMU: no cancel, guest intact on the destination.
func testEnginePostcopy(t *testing.T, q *qemulab.QEMU) {
	src, dst := enginePair(t, q, 500e6, true, "")
	cfg := nonConverging(t, src, dst)
	cfg.Strategy.Policy = strategy.PolicyAuto
	cfg.Strategy.Limits.NoThrottle = true
	cfg.Strategy.Limits.AllowPostcopy = true
	cfg.Strategy.Limits.Budget = 3 * time.Second
	var statuses []string
	cfg.Observer = func(e engine.Event) {
		if e.Kind == engine.EventStats && (len(statuses) == 0 || statuses[len(statuses)-1] != e.Stats.Status) {
			statuses = append(statuses, e.Stats.Status)
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	res, err := engine.Migrate(ctx, cfg)
	require.NoError(t, err)
	t.Logf("completed in %v, downtime %v, statuses %v, decisions %+v", res.Total, res.Downtime, statuses, res.Decisions)
	assert.Contains(t, statuses, "postcopy-active")
	require.NotEmpty(t, res.Decisions)
	assert.Equal(t, strategy.StartPostcopy, res.Decisions[len(res.Decisions)-1].Action)
	_, err = qemulab.CheckSweep(ctx, src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err, "destination guest intact")
}

func testEngineCancel(t *testing.T, q *qemulab.QEMU) {
	src, dst := enginePair(t, q, 500e6, true, "")
	before, err := src.QMP.QueryMigrateParameters(t.Context())
	require.NoError(t, err)
	cfg := nonConverging(t, src, dst)
	ctx, cancel := context.WithCancel(t.Context())
	time.AfterFunc(2*time.Second, cancel)
	res, err := engine.Migrate(ctx, cfg)
	require.Error(t, err)
	t.Logf("cancelled: %v; undone %q; undo errors %q", err, res.Undone, res.UndoErrors)
	assert.ErrorIs(t, err, engine.ErrCancelled)
	assert.ErrorIs(t, err, context.Canceled)
	assert.Equal(t, engine.StatusCancelled, res.Status)
	assert.Less(t, res.Total, 10*time.Second)
	assert.Empty(t, res.UndoErrors)
	after, err := src.QMP.QueryMigrateParameters(t.Context())
	require.NoError(t, err)
	assert.Equal(t, *before.MaxBandwidth, *after.MaxBandwidth, "source parameters restored")
	caps, err := src.QMP.QueryMigrateCapabilities(t.Context())
	require.NoError(t, err)
	assert.False(t, caps["events"], "source capabilities restored")
	_, err = os.Stat(filepath.Join(dst.Dir(), "mig.sock"))
	assert.True(t, os.IsNotExist(err), "migration socket removed once the destination exited")
	sourceIntact(t, src)
}

func testEngineDstKilled(t *testing.T, q *qemulab.QEMU) {
	src, dst := enginePair(t, q, 500e6, true, "")
	cfg := nonConverging(t, src, dst)
	killed := make(chan time.Time, 1)
	time.AfterFunc(2*time.Second, func() { killed <- time.Now(); dst.Kill() })
	res, err := engine.Migrate(t.Context(), cfg)
	require.Error(t, err)
	took := time.Since(<-killed)
	t.Logf("failed %v after the kill: %v; undone %q; undo errors %q", took, err, res.Undone, res.UndoErrors)
	assert.Less(t, took, 5*time.Second, "surfaced within seconds")
	assert.Equal(t, engine.StatusFailed, res.Status)
	var ee *engine.Error
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, engine.SideDestination, ee.Side)
	assert.Empty(t, res.UndoErrors)
	sourceIntact(t, src)
}

func testEngineAbort(t *testing.T, q *qemulab.QEMU) {
	src, dst := enginePair(t, q, 500e6, true, "")
	cfg := nonConverging(t, src, dst)
	cfg.Strategy.Limits.Budget = 3 * time.Second
	res, err := engine.Migrate(t.Context(), cfg)
	require.Error(t, err)
	t.Logf("aborted after %v: %v; decisions %+v", res.Total, err, res.Decisions)
	assert.ErrorIs(t, err, engine.ErrAborted)
	assert.Less(t, res.Total, cfg.Strategy.Limits.Budget+4*time.Second, "ends at its budget, plus the rollback")
	sourceIntact(t, src)
}

func testEngineNotIncoming(t *testing.T, q *qemulab.QEMU) {
	src, dst := enginePair(t, q, 50e6, false, "")
	cfg := engineConfig(t, src, dst, "unix:"+filepath.Join(dst.Dir(), "mig.sock"))
	res, err := engine.Migrate(t.Context(), cfg)
	require.Error(t, err)
	t.Log(err)
	assert.ErrorIs(t, err, engine.ErrBadInput)
	assert.Contains(t, err.Error(), "-incoming defer")
	assert.Equal(t, engine.StatusFailed, res.Status)
	st, err := src.QMP.QueryStatus(t.Context())
	require.NoError(t, err)
	assert.Equal(t, "running", st.Status)
}

func testEngineWrongSocket(t *testing.T) {
	dir := t.TempDir()
	cfg := engine.Config{
		Source:      engine.Endpoint{Address: qmp.UnixAddress(filepath.Join(dir, "src.qmp"))},
		Destination: engine.Endpoint{Address: qmp.UnixAddress(filepath.Join(dir, "dst.qmp"))},
		URI:         "unix:" + filepath.Join(dir, "mig.sock"),
	}
	start := time.Now()
	_, err := engine.Migrate(t.Context(), cfg)
	require.Error(t, err)
	t.Log(err)
	assert.ErrorIs(t, err, engine.ErrBadInput)
	assert.Less(t, time.Since(start), 3*time.Second, "a missing socket fails at once, not after a connect timeout")
}

// A unix listener that accepts and says nothing stands in for the
// destination's monitor: the engine gives up after ConnectTimeout.
func testEngineSilentPeer(t *testing.T, q *qemulab.QEMU) {
	src := qemulab.StartT(t, q, qemulab.Config{Name: "src", Guest: qemulab.NewSweepGuest(50e6)})
	dir, err := os.MkdirTemp("", "qm-silent-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "silent.qmp")
	silent := qmptest.NewServer(qmptest.WithoutGreeting()) // accepts, never greets
	t.Cleanup(silent.Close)
	require.NoError(t, silent.ListenUnix(path))
	cfg := engine.Config{
		Source:         engine.Endpoint{Client: src.QMP},
		Destination:    engine.Endpoint{Address: qmp.UnixAddress(path)},
		URI:            "unix:" + filepath.Join(dir, "mig.sock"),
		ConnectTimeout: time.Second,
	}
	start := time.Now()
	_, err = engine.Migrate(t.Context(), cfg)
	took := time.Since(start)
	require.Error(t, err)
	t.Log(err)
	assert.ErrorIs(t, err, engine.ErrBadInput)
	assert.Less(t, took, cfg.ConnectTimeout+4*time.Second, "gives up after ConnectTimeout")
	caps, err := src.QMP.QueryMigrateCapabilities(t.Context())
	require.NoError(t, err)
	assert.False(t, caps["events"], "nothing changed on the source")
}
