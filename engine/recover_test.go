package engine_test

import (
	"context"
	"encoding/json"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp"
)

// slowPostcopy is a pair whose migration goes to postcopy after about 3s
// and stays there about 15s (150 MiB at 10 MiB/s).
func slowPostcopy(t *testing.T, opt qemutest.Options) (*qemutest.Pair, engine.Config) {
	t.Helper()
	opt.Throughput, opt.DirtyRate, opt.PostcopyRate = 100<<20, 400<<20, 10<<20
	p, cfg := pair(t, opt)
	cfg.URI = "tcp:127.0.0.1:0"
	cfg.Strategy.Limits.Budget = 3 * time.Second
	cfg.Strategy.Limits.AllowPostcopy = true
	return p, cfg
}

// inPostcopy runs each fault in turn: the first `after` the first
// postcopy-active sample, each next one `after` the previous one's
// recovery (or, for a fault during the recovery, its first attempt).
type script struct {
	rec    recorder
	after  time.Duration
	faults []func()
	armed  bool
	onStep engine.RecoveryStep
}

func (s *script) observe(e engine.Event) {
	s.rec.observe(e)
	if len(s.faults) == 0 || s.armed {
		return
	}
	fire := e.Kind == engine.EventStats && e.Stats.Status == "postcopy-active" && s.onStep == ""
	fire = fire || (e.Kind == engine.EventRecovery && s.onStep != "" && e.Recovery.Step == s.onStep)
	if !fire {
		return
	}
	f := s.faults[0]
	s.faults = s.faults[1:]
	s.armed = true
	time.AfterFunc(s.after, func() { f() })
}

// rearm lets the next fault fire after the next recovery.
func (s *script) rearm(e engine.Event) {
	if e.Kind == engine.EventRecovery && e.Recovery.Step == engine.RecoveryRecovered {
		s.armed = false
	}
}

// lastAttempt is the last recovery attempt's event (nil: none).
func (s *script) lastAttempt() *engine.Recovery {
	var attempt *engine.Recovery
	for _, e := range s.rec.events {
		if e.Kind == engine.EventRecovery && e.Recovery.Step == engine.RecoveryAttempt {
			attempt = e.Recovery
		}
	}
	return attempt
}

func (s *script) steps() []engine.RecoveryStep {
	var out []engine.RecoveryStep
	for _, e := range s.rec.events {
		if e.Kind == engine.EventRecovery {
			out = append(out, e.Recovery.Step)
		}
	}
	return out
}

func noCancelNoResume(t *testing.T, p *qemutest.Pair) {
	t.Helper()
	assert.Empty(t, p.Src.CallsOf("migrate_cancel"), "never migrate_cancel in postcopy")
	assert.Empty(t, p.Src.CallsOf("cont"), "the source is never resumed once the destination ran")
}

// A reset link mid-postcopy: both sides pause by themselves; the engine
// recovers (migrate-recover at the address the destination listened on,
// migrate resume) and the migration completes.
func TestRecoverLinkReset(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{})
		s := &script{after: 2 * time.Second, faults: []func(){p.LinkReset}}
		cfg.Observer = s.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Equal(t, 1, res.Recoveries)
		assert.Equal(t, 1, res.RecoveryAttempts)
		assert.Equal(t, 1, p.Recoveries())
		assert.Positive(t, res.PostcopyStall)
		assert.Less(t, res.PostcopyStall, 2*time.Second)
		assert.Equal(t, []engine.RecoveryStep{engine.RecoveryLinkLost, engine.RecoveryAttempt, engine.RecoveryRecovered}, s.steps())
		require.Len(t, p.RecoverAddresses(), 1)
		assert.Equal(t, qmp.SocketAddress{Type: "inet", Host: "127.0.0.1", Port: "45678"}, p.RecoverAddresses()[0], "the port the migration used")
		assert.Equal(t, 1, resumes(t, p))
		assert.Zero(t, p.Pauses(qemutest.Source)+p.Pauses(qemutest.Destination), "both paused by themselves")
		noCancelNoResume(t, p)
		assert.Equal(t, "running", p.DstRunState())
	})
}

// The link reset before the destination loaded the device state (the
// first seconds of postcopy on real QEMU): the destination goes to
// postcopy-paused but its main thread waits for a page, so its monitor
// answers no in-band command. The engine's query-migrate there goes
// unanswered; after dstProbeGrace it follows the destination's MIGRATION
// events, sends migrate-recover out of band, resumes the source, and the
// migration completes (it used to end "state unknown" after
// UnresponsiveTimeout). At most one in-band command waits on the blocked
// monitor (QEMU stops reading it, out-of-band commands included, once 8
// wait). 7.2 and 10.0 models.
func TestRecoverLinkLostBeforeDeviceLoaded(t *testing.T) {
	for _, v := range [][3]int{{7, 2, 22}, {10, 0, 2}} {
		t.Run(qmp.Version{Major: v[0], Minor: v[1], Micro: v[2]}.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := slowPostcopy(t, qemutest.Options{Version: v, DstDeviceLoad: 5 * time.Second})
				var inBandAtReset, inBandAtRecovered int = -1, -1
				s := &script{after: time.Second, faults: []func(){func() {
					require.True(t, p.DstLoading())
					inBandAtReset = inBand(p.Dst)
					p.LinkReset()
				}}}
				cfg.Observer = func(e engine.Event) {
					s.observe(e)
					if e.Kind == engine.EventRecovery && e.Recovery.Step == engine.RecoveryRecovered {
						inBandAtRecovered = inBand(p.Dst)
					}
				}
				res, err := engine.Migrate(t.Context(), cfg)
				require.NoError(t, err)
				assert.Equal(t, engine.StatusCompleted, res.Status)
				assert.False(t, res.StateUnknown)
				assert.Equal(t, 1, res.Recoveries)
				assert.Equal(t, 1, res.RecoveryAttempts)
				assert.Equal(t, 1, p.Recoveries())
				assert.Equal(t, []engine.RecoveryStep{engine.RecoveryLinkLost, engine.RecoveryAttempt, engine.RecoveryRecovered}, s.steps())
				// The grace of the in-band query, then the recovery.
				assert.GreaterOrEqual(t, res.PostcopyStall, time.Second)
				assert.Less(t, res.PostcopyStall, 3*time.Second)
				attempt := s.lastAttempt()
				require.NotNil(t, attempt)
				assert.Contains(t, attempt.Detail, "followed from its events")
				calls := p.Dst.CallsOf("migrate-recover")
				require.Len(t, calls, 1)
				assert.True(t, calls[0].OOB, "migrate-recover out of band")
				assert.Equal(t, 1, resumes(t, p))
				assert.Zero(t, p.Pauses(qemutest.Source)+p.Pauses(qemutest.Destination), "both paused by themselves")
				require.GreaterOrEqual(t, inBandAtReset, 0)
				assert.LessOrEqual(t, inBandAtRecovered-inBandAtReset, 1, "at most one in-band command sent to the blocked monitor")
				noCancelNoResume(t, p)
				assert.False(t, p.DstLoading())
				assert.Equal(t, "running", p.DstRunState())
			})
		})
	}
}

// The link black-holed before the destination loaded the device state:
// nothing breaks, so no event says paused, and its in-band monitor answers
// nothing (its main thread waits for a page). The engine, having seen the
// stall, probes it out of band (query-yank): alive, it is paused out of
// band and recovered once the link returns. Measured on real QEMU 7.2
// before: ErrUnresponsive after UnresponsiveTimeout, state unknown
// (TestPostcopyTwoHost/LinkBlackHoleBeforeGuestRuns).
func TestRecoverBlackHoleBeforeDeviceLoaded(t *testing.T) {
	for _, v := range [][3]int{{7, 2, 22}, {10, 0, 2}} {
		t.Run(qmp.Version{Major: v[0], Minor: v[1], Micro: v[2]}.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := slowPostcopy(t, qemutest.Options{Version: v, DstDeviceLoad: 5 * time.Second})
				cfg.PostcopyStallTimeout = 2 * time.Second
				s := &script{after: time.Second, faults: []func(){func() {
					require.True(t, p.DstLoading())
					p.LinkBlackHole(true)
				}}}
				cfg.Observer = func(e engine.Event) {
					s.observe(e)
					// The link returns as the first attempt starts (both
					// sides paused), as in the integration test; it would
					// stay down for good without a recovery attempt.
					if e.Kind == engine.EventRecovery && e.Recovery.Step == engine.RecoveryAttempt {
						p.LinkBlackHole(false)
					}
				}
				res, err := engine.Migrate(t.Context(), cfg)
				require.NoError(t, err)
				assert.Equal(t, engine.StatusCompleted, res.Status)
				assert.False(t, res.StateUnknown)
				assert.Equal(t, 1, res.Recoveries)
				assert.Less(t, res.PostcopyStall, 10*time.Second, "well within UnresponsiveTimeout (30 s)")
				probes := p.Dst.CallsOf("query-yank")
				require.NotEmpty(t, probes, "the destination probed out of band")
				for _, c := range probes {
					assert.True(t, c.OOB)
				}
				assert.Equal(t, 1, p.Pauses(qemutest.Destination), "the destination paused out of band")
				for _, c := range append(p.Dst.CallsOf("migrate-pause"), p.Dst.CallsOf("migrate-recover")...) {
					assert.True(t, c.OOB, "%s out of band", c.Command)
				}
				attempt := s.lastAttempt()
				require.NotNil(t, attempt)
				assert.Contains(t, attempt.Detail, "followed from its events")
				noCancelNoResume(t, p)
				assert.False(t, p.DstLoading())
				assert.Equal(t, "running", p.DstRunState())
			})
		})
	}
}

// Three losses, the first two before the destination loaded the device
// state (its in-band monitor blocked throughout: the query left unanswered
// by the first is waited for again, not sent anew), the third after it
// loaded (its stale answer dropped, the destination read in band again).
func TestRecoverLostBeforeAndAfterDeviceLoaded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{DstDeviceLoad: 2500 * time.Millisecond})
		var loading []bool
		reset := func() { loading = append(loading, p.DstLoading()); p.LinkReset() }
		s := &script{after: time.Second, faults: []func(){reset, reset, reset}}
		var details []string
		cfg.Observer = func(e engine.Event) {
			s.observe(e)
			s.rearm(e)
			if e.Kind == engine.EventRecovery && e.Recovery.Step == engine.RecoveryAttempt {
				details = append(details, e.Recovery.Detail)
			}
		}
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Equal(t, []bool{true, true, false}, loading)
		assert.Equal(t, 3, res.Recoveries)
		assert.Equal(t, 3, res.RecoveryAttempts)
		assert.Equal(t, 3, p.Recoveries())
		require.Len(t, details, 3)
		assert.Contains(t, details[0], "followed from its events")
		assert.Contains(t, details[1], "followed from its events")
		assert.Empty(t, details[2], "read in band once loaded")
		for _, c := range p.Dst.CallsOf("migrate-recover") {
			assert.True(t, c.OOB)
		}
		noCancelNoResume(t, p)
		assert.Equal(t, "running", p.DstRunState())
	})
}

// inBand counts the in-band commands q received.
func inBand(q *qemutest.QEMU) int {
	n := 0
	for _, c := range q.Calls() {
		if !c.OOB {
			n++
		}
	}
	return n
}

// A black hole mid-postcopy: nothing moves and QEMU notices nothing; after
// the stall timeout the engine pauses both sides out of band, and retries
// with backoff until the link works again.
func TestRecoverBlackHole(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{})
		cfg.PostcopyStallTimeout = 2 * time.Second
		s := &script{after: time.Second, faults: []func(){func() {
			p.LinkBlackHole(true)
			time.AfterFunc(20*time.Second, func() { p.LinkBlackHole(false) })
		}}}
		cfg.Observer = s.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Equal(t, 1, res.Recoveries)
		assert.Greater(t, res.RecoveryAttempts, 1, "attempts fail while the link is down")
		assert.GreaterOrEqual(t, res.PostcopyStall, 15*time.Second, "the hole lasts 20 s, the stall is noticed after 2 s without progress")
		assert.Less(t, res.PostcopyStall, 30*time.Second)
		assert.GreaterOrEqual(t, p.Pauses(qemutest.Source), 1, "paused, and again for each resume the black hole swallowed")
		assert.Equal(t, 1, p.Pauses(qemutest.Destination))
		for _, c := range append(p.Src.CallsOf("migrate-pause"), p.Dst.CallsOf("migrate-pause")...) {
			assert.True(t, c.OOB, "migrate-pause out of band")
		}
		for _, c := range p.Dst.CallsOf("migrate-recover") {
			assert.True(t, c.OOB, "migrate-recover out of band")
		}
		steps := s.steps()
		assert.Equal(t, engine.RecoveryLinkLost, steps[0])
		assert.Contains(t, steps, engine.RecoveryFailed)
		assert.Equal(t, engine.RecoveryRecovered, steps[len(steps)-1])
		noCancelNoResume(t, p)
	})
}

// The link lost twice, then a third time, in one migration: each loss is
// recovered.
func TestRecoverLostThreeTimes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{})
		s := &script{after: 2 * time.Second, faults: []func(){p.LinkReset, p.LinkReset, p.LinkReset}}
		cfg.Observer = func(e engine.Event) { s.observe(e); s.rearm(e) }
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Equal(t, 3, res.Recoveries)
		assert.Equal(t, 3, p.Recoveries())
		noCancelNoResume(t, p)
	})
}

// The link lost again during the recovery handshake (postcopy-recover), twice:
// both sides fall back to postcopy-paused, and the third attempt succeeds.
func TestRecoverHandshakeBroken(t *testing.T) {
	for _, v := range [][3]int{{7, 2, 22}, {10, 0, 2}} {
		t.Run(qmp.Version{Major: v[0], Minor: v[1], Micro: v[2]}.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := slowPostcopy(t, qemutest.Options{Version: v})
				p.BreakRecoveries(2)
				s := &script{after: 2 * time.Second, faults: []func(){p.LinkReset}}
				cfg.Observer = s.observe
				res, err := engine.Migrate(t.Context(), cfg)
				require.NoError(t, err)
				assert.Equal(t, 1, res.Recoveries)
				assert.Equal(t, 3, res.RecoveryAttempts)
				assert.Equal(t, []engine.RecoveryStep{engine.RecoveryLinkLost,
					engine.RecoveryAttempt, engine.RecoveryFailed,
					engine.RecoveryAttempt, engine.RecoveryFailed,
					engine.RecoveryAttempt, engine.RecoveryRecovered}, s.steps())
				noCancelNoResume(t, p)
			})
		})
	}
}

// A black hole during the recovery itself: the source hangs in
// postcopy-recover(-setup); the engine pauses it and tries again.
func TestRecoverBlackHoleDuringHandshake(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{})
		cfg.PostcopyStallTimeout = 2 * time.Second
		s := &script{after: 0, onStep: engine.RecoveryAttempt, faults: []func(){func() {
			p.LinkBlackHole(true)
			time.AfterFunc(10*time.Second, func() { p.LinkBlackHole(false) })
		}}}
		first := true
		cfg.Observer = func(e engine.Event) {
			s.rec.observe(e)
			if first && e.Kind == engine.EventStats && e.Stats.Status == "postcopy-active" {
				first = false
				time.AfterFunc(time.Second, p.LinkReset)
			}
			if e.Kind == engine.EventRecovery && e.Recovery.Step == engine.RecoveryAttempt && len(s.faults) > 0 {
				s.faults[0]()
				s.faults = nil
			}
		}
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Equal(t, 1, res.Recoveries)
		assert.Greater(t, res.RecoveryAttempts, 1)
		assert.GreaterOrEqual(t, p.Pauses(qemutest.Source), 1, "the hanging resume was paused")
		noCancelNoResume(t, p)
	})
}

// A destination that cannot listen again (7.2's migrate-recover once failed
// to bind its port as the paused connection closed, CI): the source is not
// sent towards nobody; the next attempt asks the destination again.
func TestRecoverListenFails(t *testing.T) {
	for _, v := range [][3]int{{7, 2, 22}, {10, 0, 2}} {
		t.Run(qmp.Version{Major: v[0], Minor: v[1], Micro: v[2]}.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := slowPostcopy(t, qemutest.Options{Version: v})
				p.FailRecoverListen(1)
				s := &script{after: 2 * time.Second, faults: []func(){p.LinkReset}}
				var details []string
				cfg.Observer = func(e engine.Event) {
					s.observe(e)
					if e.Kind == engine.EventRecovery && e.Recovery.Step == engine.RecoveryFailed {
						details = append(details, e.Recovery.Detail)
					}
				}
				res, err := engine.Migrate(t.Context(), cfg)
				require.NoError(t, err)
				assert.Equal(t, 1, res.Recoveries)
				assert.Equal(t, 2, res.RecoveryAttempts)
				require.Len(t, details, 1)
				assert.Contains(t, details[0], "the destination could not listen again")
				assert.Contains(t, details[0], "Address already in use")
				assert.Len(t, p.RecoverAddresses(), 2, "asked again")
				assert.Equal(t, 1, resumes(t, p), "the source resumed only towards a listening destination")
				noCancelNoResume(t, p)
			})
		})
	}
}

// QEMU before 8.2 cannot pause a source in postcopy-recover: a resume
// handshake held up by a black hole is waited for (pausing the destination
// under it would leave the source in postcopy-recover for good), and
// completes once the link carries it again.
func TestRecoverHeldHandshake(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{Version: [3]int{7, 2, 22}})
		cfg.PostcopyStallTimeout = 2 * time.Second
		first, holed := true, false
		cfg.Observer = func(e engine.Event) {
			if first && e.Kind == engine.EventStats && e.Stats.Status == "postcopy-active" {
				first = false
				time.AfterFunc(time.Second, p.LinkReset)
			}
			if !holed && e.Kind == engine.EventRecovery && e.Recovery.Step == engine.RecoveryAttempt {
				holed = true
				p.LinkBlackHole(true)
				time.AfterFunc(10*time.Second, func() { p.LinkBlackHole(false) })
			}
		}
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Equal(t, 1, res.Recoveries)
		assert.Equal(t, 1, res.RecoveryAttempts, "the held handshake waited for, not tried again")
		assert.GreaterOrEqual(t, res.PostcopyStall, 9*time.Second)
		assert.Zero(t, p.Pauses(qemutest.Destination), "the destination not paused under the handshake")
		assert.Equal(t, 1, resumes(t, p))
		noCancelNoResume(t, p)
	})
}

// The destination killed as postcopy starts (the CI's 7.2 run: the
// source's migration failed instead of pausing), its guest left stopped, as
// 7.2 does: the guest is lost as in postcopy, typed, the source never
// resumed (the destination may have run the guest).
func TestPostcopyStartFailsGuestLost(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{Version: [3]int{7, 2, 22}})
		p.KillDstAtPostcopyStart(false)
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		t.Log(err)
		assert.ErrorIs(t, err, engine.ErrPostcopyFailed)
		assert.ErrorIs(t, err, engine.ErrGuestLost)
		assert.ErrorIs(t, err, engine.ErrDestinationGone)
		var ee *engine.Error
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, engine.SideDestination, ee.Side)
		assert.Equal(t, engine.GuestLost, res.Lost)
		assert.Equal(t, "postmigrate", p.SrcRunState(), "the source never resumed")
		assert.Empty(t, p.Src.CallsOf("cont"))
		assert.Empty(t, p.Src.CallsOf("migrate_cancel"))
	})
}

// The same with the source's guest running again after the failed start
// (not seen on real QEMU): its latest state is there, so the migration is
// rolled back as one that failed before the switchover.
func TestPostcopyStartFailsRollsBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{Version: [3]int{7, 2, 22}})
		p.KillDstAtPostcopyStart(true)
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		t.Logf("%v\nundone %q\nundo errors %q", err, res.Undone, res.UndoErrors)
		assert.ErrorIs(t, err, engine.ErrMigrationFailed)
		assert.ErrorIs(t, err, engine.ErrDestinationGone)
		assert.NotErrorIs(t, err, engine.ErrPostcopyFailed, "postcopy never took over")
		assert.Equal(t, engine.StatusFailed, res.Status)
		assert.Empty(t, res.Lost)
		assert.False(t, res.StateUnknown)
		assert.Equal(t, "running", p.SrcRunState(), "the guest runs on the source")
		assert.Contains(t, res.Undone, "source: guest resumed by QEMU (postcopy failed as it started, before the destination ran it)")
		assert.False(t, p.Caps(qemutest.Source)["postcopy-ram"], "the source's capabilities restored")
		assert.Empty(t, p.Src.CallsOf("migrate_cancel"))
	})
}

// The destination QEMU killed in postcopy: the guest is lost. A typed error
// at once, naming the destination; the source is left as it is (paused,
// never resumed, never cancelled).
func TestRecoverDestinationKilled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{})
		var killedAt time.Time
		s := &script{after: 2 * time.Second, faults: []func(){func() { killedAt = time.Now(); p.KillDst() }}}
		cfg.Observer = s.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		assert.Less(t, time.Since(killedAt), 2*time.Second, "within seconds")
		assert.ErrorIs(t, err, engine.ErrGuestLost)
		assert.ErrorIs(t, err, engine.ErrPostcopyFailed)
		assert.ErrorIs(t, err, engine.ErrDestinationGone)
		var ee *engine.Error
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, engine.SideDestination, ee.Side)
		assert.Equal(t, engine.GuestLost, res.Lost)
		assert.Equal(t, engine.StatusFailed, res.Status)
		assert.True(t, p.Status().Postcopy(), "the source is left as it is (%s)", p.Status())
		assert.NotEqual(t, "running", p.SrcRunState())
		noCancelNoResume(t, p)
	})
}

// The source QEMU killed in postcopy: the pages the destination lacks are
// lost. A typed error at once, naming the source; the destination (running
// the guest, stalled) is left as it is.
func TestRecoverSourceKilled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{})
		var killedAt time.Time
		s := &script{after: 2 * time.Second, faults: []func(){func() { killedAt = time.Now(); p.KillSrc() }}}
		cfg.Observer = s.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		assert.Less(t, time.Since(killedAt), 2*time.Second, "within seconds")
		assert.ErrorIs(t, err, engine.ErrPagesLost)
		assert.ErrorIs(t, err, engine.ErrSourceGone)
		var ee *engine.Error
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, engine.SideSource, ee.Side)
		assert.Equal(t, engine.PagesLost, res.Lost)
		assert.Equal(t, "running", p.DstRunState(), "the destination is left as it is")
		assert.Equal(t, qmp.StatusPostcopyPaused, p.DstStatus())
		assert.Empty(t, p.Dst.CallsOf("migrate-recover"))
	})
}

// The source killed while the destination (7.2) still loads the device
// state: it goes down too (a CI rehearsal). Both gone is the guest lost,
// not pages lost on a destination that holds the guest.
func TestRecoverSourceKilledDuringDeviceLoad(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{Version: [3]int{7, 2, 22}, DstDeviceLoad: 5 * time.Second})
		s := &script{after: time.Second, faults: []func(){p.KillSrc}}
		cfg.Observer = s.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		t.Log(err)
		assert.True(t, p.DstGone(), "the destination went down with the source")
		assert.ErrorIs(t, err, engine.ErrGuestLost)
		assert.ErrorIs(t, err, engine.ErrSourceGone)
		assert.ErrorIs(t, err, engine.ErrDestinationGone)
		assert.NotErrorIs(t, err, engine.ErrPagesLost)
		assert.Contains(t, err.Error(), "both QEMUs went away")
		assert.Equal(t, engine.GuestLost, res.Lost)
	})
}

// The source killed while the engine recovers a lost link: the same typed
// error, not a recovery budget spent.
func TestRecoverSourceKilledDuringRecovery(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{})
		cfg.PostcopyStallTimeout = time.Second
		s := &script{after: time.Second, faults: []func(){func() {
			p.LinkBlackHole(true)
			time.AfterFunc(5*time.Second, p.KillSrc)
		}}}
		cfg.Observer = s.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.ErrorIs(t, err, engine.ErrPagesLost)
		assert.Equal(t, engine.PagesLost, res.Lost)
		assert.Less(t, res.Total, 20*time.Second)
	})
}

// A link that never comes back: the recovery budget ends the migration
// with ErrRecoveryFailed, both QEMUs left in postcopy-paused.
func TestRecoveryBudgetSpent(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{})
		cfg.PostcopyStallTimeout = time.Second
		cfg.RecoveryTimeout = 30 * time.Second
		s := &script{after: time.Second, faults: []func(){func() { p.LinkBlackHole(true) }}}
		cfg.Observer = s.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.ErrorIs(t, err, engine.ErrRecoveryFailed)
		assert.ErrorIs(t, err, engine.ErrPostcopyFailed)
		assert.Equal(t, engine.PostcopyPaused, res.Lost)
		assert.Zero(t, res.Recoveries)
		assert.Greater(t, res.RecoveryAttempts, 3)
		assert.GreaterOrEqual(t, res.PostcopyStall, 30*time.Second)
		assert.Less(t, res.PostcopyStall, 40*time.Second)
		assert.Equal(t, qmp.StatusPostcopyPaused, p.Status())
		assert.Equal(t, "running", p.DstRunState())
		steps := s.steps()
		assert.Equal(t, engine.RecoveryGaveUp, steps[len(steps)-1])
		noCancelNoResume(t, p)
	})
}

// RecoveryTimeout < 0: no recovery; the sides are paused and left so.
func TestRecoveryDisabled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{})
		cfg.RecoveryTimeout = -1
		s := &script{after: time.Second, faults: []func(){p.LinkReset}}
		cfg.Observer = s.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.ErrorIs(t, err, engine.ErrRecoveryFailed)
		assert.Zero(t, res.RecoveryAttempts)
		assert.Empty(t, p.Dst.CallsOf("migrate-recover"))
	})
}

// A cancel during the recovery is ignored: postcopy must finish.
func TestRecoverIgnoresCancel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{})
		cfg.PostcopyStallTimeout = time.Second
		ctx, cancel := context.WithCancel(t.Context())
		s := &script{after: time.Second, faults: []func(){func() {
			p.LinkBlackHole(true)
			time.AfterFunc(3*time.Second, cancel)
			time.AfterFunc(6*time.Second, func() { p.LinkBlackHole(false) })
		}}}
		cfg.Observer = s.observe
		res, err := engine.Migrate(ctx, cfg)
		require.NoError(t, err)
		assert.Equal(t, 1, res.Recoveries)
		noCancelNoResume(t, p)
	})
}

// Config.Listen: the destination binds there (migrate-incoming and
// migrate-recover), the source connects to URI.
func TestListenAddress(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := slowPostcopy(t, qemutest.Options{Version: [3]int{7, 2, 22}})
		cfg.URI = "tcp:192.0.2.10:0"
		cfg.Listen = "tcp:0.0.0.0:0"
		s := &script{after: time.Second, faults: []func(){p.LinkReset}}
		cfg.Observer = s.observe
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Equal(t, 1, res.Recoveries)
		inc := p.Dst.CallsOf("migrate-incoming")
		require.NotEmpty(t, inc)
		var ia qmp.MigrateIncomingArgs // 7.2: the uri form, after the newer ones were refused
		require.NoError(t, json.Unmarshal(inc[len(inc)-1].Args, &ia))
		assert.Equal(t, "tcp:0.0.0.0:0", ia.URI)
		for _, c := range p.Src.CallsOf("migrate") {
			var a qmp.MigrateArgs
			require.NoError(t, json.Unmarshal(c.Args, &a))
			if a.URI != "" {
				assert.Equal(t, "tcp:192.0.2.10:45678", a.URI, "the source connects to URI, the port resolved")
			}
		}
		require.Len(t, p.RecoverAddresses(), 1)
		assert.Equal(t, qmp.SocketAddress{Type: "inet", Host: "0.0.0.0", Port: "45678"}, p.RecoverAddresses()[0])
	})
}

func TestListenValidate(t *testing.T) {
	cfg := engine.Config{Source: engine.Endpoint{Address: qmp.Address{Network: qmp.Unix, Path: "/a"}},
		Destination: engine.Endpoint{Address: qmp.Address{Network: qmp.Unix, Path: "/b"}}, URI: "tcp:h:1"}
	cfg.Listen = "unix:/tmp/x.sock"
	assert.ErrorIs(t, cfg.Validate(), engine.ErrInvalidConfig)
	cfg.Listen = "tcp:0.0.0.0:1"
	assert.NoError(t, cfg.Validate())
	cfg.Listen = "tcp:"
	assert.ErrorIs(t, cfg.Validate(), engine.ErrInvalidConfig)
}

// A postcopy-paused migration left by a process that died is recovered by
// Adopt, and completes.
func TestAdoptRecoversPostcopyPaused(t *testing.T) {
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
		src.Close() // the first process dies
		dst.Close()
		<-j.Done()
		p.LinkReset() // and the link breaks while nobody watches
		for p.Status() != qmp.StatusPostcopyPaused {
			time.Sleep(100 * time.Millisecond)
		}
		src2, dst2, err := p.Clients(context.Background())
		require.NoError(t, err)
		defer src2.Close()
		defer dst2.Close()
		cfg.Source, cfg.Destination = engine.Endpoint{Client: src2}, engine.Endpoint{Client: dst2}
		var rec recorder
		cfg.Observer = rec.observe
		j, err = engine.Adopt(t.Context(), cfg)
		require.NoError(t, err)
		res, err := j.Wait(t.Context())
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Equal(t, 1, res.Recoveries)
		assert.Equal(t, "running", p.DstRunState())
		require.Len(t, p.RecoverAddresses(), 1)
		assert.Equal(t, "45678", p.RecoverAddresses()[0].Port, "the port the migration used, read from the destination")
		noCancelNoResume(t, p)
		noLeftovers(t, p)
	})
}

// postcopy-preempt is on with postcopy where both QEMUs are 8.0 or newer,
// off with 7.2 on either side; recovery works with it.
func TestPostcopyPreempt(t *testing.T) {
	for name, tc := range map[string]struct {
		src, dst [3]int
		want     bool
	}{
		"10.0-10.0": {[3]int{10, 0, 2}, [3]int{10, 0, 2}, true},
		"8.2-10.0":  {[3]int{8, 2, 0}, [3]int{10, 0, 2}, true},
		"7.2-10.0":  {[3]int{7, 2, 22}, [3]int{10, 0, 2}, false},
		"7.2-7.2":   {[3]int{7, 2, 22}, [3]int{7, 2, 22}, false},
	} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p, cfg := slowPostcopy(t, qemutest.Options{Version: tc.src, DstVersion: tc.dst})
				s := &script{after: time.Second, faults: []func(){p.LinkReset}}
				cfg.Observer = s.observe
				res, err := engine.Migrate(t.Context(), cfg)
				require.NoError(t, err)
				assert.Equal(t, 1, res.Recoveries)
				assert.Equal(t, tc.want, p.Caps(qemutest.Source)["postcopy-preempt"])
				assert.Equal(t, tc.want, p.Caps(qemutest.Destination)["postcopy-preempt"])
			})
		})
	}
	t.Run("turned off", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p, cfg := slowPostcopy(t, qemutest.Options{Version: [3]int{10, 0, 2}})
			cfg.NoPostcopyPreempt = true
			res, err := engine.Migrate(t.Context(), cfg)
			require.NoError(t, err)
			assert.True(t, p.Caps(qemutest.Source)["postcopy-ram"])
			assert.False(t, p.Caps(qemutest.Source)["postcopy-preempt"], "set off explicitly")
			assert.False(t, p.Caps(qemutest.Destination)["postcopy-preempt"])
			assert.Equal(t, engine.StatusCompleted, res.Status)
		})
	})
	t.Run("not without postcopy", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p, cfg := pair(t, qemutest.Options{})
			_, err := engine.Migrate(t.Context(), cfg)
			require.NoError(t, err)
			assert.False(t, p.Caps(qemutest.Source)["postcopy-preempt"])
		})
	})
}

// The same link faults in pre-copy end as before: rolled back with the
// guest running on the source, or completed after a short flap.
func TestPrecopyLinkFaults(t *testing.T) {
	run := func(t *testing.T, fault func(p *qemutest.Pair)) (*qemutest.Pair, *engine.Result, error) {
		p, cfg := pair(t, qemutest.Options{Throughput: 20 << 20, DirtyRate: 1 << 20})
		cfg.Strategy.Limits.ProgressTimeout = 5 * time.Second
		time.AfterFunc(2*time.Second, func() { fault(p) })
		res, err := engine.Migrate(t.Context(), cfg)
		return p, res, err
	}
	t.Run("reset", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p, res, err := run(t, func(p *qemutest.Pair) { p.LinkReset() })
			require.ErrorIs(t, err, engine.ErrMigrationFailed)
			assert.Equal(t, engine.StatusFailed, res.Status)
			assert.Equal(t, "running", p.SrcRunState(), "the guest runs on the source")
			assert.Empty(t, res.UndoErrors)
			assert.Empty(t, res.Lost)
		})
	})
	t.Run("black hole", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p, res, err := run(t, func(p *qemutest.Pair) { p.LinkBlackHole(true) })
			require.ErrorIs(t, err, engine.ErrAborted, "the progress timeout")
			assert.Equal(t, "running", p.SrcRunState(), "the guest runs on the source")
			assert.Less(t, res.Total, 10*time.Second)
			assert.Empty(t, res.Lost)
		})
	})
	t.Run("flap", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p, res, err := run(t, func(p *qemutest.Pair) {
				p.LinkBlackHole(true)
				time.AfterFunc(2*time.Second, func() { p.LinkBlackHole(false) })
			})
			require.NoError(t, err)
			assert.Equal(t, engine.StatusCompleted, res.Status)
			assert.Equal(t, "running", p.DstRunState())
		})
	})
}
