package engine_test

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"sync/atomic"
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
)

// Cells of docs/faults.md not covered elsewhere.

// isResume reports whether a migrate command's arguments ask to resume.
func isResume(args json.RawMessage) bool {
	var a struct {
		Resume bool `json:"resume"`
	}
	_ = json.Unmarshal(args, &a)
	return a.Resume
}

// dieAtResume starts a postcopy migration with clients of its own whose
// process "dies" (both connections close, as after a SIGKILL) at its first
// migrate resume: before the source got it (reached false) or just after
// (reached true). beforeResume runs first, in the source's handler. It
// returns once that process ended, with a config for the adopting process.
func dieAtResume(t *testing.T, p *qemutest.Pair, cfg engine.Config, reached bool, beforeResume func()) engine.Config {
	t.Helper()
	src, dst, err := p.Clients(context.Background())
	require.NoError(t, err)
	var died atomic.Bool
	migrate := p.Src.Handler("migrate")
	p.Src.Handle("migrate", func(args json.RawMessage) (any, error) {
		if !isResume(args) || died.Swap(true) {
			return migrate(args)
		}
		if beforeResume != nil {
			beforeResume()
		}
		if reached {
			_, err := migrate(args)
			require.NoError(t, err)
		}
		dst.Close()
		return nil, qmptest.ErrCloseConn
	})
	first := cfg
	first.Source, first.Destination = engine.Endpoint{Client: src}, engine.Endpoint{Client: dst}
	var broke bool
	first.Observer = func(e engine.Event) {
		// Some way into postcopy the link breaks; the first process
		// recovers.
		if !broke && e.Kind == engine.EventStats && e.Stats.Status == "postcopy-active" && e.Stats.RemainingBytes < 120<<20 {
			broke = true
			p.LinkReset()
		}
	}
	j, err := engine.Start(context.Background(), first)
	require.NoError(t, err)
	<-j.Done()
	require.True(t, died.Load(), "the first process died at its resume")
	src.Close()
	src2, dst2, err := p.Clients(context.Background())
	require.NoError(t, err)
	t.Cleanup(func() { src2.Close(); dst2.Close() })
	cfg.Source, cfg.Destination = engine.Endpoint{Client: src2}, engine.Endpoint{Client: dst2}
	return cfg
}

// resumes counts the migrate commands with resume the source received.
func resumes(t *testing.T, p *qemutest.Pair) int {
	t.Helper()
	n := 0
	for _, c := range p.Src.CallsOf("migrate") {
		if isResume(c.Args) {
			n++
		}
	}
	return n
}

// postcopy recovery x manager killed: the process recovering a lost link
// died after migrate-recover, before its migrate resume reached the source
// (the source postcopy-paused, the destination listening: in
// postcopy-recover-setup from 9.1, still postcopy-paused on 7.2). Adopt
// sees the recovery through: the destination's second migrate-recover is
// refused (it listens already), the source resumes to where it listens,
// and the migration completes; never cancelled, the source never resumed.
func TestAdoptRecoveryAfterMigrateRecover(t *testing.T) {
	for _, v := range [][3]int{{7, 2, 22}, {10, 0, 2}} {
		t.Run(qmp.Version{Major: v[0], Minor: v[1], Micro: v[2]}.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := slowPostcopy(t, qemutest.Options{Version: v})
				cfg = dieAtResume(t, p, cfg, false, nil)
				require.Equal(t, qmp.StatusPostcopyPaused, p.Status())
				require.Len(t, p.RecoverAddresses(), 1, "the first process's migrate-recover")
				if v[0] >= 10 {
					require.Equal(t, qmp.StatusPostcopyRecoverSetup, p.DstStatus())
				} else {
					require.Equal(t, qmp.StatusPostcopyPaused, p.DstStatus())
				}

				var rec recorder
				cfg.Observer = rec.observe
				j, err := engine.Adopt(t.Context(), cfg)
				require.NoError(t, err)
				res, err := j.Wait(t.Context())
				require.NoError(t, err)
				assert.Equal(t, engine.StatusCompleted, res.Status)
				assert.Equal(t, 1, res.Recoveries)
				assert.Equal(t, 1, p.Recoveries())
				// The dead process's (the monitor got it, the model did
				// not) and the adopting process's.
				assert.Equal(t, 2, resumes(t, p))
				assert.Len(t, p.Dst.CallsOf("migrate-recover"), 2)
				assert.Len(t, p.RecoverAddresses(), 1, "the second one refused: the destination listened already")
				assert.Zero(t, p.Pauses(qemutest.Source)+p.Pauses(qemutest.Destination), "nothing to pause")
				assert.Equal(t, "running", p.DstRunState())
				assert.Equal(t, "postmigrate", p.SrcRunState())
				noCancelNoResume(t, p)
				noLeftovers(t, p)
			})
		})
	}
}

// postcopy recovery x manager killed, the resume sent: the process died
// just after its migrate resume reached the source, while the link was a
// black hole (the handshake hangs: both sides in postcopy-recover-setup).
// Adopt gives the handshake the time of an attempt, then pauses the
// hanging source and retries until the link works again, and completes. If the link never comes back it ends, at its recovery
// budget, with ErrRecoveryFailed (Lost postcopy_paused), both QEMUs left
// in postcopy-paused.
func TestAdoptRecoveryAfterResume(t *testing.T) {
	t.Run("link back", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p, cfg := slowPostcopy(t, qemutest.Options{})
			cfg.PostcopyStallTimeout = 2 * time.Second
			cfg = dieAtResume(t, p, cfg, true, func() { p.LinkBlackHole(true) })
			require.Equal(t, qmp.StatusPostcopyRecoverSetup, p.Status(), "the handshake hangs")
			require.Equal(t, qmp.StatusPostcopyRecoverSetup, p.DstStatus())
			time.AfterFunc(10*time.Second, func() { p.LinkBlackHole(false) })

			s := &script{}
			cfg.Observer = s.rec.observe
			j, err := engine.Adopt(t.Context(), cfg)
			require.NoError(t, err)
			res, err := j.Wait(t.Context())
			require.NoError(t, err)
			assert.Equal(t, engine.StatusCompleted, res.Status)
			assert.Equal(t, 1, res.Recoveries)
			assert.Equal(t, 1, p.Recoveries())
			assert.GreaterOrEqual(t, p.Pauses(qemutest.Source), 1, "the hanging resume was paused")
			assert.Equal(t, engine.RecoveryRecovered, s.steps()[len(s.steps())-1])
			assert.Equal(t, "running", p.DstRunState())
			noCancelNoResume(t, p)
			noLeftovers(t, p)
		})
	})
	t.Run("handshake under way", func(t *testing.T) {
		// The link works: Adopt finds the handshake under way (both
		// sides in postcopy-recover-setup) and waits for it rather than
		// pause it (cutting a handshake crashed 7.2's destination on
		// real QEMU).
		synctest.Test(t, func(t *testing.T) {
			p, cfg := slowPostcopy(t, qemutest.Options{})
			cfg = dieAtResume(t, p, cfg, true, nil)
			require.Equal(t, qmp.StatusPostcopyRecoverSetup, p.Status())
			s := &script{}
			cfg.Observer = s.rec.observe
			j, err := engine.Adopt(t.Context(), cfg)
			require.NoError(t, err)
			res, err := j.Wait(t.Context())
			require.NoError(t, err)
			assert.Equal(t, engine.StatusCompleted, res.Status)
			assert.Equal(t, 1, res.Recoveries, "the dead process's, seen through")
			assert.Zero(t, res.RecoveryAttempts, "none of its own")
			assert.Equal(t, 1, p.Recoveries())
			assert.Zero(t, p.Pauses(qemutest.Source)+p.Pauses(qemutest.Destination), "the handshake was not cut")
			assert.Len(t, p.Dst.CallsOf("migrate-recover"), 1, "the dead process's only")
			assert.Equal(t, 1, resumes(t, p), "the dead process's only")
			assert.Equal(t, []engine.RecoveryStep{engine.RecoveryLinkLost, engine.RecoveryRecovered}, s.steps())
			assert.Equal(t, "running", p.DstRunState())
			noCancelNoResume(t, p)
			noLeftovers(t, p)
		})
	})
	t.Run("link gone", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p, cfg := slowPostcopy(t, qemutest.Options{})
			cfg.PostcopyStallTimeout = 2 * time.Second
			cfg.RecoveryTimeout = 30 * time.Second
			cfg = dieAtResume(t, p, cfg, true, func() { p.LinkBlackHole(true) })
			start := time.Now()
			j, err := engine.Adopt(t.Context(), cfg)
			require.NoError(t, err)
			res, err := j.Wait(t.Context())
			require.ErrorIs(t, err, engine.ErrRecoveryFailed)
			assert.ErrorIs(t, err, engine.ErrPostcopyFailed)
			assert.NotErrorIs(t, err, engine.ErrGuestLost)
			assert.Equal(t, engine.PostcopyPaused, res.Lost)
			assert.Equal(t, engine.StatusFailed, res.Status)
			assert.Zero(t, res.Recoveries)
			assert.Less(t, time.Since(start), 40*time.Second, "the recovery budget, not more")
			assert.Equal(t, qmp.StatusPostcopyPaused, p.Status())
			assert.Equal(t, "running", p.DstRunState(), "the guest stays on the destination")
			assert.False(t, p.DstGone())
			assert.False(t, p.SrcGone())
			noCancelNoResume(t, p)
		})
	})
}

// postcopy recovery x kill dst: the destination QEMU dies while the engine
// recovers a lost link (attempts failing in a black hole, or just after
// its migrate-recover): the guest is lost. A typed error at once naming
// the destination, not a spent recovery budget; the source is left in
// postcopy, never resumed nor cancelled.
func TestRecoverDestinationKilledDuringRecovery(t *testing.T) {
	for name, kill := range map[string]func(p *qemutest.Pair) func(){
		"between attempts": func(p *qemutest.Pair) func() {
			return func() {
				p.LinkBlackHole(true)
				time.AfterFunc(5*time.Second, p.KillDst)
			}
		},
		"listening": func(p *qemutest.Pair) func() {
			recover := p.Dst.Handler("migrate-recover")
			p.Dst.Handle("migrate-recover", func(args json.RawMessage) (any, error) {
				res, err := recover(args)
				p.KillDst()
				return res, err
			})
			return p.LinkReset
		},
	} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := slowPostcopy(t, qemutest.Options{})
				cfg.PostcopyStallTimeout = time.Second
				s := &script{after: time.Second, faults: []func(){kill(p)}}
				cfg.Observer = s.observe
				res, err := engine.Migrate(t.Context(), cfg)
				require.ErrorIs(t, err, engine.ErrGuestLost)
				assert.ErrorIs(t, err, engine.ErrPostcopyFailed)
				assert.ErrorIs(t, err, engine.ErrDestinationGone)
				assert.NotErrorIs(t, err, engine.ErrRecoveryFailed)
				var ee *engine.Error
				require.ErrorAs(t, err, &ee)
				assert.Equal(t, engine.SideDestination, ee.Side)
				assert.Equal(t, engine.GuestLost, res.Lost)
				assert.Equal(t, engine.StatusFailed, res.Status)
				assert.Less(t, res.Total, 15*time.Second, "within seconds of the kill")
				assert.Positive(t, res.RecoveryAttempts, "killed during the recovery")
				assert.True(t, p.Status().Postcopy(), "the source is left as it is (%s)", p.Status())
				assert.False(t, p.SrcGone())
				assert.NotEqual(t, "running", p.SrcRunState())
				steps := s.steps()
				assert.Equal(t, engine.RecoveryGaveUp, steps[len(steps)-1])
				noCancelNoResume(t, p)
			})
		})
	}
}

// postcopy x stop dst: the destination QEMU stopped (SIGSTOP) in
// postcopy-active. Nothing moves (it reads nothing), so the engine sees the
// link stalled after PostcopyStallTimeout; its query of the destination
// then goes unanswered: ErrUnresponsive naming the destination after
// UnresponsiveTimeout, the state unknown, nothing cancelled, cut or paused
// (the source is left in postcopy-active), no recovery attempted.
func TestDestinationStopsAnsweringInPostcopy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{})
		cfg.PostcopyStallTimeout = 2 * time.Second
		cfg.UnresponsiveTimeout = 5 * time.Second
		var frozenAt time.Time
		s := &script{after: time.Second, faults: []func(){func() { frozenAt = time.Now(); p.Freeze(qemutest.Destination) }}}
		cfg.Observer = s.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		t.Logf("%v\nundone %q\nundo errors %q", err, res.Undone, res.UndoErrors)
		assert.ErrorIs(t, err, engine.ErrUnresponsive)
		assert.ErrorIs(t, err, engine.ErrPostcopyFailed)
		assert.NotErrorIs(t, err, engine.ErrGuestLost)
		engineErr(t, err, engine.PhaseSwitchover, engine.SideDestination, "query-migrate")
		assert.Equal(t, engine.StatusFailed, res.Status)
		assert.True(t, res.StateUnknown)
		assert.Empty(t, res.Undone)
		// The stall's detection (2 s, at the poll), then the limit.
		assert.InDelta(t, 7*time.Second, time.Since(frozenAt), float64(time.Second))
		assert.Zero(t, res.RecoveryAttempts)
		assert.Equal(t, qmp.StatusPostcopyActive, p.Status(), "the source is left as it is")
		assert.Zero(t, p.Pauses(qemutest.Source))
		assert.Empty(t, p.Dst.CallsOf("yank"))
		// Its out-of-band probe went unanswered (a stopped process): sent
		// once, waited for again, never sent anew; nothing paused.
		assert.Len(t, p.Dst.CallsOf("query-yank"), 1)
		assert.Empty(t, p.Dst.CallsOf("migrate-pause"))
		noCancelNoResume(t, p)
		p.Thaw(qemutest.Destination)
	})
}

// postcopy recovery x stop dst: the destination QEMU stopped (SIGSTOP) as
// the engine starts a recovery attempt: its migrate-recover goes
// unanswered. ErrUnresponsive naming the destination and the command after
// UnresponsiveTimeout, the state unknown, nothing cancelled; the source is
// left in postcopy-paused.
func TestDestinationStopsAnsweringInRecovery(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{})
		cfg.UnresponsiveTimeout = 5 * time.Second
		var frozenAt time.Time
		first := true
		cfg.Observer = func(e engine.Event) {
			if first && e.Kind == engine.EventStats && e.Stats.Status == "postcopy-active" {
				first = false
				time.AfterFunc(time.Second, p.LinkReset)
			}
			if e.Kind == engine.EventRecovery && e.Recovery.Step == engine.RecoveryAttempt && frozenAt.IsZero() {
				frozenAt = time.Now()
				p.Freeze(qemutest.Destination)
			}
		}
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		t.Logf("%v\nundone %q\nundo errors %q", err, res.Undone, res.UndoErrors)
		assert.ErrorIs(t, err, engine.ErrUnresponsive)
		assert.ErrorIs(t, err, engine.ErrPostcopyFailed)
		engineErr(t, err, engine.PhaseSwitchover, engine.SideDestination, "migrate-recover")
		assert.Equal(t, engine.StatusFailed, res.Status)
		assert.True(t, res.StateUnknown)
		assert.Empty(t, res.Undone)
		assert.InDelta(t, 5*time.Second, time.Since(frozenAt), float64(500*time.Millisecond))
		assert.Equal(t, qmp.StatusPostcopyPaused, p.Status(), "the source is left as it is")
		assert.Zero(t, resumes(t, p), "no resume towards a destination that does not listen")
		noCancelNoResume(t, p)
		p.Thaw(qemutest.Destination)
	})
}

// setup x kill dst / kill src: a QEMU dies as it gets a command of prepare
// or start (its monitor closes without answering). The migration fails
// with a typed error naming that side, and the survivor is left as it was
// found: capabilities and parameters restored, qmigrate's objects (the
// journal) removed, a source's guest running.
func TestSetupQEMUKilled(t *testing.T) {
	setup := []string{"migrate-set-capabilities", "migrate-set-parameters"} // sent together
	for name, tc := range map[string]struct {
		side  qemutest.Side
		cmd   string
		phase engine.Phase
		ops   []string // the command the error names (its start)
	}{
		"dst at object-add":               {qemutest.Destination, "object-add", engine.PhasePrepare, []string{"object-add qmigrate-journal-"}},
		"dst at migrate-set-capabilities": {qemutest.Destination, "migrate-set-capabilities", engine.PhasePrepare, setup},
		"dst at migrate-incoming":         {qemutest.Destination, "migrate-incoming", engine.PhaseStart, []string{"migrate-incoming"}},
		"src at object-add":               {qemutest.Source, "object-add", engine.PhasePrepare, []string{"object-add qmigrate-journal-"}},
		"src at migrate-set-parameters":   {qemutest.Source, "migrate-set-parameters", engine.PhasePrepare, setup},
		"src at migrate":                  {qemutest.Source, "migrate", engine.PhaseStart, []string{"migrate"}},
	} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := pair(t, qemutest.Options{})
				survivor := qemutest.Source
				if tc.side == qemutest.Source {
					survivor = qemutest.Destination
				}
				caps := p.Caps(survivor)
				params := map[string]any{}
				for _, n := range []string{"max-bandwidth", "downtime-limit", "max-postcopy-bandwidth"} {
					params[n] = p.Param(survivor, n)
				}
				q := p.QEMU(tc.side)
				q.Handle(tc.cmd, func(json.RawMessage) (any, error) {
					if tc.side == qemutest.Source {
						p.KillSrc()
					} else {
						p.KillDst()
					}
					return nil, qmptest.ErrCloseConn
				})
				res, err := engine.Migrate(t.Context(), cfg)
				require.Error(t, err)
				t.Logf("%v\nundone %q\nundo errors %q", err, res.Undone, res.UndoErrors)
				assert.Equal(t, engine.StatusFailed, res.Status)
				assert.NotErrorIs(t, err, engine.ErrBadInput)
				assert.ErrorIs(t, err, qmp.ErrClosed)
				want, side := engine.ErrDestinationGone, engine.SideDestination
				if tc.side == qemutest.Source {
					want, side = engine.ErrSourceGone, engine.SideSource
				}
				assert.ErrorIs(t, err, want)
				var ee *engine.Error
				require.ErrorAs(t, err, &ee)
				assert.Equal(t, side, ee.Side)
				assert.Equal(t, tc.phase, ee.Phase)
				assert.True(t, slices.ContainsFunc(tc.ops, func(op string) bool { return strings.HasPrefix(ee.Op, op) }), "op %q", ee.Op)

				assert.Empty(t, p.Objects(survivor), "nothing of qmigrate's left on the survivor")
				if survivor == qemutest.Source {
					assert.Equal(t, "running", p.SrcRunState())
					assert.Empty(t, p.Src.CallsOf("migrate"), "no migration towards a dead destination")
				} else {
					assert.Equal(t, "inmigrate", p.DstRunState())
				}
				if tc.cmd == "migrate" {
					// The destination listens since migrate-incoming: not
					// reusable (a second migrate-incoming is refused), it
					// is left as it is, its settings too, for the operator.
					assert.Equal(t, qmp.StatusSetup, p.DstStatus())
					return
				}
				assert.Equal(t, caps, p.Caps(survivor), "the survivor's capabilities restored")
				for n, v := range params {
					assert.Equal(t, v, p.Param(survivor, n), n)
				}
			})
		})
	}
}

// stopAndCopy is a pair whose migration converges at about 1.5 s into a
// 300 ms stop-and-copy (status device; TestSlowMonitorInStopAndCopy
// describes the figures), with fault injected as the engine enters its
// switchover phase (the source stopped).
func stopAndCopy(t *testing.T, fault func(p *qemutest.Pair), opts ...func(*engine.Config)) (*qemutest.Pair, *engine.Result, error) {
	p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 20 << 20})
	cfg.Strategy.Policy = strategy.PolicyQEMU
	for _, o := range opts {
		o(&cfg)
	}
	var rec recorder
	cfg.Observer = func(e engine.Event) {
		rec.observe(e)
		if e.Kind == engine.EventPhase && e.Phase == engine.PhaseSwitchover {
			require.Equal(t, qmp.StatusDevice, p.Status(), "the fault lands in the stop-and-copy")
			fault(p)
		}
	}
	res, err := engine.Migrate(t.Context(), cfg)
	require.Contains(t, rec.phases(), engine.PhaseSwitchover)
	t.Logf("%v\nundone %q\nundo errors %q", err, res.Undone, res.UndoErrors)
	return p, res, err
}

// pre-switchover x kill src: the source QEMU dies in the stop-and-copy.
// The guest died with it (the destination had not the whole stream: its
// load fails and it exits). ErrSourceGone naming the source, at once.
func TestStopAndCopySourceKilled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, res, err := stopAndCopy(t, func(p *qemutest.Pair) { p.KillSrc() })
		require.ErrorIs(t, err, engine.ErrSourceGone)
		var ee *engine.Error
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, engine.SideSource, ee.Side)
		assert.Equal(t, engine.StatusFailed, res.Status)
		assert.Less(t, res.Total, 3*time.Second, "at once")
		assert.True(t, p.DstGone(), "the destination's load failed")
		assert.Empty(t, p.Dst.CallsOf("cont"), "the destination's partial guest never started")
	})
}

// pre-switchover x link reset: the stream is cut in the stop-and-copy.
// QEMU fails the migration and resumes the guest on the source (it ran
// before the switchover); the destination exits. Rolled back: the guest
// runs on the source, its settings restored.
func TestStopAndCopyLinkReset(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, res, err := stopAndCopy(t, func(p *qemutest.Pair) { p.LinkReset() })
		require.ErrorIs(t, err, engine.ErrMigrationFailed)
		// The destination exited on the cut stream: the error says so.
		assert.ErrorIs(t, err, engine.ErrDestinationGone)
		var ee *engine.Error
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, engine.SideDestination, ee.Side)
		assert.Equal(t, engine.StatusFailed, res.Status)
		assert.Equal(t, qmp.StatusFailed, p.Status())
		assert.Equal(t, "running", p.SrcRunState(), "the guest runs on the source")
		assert.True(t, p.DstGone())
		assert.Empty(t, p.Dst.CallsOf("cont"))
		assert.Empty(t, res.UndoErrors)
		assert.Empty(t, p.Objects(qemutest.Source))
	})
}

// mirror x kill src / kill dst: a QEMU dies while the disk mirrors copy
// (before RAM migrates): the error wraps ErrSourceGone or
// ErrDestinationGone and names that side, at once, and the survivor is
// cleaned up. A surviving destination, which only served the mirrors' NBD
// exports: exports, NBD server and target nodes removed, settings restored,
// journal removed. A surviving source: its mirrors cancelled, settings
// restored, its guest running.
func TestMirrorQEMUKilled(t *testing.T) {
	for _, side := range []engine.Side{engine.SideSource, engine.SideDestination} {
		t.Run(string(side), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := pair(t, heavyWriter([3]int{10, 0, 2}))
				cfg.Storage = &blockmirror.Config{}
				survivor, kill, gone := qemutest.Destination, p.KillSrc, engine.ErrSourceGone
				if side == engine.SideDestination {
					survivor, kill, gone = qemutest.Source, p.KillDst, engine.ErrDestinationGone
				}
				caps := p.Caps(survivor)
				var killedAt time.Time
				cfg.Observer = func(e engine.Event) {
					if e.Kind == engine.EventPhase && e.Phase == engine.PhaseStart { // the mirrors start
						time.AfterFunc(time.Second, func() { killedAt = time.Now(); kill() })
					}
				}
				res, err := engine.Migrate(t.Context(), cfg)
				require.Error(t, err)
				t.Logf("%v\nundone %q\nundo errors %q", err, res.Undone, res.UndoErrors)
				require.False(t, killedAt.IsZero())
				assert.ErrorIs(t, err, gone)
				engineErr(t, err, engine.PhaseStart, side, "wait for mirrors")
				assert.Equal(t, engine.StatusFailed, res.Status)
				assert.Less(t, time.Since(killedAt), 3*time.Second, "at once")
				assert.Empty(t, p.Objects(survivor))
				assert.Equal(t, caps, p.Caps(survivor))
				if side == engine.SideSource {
					assert.ErrorIs(t, err, blockmirror.ErrSourceGone)
					assert.Empty(t, p.Dst.CallsOf("migrate-incoming"), "RAM never started")
					nodes, jobs, exports, server := p.Dst.BlockLeft()
					assert.Zero(t, nodes, "destination: target nodes left")
					assert.Zero(t, jobs)
					assert.Zero(t, exports, "destination: exports left")
					assert.False(t, server, "destination: NBD server left")
					assert.False(t, p.DstGone())
					return
				}
				assert.Empty(t, p.Src.CallsOf("migrate"), "RAM never started")
				nodes, jobs, _, _ := p.Src.BlockLeft()
				assert.Zero(t, nodes, "source: nodes left")
				assert.Zero(t, jobs, "source: mirror jobs left")
				assert.Equal(t, "running", p.SrcRunState())
			})
		})
	}
}

// pre-switchover x kill dst / kill src: a QEMU killed in the
// pre-switchover window of a storage migration (the source paused there,
// the mirrors about to finish) is named as gone (ErrDestinationGone,
// ErrSourceGone), the side it was, as in the mirror phase; a destination
// killed is rolled back, the source's guest running again. Found on real
// QEMU (TestFaultMatrix/PreSwitchover): the error named the source and
// no QEMU gone.
func TestPreSwitchoverQEMUKilled(t *testing.T) {
	for _, side := range []engine.Side{engine.SideSource, engine.SideDestination} {
		t.Run(string(side), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := pair(t, qemutest.Options{Disk: 64 << 20})
				cfg.Storage = &blockmirror.Config{}
				kill, gone := p.KillSrc, engine.ErrSourceGone
				if side == engine.SideDestination {
					kill, gone = p.KillDst, engine.ErrDestinationGone
				}
				cfg.Observer = func(e engine.Event) {
					if e.Kind == engine.EventPhase && e.Phase == engine.PhaseSwitchover {
						require.Equal(t, qmp.StatusPreSwitchover, p.Status())
						kill()
					}
				}
				res, err := engine.Migrate(t.Context(), cfg)
				require.Error(t, err)
				t.Logf("%v\nundone %q\nundo errors %q", err, res.Undone, res.UndoErrors)
				assert.ErrorIs(t, err, gone)
				if side == engine.SideSource {
					engineErr(t, err, engine.PhaseSwitchover, side, "finish mirrors")
				} else {
					// The fake's mirrors finish without the destination: its
					// monitor's end is seen first (real QEMU: at the
					// mirrors' finish, as for the source).
					var ee *engine.Error
					require.ErrorAs(t, err, &ee)
					assert.Equal(t, engine.SideDestination, ee.Side)
				}
				assert.Equal(t, engine.StatusFailed, res.Status)
				if side == engine.SideDestination {
					assert.Equal(t, "running", p.SrcRunState(), "rolled back: the source runs the guest")
					nodes, jobs, _, _ := p.Src.BlockLeft()
					assert.Zero(t, nodes+jobs, "source: mirrors and nodes left")
				}
			})
		})
	}
}

// pre-switchover x stop dst / link black hole: the destination stops
// reading in the stop-and-copy (SIGSTOP, or a link that drops every
// packet). QEMU's migration thread then blocks writing the device state
// with the big lock held, so the source's monitor stops answering too
// (modelled by freezing the source as well). The engine ends after
// UnresponsiveTimeout with ErrUnresponsive, the state unknown, nothing
// rolled back nor cut (the guest is paused on the source, its state maybe
// on the destination); once the destination reads again the migration
// completes, the destination left paused for the operator.
func TestStopAndCopyStalls(t *testing.T) {
	for name, tc := range map[string]struct{ fault, heal func(p *qemutest.Pair) }{
		"stop dst": {
			func(p *qemutest.Pair) { p.Freeze(qemutest.Destination); p.Freeze(qemutest.Source) },
			func(p *qemutest.Pair) { p.Thaw(qemutest.Destination); p.Thaw(qemutest.Source) },
		},
		"black hole": {
			func(p *qemutest.Pair) { p.LinkBlackHole(true); p.Freeze(qemutest.Source) },
			func(p *qemutest.Pair) { p.LinkBlackHole(false); p.Thaw(qemutest.Source) },
		},
	} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				var faultAt time.Time
				p, res, err := stopAndCopy(t, func(p *qemutest.Pair) { faultAt = time.Now(); tc.fault(p) }, func(cfg *engine.Config) {
					cfg.UnresponsiveTimeout = 5 * time.Second
				})
				require.Error(t, err)
				assert.ErrorIs(t, err, engine.ErrUnresponsive)
				engineErr(t, err, engine.PhaseSwitchover, engine.SideSource, "query-migrate")
				assert.Equal(t, engine.StatusFailed, res.Status)
				assert.True(t, res.StateUnknown)
				assert.Empty(t, res.Rollback, "nothing rolled back")
				assert.InDelta(t, 5*time.Second, time.Since(faultAt), float64(time.Second))
				assert.Empty(t, p.Src.CallsOf("migrate_cancel"))
				assert.Empty(t, p.Dst.CallsOf("yank"))
				assert.Empty(t, p.Src.CallsOf("cont"))

				tc.heal(p)
				time.Sleep(2 * time.Second)
				assert.Equal(t, qmp.StatusCompleted, p.Status())
				assert.Equal(t, "postmigrate", p.SrcRunState())
				assert.Equal(t, "paused", p.DstRunState(), "left for the operator (-S)")
			})
		})
	}
}

// postcopy x manager killed, the link working: the process dies in
// postcopy-active; Adopt sees postcopy through to completion (no recovery
// needed, nothing paused), the destination running the guest, leftovers
// removed.
func TestAdoptPostcopyActiveCompletes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{})
		src, dst, err := p.Clients(context.Background())
		require.NoError(t, err)
		first := cfg
		first.Source, first.Destination = engine.Endpoint{Client: src}, engine.Endpoint{Client: dst}
		j, err := engine.Start(context.Background(), first)
		require.NoError(t, err)
		for p.Status() != qmp.StatusPostcopyActive {
			time.Sleep(100 * time.Millisecond)
		}
		time.Sleep(time.Second)
		src.Close() // the first process dies
		dst.Close()
		<-j.Done()
		require.Equal(t, qmp.StatusPostcopyActive, p.Status())
		src2, dst2, err := p.Clients(context.Background())
		require.NoError(t, err)
		defer src2.Close()
		defer dst2.Close()
		cfg.Source, cfg.Destination = engine.Endpoint{Client: src2}, engine.Endpoint{Client: dst2}
		j, err = engine.Adopt(t.Context(), cfg)
		require.NoError(t, err)
		res, err := j.Wait(t.Context())
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Zero(t, res.Recoveries)
		assert.Zero(t, p.Pauses(qemutest.Source)+p.Pauses(qemutest.Destination))
		assert.Equal(t, "running", p.DstRunState())
		assert.Equal(t, "postmigrate", p.SrcRunState())
		noCancelNoResume(t, p)
		noLeftovers(t, p)
	})
}

// pre-switchover x link flap: the link drops every packet for 2 s of the
// stop-and-copy (the source's monitor held meanwhile, as in
// TestStopAndCopyStalls), then works again: the engine waits for the
// held monitor (within UnresponsiveTimeout) and the migration completes,
// its downtime longer by the flap, and the Result says the maximum broke.
func TestStopAndCopyFlap(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, res, err := stopAndCopy(t, func(p *qemutest.Pair) {
			p.LinkBlackHole(true)
			p.Freeze(qemutest.Source)
			time.AfterFunc(2*time.Second, func() { p.LinkBlackHole(false); p.Thaw(qemutest.Source) })
		}, func(cfg *engine.Config) { cfg.UnresponsiveTimeout = 5 * time.Second })
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Greater(t, res.Downtime, 2*time.Second, "the flap is downtime: the guest is stopped on the source")
		assert.False(t, res.DowntimeHeld)
		assert.Equal(t, "running", p.DstRunState())
		assert.Empty(t, p.Src.CallsOf("migrate_cancel"))
		assert.Empty(t, p.Src.CallsOf("cont"))
	})
}
