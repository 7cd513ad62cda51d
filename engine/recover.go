package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/transport"
)

// Postcopy's link lost, and its recovery.
//
// In postcopy the guest runs on the destination while the pages it has
// not received yet are only on the source: neither side can be given up,
// and the migration is never cancelled nor rolled back. A link that breaks
// shows in one of two ways:
//
//   - a reset (or a QEMU that notices the broken stream): the sides go to
//     postcopy-paused by themselves; the source's status or the
//     destination's MIGRATION event says so;
//   - a black hole (packets dropped, no reset): QEMU waits on TCP for
//     minutes while nothing moves. After Config.PostcopyStallTimeout with
//     no byte transferred and pages remaining, the engine sends
//     migrate-pause (out of band where the monitor negotiated it) to each
//     side still in postcopy-active or postcopy-recover.
//
// Once both sides are paused, each attempt asks the destination to listen
// again (migrate-recover, at Config.Listen or URI with the port the
// migration used, TLS parameters still in force) and the source to resume
// (migrate with resume, to the address it migrated to). Both go back to
// postcopy-active, or fall back to postcopy-paused when the attempt fails
// (the link dropping again, a handshake cut half-way, nobody listening);
// attempts are retried with backoff until Config.RecoveryTimeout after the
// loss. Each loss, attempt and outcome is an EventRecovery.
//
// The destination's main thread loads the device state at the start of
// postcopy and may wait there on a guest page: a link lost before it loaded
// it leaves that thread blocked until a recovery, and the monitor answers no
// in-band command meanwhile (measured on 7.2 and 10.0: the first seconds of
// postcopy). Out-of-band commands (migrate-recover, migrate-pause: exec-oob
// where the monitor negotiated oob) are still served and the MIGRATION
// events still sent. So the destination's status is read with one in-band
// query-migrate at a time (dstStatus: QEMU queues in-band commands behind
// the blocked thread, and stops reading the monitor, out-of-band commands
// included, once eight wait); when it has not answered within
// dstProbeGrace while the destination's last MIGRATION event reports a
// paused postcopy or a recovery, the engine follows the destination's
// events instead, and the recovery goes on out of band. A link lost in a
// black hole there breaks nothing, so no event says paused: once the
// engine took the link for lost (stage postcopy-paused: the stall, or any
// loss), a destination whose events still say postcopy-active is probed
// out of band (query-yank); one that answers is followed the same way,
// and paused out of band. A destination that answers neither (SIGSTOP) is
// waited for up to UnresponsiveTimeout, as any command.
//
// Recovery is impossible when a QEMU went away: the destination (the guest
// ran there: lost, ErrGuestLost) or the source (the pages it alone held:
// lost, ErrPagesLost). The engine then ends at once with that error and
// leaves the other QEMU as it is (the source is never resumed once the
// destination ran: their memories diverged).

// Backoff between recovery attempts.
const (
	recoveryBackoffMin = 250 * time.Millisecond
	recoveryBackoffMax = 5 * time.Second
)

// dstProbeGrace is how long the destination's in-band query-migrate may go
// unanswered, while its events report postcopy paused or recovering (or
// still postcopy-active after a loss, and it answers out of band), before
// the engine follows its events (a main thread blocked on a page); it also
// bounds each wait for the out-of-band probe's answer (dstAlive).
const dstProbeGrace = time.Second

// postcopyPreempt reports whether postcopy-preempt is wanted: postcopy
// permitted, both QEMUs 8.0 or newer (7.2's preempt channel speaks another
// protocol), no multifd, and not turned off (Config.NoPostcopyPreempt).
func (r *run) postcopyPreempt() bool {
	return r.setup.Postcopy && r.cfg.MultifdChannels == 0 && !r.cfg.NoPostcopyPreempt &&
		r.src.Version().AtLeast(8, 0) && r.dst.Version().AtLeast(8, 0)
}

// postcopyWatch is what the engine watches of postcopy's link.
type postcopyWatch struct {
	lastBytes uint64    // the source's ram.transferred at the last move
	lastMove  time.Time // when it last grew (or postcopy started or recovered)
	dstPaused bool      // the destination's MIGRATION event said postcopy-paused
	losses    int       // losses of the link in this migration
	// inFlight: the source was found in a resume handshake the engine did
	// not start (Adopt, after a process that died recovering): it is
	// given the time of an attempt before anything is paused.
	inFlight bool
	// stuckRecover: the source refused migrate-pause in postcopy-recover
	// (QEMU before 8.2 pauses only postcopy-active): a resume handshake
	// under way there is the only one there can be, so it is waited for,
	// and the destination is not paused under it (that cut it for good in
	// the 7.2 CI run's black hole: the source hung in postcopy-recover).
	stuckRecover bool
	// startCheck: dstGoneAtPostcopyStart is under way (it is not entered
	// again from within).
	startCheck bool
	// dstEv is the status of the destination's last MIGRATION event.
	dstEv qmp.MigrationStatus
	// probe is the destination's in-band query-migrate in flight (nil
	// when none): at most one at a time (dstStatus).
	probe *dstProbe
	// dstBlocked: the destination's in-band monitor did not answer while
	// its events reported postcopy paused or recovering (or, after a loss,
	// still postcopy-active with its out-of-band probe answered): its
	// status is followed from its events until the probe answers.
	dstBlocked bool
	// live is the destination's out-of-band liveness probe in flight (nil
	// when none): at most one at a time (dstAlive).
	live *liveProbe
}

// liveProbe is one out-of-band query-yank of the destination.
type liveProbe struct {
	done   chan error // buffered: the goroutine never blocks
	cancel context.CancelFunc
}

// dstProbe is one in-band query-migrate of the destination.
type dstProbe struct {
	done   chan dstAnswer // buffered: the goroutine never blocks
	cancel context.CancelFunc
	sent   time.Time
}

type dstAnswer struct {
	info *qmp.MigrationInfo
	err  error
}

// dstEvent notes a destination MIGRATION event that reports postcopy
// paused: converge then checks the link.
func (r *run) dstEvent(ev qmp.Event) {
	if ev.Name != "MIGRATION" || !r.stage.postcopy() {
		return
	}
	var d struct {
		Status qmp.MigrationStatus `json:"status"`
	}
	if json.Unmarshal(ev.Data, &d) == nil && d.Status == qmp.StatusPostcopyPaused {
		r.pc.dstPaused = true
	}
}

// postcopyLost looks at a poll of the source in postcopy and returns how
// the link was seen lost ("" while it works).
func (r *run) postcopyLost(ctx context.Context, info *qmp.MigrationInfo) (string, error) {
	w := &r.pc
	now := time.Now()
	if w.lastMove.IsZero() {
		w.lastMove = now
	}
	switch info.Status {
	case qmp.StatusPostcopyRecover, qmp.StatusPostcopyRecoverSetup:
		w.inFlight = true
		return "the source reports " + string(info.Status), nil
	case qmp.StatusPostcopyPaused:
		return "the source reports " + string(info.Status), nil
	}
	if w.dstPaused {
		w.dstPaused = false
		dst, err := r.dstStatus(ctx)
		if err != nil {
			return "", err
		}
		if dst == qmp.StatusPostcopyPaused {
			return "the destination reports postcopy-paused", nil
		}
	}
	if info.Status != qmp.StatusPostcopyActive || info.RAM == nil {
		return "", nil
	}
	if info.RAM.Transferred > w.lastBytes || info.RAM.Remaining == 0 {
		w.lastBytes, w.lastMove = info.RAM.Transferred, now
		return "", nil
	}
	if d := now.Sub(w.lastMove); d >= r.cfg.postcopyStall() {
		return fmt.Sprintf("nothing transferred for %v with %d bytes remaining", d.Round(time.Millisecond), info.RAM.Remaining), nil
	}
	return "", nil
}

// recoverPostcopy sees a lost link through to postcopy running again (nil),
// or ends with why it cannot: ErrGuestLost, ErrPagesLost, ErrRecoveryFailed
// (or an unanswered command). A cancel of ctx is ignored, as everywhere in
// postcopy.
func (r *run) recoverPostcopy(ctx context.Context, why string) error {
	ctx = context.WithoutCancel(ctx)
	w := &r.pc
	w.losses++
	lostAt := time.Now()
	r.enter(stagePostcopyPaused)
	r.log.Warn("postcopy link lost: recovering", "why", why, "loss", w.losses)
	r.emitRecovery(Recovery{Step: RecoveryLinkLost, Detail: why}, lostAt)
	defer func() {
		r.res.PostcopyStall += time.Since(lostAt)
		w.dstPaused = false
		w.lastMove = time.Now()
	}()
	budget := r.cfg.recoveryTimeout()
	deadline := lostAt.Add(budget)
	backoff := recoveryBackoffMin
	last := why
	inFlight := w.inFlight
	if inFlight {
		// A handshake already under way (a migrate resume the engine did
		// not send): pausing it would cut a recovery that may work, so
		// it is waited for as an attempt of the engine's is (attempt 0).
		w.inFlight = false
		ok, detail, err := r.awaitResume(ctx, true)
		if err != nil {
			return r.gaveUp(0, err, lostAt)
		}
		if ok {
			r.recovered(0, lostAt)
			return nil
		}
		last = detail
	}
	for attempt := 1; ; attempt++ {
		done, err := r.pauseBoth(ctx, attempt > 1 || inFlight)
		for err == nil && !done && r.handshakeHeld() {
			// A source that cannot be paused in postcopy-recover: its
			// handshake completes when the link carries it again, or the
			// budget ends; a new attempt would only be refused.
			if !time.Now().Before(deadline) {
				return r.gaveUp(attempt-1, r.errorf(SideSource, "recover", fmt.Errorf("%w: %w: no recovery within %v: the source is held in postcopy-recover by a resume handshake that never completed (QEMU %s cannot pause it there); the last attempt: %s", ErrPostcopyFailed, ErrRecoveryFailed, max(budget, 0), r.src.Version(), last)), lostAt)
			}
			r.log.Info("the source's resume handshake is still under way: waiting for it", "attempt", attempt-1)
			if _, err = r.watchFor(ctx, r.recoveryPoll()); err != nil {
				break
			}
			done, err = r.pauseBoth(ctx, true)
		}
		if err != nil {
			return r.gaveUp(attempt-1, err, lostAt)
		}
		if done && (attempt > 1 || inFlight) {
			// The last attempt succeeded late (a handshake held up by the
			// link, or a source that could not be paused meanwhile).
			r.recovered(attempt-1, lostAt)
			return nil
		}
		if done {
			return nil // the source completed: converge finishes
		}
		if r.listen.Scheme == transport.FD {
			return r.gaveUp(attempt-1, r.errorf("", "recover", fmt.Errorf("%w: %w: an fd: channel cannot be opened again", ErrPostcopyFailed, ErrRecoveryFailed)), lostAt)
		}
		if budget < 0 || !time.Now().Before(deadline) {
			return r.gaveUp(attempt-1, r.errorf("", "recover", fmt.Errorf("%w: %w: no recovery within %v (the last: %s)", ErrPostcopyFailed, ErrRecoveryFailed, max(budget, 0), last)), lostAt)
		}
		r.enter(stageRecovering)
		r.res.RecoveryAttempts++
		var detail string
		if w.dstBlocked {
			detail = "the destination's monitor answers no in-band command (its main thread blocked): its status followed from its events, migrate-recover out of band"
		}
		r.emitRecovery(Recovery{Step: RecoveryAttempt, Attempt: attempt, Detail: detail}, lostAt)
		ok, detail, err := r.recoverOnce(ctx)
		if err != nil {
			return r.gaveUp(attempt, err, lostAt)
		}
		if ok {
			r.recovered(attempt, lostAt)
			return nil
		}
		last = detail
		r.enter(stagePostcopyPaused)
		wait := max(min(backoff, time.Until(deadline)), 0)
		r.log.Warn("postcopy recovery attempt failed", "attempt", attempt, "why", detail, "next in", wait)
		r.emitRecovery(Recovery{Step: RecoveryFailed, Attempt: attempt, Detail: detail, Backoff: wait}, lostAt)
		if _, err := r.watchFor(ctx, wait); err != nil {
			return r.gaveUp(attempt, err, lostAt)
		}
		backoff = min(backoff*2, recoveryBackoffMax)
	}
}

// recovered counts a recovery that worked (at attempt) and goes back to
// postcopy.
func (r *run) recovered(attempt int, lostAt time.Time) {
	r.res.Recoveries++
	r.enter(stagePostcopy)
	r.drainEvents()
	r.emitRecovery(Recovery{Step: RecoveryRecovered, Attempt: attempt}, lostAt)
	r.log.Info("postcopy recovered", "loss", r.pc.losses, "attempt", attempt, "stalled", time.Since(lostAt))
}

func (r *run) emitRecovery(rc Recovery, lostAt time.Time) {
	rc.Loss = r.pc.losses
	rc.Stalled = time.Since(lostAt)
	r.emit(Event{Kind: EventRecovery, Recovery: &rc})
}

// gaveUp reports the end of a recovery that cannot succeed.
func (r *run) gaveUp(attempt int, err error, lostAt time.Time) error {
	if errors.Is(err, ErrRecoveryFailed) {
		r.res.Lost = PostcopyPaused
	}
	r.emitRecovery(Recovery{Step: RecoveryGaveUp, Attempt: attempt, Detail: err.Error()}, lostAt)
	return err
}

// pauseBoth brings both sides to postcopy-paused: migrate-pause to each
// side still in postcopy-active or postcopy-recover (the link may be a
// black hole, which QEMU does not notice for minutes), then waits until
// both are paused, for at most the stall timeout (a side that cannot be
// paused yet makes the attempt fail, and the next one tries again). done:
// the source completed, or (after an attempt, late) both run postcopy again.
func (r *run) pauseBoth(ctx context.Context, afterAttempt bool) (done bool, err error) {
	limit := time.Now().Add(r.cfg.postcopyStall())
	sent := map[Side]bool{}
	for {
		src, dst, err := r.postcopyStatus(ctx)
		if err != nil {
			return false, err
		}
		if src == qmp.StatusCompleted {
			return true, nil
		}
		if afterAttempt && src == qmp.StatusPostcopyActive && (dst == qmp.StatusPostcopyActive || dst == qmp.StatusCompleted) {
			return true, nil
		}
		// A destination in postcopy-recover-setup only listens (an earlier
		// attempt's migrate-recover): nothing to pause there.
		dstReady := dst == qmp.StatusPostcopyPaused || dst == qmp.StatusPostcopyRecoverSetup
		if src == qmp.StatusPostcopyPaused && dstReady {
			return false, nil
		}
		for _, s := range []struct {
			side Side
			st   qmp.MigrationStatus
			c    *qmp.Client
		}{{SideSource, src, r.src}, {SideDestination, dst, r.dst}} {
			switch s.st {
			case qmp.StatusPostcopyActive, qmp.StatusPostcopyRecover:
			case qmp.StatusPostcopyRecoverSetup:
				if s.side == SideDestination {
					continue
				}
			default:
				continue
			}
			if sent[s.side] {
				continue
			}
			if s.side == SideDestination && r.pc.stuckRecover && src == qmp.StatusPostcopyRecover {
				continue // under the source's resume handshake
			}
			sent[s.side] = true
			r.log.Info("migrate-pause", "side", s.side, "status", s.st)
			if err := r.do(ctx, s.side, "migrate-pause", s.c.MigratePause); err != nil {
				if !isQMPError(err) {
					return false, r.postcopyCallErr(ctx, s.side, "migrate-pause", err)
				}
				r.log.Debug("migrate-pause refused", "side", s.side, "err", err)
				if s.side == SideSource && s.st == qmp.StatusPostcopyRecover {
					r.pc.stuckRecover = true
				}
			}
		}
		if !time.Now().Before(limit) {
			r.log.Debug("not both paused", "source", src, "destination", dst)
			return false, nil
		}
		if _, err := r.watchFor(ctx, r.recoveryPoll()); err != nil {
			return false, err
		}
	}
}

// handshakeHeld reports whether the source sits in postcopy-recover (as
// pauseBoth last read it) and cannot be paused there.
func (r *run) handshakeHeld() bool {
	return r.pc.stuckRecover && r.lastInfo != nil && r.lastInfo.Status == qmp.StatusPostcopyRecover
}

// recoverOnce is one attempt: the destination listens again, the source
// resumes, and the attempt waits for both to run postcopy again (ok), or
// for it to fail (detail says why).
func (r *run) recoverOnce(ctx context.Context) (ok bool, detail string, err error) {
	uri := r.listen.String()
	r.log.Info("migrate-recover", "uri", uri)
	var refused error
	if err := r.do(ctx, SideDestination, "migrate-recover", func(c context.Context) error { return r.dst.MigrateRecover(c, uri) }); err != nil {
		if !isQMPError(err) {
			return false, "", r.postcopyCallErr(ctx, SideDestination, "migrate-recover", err)
		}
		// It may listen already since an earlier attempt (QEMU refuses a
		// second migrate-recover then): the resume tells. A destination
		// still in postcopy-paused that does not say so (7.1 to 9.0 drop
		// the old listener and listen again) failed to listen: the source
		// is not sent towards nobody (7.2's source, its connection cut
		// in postcopy-recover, hangs there for good; CI, 7.2's bind of the
		// port failed once as the paused connection closed), and the next
		// attempt asks again.
		refused = err
		r.log.Debug("migrate-recover refused", "err", err)
		dst, qerr := r.dstStatus(ctx)
		if qerr != nil {
			return false, "", qerr
		}
		if dst == qmp.StatusPostcopyPaused && !strings.Contains(err.Error(), "triggered already") {
			return false, "the destination could not listen again: " + err.Error(), nil
		}
	}
	if r.listen.NeedsPort() && refused == nil {
		// Adopted without the port the migration used: QEMU picked one.
		ch, err := ask(r, ctx, SideDestination, "read listening port", func(c context.Context) (transport.Channel, error) {
			return resolvePort(c, r.dst, r.listen)
		})
		if err != nil {
			return false, "", r.postcopyCallErr(ctx, SideDestination, "read listening port", err)
		}
		if err := r.listensAt(ch); err != nil {
			return false, "", r.errorf(SideDestination, "read listening port", err)
		}
	}
	args := r.migCh.MigrateArgs(r.srcForm)
	args.Resume = true
	r.log.Info("migrate resume", "uri", r.migCh.String())
	if err := r.do(ctx, SideSource, "migrate", func(c context.Context) error { return r.src.Migrate(c, args) }); err != nil {
		if !isQMPError(err) {
			return false, "", r.postcopyCallErr(ctx, SideSource, "migrate", err)
		}
		d := "the source refused to resume: " + err.Error()
		if refused != nil {
			d += "; the destination refused migrate-recover: " + refused.Error()
		}
		return false, d, nil
	}
	return r.awaitResume(ctx, false)
}

// awaitResume waits, for at most the stall timeout, for a resume handshake
// to bring both sides back to postcopy (ok) or to fail (detail says why).
// left: the source is known to have left postcopy-paused already.
func (r *run) awaitResume(ctx context.Context, left bool) (ok bool, detail string, err error) {
	limit := time.Now().Add(r.cfg.postcopyStall())
	for {
		src, dst, err := r.postcopyStatus(ctx)
		if err != nil {
			return false, "", err
		}
		switch {
		case src == qmp.StatusCompleted:
			return true, "", nil
		case src == qmp.StatusPostcopyActive && (dst == qmp.StatusPostcopyActive || dst == qmp.StatusCompleted):
			return true, "", nil
		case src == qmp.StatusPostcopyPaused && left:
			return false, "the link broke again during the handshake: " + r.srcErrorDesc(ctx), nil
		case src != qmp.StatusPostcopyPaused:
			left = true
		}
		if !time.Now().Before(limit) {
			return false, fmt.Sprintf("not recovered within %v (source %s, destination %s)", r.cfg.postcopyStall(), src, dst), nil
		}
		moved, err := r.watchFor(ctx, r.recoveryPoll())
		if err != nil {
			return false, "", err
		}
		left = left || moved
	}
}

// srcErrorDesc is the source's error-desc, for a failed attempt's detail.
func (r *run) srcErrorDesc(ctx context.Context) string {
	info, err := ask(r, ctx, SideSource, "query-migrate", r.src.QueryMigrate)
	if err != nil || info.ErrorDesc == "" {
		return "source back in postcopy-paused"
	}
	return info.ErrorDesc
}

// postcopyStatus reads both sides' migration status.
func (r *run) postcopyStatus(ctx context.Context) (src, dst qmp.MigrationStatus, err error) {
	if err := r.lostSide(); err != nil {
		return "", "", err
	}
	info, err := ask(r, ctx, SideSource, "query-migrate", r.src.QueryMigrate)
	if err != nil {
		return "", "", r.postcopyCallErr(ctx, SideSource, "query-migrate", err)
	}
	r.lastInfo = info
	dst, err = r.dstStatus(ctx)
	if err != nil {
		return "", "", err
	}
	return info.Status, dst, nil
}

// dstStatus reads the destination's migration status in postcopy: its
// answer to an in-band query-migrate, or, when that goes unanswered for
// dstProbeGrace while its last MIGRATION event reports postcopy paused or
// recovering (and out-of-band commands can reach it), that event's status;
// after a loss, one whose events still say postcopy-active is followed so
// too if it answers out of band (followDstEvents). At most one query, and
// one out-of-band probe, is in flight: one left unanswered by an earlier
// read is waited for again rather than sent anew, and one answered before
// this read began is stale and dropped. Unanswered otherwise within
// UnresponsiveTimeout of being sent: ErrUnresponsive, as from ask.
func (r *run) dstStatus(ctx context.Context) (qmp.MigrationStatus, error) {
	w := &r.pc
	if w.live != nil && len(w.live.done) > 0 {
		// Answered since the last read: stale (the process may have
		// stopped since).
		w.live.cancel()
		w.live = nil
	}
	if w.probe != nil {
		select {
		case <-w.probe.done:
			// Answered since the last read: the monitor is not blocked
			// any more, but the answer is stale.
			w.probe.cancel()
			w.probe = nil
			w.dstBlocked = false
		default:
		}
	}
	if w.probe == nil {
		pctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		p := &dstProbe{done: make(chan dstAnswer, 1), cancel: cancel, sent: time.Now()}
		go func() {
			info, err := r.dst.QueryMigrate(pctx)
			p.done <- dstAnswer{info, err}
		}()
		w.probe = p
	}
	p := w.probe
	unresponsive := r.cfg.unresponsiveTimeout()
	grace := min(dstProbeGrace, unresponsive)
	var dstEv <-chan qmp.Event
	if r.dstSub != nil {
		dstEv = r.dstSub.C
	}
	dstDone := r.dst.Done()
	t := time.NewTimer(0)
	defer t.Stop()
	<-t.C
	for {
		waited := time.Since(p.sent)
		if r.followDstEvents(waited >= grace, unresponsive-waited) {
			r.drain(SideDestination, r.dstSub)
			return w.dstEv, nil
		}
		if waited >= unresponsive {
			return "", r.unanswered(SideDestination, "query-migrate", callBound{wait: unresponsive})
		}
		next := unresponsive - waited
		if waited < grace {
			next = grace - waited
		} else if w.live != nil {
			next = min(next, dstProbeGrace) // look again for its late answer
		}
		t.Reset(next)
		select {
		case a := <-p.done:
			p.cancel()
			w.probe = nil
			if w.dstBlocked {
				w.dstBlocked = false
				r.log.Info("the destination's monitor answers in-band commands again", "after", time.Since(p.sent).Round(time.Millisecond))
			}
			if a.err != nil {
				return "", r.postcopyCallErr(ctx, SideDestination, "query-migrate", a.err)
			}
			return a.info.Status, nil
		case ev, ok := <-dstEv:
			if !ok {
				dstEv = nil
				continue
			}
			r.event(SideDestination, ev)
		case <-dstDone:
			if err := r.lostSide(); err != nil {
				return "", err
			}
			dstDone = nil
		case <-t.C:
		}
		t.Stop()
	}
}

// followDstEvents reports whether the destination's status is to be taken
// from its events: its in-band monitor is blocked (graceSpent: the probe
// went unanswered for dstProbeGrace) while its events report postcopy
// paused or recovering, and out-of-band commands reach it. Its events may
// also still report postcopy-active when the link went into a black hole
// while its main thread waited for a page (nothing broke, so nothing says
// paused): once the engine took the link for lost, a destination that
// answers an out-of-band probe (dstAlive) is followed too, and paused out
// of band as any side of a lost link; a stopped process (SIGSTOP) answers
// nothing and is waited for up to UnresponsiveTimeout, as before (left is
// what remains of it).
func (r *run) followDstEvents(graceSpent bool, left time.Duration) bool {
	w := &r.pc
	if !r.dst.OOB() || r.dstSub == nil {
		return false
	}
	if w.dstBlocked {
		return true
	}
	if !graceSpent {
		return false
	}
	why := "its events report " + string(w.dstEv)
	switch w.dstEv {
	case qmp.StatusPostcopyPaused, qmp.StatusPostcopyRecover, qmp.StatusPostcopyRecoverSetup:
	case qmp.StatusPostcopyActive:
		if r.stage != stagePostcopyPaused || left <= 0 || !r.dstAlive(left) {
			return false
		}
		if len(w.probe.done) > 0 {
			return false // its in-band answer came meanwhile: dstStatus reads it
		}
		why = "it answers out of band and its events still report postcopy-active (the link lost in a black hole)"
	default:
		return false
	}
	w.dstBlocked = true
	r.log.Warn("the destination's monitor answers no in-band command while "+why+
		" (its main thread waits for a page, loading the device state?): following its MIGRATION events, recovering out of band",
		"waited", time.Since(w.probe.sent).Round(time.Millisecond))
	return true
}

// dstAlive probes the destination out of band with query-yank, which QEMU
// runs in its monitor's own thread, harmless whenever it runs: an answer
// (an error included) within dstProbeGrace, and at most wait, says its
// process runs though its main thread is blocked. At most one probe is in
// flight: a stopped process keeps it queued (it is waited for again, not
// sent anew), and QEMU stops reading a monitor whose out-of-band queue is
// full.
func (r *run) dstAlive(wait time.Duration) bool {
	w := &r.pc
	if w.live == nil {
		ctx, cancel := context.WithCancel(context.Background())
		p := &liveProbe{done: make(chan error, 1), cancel: cancel}
		go func() { p.done <- r.dst.ExecuteOOB(ctx, "query-yank", nil, nil) }()
		w.live = p
	}
	t := time.NewTimer(max(min(dstProbeGrace, wait), 0))
	defer t.Stop()
	select {
	case err := <-w.live.done:
		w.live.cancel()
		w.live = nil
		alive := err == nil || isQMPError(err)
		r.log.Debug("the destination's out-of-band probe answered", "alive", alive, "err", err)
		return alive
	case <-t.C:
		r.log.Debug("the destination's out-of-band probe is unanswered", "waited", min(dstProbeGrace, wait))
		return false
	}
}

// endProbe gives up the destination's query in flight (the run ends).
func (r *run) endProbe() {
	if r.pc.probe != nil {
		r.pc.probe.cancel()
		r.pc.probe = nil
	}
	if r.pc.live != nil {
		r.pc.live.cancel()
		r.pc.live = nil
	}
}

func (r *run) recoveryPoll() time.Duration { return min(r.cfg.pollInterval(), 100*time.Millisecond) }

// watchFor waits d, or less when a side's MIGRATION event arrives; moved
// says the source reported a status other than postcopy-paused meanwhile.
// A QEMU that goes away ends it with the error that says what is lost.
func (r *run) watchFor(ctx context.Context, d time.Duration) (moved bool, err error) {
	t := time.NewTimer(d)
	defer t.Stop()
	var srcEv, dstEv <-chan qmp.Event
	if r.srcSub != nil {
		srcEv = r.srcSub.C
	}
	if r.dstSub != nil {
		dstEv = r.dstSub.C
	}
	for {
		select {
		case <-r.dst.Done():
			return moved, r.lostSide()
		case <-r.src.Done():
			return moved, r.lostSide()
		case ev, ok := <-srcEv:
			if !ok {
				srcEv = nil
				continue
			}
			r.event(SideSource, ev)
			if st := migrationStatus(ev); st != "" && st != qmp.StatusPostcopyPaused {
				moved = true
			}
			if ev.Name == "MIGRATION" {
				return moved, nil
			}
		case ev, ok := <-dstEv:
			if !ok {
				dstEv = nil
				continue
			}
			r.event(SideDestination, ev)
		case q := <-r.job.reqs:
			if err := r.serve(ctx, q); err != nil {
				return moved, err
			}
		case <-t.C:
			return moved, nil
		}
	}
}

func migrationStatus(ev qmp.Event) qmp.MigrationStatus {
	if ev.Name != "MIGRATION" {
		return ""
	}
	var d struct {
		Status qmp.MigrationStatus `json:"status"`
	}
	_ = json.Unmarshal(ev.Data, &d)
	return d.Status
}

// lostSide is the error for a QEMU gone in postcopy (nil while both are
// there): the destination first (the guest ran there).
func (r *run) lostSide() error {
	switch {
	case r.dst.Err() != nil && r.src.Err() != nil:
		return r.bothGone()
	case r.dst.Err() != nil:
		if handled, err := r.dstGoneAtPostcopyStart(); handled {
			return err
		}
		if r.src.Err() != nil {
			// Seen gone meanwhile (its query failed): the source went
			// first, the destination with it.
			return r.bothGone()
		}
		r.res.Lost = GuestLost
		return r.errorf(SideDestination, "postcopy", fmt.Errorf("%w: %w: %w: %w", ErrPostcopyFailed, ErrGuestLost, ErrDestinationGone, r.dst.Err()))
	case r.src.Err() != nil:
		// A destination still loading the device state may go down with
		// it (7.2, source killed at postcopy's first pages): given a
		// moment, both gone is the guest lost, not pages lost.
		grace := time.NewTimer(srcGoneGrace)
		defer grace.Stop()
		select {
		case <-r.dst.Done():
			return r.bothGone()
		case <-grace.C:
		}
		if err := r.dstNeverTookOver(); err != nil {
			return err
		}
		r.res.Lost = PagesLost
		return r.errorf(SideSource, "postcopy", fmt.Errorf("%w: %w: %w: %w", ErrPostcopyFailed, ErrPagesLost, ErrSourceGone, r.src.Err()))
	}
	return nil
}

// dstNeverTookOver is the error for a source gone in stage postcopy
// while the destination had not switched to postcopy yet (10.0, source
// killed at postcopy's first sample: the destination stays in active,
// loading): it never ran the guest and cannot, so the guest is lost, not
// held by the destination. nil when the destination reports postcopy, or
// does not answer within a moment (a main thread blocked on a page: it had
// switched).
func (r *run) dstNeverTookOver() error {
	if r.been(stagePostcopyPaused) || r.dst.Err() != nil || r.silent.isMute(SideDestination) {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), dstProbeGrace)
	defer cancel()
	info, err := r.dst.QueryMigrate(ctx)
	if err != nil || info.Status.Postcopy() || info.Status == qmp.StatusCompleted {
		return nil
	}
	r.res.Lost = GuestLost
	lost := &quietWrap{"guest lost: the source QEMU went away before the destination took the guest over (its incoming migration " + string(info.Status) + ", not postcopy): neither holds a guest that can run", ErrGuestLost}
	return r.errorf(SideSource, "postcopy", fmt.Errorf("%w: %w: %w: %w", ErrPostcopyFailed, lost, ErrSourceGone, r.src.Err()))
}

// bothGone is the error for both QEMUs gone in postcopy: the guest is lost.
func (r *run) bothGone() error {
	r.res.Lost = GuestLost
	lost := &quietWrap{"guest lost: both QEMUs went away", ErrGuestLost}
	return r.errorf(SideSource, "postcopy", fmt.Errorf("%w: %w: %w, %w: %w", ErrPostcopyFailed, lost, ErrSourceGone, ErrDestinationGone, r.src.Err()))
}

// srcGoneGrace is how long a source gone in postcopy is reported late, to
// see whether the destination goes down with it.
const srcGoneGrace = 500 * time.Millisecond

// postcopyStartWait is how long a source still in pre-copy, device or
// postcopy-active is watched, once the destination went away in stage
// postcopy before any loss, for the failure that says postcopy's start
// failed (or never took effect: QEMU had not switched yet).
const postcopyStartWait = time.Second

// dstGoneAtPostcopyStart tells a destination that went away as postcopy
// started, before it ran the guest, from one that went away running it:
// QEMU fails the source's migration in the first case (and resumes its
// guest), pauses it in the second. The source is read for up to
// postcopyStartWait while it still reports postcopy-active. handled: the
// start failed, err is the rollback's cause (postcopyStartFailed) or what
// it found instead; not handled: the guest is lost, as lostSide says.
func (r *run) dstGoneAtPostcopyStart() (handled bool, err error) {
	if r.stage != stagePostcopy || r.been(stagePostcopyPaused) || r.src.Err() != nil || r.pc.startCheck {
		return false, nil
	}
	r.pc.startCheck = true // not again from within (postcopyCallErr asks lostSide)
	defer func() { r.pc.startCheck = false }()
	ctx, cancel := context.WithTimeout(context.Background(), postcopyStartWait+r.cfg.unresponsiveTimeout())
	defer cancel()
	until := time.Now().Add(postcopyStartWait)
	for {
		info, qerr := ask(r, ctx, SideSource, "query-migrate", r.src.QueryMigrate)
		if qerr != nil {
			return false, nil
		}
		switch {
		case info.Status == qmp.StatusFailed:
			if err := r.postcopyStartFailed(ctx, info); err != nil {
				return true, err
			}
			if r.stage.postcopy() {
				return false, nil
			}
			return true, r.dstGone("postcopy start")
		case !slices.Contains([]qmp.MigrationStatus{qmp.StatusActive, qmp.StatusDevice, qmp.StatusPostcopyDevice, qmp.StatusPostcopyActive}, info.Status) ||
			!time.Now().Before(until):
			// Paused (postcopy had taken over), or still undecided.
			return false, nil
		}
		time.Sleep(r.recoveryPoll())
	}
}

// postcopyCallErr classifies a failed command in postcopy: a QEMU gone
// (its monitor closed, maybe a moment after the command failed) is what is
// lost; anything else as callErr.
func (r *run) postcopyCallErr(ctx context.Context, side Side, op string, err error) error {
	if isUnanswered(err) {
		return err
	}
	if lerr := r.lostSide(); lerr != nil {
		return lerr
	}
	c := r.client(side)
	grace := time.NewTimer(500 * time.Millisecond)
	defer grace.Stop()
	select {
	case <-c.Done():
		return r.lostSide()
	case <-grace.C:
	}
	return r.callErr(ctx, side, op, err)
}
