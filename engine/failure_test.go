package engine_test

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
	"github.com/qmigrate/qmigrate/strategy"
	"github.com/qmigrate/qmigrate/transport"
)

func TestValidate(t *testing.T) {
	ok := engine.Config{
		Source:      engine.Endpoint{Address: qmp.UnixAddress("/run/src.qmp")},
		Destination: engine.Endpoint{Address: qmp.UnixAddress("/run/dst.qmp")},
		URI:         "tcp:[::1]:0",
	}
	require.NoError(t, ok.Validate())
	for name, tc := range map[string]struct {
		mut   func(*engine.Config)
		field string
	}{
		"no source":      {func(c *engine.Config) { c.Source = engine.Endpoint{} }, "Source"},
		"bad address":    {func(c *engine.Config) { c.Destination.Address = qmp.TCPAddress("h", "0") }, "Destination.Address"},
		"same address":   {func(c *engine.Config) { c.Destination.Address = c.Source.Address }, "Destination.Address"},
		"same path":      {func(c *engine.Config) { c.Destination.Address = qmp.UnixAddress("//run/./src.qmp") }, "Destination.Address"},
		"no uri":         {func(c *engine.Config) { c.URI = "" }, "URI"},
		"exec uri":       {func(c *engine.Config) { c.URI = "exec:cat > /tmp/x" }, "URI"},
		"bad port":       {func(c *engine.Config) { c.URI = "tcp:host:99999" }, "URI"},
		"multifd":        {func(c *engine.Config) { c.MultifdChannels = 256 }, "MultifdChannels"},
		"poll":           {func(c *engine.Config) { c.PollInterval = -1 }, "PollInterval"},
		"timeout":        {func(c *engine.Config) { c.ConnectTimeout = -1 }, "ConnectTimeout"},
		"policy":         {func(c *engine.Config) { c.Strategy.Policy = "yolo" }, "Strategy"},
		"negative limit": {func(c *engine.Config) { c.Strategy.Limits.MaxDowntime = -time.Second }, "Strategy"},
		"nbd reconnect": {func(c *engine.Config) {
			c.Storage = &blockmirror.Config{ReconnectDelay: 5 * time.Second}
		}, "Storage.ReconnectDelay"},
	} {
		t.Run(name, func(t *testing.T) {
			c := ok
			tc.mut(&c)
			err := c.Validate()
			require.Error(t, err)
			assert.ErrorIs(t, err, engine.ErrInvalidConfig)
			assert.ErrorIs(t, err, engine.ErrBadInput)
			// Validate names the field in its message, for the person who
			// wrote the config; there is no typed field to check instead.
			assert.Contains(t, err.Error(), tc.field)
			var rec recorder
			c.Observer = rec.observe
			res, merr := engine.Migrate(t.Context(), c)
			assert.ErrorIs(t, merr, engine.ErrInvalidConfig)
			// Never a nil Result: the failure is reported like any other,
			// and the observer gets the result event alone.
			require.NotNil(t, res)
			assert.Equal(t, engine.StatusFailed, res.Status)
			assert.Same(t, merr, res.Err)
			assert.Empty(t, res.Undone)
			require.Len(t, rec.events, 1)
			assert.Equal(t, engine.EventResult, rec.events[0].Kind)
			assert.Same(t, res, rec.events[0].Result)
		})
	}
}

// badInput runs a migration that must fail in prepare with ErrBadInput,
// refused by the check want, and without changing anything on either side.
func badInput(t *testing.T, p *qemutest.Pair, cfg engine.Config, want engine.Check) *engine.Error {
	t.Helper()
	res, err := engine.Migrate(t.Context(), cfg)
	require.Error(t, err)
	require.NotNil(t, res)
	assert.Equal(t, engine.StatusFailed, res.Status)
	assert.ErrorIs(t, err, engine.ErrBadInput)
	assert.Equal(t, want, engine.CheckOf(err), "%v", err)
	var ee *engine.Error
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, engine.PhasePrepare, ee.Phase)
	for _, s := range []*qemutest.QEMU{p.Src, p.Dst} {
		for _, c := range s.Calls() {
			switch c.Command {
			case "migrate-set-capabilities", "migrate-set-parameters", "migrate", "migrate-incoming", "stop", "cont":
				t.Errorf("%s sent although the input was bad", c.Command)
			}
		}
	}
	assert.Empty(t, res.Undone)
	return ee
}

func TestPrepareBadInput(t *testing.T) {
	for name, tc := range map[string]struct {
		opt     qemutest.Options
		multifd int
		side    engine.Side
		want    engine.Check
		op      string
	}{
		"destination running":      {opt: qemutest.Options{DstRunState: "running"}, side: engine.SideDestination, want: engine.CheckRunState, op: "check run state"},
		"destination not deferred": {opt: qemutest.Options{DstNotDeferred: true}, side: engine.SideDestination, want: engine.CheckRunState, op: "check incoming migration"},
		"source postmigrate":       {opt: qemutest.Options{SrcRunState: "postmigrate"}, side: engine.SideSource, want: engine.CheckRunState, op: "check run state"},
		"RAM size":                 {opt: qemutest.Options{DstRAM: 256 << 20}, side: engine.SideDestination, want: engine.CheckPreflight, op: "preflight"},
		"machine type":             {opt: qemutest.Options{DstMachine: "pc-i440fx-10.0"}, side: engine.SideDestination, want: engine.CheckPreflight, op: "preflight"},
		"multifd uuid": {opt: qemutest.Options{SrcUUID: "11111111-1111-1111-1111-111111111111"}, multifd: 4,
			side: engine.SideDestination, want: engine.CheckMultifd, op: "compare uuid for multifd"},
	} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := pair(t, tc.opt)
				cfg.MultifdChannels = tc.multifd
				ee := badInput(t, p, cfg, tc.want)
				assert.Equal(t, tc.side, ee.Side)
				assert.Equal(t, tc.op, ee.Op)
				if tc.want == engine.CheckMultifd {
					assert.ErrorIs(t, ee, transport.ErrUUIDMismatch)
				}
			})
		})
	}
}

func TestConnectWrongSocket(t *testing.T) {
	dir := t.TempDir()
	cfg := engine.Config{
		Source:         engine.Endpoint{Address: qmp.UnixAddress(filepath.Join(dir, "nope.qmp"))},
		Destination:    engine.Endpoint{Address: qmp.UnixAddress(filepath.Join(dir, "dst.qmp"))},
		URI:            "unix:" + filepath.Join(dir, "mig.sock"),
		ConnectTimeout: time.Second,
	}
	res, err := engine.Migrate(t.Context(), cfg)
	require.Error(t, err)
	assert.ErrorIs(t, err, engine.ErrBadInput)
	assert.Equal(t, engine.StatusFailed, res.Status)
	var ee *engine.Error
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, engine.SideSource, ee.Side)
	var ce *engine.ConnectError
	require.ErrorAs(t, err, &ce)
	assert.Equal(t, engine.SideSource, ce.Side)
	assert.Equal(t, cfg.Source.Address, ce.Address)
	assert.Zero(t, ce.Timeout)
	assert.Equal(t, engine.PathUnknown, ce.Path)
	assert.ErrorIs(t, err, syscall.ENOENT)

	// Both sides wrong: both ConnectErrors, joined.
	cfg.Destination.Address = qmp.UnixAddress(filepath.Join(dir, "nope2.qmp"))
	_, err = engine.Migrate(t.Context(), cfg)
	require.Error(t, err)
	j, ok := err.(interface{ Unwrap() []error })
	require.True(t, ok, "joined: %v", err)
	var sides []engine.Side
	for _, e := range j.Unwrap() {
		require.ErrorAs(t, e, &ce)
		sides = append(sides, ce.Side)
	}
	assert.Equal(t, []engine.Side{engine.SideSource, engine.SideDestination}, sides)
}

// What is at a unix path that refuses the connection: a directory, a file,
// a socket no process listens on.
func TestConnectPathKind(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file.qmp")
	require.NoError(t, os.WriteFile(file, nil, 0o600))
	stale := filepath.Join(dir, "stale.qmp")
	l, err := net.Listen("unix", stale)
	require.NoError(t, err)
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	require.NoError(t, l.Close())
	for path, want := range map[string]engine.PathKind{
		dir:   engine.PathDirectory,
		file:  engine.PathFile,
		stale: engine.PathStaleSocket,
	} {
		_, err := engine.Migrate(t.Context(), engine.Config{
			Source:      engine.Endpoint{Address: qmp.UnixAddress(path)},
			Destination: engine.Endpoint{Address: qmp.UnixAddress(filepath.Join(dir, "dst.qmp"))},
			URI:         "unix:" + filepath.Join(dir, "mig.sock"),
		})
		var ce *engine.ConnectError
		require.ErrorAs(t, err, &ce, path)
		assert.Equal(t, want, ce.Path, path)
		assert.ErrorIs(t, err, engine.ErrBadInput)
	}
}

// A unix listener that accepts and says nothing: the engine gives up after
// ConnectTimeout, or sooner when the budget is shorter.
func TestConnectSilentPeer(t *testing.T) {
	for name, tc := range map[string]struct {
		connect, budget time.Duration
	}{
		"ConnectTimeout": {connect: 300 * time.Millisecond},
		"budget":         {budget: 300 * time.Millisecond}, // not the 10s ConnectTimeout
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			cfg := engine.Config{
				Source:         engine.Endpoint{Address: qmp.UnixAddress(silentListener(t, dir))},
				Destination:    engine.Endpoint{Address: qmp.UnixAddress(filepath.Join(dir, "dst.qmp"))},
				URI:            "unix:" + filepath.Join(dir, "mig.sock"),
				ConnectTimeout: tc.connect,
				Strategy:       strategy.Config{Limits: strategy.Limits{Budget: tc.budget}},
			}
			start := time.Now()
			res, err := engine.Migrate(t.Context(), cfg)
			took := time.Since(start)
			require.Error(t, err)
			assert.ErrorIs(t, err, engine.ErrBadInput)
			assert.Equal(t, engine.StatusFailed, res.Status)
			assert.Less(t, took, 3*time.Second)
			assert.Equal(t, engine.CheckConnect, engine.CheckOf(err))
			var ce *engine.ConnectError
			require.ErrorAs(t, err, &ce)
			assert.Equal(t, 300*time.Millisecond, ce.Timeout.Round(100*time.Millisecond), "no greeting within it")
		})
	}
}

// A monitor that greets but never answers commands: the first answers are
// bounded by ConnectTimeout, or by a budget shorter than that (the
// migration gives up when its budget is spent, not ConnectTimeout later).
func TestPrepareMuteMonitor(t *testing.T) {
	for name, tc := range map[string]struct {
		side            engine.Side
		cmd             string
		connect, budget time.Duration
		want            time.Duration
	}{
		"ConnectTimeout": {side: engine.SideDestination, cmd: "query-status", connect: 5 * time.Second, want: 5 * time.Second},
		"budget":         {side: engine.SideSource, cmd: "query-migrate", connect: 10 * time.Second, budget: 2 * time.Second, want: 2 * time.Second},
	} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := pair(t, qemutest.Options{})
				mute := p.Src
				if tc.side == engine.SideDestination {
					mute = p.Dst
				}
				mute.Handle(tc.cmd, func(json.RawMessage) (any, error) { return nil, qmptest.ErrNoReply })
				cfg.ConnectTimeout, cfg.Strategy.Limits.Budget = tc.connect, tc.budget
				start := time.Now()
				ee := badInput(t, p, cfg, engine.CheckInspect)
				assert.Equal(t, tc.side, ee.Side)
				assert.Equal(t, tc.cmd, ee.Op)
				assert.ErrorIs(t, ee, context.DeadlineExceeded)
				assert.Equal(t, tc.want, time.Since(start).Round(time.Second))
			})
		})
	}
}

func TestFailureRollsBack(t *testing.T) {
	for name, tc := range map[string]struct {
		side   int
		cmd    string
		phase  engine.Phase
		eside  engine.Side
		undone int
	}{
		"dst caps":         {side: 1, cmd: "migrate-set-capabilities", phase: engine.PhasePrepare, eside: engine.SideDestination},
		"src params":       {side: 0, cmd: "migrate-set-parameters", phase: engine.PhasePrepare, eside: engine.SideSource},
		"migrate-incoming": {side: 1, cmd: "migrate-incoming", phase: engine.PhaseStart, eside: engine.SideDestination},
		"migrate":          {side: 0, cmd: "migrate", phase: engine.PhaseStart, eside: engine.SideSource},
	} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := pair(t, qemutest.Options{})
				before := p.Caps(qemutest.Source)
				bw := p.Param(qemutest.Source, "max-bandwidth")
				srv := p.Src
				if tc.side == 1 {
					srv = p.Dst
				}
				srv.Handle(tc.cmd, qmptest.Fail("GenericError", "injected "+tc.cmd+" failure"))
				var rec recorder
				cfg.Observer = rec.observe
				res, err := engine.Migrate(t.Context(), cfg)
				require.Error(t, err)
				assert.NotErrorIs(t, err, engine.ErrBadInput)
				assert.Equal(t, engine.StatusFailed, res.Status)
				var ee *engine.Error
				require.ErrorAs(t, err, &ee)
				assert.Equal(t, tc.phase, ee.Phase)
				assert.Equal(t, tc.eside, ee.Side)
				assert.Equal(t, tc.cmd, ee.Op)
				var qe *qmp.Error
				require.ErrorAs(t, err, &qe, "QEMU's error is kept")
				assert.Equal(t, "injected "+tc.cmd+" failure", qe.Desc)
				assert.Equal(t, before, p.Caps(qemutest.Source), "source capabilities restored")
				assert.Equal(t, bw, p.Param(qemutest.Source, "max-bandwidth"), "source parameters restored")
				assert.Equal(t, "running", p.SrcRunState())
				assert.Contains(t, rec.phases(), engine.PhaseRollback)
				assert.NotEmpty(t, res.Undone)
				assert.Empty(t, res.UndoErrors)
			})
		})
	}
}

func TestCancelMidMigration(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// Dirtying faster than the link: never converges by itself.
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
		cfg.Strategy.Policy = strategy.PolicyQEMU
		before := p.Caps(qemutest.Source)
		ctx, cancel := context.WithCancel(t.Context())
		time.AfterFunc(3*time.Second, cancel)
		res, err := engine.Migrate(ctx, cfg)
		require.Error(t, err)
		assert.Equal(t, engine.StatusCancelled, res.Status)
		assert.ErrorIs(t, err, engine.ErrCancelled)
		assert.ErrorIs(t, err, context.Canceled)
		assert.InDelta(t, 3*time.Second, res.Total, float64(500*time.Millisecond))
		assert.Len(t, p.Src.CallsOf("migrate_cancel"), 1)
		assert.Equal(t, qmp.StatusCancelled, p.Status())
		assert.Equal(t, "running", p.SrcRunState())
		assert.Equal(t, before, p.Caps(qemutest.Source))
		cancelStep := rollbackStep(t, res, "source: cancel migration")
		assert.NoError(t, cancelStep.Err)
		assert.NotEmpty(t, cancelStep.Did, "migrate_cancel sent")
		assert.Empty(t, res.UndoErrors)
	})
}

func TestDestinationDies(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
		cfg.Strategy.Policy = strategy.PolicyQEMU
		time.AfterFunc(2*time.Second, p.KillDst)
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		assert.Equal(t, engine.StatusFailed, res.Status)
		var ee *engine.Error
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, engine.SideDestination, ee.Side)
		assert.ErrorIs(t, err, qmp.ErrClosed)
		assert.ErrorIs(t, err, engine.ErrDestinationGone)
		assert.Less(t, res.Total, 3*time.Second, "surfaced within a second")
		assert.Equal(t, "running", p.SrcRunState())
		assert.Empty(t, res.UndoErrors)
	})
}

func TestStrategyAbortWithinBudget(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
		cfg.Strategy.Policy = strategy.PolicyQEMU
		cfg.Strategy.Limits.Budget = 5 * time.Second
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		assert.ErrorIs(t, err, engine.ErrAborted)
		assert.Equal(t, engine.StatusFailed, res.Status)
		require.NotEmpty(t, res.Decisions)
		assert.Equal(t, strategy.Abort, res.Decisions[len(res.Decisions)-1].Action)
		assert.LessOrEqual(t, res.Total, 5*time.Second+500*time.Millisecond)
		assert.Equal(t, "running", p.SrcRunState())
		// What was sent before the abort is reported, not 0.
		assert.Greater(t, res.TransferredBytes, uint64(100<<20))
	})
}

// A destination that dies in postcopy: no rollback (never migrate_cancel),
// an error that says so.
func TestPostcopyDestinationDies(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20, PostcopyRate: 10 << 20})
		cfg.Strategy.Limits.Budget = 3 * time.Second
		cfg.Strategy.Limits.AllowPostcopy = true
		time.AfterFunc(5*time.Second, p.KillDst)
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		assert.ErrorIs(t, err, engine.ErrPostcopyFailed)
		var ee *engine.Error
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, engine.SideDestination, ee.Side)
		assert.Empty(t, p.Src.CallsOf("migrate_cancel"))
		assert.Equal(t, engine.StatusFailed, res.Status)
		assert.NotEmpty(t, res.UndoErrors, "says why nothing was rolled back")
		assert.Empty(t, res.Undone)
	})
}

func TestPostcopyNeverCancelled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// Postcopy runs slowly so the cancel lands in postcopy-active.
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20, PostcopyRate: 10 << 20})
		cfg.Strategy.Limits.Budget = 3 * time.Second
		cfg.Strategy.Limits.AllowPostcopy = true
		ctx, cancel := context.WithCancel(t.Context())
		time.AfterFunc(5*time.Second, cancel)
		res, err := engine.Migrate(ctx, cfg)
		// The cancel came in postcopy: the only safe outcome is to finish.
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Greater(t, res.Total, 5*time.Second, "the cancel came during postcopy")
		assert.Zero(t, p.CancelsInPostcopy())
		assert.Empty(t, p.Src.CallsOf("migrate_cancel"))
		assert.True(t, p.Caps(qemutest.Source)["postcopy-ram"] && p.Caps(qemutest.Destination)["postcopy-ram"])
		assert.Equal(t, "running", p.DstRunState())
		require.NotEmpty(t, res.Decisions)
	})
}

// A cancel that lands while a call is under way in postcopy (here the
// poll's query-migrate) is ignored as any other: the call is not cut by it
// and the migration completes. Measured on 10.0 before the fix
// (TestFaultMatrix/Postcopy/Cancel, a cancel at the first postcopy
// sample): "failure during postcopy: ... migration cancelled".
func TestPostcopyCancelDuringCall(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{})
		ctx, cancel := context.WithCancel(t.Context())
		query := p.Src.Handler("query-migrate")
		var once sync.Once
		p.Src.Handle("query-migrate", func(args json.RawMessage) (any, error) {
			if p.Status() == qmp.StatusPostcopyActive {
				cancelled := false
				once.Do(func() { cancel(); cancelled = true })
				if cancelled {
					time.Sleep(10 * time.Millisecond) // the caller sees its cancel first
				}
			}
			return query(args)
		})
		res, err := engine.Migrate(ctx, cfg)
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Error(t, ctx.Err(), "the cancel came")
		assert.Empty(t, p.Src.CallsOf("migrate_cancel"))
		assert.Equal(t, "running", p.DstRunState())
	})
}

func TestPostcopyCompletes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
		cfg.Strategy.Limits.Budget = 3 * time.Second
		cfg.Strategy.Limits.AllowPostcopy = true
		var rec recorder
		cfg.Observer = rec.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Equal(t, "running", p.DstRunState())
		var actions []strategy.Action
		for _, d := range res.Decisions {
			actions = append(actions, d.Action)
		}
		assert.Contains(t, actions, strategy.StartPostcopy)
		assert.Len(t, p.Src.CallsOf("migrate-start-postcopy"), 1)
		assert.Equal(t, len(res.Decisions), rec.kinds(engine.EventDecision))
	})
}

func TestPauseSourceFinishes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
		cfg.Strategy.Limits.Budget = 3 * time.Second
		cfg.Strategy.Limits.AllowPause = true
		cfg.Strategy.Limits.NoThrottle = true
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Len(t, p.Src.CallsOf("stop"), 1)
		assert.Equal(t, "running", p.DstRunState(), "destination resumed after stop-and-copy")
		assert.Greater(t, res.Downtime, 300*time.Millisecond, "stop-and-copy downtime is reported")
		assert.False(t, res.DowntimeHeld, "a stop-and-copy breaks the 300 ms maximum, and the Result says so")
	})
}

// Decisions are applied to QEMU: every SetDowntime lands in downtime-limit,
// capped at the user's maximum. The guest dirties more than the link, so
// without throttling only a downtime limit of RAM / link (150 MiB at
// 200 MiB/s: 750 ms) converges; auto asks for that with its margin, held
// within the 900 ms maximum, and QEMU converges at once.
func TestDecisionsApplied(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 200 << 20, DirtyRate: 250 << 20})
		cfg.Strategy.Policy = strategy.PolicyAuto
		cfg.Strategy.Limits.MaxDowntime = 900 * time.Millisecond
		cfg.Strategy.Limits.NoThrottle = true
		var rec recorder
		cfg.Observer = rec.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err, "%+v", res)
		var last time.Duration
		n := 0
		for _, e := range rec.events {
			if e.Kind == engine.EventDecision && e.Decision.Action == strategy.SetDowntime {
				require.NoError(t, e.DecisionErr)
				last = e.Decision.DowntimeLimit
				n++
			}
		}
		require.Positive(t, n, "auto raised the downtime")
		assert.GreaterOrEqual(t, last, 750*time.Millisecond, "enough for the whole RAM")
		assert.LessOrEqual(t, last, 900*time.Millisecond, "within the maximum")
		assert.Equal(t, uint64(last.Milliseconds()), p.Param(qemutest.Source, "downtime-limit"))
		assert.InDelta(t, 750*time.Millisecond, res.Downtime, float64(20*time.Millisecond), "the whole RAM in the stop-and-copy")
	})
}

// The argument forms of migrate-incoming and migrate are found out by
// trying, newest first, on each side separately: a QEMU that refuses an
// argument with QAPI's error (the fakes answer as QEMU does) gets the older
// form, and no schema is probed without storage.
func TestArgFormsByTrying(t *testing.T) {
	v72, v90, v100 := [3]int{7, 2, 22}, [3]int{9, 0, 2}, [3]int{10, 0, 2}
	for name, tc := range map[string]struct {
		src, dst       [3]int
		incoming       []string // the forms of the migrate-incoming calls, in order
		migrate        []string // and of the migrate calls
		incomingResult string
	}{
		"10.0": {src: v100, dst: v100, incoming: []string{"channels+eoe"}, migrate: []string{"channels"}},
		"9.0":  {src: v90, dst: v90, incoming: []string{"channels+eoe", "channels"}, migrate: []string{"channels"}},
		"7.2": {src: v72, dst: v72, incoming: []string{"channels+eoe", "uri+eoe", "uri"},
			migrate: []string{"channels", "uri"}},
		"7.2 to 10.0": {src: v72, dst: v100, incoming: []string{"channels+eoe"}, migrate: []string{"channels", "uri"}},
		"10.0 to 7.2": {src: v100, dst: v72, incoming: []string{"channels+eoe", "uri+eoe", "uri"}, migrate: []string{"channels"}},
	} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := pair(t, qemutest.Options{Version: tc.src, DstVersion: tc.dst})
				cfg.URI = "tcp:127.0.0.1:0"
				res, err := engine.Migrate(t.Context(), cfg)
				require.NoError(t, err)
				assert.Equal(t, engine.StatusCompleted, res.Status)
				assert.Empty(t, res.UndoErrors)
				assert.Equal(t, tc.incoming, argForms(t, p.Dst.CallsOf("migrate-incoming")))
				assert.Equal(t, tc.migrate, argForms(t, p.Src.CallsOf("migrate")))
				// The source connects to the port the destination picked,
				// in whatever form it takes.
				var args qmp.MigrateArgs
				calls := p.Src.CallsOf("migrate")
				require.NoError(t, json.Unmarshal(calls[len(calls)-1].Args, &args))
				if args.URI != "" {
					assert.Equal(t, "tcp:127.0.0.1:45678", args.URI)
				} else {
					require.Len(t, args.Channels, 1)
					assert.Equal(t, "45678", args.Channels[0].Addr.Port)
				}
				assert.Empty(t, p.Src.CallsOf("query-qmp-schema"), "no schema without storage")
				assert.Empty(t, p.Dst.CallsOf("query-qmp-schema"), "no schema without storage")
			})
		})
	}
}

// argForms names the form of each migrate or migrate-incoming call.
func argForms(t *testing.T, calls []qmptest.Call) []string {
	t.Helper()
	var out []string
	for _, c := range calls {
		var a map[string]json.RawMessage
		require.NoError(t, json.Unmarshal(c.Args, &a))
		f := "uri"
		if _, ok := a["channels"]; ok {
			f = "channels"
		}
		if _, ok := a["exit-on-error"]; ok {
			f += "+eoe"
		}
		out = append(out, f)
	}
	return out
}

// Only QEMU's refusal of an argument of the form leads to an older form:
// any other failure of migrate-incoming or migrate is the command's own,
// reported after one call and rolled back; a failure of the older form is
// reported as it is. The handlers stand in for the fake's: on 7.2 they
// refuse arguments as QEMU 7.2 does, then fail the calls tc.fail picks.
func TestArgFormFallbackFailures(t *testing.T) {
	v72, v100 := [3]int{7, 2, 22}, [3]int{10, 0, 2}
	bind := "Failed to bind socket: Address already in use"
	for name, tc := range map[string]struct {
		version  [3]int
		side     int
		cmd      string
		fail     func(args map[string]json.RawMessage) bool // which calls fail with "injected"
		calls    int
		wantDesc string
	}{
		"incoming other error": {version: v100, side: 1, cmd: "migrate-incoming", calls: 1, wantDesc: bind,
			fail: func(map[string]json.RawMessage) bool { return true }},
		"incoming fallback fails": {version: v72, side: 1, cmd: "migrate-incoming", calls: 3, wantDesc: bind,
			fail: func(a map[string]json.RawMessage) bool { _, ok := a["uri"]; return ok && len(a) == 1 }},
		"migrate other error": {version: v100, side: 0, cmd: "migrate", calls: 1, wantDesc: bind,
			fail: func(map[string]json.RawMessage) bool { return true }},
		"migrate fallback fails": {version: v72, side: 0, cmd: "migrate", calls: 2, wantDesc: bind,
			fail: func(a map[string]json.RawMessage) bool { _, ok := a["uri"]; return ok }},
		// A QEMU that keeps answering the same refusal: no endless retries.
		"refused again": {version: v100, side: 1, cmd: "migrate-incoming", calls: 2,
			wantDesc: "Parameter 'uri' is missing",
			fail:     func(map[string]json.RawMessage) bool { return true }},
	} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := pair(t, qemutest.Options{Version: tc.version})
				srv := p.Src
				members := []string{"uri", "*blk", "*inc", "*detach", "*resume"}
				if tc.side == 1 {
					srv = p.Dst
					members = []string{"uri"}
				}
				desc := tc.wantDesc
				srv.Handle(tc.cmd, func(raw json.RawMessage) (any, error) {
					if tc.version == v72 {
						if err := qmptest.CheckArgs(raw, members...); err != nil {
							return nil, err
						}
					}
					var a map[string]json.RawMessage
					_ = json.Unmarshal(raw, &a)
					if tc.fail(a) {
						return nil, &qmp.Error{Class: "GenericError", Desc: desc}
					}
					return nil, nil
				})
				res, err := engine.Migrate(t.Context(), cfg)
				require.Error(t, err)
				assert.Equal(t, engine.StatusFailed, res.Status)
				var ee *engine.Error
				require.ErrorAs(t, err, &ee)
				assert.Equal(t, tc.cmd, ee.Op)
				assert.Equal(t, engine.PhaseStart, ee.Phase)
				var qe *qmp.Error
				require.ErrorAs(t, err, &qe)
				assert.Equal(t, tc.wantDesc, qe.Desc)
				assert.Len(t, srv.CallsOf(tc.cmd), tc.calls)
				assert.Equal(t, "running", p.SrcRunState())
				assert.False(t, p.Caps(qemutest.Source)["events"], "source capabilities restored")
				assert.Empty(t, res.UndoErrors)
			})
		})
	}
}

func TestMultifdBothSides(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		u := "11111111-2222-3333-4444-555555555555"
		p, cfg := pair(t, qemutest.Options{SrcUUID: u, DstUUID: u})
		cfg.MultifdChannels = 4
		_, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		for _, side := range []qemutest.Side{qemutest.Source, qemutest.Destination} {
			assert.True(t, p.Caps(side)["multifd"])
			assert.Equal(t, 4, p.Param(side, "multifd-channels"))
		}
	})
}

func TestMissingCapabilityIsBadInput(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{})
		cfg.MultifdChannels = 2
		// A QEMU without multifd: its query-migrate-capabilities lists
		// every capability it has.
		p.Dst.Handle("query-migrate-capabilities", func(json.RawMessage) (any, error) {
			return []map[string]any{{"capability": "events", "state": false}, {"capability": "postcopy-ram", "state": false}}, nil
		})
		ee := badInput(t, p, cfg, engine.CheckFeatures)
		assert.Equal(t, engine.SideDestination, ee.Side)
		assert.Equal(t, "check capabilities", ee.Op)
	})
}

var _ = errors.Is

// The storage preflight needs the schemas: with storage, a schema failure
// comes before any change and is bad input.
func TestStorageSchemaFailureIsBadInput(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Disk: 16 << 20})
		cfg.Storage = &blockmirror.Config{}
		p.Dst.Handle("query-qmp-schema", qmptest.Fail("GenericError", "injected schema failure"))
		ee := badInput(t, p, cfg, engine.CheckInspect)
		assert.ErrorIs(t, ee, &qmp.Error{Class: "GenericError", Desc: "injected schema failure"}, "QEMU's error is kept")
		assert.Equal(t, engine.SideDestination, ee.Side)
		assert.Equal(t, "query-qmp-schema", ee.Op)
	})
}

// QEMU's own failure text reaches the caller, naming the source when the
// destination is still up.
func TestSourceReportsFailure(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{FailWith: "multifd: received uuid '1111' and expected uuid '2222'"})
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		assert.Equal(t, engine.StatusFailed, res.Status)
		assert.ErrorIs(t, err, engine.ErrMigrationFailed)
		var ee *engine.Error
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, engine.SideSource, ee.Side)
		// QEMU's error-desc, carried through in the message: the engine
		// keeps no typed copy of it.
		assert.Contains(t, err.Error(), "expected uuid '2222'")
		assert.Equal(t, "running", p.SrcRunState())
		assert.Empty(t, res.UndoErrors)
	})
}

func TestSourceDies(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
		cfg.Strategy.Policy = strategy.PolicyQEMU
		time.AfterFunc(time.Second, p.Src.CloseConns)
		var rec recorder
		cfg.Observer = rec.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		var ee *engine.Error
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, engine.SideSource, ee.Side)
		assert.ErrorIs(t, err, qmp.ErrClosed)
		for _, e := range rec.events {
			if e.Kind == engine.EventPhase && e.Phase == engine.PhaseRollback {
				assert.Less(t, e.Elapsed, 1100*time.Millisecond, "noticed at once")
			}
		}
		assert.NotEmpty(t, res.UndoErrors, "nothing can be undone on a dead source, and the result says so")
	})
}

// A migration that stops moving is aborted after the progress timeout.
func TestProgressTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
		cfg.Strategy.Policy = strategy.PolicyQEMU
		cfg.Strategy.Limits.ProgressTimeout = 3 * time.Second
		time.AfterFunc(time.Second, func() { p.SetThroughput(0) })
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		assert.ErrorIs(t, err, engine.ErrAborted)
		assert.InDelta(t, 4*time.Second, res.Total, float64(time.Second))
		assert.Equal(t, "running", p.SrcRunState())
		assert.Len(t, p.Src.CallsOf("migrate_cancel"), 1)
	})
}

// A context cancelled while prepare waits for an answer: cancelled, not bad
// input, and nothing changed.
func TestCancelDuringPrepare(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{})
		p.Dst.Handle("query-migrate-parameters", func(json.RawMessage) (any, error) { return nil, qmptest.ErrNoReply })
		ctx, cancel := context.WithCancel(t.Context())
		time.AfterFunc(time.Second, cancel)
		res, err := engine.Migrate(ctx, cfg)
		require.Error(t, err)
		assert.Equal(t, engine.StatusCancelled, res.Status)
		assert.ErrorIs(t, err, engine.ErrCancelled)
		assert.ErrorIs(t, err, context.Canceled)
		assert.NotErrorIs(t, err, engine.ErrBadInput)
		assert.Empty(t, p.Src.CallsOf("migrate-set-capabilities"))
	})
}

// Events come in order: phases in sequence, Elapsed never decreasing, the
// result last.
func TestEventOrder(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, cfg := pair(t, qemutest.Options{Throughput: 200 << 20, DirtyRate: 250 << 20})
		cfg.Strategy.Limits.MaxDowntime = 2 * time.Second
		var rec recorder
		cfg.Observer = rec.observe
		_, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		var last time.Duration
		for i, e := range rec.events {
			assert.GreaterOrEqual(t, e.Elapsed, last, "event %d", i)
			last = e.Elapsed
			switch e.Kind {
			case engine.EventStats:
				assert.NotNil(t, e.Stats)
			case engine.EventDecision:
				assert.NotNil(t, e.Decision)
			case engine.EventResult:
				assert.Equal(t, len(rec.events)-1, i, "result is last")
			}
		}
	})
}

// multifd and postcopy together only from 10.1 on: before, postcopy-ram is
// left off (7.2 would crash the destination at the switch).
func TestMultifdNoPostcopyBefore101(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Version: [3]int{7, 2, 22}})
		cfg.MultifdChannels = 2
		cfg.Strategy.Limits.AllowPostcopy = true
		_, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.False(t, p.Caps(qemutest.Source)["postcopy-ram"])
		assert.False(t, p.Caps(qemutest.Destination)["postcopy-ram"])
		assert.True(t, p.Caps(qemutest.Source)["multifd"])
	})
}

// A cancel that loses the race with QEMU's completion: the guest's state is
// already on the destination, so the engine finishes the migration (and
// resumes the destination) instead of abandoning it, and says so.
func TestCancelLosesRaceWithCompletion(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20})
		p.Src.Handle("migrate_cancel", func(json.RawMessage) (any, error) { return nil, nil }) // too late to cancel
		ctx, cancel := context.WithCancel(t.Context())
		time.AfterFunc(500*time.Millisecond, cancel)
		res, err := engine.Migrate(ctx, cfg)
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Equal(t, "running", p.DstRunState())
		assert.Equal(t, "postmigrate", p.SrcRunState())
		assert.Empty(t, p.Src.CallsOf("cont"), "the source is never resumed once the destination has the guest")
		cancelStep := rollbackStep(t, res, "source: cancel migration")
		assert.Error(t, cancelStep.Err, "the cancel came too late")
		// No sentinel for a late cancel: the sentence is for the person
		// reading the rollback.
		assert.ErrorContains(t, cancelStep.Err, "completed before the cancel")
		assert.Positive(t, res.TransferredBytes)
	})
}

// rollbackStep returns the step of res.Rollback named name, and fails the
// test when there is none.
func rollbackStep(t *testing.T, res *engine.Result, name string) engine.RollbackStep {
	t.Helper()
	for _, s := range res.Rollback {
		if s.Name == name {
			return s
		}
	}
	require.Failf(t, "no rollback step", "%q not in %+v", name, res.Rollback)
	return engine.RollbackStep{}
}

// silentListener serves a unix socket in dir that accepts every connection
// and never greets (never writes a byte), until the test ends.
func silentListener(t *testing.T, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "silent.qmp")
	s := qmptest.NewServer(qmptest.WithoutGreeting())
	t.Cleanup(s.Close)
	require.NoError(t, s.ListenUnix(path))
	return path
}
