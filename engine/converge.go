package engine

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/strategy"
	"github.com/qmigrate/qmigrate/transport"
)

// start waits for the mirrors, starts the incoming side, then the migration.
func (r *run) start(ctx context.Context) error {
	r.setPhase(PhaseStart)
	if r.mirror != nil {
		if err := r.waitMirrors(ctx); err != nil {
			return err
		}
	}
	// Subscribe before the commands that cause the events.
	r.srcSub = r.src.SubscribeNames("MIGRATION", "MIGRATION_PASS", "STOP")
	r.dstSub = r.dst.SubscribeNames("MIGRATION", "RESUME")

	if r.ch.Scheme == transport.FD {
		if err := r.passFDs(ctx); err != nil {
			return err
		}
	}
	r.incoming = true // from the first attempt on, the destination is not reusable
	if err := r.migrateIncoming(ctx); err != nil {
		return r.callErr(ctx, SideDestination, "migrate-incoming", err)
	}
	if r.ch.Scheme == transport.Unix {
		r.pushUndo("", "destination: remove migration socket", func(ctx context.Context) (string, error) {
			// After a cancel the destination exits (exit-on-error); give it
			// a moment, then remove the socket it leaves behind. One that
			// completed its incoming migration as the cancel landed stays,
			// no longer listening. One that does not answer is left alone.
			if r.silent.isMute(SideDestination) {
				return "", nil
			}
			if !r.dstKept {
				t := time.NewTimer(2 * time.Second)
				defer t.Stop()
				select {
				case <-r.dst.Done():
				case <-t.C:
					return "", nil // still there and listening: the destination owns it
				case <-ctx.Done():
					return "", nil
				}
			}
			if err := transport.RemoveSocket(r.ch); err != nil {
				return "", err
			}
			return "destination: removed migration socket " + r.ch.Path, nil
		})
	}
	ch, err := ask(r, ctx, SideDestination, "read listening port", func(c context.Context) (transport.Channel, error) {
		return resolvePort(c, r.dst, r.ch)
	})
	if err != nil {
		return r.callErr(ctx, SideDestination, "read listening port", err)
	}
	r.migCh = ch
	// The source must end up running again after any rollback; then the
	// migration must be cancelled first (undo runs in reverse).
	r.pushUndo(SideSource, "source: resume guest", r.undoResumeSource)
	// Not skipped when the source stopped answering: it then cuts the
	// stream from the destination's side.
	r.pushUndo("", "source: cancel migration", r.undoCancel)
	if err := r.migrate(ctx, ch); err != nil {
		return r.callErr(ctx, SideSource, "migrate", err)
	}
	return nil
}

// migrateIncoming runs migrate-incoming in the destination's form, newest
// first: where QEMU refuses an argument of that form with QAPI's exact
// error (the command did not run), it retries in the older form
// (transport.Form.Fallback) and keeps the form that worked. exit-on-error
// is sent as true, QEMU's default, where the destination takes it.
func (r *run) migrateIncoming(ctx context.Context) error {
	for {
		args := r.ch.IncomingArgs(r.dstForm, true)
		r.log.Debug("migrate-incoming", "channel", r.ch.String(), "channels-form", args.Channels != nil, "exit-on-error", args.ExitOnError != nil)
		err := r.do(ctx, SideDestination, "migrate-incoming", func(c context.Context) error { return r.dst.MigrateIncoming(c, args) })
		if err == nil {
			return nil
		}
		older, ok := r.dstForm.Fallback(err)
		if !ok {
			return err
		}
		r.log.Debug("migrate-incoming refused an argument: older form next", "err", err)
		r.dstForm = older
	}
}

// migrate runs migrate on the source towards ch in the source's form,
// found out the same way as migrateIncoming's (the source may be another
// QEMU version than the destination). migrate has no exit-on-error: only
// the channels form falls back.
func (r *run) migrate(ctx context.Context, ch transport.Channel) error {
	for {
		args := ch.MigrateArgs(r.srcForm)
		r.log.Debug("migrate", "channel", ch.String(), "channels-form", args.Channels != nil)
		err := r.do(ctx, SideSource, "migrate", func(c context.Context) error { return r.src.Migrate(c, args) })
		if err == nil {
			return nil
		}
		older, ok := r.srcForm.Fallback(err)
		if !ok || older.Channels == r.srcForm.Channels {
			return err
		}
		r.log.Debug("migrate refused an argument: older form next", "err", err)
		r.srcForm = older
	}
}

// waitMirrors polls the mirrors until all are READY. Each poll is a
// strategy sample of the mirror phase (Mirroring); its decisions are applied
// (MirrorWriteBlocking, Abort) and fed back. The budget's safety net holds
// here too: Elapsed counts from the start of Migrate.
func (r *run) waitMirrors(ctx context.Context) error {
	poll := r.cfg.pollInterval()
	timer := time.NewTimer(poll)
	defer timer.Stop()
	for {
		ps, err := ask(r, ctx, SideSource, "query-block-jobs", r.mirror.Progress)
		if err != nil {
			if ctx.Err() != nil {
				return r.cancelled(ctx, "wait for mirrors")
			}
			if isUnanswered(err) {
				return err
			}
			return r.errorf("", "wait for mirrors", err)
		}
		r.diskProgress(ps)
		ready := true
		for _, p := range ps {
			ready = ready && p.Ready
		}
		if ready {
			r.mirrorsReady = true
			return nil
		}
		if !r.m.Done() {
			s := r.sample(&qmp.MigrationInfo{}) // no RAM migration yet: Status "", RAM fields zero
			s.Mirroring = true
			if err := r.decide(ctx, r.m.Step(s)); err != nil {
				return err
			}
		}
		if err := r.budgetSpent(poll, " waiting for the mirrors"); err != nil {
			return err
		}
		timer.Reset(poll)
		select {
		case <-ctx.Done():
			return r.cancelled(ctx, "wait for mirrors")
		case <-r.dst.Done():
			return r.errorf("", "wait for mirrors", fmt.Errorf("%w: %w", blockmirror.ErrDestinationGone, r.dst.Err()))
		case <-r.src.Done():
			return r.errorf("", "wait for mirrors", fmt.Errorf("%w: %w", blockmirror.ErrSourceGone, r.src.Err()))
		case <-timer.C:
		}
	}
}

// decide applies a non-wait decision, feeds its outcome back, records and
// reports it. An Abort ends the migration with ErrAborted.
func (r *run) decide(ctx context.Context, d strategy.Decision) error {
	if d.Action == strategy.Wait {
		return nil
	}
	aerr := r.apply(ctx, d)
	r.m.Applied(d, aerr)
	r.res.Decisions = append(r.res.Decisions, d)
	r.log.Debug("decision", "action", d.Action, "reason", d.Reason, "err", aerr)
	r.emit(Event{Kind: EventDecision, Decision: &d, DecisionErr: aerr})
	if d.Action == strategy.Abort {
		return r.errorf("", "strategy", fmt.Errorf("%w: %s", ErrAborted, d.Reason))
	}
	if aerr != nil && ctx.Err() != nil {
		return r.cancelled(ctx, "apply decision")
	}
	if isUnanswered(aerr) {
		return aerr
	}
	return nil
}

// passFDs makes a socketpair and hands one end to each QEMU (getfd). QEMU
// consumes the descriptor at migrate-incoming / migrate; the undo closes
// whatever was not consumed. The engine's own copies are closed at once.
func (r *run) passFDs(ctx context.Context) error {
	name := "qmigrate-" + randomHex(6)
	r.ch.FDName = name
	dfd, sfd, err := transport.Socketpair()
	if err != nil {
		return r.errorf("", "socketpair", err)
	}
	defer unix.Close(dfd)
	defer unix.Close(sfd)
	for _, p := range []struct {
		side Side
		fd   int
	}{{SideDestination, dfd}, {SideSource, sfd}} {
		c := r.client(p.side)
		if err := r.do(ctx, p.side, "getfd", func(ctx context.Context) error { return c.Getfd(ctx, name, p.fd) }); err != nil {
			return r.callErr(ctx, p.side, "getfd", err)
		}
		side := p.side
		r.pushUndo("", string(side)+": close migration fd", func(ctx context.Context) (string, error) {
			if c.Err() != nil {
				return "", nil // QEMU gone, and its fds with it
			}
			if err := r.do(ctx, side, "closefd", func(ctx context.Context) error { return c.Closefd(ctx, name) }); err != nil {
				var qe *qmp.Error
				if errors.As(err, &qe) {
					return "", nil // consumed by the migration: nothing to close
				}
				return "", err
			}
			return fmt.Sprintf("%s: closed unused migration fd %s", side, name), nil
		})
	}
	return nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func (r *run) diskProgress(ps []blockmirror.Progress) {
	var done, total uint64
	for i := range ps {
		p := ps[i]
		done += p.Done
		total += p.Total
		r.emit(Event{Kind: EventDisk, Disk: &p})
	}
	r.storageDone, r.storageTotal = done, total
}

// converge polls the source until the migration completed, applying the
// strategy's decisions; it also drives the switchover.
func (r *run) converge(ctx context.Context) error {
	r.setPhase(PhaseConverge)
	poll := r.cfg.pollInterval()
	timer := time.NewTimer(0)
	defer timer.Stop()
	<-timer.C
	limits := r.cfg.Strategy.Limits
	var lastTransferred uint64
	lastProgress := time.Now()
	srcEv, dstEv := r.srcSub.C, r.dstSub.C
	if err := r.startDirtyRate(ctx); err != nil {
		return err
	}
	for {
		info, err := ask(r, ctx, SideSource, "query-migrate", r.src.QueryMigrate)
		if err != nil {
			if r.dst.Err() != nil && ctx.Err() == nil {
				return r.dstGone("query-migrate")
			}
			return r.callErr(ctx, SideSource, "query-migrate", err)
		}
		r.lastInfo = info
		if err := r.pollDirtyRate(ctx); err != nil {
			return err
		}
		if r.mirror != nil && !r.switchover {
			if ps, err := ask(r, ctx, SideSource, "query-block-jobs", r.mirror.Progress); err == nil {
				r.diskProgress(ps)
			} else if isUnanswered(err) {
				return err
			} else {
				r.log.Debug("mirror progress", "err", err)
			}
		}
		sample := r.sample(info)
		r.emit(Event{Kind: EventStats, Stats: statsOf(sample)})

		switch s := info.Status; {
		case s == qmp.StatusCompleted:
			// The STOP of the stop-and-copy may still be queued (the poll
			// waited out the stop-and-copy): the switchover happened all
			// the same.
			r.drain(SideSource, r.srcSub)
			r.setPhase(PhaseSwitchover)
			r.srcCompleted = true
			return nil
		case s == qmp.StatusFailed:
			// A dead destination is the usual cause; its monitor closes at
			// about the same moment. Give it a moment to say so.
			grace := time.NewTimer(500 * time.Millisecond)
			select {
			case <-r.dst.Done():
			case <-grace.C:
			}
			grace.Stop()
			if r.dst.Err() != nil {
				return r.dstGone("incoming migration: source reports " + info.ErrorDesc)
			}
			return r.errorf(SideSource, "migrate", fmt.Errorf("%w: %s%s", ErrMigrationFailed, orUnknown(info.ErrorDesc), r.tlsHint(info)))
		case s == qmp.StatusCancelled || s == qmp.StatusCancelling:
			return r.errorf(SideSource, "migrate", fmt.Errorf("%w: cancelled outside the engine (status %s)", ErrMigrationFailed, s))
		case s.Postcopy():
			r.postcopy = true
			r.setPhase(PhaseSwitchover)
		case s == qmp.StatusPreSwitchover && !r.switchover:
			if err := r.switchOver(ctx); err != nil {
				return err
			}
			continue
		case s == qmp.StatusPreSwitchover:
			// migrate-continue sent; wait for QEMU to move on.
		case s == qmp.StatusDevice:
			r.setPhase(PhaseSwitchover)
		}

		// Past the switchover the engine finishes: nothing to decide.
		if !r.m.Done() && !r.pastSwitchover() {
			if err := r.decide(ctx, r.m.Step(sample)); err != nil {
				return err
			}
		}

		// Safety nets under the strategy. The budget no longer holds once
		// the switchover began (the stop-and-copy included: a cancel then
		// lands only once the device state is written).
		finishing := r.postcopy || r.pausedByUs || r.switchover
		if !r.pastSwitchover() {
			if err := r.budgetSpent(poll, ""); err != nil {
				return err
			}
		}
		if info.RAM != nil && info.RAM.Transferred > lastTransferred {
			lastTransferred = info.RAM.Transferred
			lastProgress = time.Now()
		}
		if pt := limits.ProgressTimeout; pt > 0 && !finishing && time.Since(lastProgress) >= pt+poll {
			return r.errorf(SideSource, "progress", fmt.Errorf("%w: nothing transferred for %v", ErrAborted, time.Since(lastProgress).Round(time.Millisecond)))
		}

		// Wait for the next poll or an event that says something changed.
		timer.Reset(poll)
	wait:
		for {
			select {
			case <-ctx.Done():
				if !r.postcopy {
					return r.cancelled(ctx, "wait for migration")
				}
				// The guest already runs on the destination: there is no way
				// back, so finishing is the only safe outcome of a cancel.
				r.log.Warn("cancel ignored: postcopy started, the migration must finish", "err", ctx.Err())
				ctx = context.WithoutCancel(ctx)
			case <-r.dst.Done():
				if r.postcopy {
					return r.errorf(SideDestination, "monitor", fmt.Errorf("destination QEMU went away during postcopy: %w", r.dst.Err()))
				}
				return r.dstGone("monitor")
			case <-r.src.Done():
				return r.errorf(SideSource, "monitor", fmt.Errorf("source QEMU went away: %w", r.src.Err()))
			case ev, ok := <-srcEv:
				if !ok {
					srcEv = nil
					continue
				}
				r.event(SideSource, ev)
				if ev.Name == "STOP" {
					r.setPhase(PhaseSwitchover) // vCPUs stopped: stop-and-copy
					continue
				}
				break wait
			case ev, ok := <-dstEv:
				if !ok {
					dstEv = nil
					continue
				}
				r.event(SideDestination, ev)
			case <-timer.C:
				break wait
			}
		}
		timer.Stop() // Go 1.23+ timers: no stale tick after Stop/Reset
	}
}

// budgetSpent is the budget's safety net under the strategy (which aborts
// first): an error once the budget and a poll interval have passed.
func (r *run) budgetSpent(poll time.Duration, where string) error {
	if b := r.cfg.Strategy.Limits.Budget; b > 0 && r.elapsed() >= b+poll {
		return r.errorf("", "budget", fmt.Errorf("%w: budget %v exhausted at %v%s", ErrAborted, b, r.elapsed().Round(time.Millisecond), where))
	}
	return nil
}

func orUnknown(s string) string {
	if s == "" {
		return "QEMU gave no error-desc"
	}
	return s
}

// dstGone is the error for a destination that died mid-migration.
func (r *run) dstGone(op string) error {
	cause := r.dst.Err()
	if cause == nil {
		cause = qmp.ErrClosed
	}
	return r.errorf(SideDestination, op, fmt.Errorf("%w: destination QEMU went away: %w", ErrMigrationFailed, cause))
}

func (r *run) event(side Side, ev qmp.Event) {
	r.log.Debug("event", "side", side, "name", ev.Name, "data", string(ev.Data))
	switch {
	case side == SideSource && ev.Name == "STOP":
		if r.stopAt.IsZero() {
			r.stopAt = eventTime(ev)
		}
	case side == SideDestination && ev.Name == "RESUME":
		r.resumeAt = eventTime(ev)
		r.dstRan = true
	}
}

func eventTime(ev qmp.Event) time.Time {
	if ev.Time.IsZero() {
		return time.Now()
	}
	return ev.Time
}

// switchOver handles pre-switchover: finish the mirrors, then continue.
func (r *run) switchOver(ctx context.Context) error {
	r.switchover = true
	r.setPhase(PhaseSwitchover)
	if r.mirror != nil {
		r.log.Debug("finishing mirrors")
		if err := r.mirror.Finish(ctx); err != nil {
			if ctx.Err() != nil {
				return r.cancelled(ctx, "finish mirrors")
			}
			return r.errorf(SideSource, "finish mirrors", err)
		}
	}
	r.log.Debug("migrate-continue pre-switchover")
	if err := r.do(ctx, SideSource, "migrate-continue", func(c context.Context) error {
		return r.src.MigrateContinue(c, qmp.StatusPreSwitchover)
	}); err != nil {
		return r.callErr(ctx, SideSource, "migrate-continue", err)
	}
	return nil
}

func (r *run) sample(info *qmp.MigrationInfo) strategy.Sample {
	s := strategy.Sample{
		Elapsed:          r.elapsed(),
		Status:           string(info.Status),
		ExpectedDowntime: info.ExpectedDowntime,
		ThrottlePercent:  info.CPUThrottlePercentage,
		DowntimeLimit:    r.downtimeLimit,
		SourcePaused:     r.pausedByUs,
		StorageTotal:     r.storageTotal,
		GuestDirtyRate:   r.dirty.rate,
		GuestDirtyPeriod: r.dirty.period,
	}
	if r.storageTotal > r.storageDone {
		s.StorageRemaining = r.storageTotal - r.storageDone
	}
	if ram := info.RAM; ram != nil {
		s.Iteration = ram.DirtySyncCount
		s.RemainingBytes = ram.Remaining
		s.TransferredBytes = ram.Transferred
		s.TotalBytes = ram.Total
		s.DirtyRate = ram.DirtyRate()
		s.Throughput = ram.Throughput()
	}
	return s
}

func statsOf(s strategy.Sample) *Stats {
	return &Stats{
		Status:           s.Status,
		Iteration:        s.Iteration,
		TransferredBytes: s.TransferredBytes,
		RemainingBytes:   s.RemainingBytes,
		TotalBytes:       s.TotalBytes,
		DirtyRate:        s.DirtyRate,
		GuestDirtyRate:   s.GuestDirtyRate,
		Throughput:       s.Throughput,
		ExpectedDowntime: s.ExpectedDowntime,
		ThrottlePercent:  s.ThrottlePercent,
		DowntimeLimit:    s.DowntimeLimit,
		StorageRemaining: s.StorageRemaining,
		StorageTotal:     s.StorageTotal,
	}
}

// apply carries out one decision on the source. Each command is bounded
// (ask): one that gets no answer in time is an *Error decide ends the
// migration with.
func (r *run) apply(ctx context.Context, d strategy.Decision) error {
	setParams := func(p qmp.MigrationParameters) error {
		return r.do(ctx, SideSource, "migrate-set-parameters", func(c context.Context) error { return r.src.MigrateSetParameters(c, p) })
	}
	switch d.Action {
	case strategy.SetDowntime:
		lim := r.capDowntime(d.DowntimeLimit)
		if err := setParams(qmp.MigrationParameters{DowntimeLimit: qmp.Ptr(qmp.MillisOf(lim))}); err != nil {
			return err
		}
		r.downtimeLimit = lim
	case strategy.SetThrottle:
		if !r.setup.AutoConverge {
			return errors.New("auto-converge was not enabled before the start")
		}
		var p qmp.MigrationParameters
		r.throttleParams(&p, d.Throttle)
		return setParams(p)
	case strategy.StartPostcopy:
		if !r.setup.Postcopy {
			return errors.New("postcopy-ram was not enabled before the start")
		}
		// From the moment it is sent QEMU may switch at any moment: never
		// cancel again, unless QEMU refused it. (Set before sending, so the
		// command is bounded as past the switchover: by
		// UnresponsiveTimeout, not the budget; one left unanswered may
		// still be carried out.)
		r.postcopy = true
		if err := r.do(ctx, SideSource, "migrate-start-postcopy", r.src.MigrateStartPostcopy); err != nil {
			r.postcopy = !isQMPError(err) // refused: not started
			return err
		}
	case strategy.PauseSource:
		if !r.cfg.Strategy.Limits.AllowPause {
			return errors.New("pausing the source is not permitted")
		}
		r.pausedByUs = true // as for postcopy: the stop may land late
		if err := r.do(ctx, SideSource, "stop", r.src.Stop); err != nil {
			r.pausedByUs = !isQMPError(err) // refused: not paused
			return err
		}
	case strategy.MirrorWriteBlocking:
		if r.mirror == nil {
			return errors.New("no disk mirrors to switch")
		}
		if r.srcF.BlockJobChange {
			return r.do(ctx, SideSource, "block-job-change", r.mirror.SetWriteBlocking)
		}
		// No block-job-change: restart the mirrors in write-blocking mode
		// (a full re-copy). The strategy decides it only in the mirror
		// phase, before READY; refuse it after, whatever it decided.
		if r.mirrorsReady {
			return errors.New("write-blocking restart refused after READY (block-job-change missing on the source)")
		}
		return r.do(ctx, SideSource, "restart mirrors write-blocking", r.mirror.RestartWriteBlocking)
	case strategy.Abort:
	default:
		return fmt.Errorf("unknown action %q", d.Action)
	}
	return nil
}
