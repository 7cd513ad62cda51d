package engine_test

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/engine/internal/fakevm"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/qmp/qmptest"
	"github.com/qmigrate/qmigrate/strategy"
)

func TestValidate(t *testing.T) {
	ok := engine.Config{
		Source:      engine.Endpoint{Address: "unix:/run/src.qmp"},
		Destination: engine.Endpoint{Address: "unix:/run/dst.qmp"},
		URI:         "tcp:[::1]:0",
	}
	require.NoError(t, ok.Validate())
	for name, tc := range map[string]struct {
		mut   func(*engine.Config)
		field string
	}{
		"no source":      {func(c *engine.Config) { c.Source = engine.Endpoint{} }, "Source"},
		"bad address":    {func(c *engine.Config) { c.Destination.Address = "/run/dst.qmp" }, "Destination.Address"},
		"same address":   {func(c *engine.Config) { c.Destination.Address = c.Source.Address }, "Destination.Address"},
		"no uri":         {func(c *engine.Config) { c.URI = "" }, "URI"},
		"exec uri":       {func(c *engine.Config) { c.URI = "exec:cat > /tmp/x" }, "URI"},
		"bad port":       {func(c *engine.Config) { c.URI = "tcp:host:99999" }, "URI"},
		"multifd":        {func(c *engine.Config) { c.MultifdChannels = 256 }, "MultifdChannels"},
		"poll":           {func(c *engine.Config) { c.PollInterval = -1 }, "PollInterval"},
		"timeout":        {func(c *engine.Config) { c.ConnectTimeout = -1 }, "ConnectTimeout"},
		"policy":         {func(c *engine.Config) { c.Strategy.Policy = "yolo" }, "Strategy"},
		"negative limit": {func(c *engine.Config) { c.Strategy.Limits.MaxDowntime = -time.Second }, "Strategy"},
	} {
		t.Run(name, func(t *testing.T) {
			c := ok
			tc.mut(&c)
			err := c.Validate()
			require.Error(t, err)
			assert.ErrorIs(t, err, engine.ErrInvalidConfig)
			assert.ErrorIs(t, err, engine.ErrBadInput)
			assert.Contains(t, err.Error(), tc.field)
			res, merr := engine.Migrate(t.Context(), c)
			assert.Nil(t, res)
			assert.ErrorIs(t, merr, engine.ErrInvalidConfig)
		})
	}
}

// badInput runs a migration that must fail in prepare with ErrBadInput and
// without changing anything on either side.
func badInput(t *testing.T, p *fakevm.Pair, cfg engine.Config, want string) *engine.Error {
	t.Helper()
	res, err := engine.Migrate(t.Context(), cfg)
	require.Error(t, err)
	require.NotNil(t, res)
	assert.Equal(t, engine.StatusFailed, res.Status)
	assert.ErrorIs(t, err, engine.ErrBadInput)
	assert.Contains(t, err.Error(), want)
	var ee *engine.Error
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, engine.PhasePrepare, ee.Phase)
	for _, s := range []*qmptest.Server{p.Src, p.Dst} {
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
		opt     fakevm.Options
		multifd int
		side    engine.Side
		want    string
	}{
		"destination running":      {opt: fakevm.Options{DstRunState: "running"}, side: engine.SideDestination, want: `"inmigrate"`},
		"destination not deferred": {opt: fakevm.Options{DstNotDeferred: true}, side: engine.SideDestination, want: "-incoming defer"},
		"source postmigrate":       {opt: fakevm.Options{SrcRunState: "postmigrate"}, side: engine.SideSource, want: `"postmigrate"`},
		"RAM size":                 {opt: fakevm.Options{DstRAM: 256 << 20}, side: engine.SideDestination, want: "RAM"},
		"machine type":             {opt: fakevm.Options{DstMachine: "pc-i440fx-10.0"}, side: engine.SideDestination, want: "machine type"},
		"multifd uuid": {opt: fakevm.Options{SrcUUID: "11111111-1111-1111-1111-111111111111"}, multifd: 4,
			side: engine.SideDestination, want: "uuid"},
	} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := pair(t, tc.opt)
				cfg.MultifdChannels = tc.multifd
				ee := badInput(t, p, cfg, tc.want)
				assert.Equal(t, tc.side, ee.Side)
			})
		})
	}
}

func TestConnectWrongSocket(t *testing.T) {
	dir := t.TempDir()
	cfg := engine.Config{
		Source:         engine.Endpoint{Address: "unix:" + filepath.Join(dir, "nope.qmp")},
		Destination:    engine.Endpoint{Address: "unix:" + filepath.Join(dir, "dst.qmp")},
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
	assert.Contains(t, err.Error(), "nope.qmp")
}

// A unix listener that accepts and says nothing: the engine gives up after
// ConnectTimeout.
func TestConnectSilentPeer(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "silent.qmp")
	l, err := net.Listen("unix", path)
	require.NoError(t, err)
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	cfg := engine.Config{
		Source:         engine.Endpoint{Address: "unix:" + path},
		Destination:    engine.Endpoint{Address: "unix:" + filepath.Join(dir, "dst.qmp")},
		URI:            "unix:" + filepath.Join(dir, "mig.sock"),
		ConnectTimeout: 300 * time.Millisecond,
	}
	start := time.Now()
	res, err := engine.Migrate(t.Context(), cfg)
	took := time.Since(start)
	require.Error(t, err)
	assert.ErrorIs(t, err, engine.ErrBadInput)
	assert.Equal(t, engine.StatusFailed, res.Status)
	assert.Less(t, took, 3*time.Second)
	assert.Contains(t, err.Error(), "greeting")
}

// A monitor that greets but never answers commands.
func TestPrepareMuteMonitor(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, fakevm.Options{})
		p.Dst.Handle("query-status", func(json.RawMessage) (any, error) { return nil, qmptest.ErrNoReply })
		cfg.ConnectTimeout = 5 * time.Second
		start := time.Now()
		ee := badInput(t, p, cfg, "no answer within 5s")
		assert.Equal(t, engine.SideDestination, ee.Side)
		assert.Equal(t, 5*time.Second, time.Since(start).Round(time.Second))
	})
}

func TestFailureRollsBack(t *testing.T) {
	for name, tc := range map[string]struct {
		side   int
		cmd    string
		phase  engine.Phase
		eside  engine.Side
		undone int
	}{
		"dst caps":   {side: 1, cmd: "migrate-set-capabilities", phase: engine.PhasePrepare, eside: engine.SideDestination},
		"src params": {side: 0, cmd: "migrate-set-parameters", phase: engine.PhasePrepare, eside: engine.SideSource},
		// The schema is awaited only after the capabilities and
		// parameters are set: its failure rolls them back.
		"src schema":       {side: 0, cmd: "query-qmp-schema", phase: engine.PhasePrepare, eside: engine.SideSource},
		"dst schema":       {side: 1, cmd: "query-qmp-schema", phase: engine.PhasePrepare, eside: engine.SideDestination},
		"migrate-incoming": {side: 1, cmd: "migrate-incoming", phase: engine.PhaseStart, eside: engine.SideDestination},
		"migrate":          {side: 0, cmd: "migrate", phase: engine.PhaseStart, eside: engine.SideSource},
	} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := pair(t, fakevm.Options{})
				before := p.Caps(0)
				bw := p.Param(0, "max-bandwidth")
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
				assert.Contains(t, err.Error(), "injected "+tc.cmd+" failure")
				assert.Equal(t, before, p.Caps(0), "source capabilities restored")
				assert.Equal(t, bw, p.Param(0, "max-bandwidth"), "source parameters restored")
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
		p, cfg := pair(t, fakevm.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
		cfg.Strategy.Policy = strategy.PolicyQEMU
		before := p.Caps(0)
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
		assert.Equal(t, before, p.Caps(0))
		assert.Contains(t, res.Undone[0], "migrate_cancel")
		assert.Empty(t, res.UndoErrors)
	})
}

func TestDestinationDies(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, fakevm.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
		cfg.Strategy.Policy = strategy.PolicyQEMU
		time.AfterFunc(2*time.Second, p.KillDst)
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		assert.Equal(t, engine.StatusFailed, res.Status)
		var ee *engine.Error
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, engine.SideDestination, ee.Side)
		assert.ErrorIs(t, err, qmp.ErrClosed)
		assert.Contains(t, err.Error(), "destination")
		assert.Less(t, res.Total, 3*time.Second, "surfaced within a second")
		assert.Equal(t, "running", p.SrcRunState())
		assert.Empty(t, res.UndoErrors)
	})
}

func TestStrategyAbortWithinBudget(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, fakevm.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
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
	})
}

// A destination that dies in postcopy: no rollback (never migrate_cancel),
// an error that says so.
func TestPostcopyDestinationDies(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, fakevm.Options{Throughput: 100 << 20, DirtyRate: 400 << 20, PostcopyRate: 10 << 20})
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
		p, cfg := pair(t, fakevm.Options{Throughput: 100 << 20, DirtyRate: 400 << 20, PostcopyRate: 10 << 20})
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
		assert.True(t, p.Caps(0)["postcopy-ram"] && p.Caps(1)["postcopy-ram"])
		assert.Equal(t, "running", p.DstRunState())
		require.NotEmpty(t, res.Decisions)
	})
}

func TestPostcopyCompletes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, fakevm.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
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
		p, cfg := pair(t, fakevm.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
		cfg.Strategy.Limits.Budget = 3 * time.Second
		cfg.Strategy.Limits.AllowPause = true
		cfg.Strategy.Limits.NoThrottle = true
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Len(t, p.Src.CallsOf("stop"), 1)
		assert.Equal(t, "running", p.DstRunState(), "destination resumed after stop-and-copy")
		assert.Greater(t, res.Downtime, 300*time.Millisecond, "stop-and-copy downtime is reported")
	})
}

// Decisions are applied to QEMU: every SetDowntime lands in downtime-limit,
// capped at the user's maximum.
func TestDecisionsApplied(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, fakevm.Options{Throughput: 200 << 20, DirtyRate: 250 << 20})
		cfg.Strategy.Policy = strategy.PolicyProxmox
		cfg.Strategy.Limits.MaxDowntime = 2 * time.Second
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
		require.Positive(t, n, "proxmox raised the downtime")
		assert.Equal(t, uint64(last.Milliseconds()), p.Param(0, "downtime-limit"))
		assert.LessOrEqual(t, last, 2*time.Second)
	})
}

func TestTCPPortZeroAndArgForms(t *testing.T) {
	for name, tc := range map[string]struct {
		version  [3]int
		channels bool
	}{"7.2 uri": {[3]int{7, 2, 22}, false}, "10.0 channels": {[3]int{10, 0, 2}, true}} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := pair(t, fakevm.Options{Version: tc.version})
				cfg.URI = "tcp:127.0.0.1:0"
				_, err := engine.Migrate(t.Context(), cfg)
				require.NoError(t, err)
				calls := p.Src.CallsOf("migrate")
				require.Len(t, calls, 1)
				var args qmp.MigrateArgs
				require.NoError(t, json.Unmarshal(calls[0].Args, &args))
				if tc.channels {
					require.Len(t, args.Channels, 1)
					assert.Equal(t, "45678", args.Channels[0].Addr.Port)
					assert.Empty(t, args.URI)
				} else {
					assert.Equal(t, "tcp:127.0.0.1:45678", args.URI)
				}
			})
		})
	}
}

func TestMultifdBothSides(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		u := "11111111-2222-3333-4444-555555555555"
		p, cfg := pair(t, fakevm.Options{SrcUUID: u, DstUUID: u})
		cfg.MultifdChannels = 4
		_, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		for side := range 2 {
			assert.True(t, p.Caps(side)["multifd"])
			assert.Equal(t, 4, p.Param(side, "multifd-channels"))
		}
	})
}

func TestMissingCapabilityIsBadInput(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, fakevm.Options{})
		cfg.MultifdChannels = 2
		// A QEMU without multifd: its query-migrate-capabilities lists
		// every capability it has.
		p.Dst.Handle("query-migrate-capabilities", func(json.RawMessage) (any, error) {
			return []map[string]any{{"capability": "events", "state": false}, {"capability": "postcopy-ram", "state": false}}, nil
		})
		ee := badInput(t, p, cfg, "lacks migration capabilities")
		assert.Equal(t, engine.SideDestination, ee.Side)
	})
}

var _ = errors.Is

// The storage preflight needs the schemas: with storage, a schema failure
// comes before any change and is bad input.
func TestStorageSchemaFailureIsBadInput(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, fakevm.Options{Disk: 16 << 20})
		cfg.Storage = &blockmirror.Config{}
		p.Dst.Handle("query-qmp-schema", qmptest.Fail("GenericError", "injected schema failure"))
		ee := badInput(t, p, cfg, "injected schema failure")
		assert.Equal(t, engine.SideDestination, ee.Side)
		assert.Equal(t, "query-qmp-schema", ee.Op)
	})
}

// QEMU's own failure text reaches the caller, naming the source when the
// destination is still up.
func TestSourceReportsFailure(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, fakevm.Options{FailWith: "multifd: received uuid '1111' and expected uuid '2222'"})
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		assert.Equal(t, engine.StatusFailed, res.Status)
		assert.ErrorIs(t, err, engine.ErrMigrationFailed)
		var ee *engine.Error
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, engine.SideSource, ee.Side)
		assert.Contains(t, err.Error(), "expected uuid '2222'")
		assert.Equal(t, "running", p.SrcRunState())
		assert.Empty(t, res.UndoErrors)
	})
}

func TestSourceDies(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, fakevm.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
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
		p, cfg := pair(t, fakevm.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
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
		p, cfg := pair(t, fakevm.Options{})
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
		_, cfg := pair(t, fakevm.Options{Throughput: 200 << 20, DirtyRate: 250 << 20})
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
		p, cfg := pair(t, fakevm.Options{Version: [3]int{7, 2, 22}})
		cfg.MultifdChannels = 2
		cfg.Strategy.Limits.AllowPostcopy = true
		_, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.False(t, p.Caps(0)["postcopy-ram"])
		assert.False(t, p.Caps(1)["postcopy-ram"])
		assert.True(t, p.Caps(0)["multifd"])
	})
}

// A cancel that loses the race with QEMU's completion: the guest's state is
// already on the destination, so the engine finishes the migration (and
// resumes the destination) instead of abandoning it, and says so.
func TestCancelLosesRaceWithCompletion(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, fakevm.Options{Throughput: 100 << 20})
		p.Src.Handle("migrate_cancel", func(json.RawMessage) (any, error) { return nil, nil }) // too late to cancel
		ctx, cancel := context.WithCancel(t.Context())
		time.AfterFunc(500*time.Millisecond, cancel)
		res, err := engine.Migrate(ctx, cfg)
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Equal(t, "running", p.DstRunState())
		assert.Equal(t, "postmigrate", p.SrcRunState())
		assert.Empty(t, p.Src.CallsOf("cont"), "the source is never resumed once the destination has the guest")
		assert.Contains(t, strings.Join(res.UndoErrors, "\n"), "completed before the cancel")
		assert.Positive(t, res.TransferredBytes)
	})
}
