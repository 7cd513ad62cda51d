package engine

import (
	"context"
	"fmt"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/strategy"
)

// converge polls the source until the migration completed, applying the
// strategy's decisions; it also drives the switchover.
func (r *run) converge(ctx context.Context) error {
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
	ignoring := false
	for {
		if !ignoring && !r.stage.cancellable() {
			// The guest runs on the destination (postcopy) or the source
			// completed: a cancel can only be ignored from here on, and no
			// call may fail for one that lands while it is under way
			// (measured on 10.0: a cancel at the first postcopy sample
			// ended the run "failure during postcopy: cancelled").
			ignoring = true
			caller := ctx
			ctx = context.WithoutCancel(ctx)
			stop := context.AfterFunc(caller, func() {
				r.log.Warn("cancel ignored: postcopy started, the migration must finish", "err", caller.Err())
			})
			defer stop()
		}
		info, err := ask(r, ctx, SideSource, "query-migrate", r.src.QueryMigrate)
		if err != nil {
			if r.stage.postcopy() {
				return r.postcopyCallErr(ctx, SideSource, "query-migrate", err)
			}
			if r.dst.Err() != nil && ctx.Err() == nil {
				return r.dstGone("query-migrate")
			}
			return r.callErr(ctx, SideSource, "query-migrate", err)
		}
		r.lastInfo = info
		if err := r.pollDirtyRate(ctx); err != nil {
			return err
		}
		if r.mirror != nil && r.stage < stageSwitchover {
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
			r.enter(stageSourceDone)
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
			if err := r.postcopyStartFailed(ctx, info); err != nil {
				return err
			}
			if r.dst.Err() != nil {
				return r.dstGone("incoming migration: source reports " + info.ErrorDesc)
			}
			return r.errorf(SideSource, "migrate", fmt.Errorf("%w: %s%s", ErrMigrationFailed, orUnknown(info.ErrorDesc), r.tlsHint(info)))
		case s == qmp.StatusCancelled || s == qmp.StatusCancelling:
			return r.errorf(SideSource, "migrate", fmt.Errorf("%w: cancelled outside the engine (status %s)", ErrMigrationFailed, s))
		case s.Postcopy():
			if !r.stage.postcopy() {
				r.enter(stagePostcopy)
			}
			why, err := r.postcopyLost(ctx, info)
			if err != nil {
				return err
			}
			if why != "" {
				if err := r.recoverPostcopy(ctx, why); err != nil {
					return err
				}
				if ctx.Err() != nil {
					r.log.Warn("cancel ignored: postcopy started, the migration must finish", "err", ctx.Err())
					ctx = context.WithoutCancel(ctx)
				}
				continue // poll again at once
			}
		case s == qmp.StatusPreSwitchover && r.stage < stageSwitchover:
			if err := r.switchOver(ctx); err != nil {
				return err
			}
			continue
		case s == qmp.StatusPreSwitchover:
			// migrate-continue sent; wait for QEMU to move on.
		case s == qmp.StatusDevice:
			r.sourceStopped()
		}

		// Past the switchover the engine finishes: nothing to decide.
		if !r.m.Done() && r.stage.steered() {
			if err := r.decide(ctx, r.m.Step(sample)); err != nil {
				return err
			}
		}

		// Safety nets under the strategy. The budget no longer holds once
		// the switchover began (the stop-and-copy included: a cancel then
		// lands only once the device state is written).
		if r.stage.budgeted() {
			if err := r.budgetSpent(poll, ""); err != nil {
				return err
			}
		}
		if info.RAM != nil && info.RAM.Transferred > lastTransferred {
			lastTransferred = info.RAM.Transferred
			lastProgress = time.Now()
		}
		if pt := limits.ProgressTimeout; pt > 0 && r.stage.progressWatched() && time.Since(lastProgress) >= pt+poll {
			return r.errorf(SideSource, "progress", fmt.Errorf("%w: nothing transferred for %v", ErrAborted, time.Since(lastProgress).Round(time.Millisecond)))
		}

		// Wait for the next poll or an event that says something changed.
		timer.Reset(poll)
	wait:
		for {
			select {
			case <-ctx.Done():
				if r.stage.cancellable() {
					return r.cancelled(ctx, "wait for migration")
				}
				// The guest already runs on the destination: there is no way
				// back, so finishing is the only safe outcome of a cancel.
				r.log.Warn("cancel ignored: postcopy started, the migration must finish", "err", ctx.Err())
				ctx = context.WithoutCancel(ctx)
			case <-r.dst.Done():
				if r.stage.postcopy() {
					return r.lostSide()
				}
				return r.dstGone("monitor")
			case <-r.src.Done():
				if r.stage.postcopy() {
					return r.lostSide()
				}
				return r.errorf(SideSource, "monitor", fmt.Errorf("%w: %w", ErrSourceGone, r.src.Err()))
			case ev, ok := <-srcEv:
				if !ok {
					srcEv = nil
					continue
				}
				r.event(SideSource, ev)
				if ev.Name == "STOP" {
					r.sourceStopped() // vCPUs stopped: stop-and-copy
					continue
				}
				break wait
			case ev, ok := <-dstEv:
				if !ok {
					dstEv = nil
					continue
				}
				r.event(SideDestination, ev)
				r.dstEvent(ev)
				if r.pc.dstPaused {
					break wait
				}
			case q := <-r.job.reqs:
				if err := r.serve(ctx, q); err != nil {
					return err
				}
				break wait // poll at once: the strategy sees the change
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

// postcopyStartFailed handles a source whose migration failed in stage
// postcopy before any loss of its link (postcopy running, QEMU pauses it
// on a stream error instead): postcopy's start failed, the destination
// dying as it started (CI's 7.2 run). Found running there (QEMU resumed
// it), with the destination gone or not running the guest, the guest's
// latest state is on the source: the stage goes back to pre-copy and the
// migration is rolled back as any failure before the switchover (nil: the
// caller reports the failure). Found stopped, as 7.2 leaves it, with the
// destination gone: the guest is lost as in postcopy (the destination may
// have run it; the source is never resumed). Otherwise nothing is assumed:
// the error says what was seen.
func (r *run) postcopyStartFailed(ctx context.Context, info *qmp.MigrationInfo) error {
	if r.stage != stagePostcopy || r.been(stagePostcopyPaused) {
		return nil
	}
	ctx = context.WithoutCancel(ctx) // a cancel changes nothing here
	st, err := ask(r, ctx, SideSource, "query-status", r.src.QueryStatus)
	if err != nil {
		// Not postcopyCallErr: it may ask lostSide, which led here.
		return r.errorf(SideSource, "query-status", fmt.Errorf("%w: after postcopy failed as it started: %w", ErrPostcopyFailed, err))
	}
	// The destination's RESUME, queued or seen, says it ran the guest.
	r.drain(SideDestination, r.dstSub)
	if r.dstAt == dstRan {
		r.res.StateUnknown = true
		return r.errorf(SideDestination, "postcopy", fmt.Errorf("%w: %w: the source's migration failed (%s) after the destination ran the guest; the source's guest is %s: check both QEMUs (the two copies diverged)",
			ErrPostcopyFailed, ErrMigrationFailed, orUnknown(info.ErrorDesc), st.Status))
	}
	why := fmt.Errorf("%w: postcopy failed as it started: %s", ErrMigrationFailed, orUnknown(info.ErrorDesc))
	if !st.Running {
		if r.dst.Err() != nil {
			// Measured on 7.2 (3 of 4 kills at postcopy's first sample):
			// the source's guest left stopped (postmigrate). Whether the
			// destination ran it before it died cannot be told: the source
			// is never resumed, as for any guest lost in postcopy.
			r.res.Lost = GuestLost
			return r.errorf(SideDestination, "postcopy", fmt.Errorf("%w: %w: %w as postcopy started; QEMU failed the source's migration (%s) and left its guest %s, with its state of the switchover (the destination may have run the guest): %w",
				ErrPostcopyFailed, ErrGuestLost, ErrDestinationGone, orUnknown(info.ErrorDesc), st.Status, r.dst.Err()))
		}
		return r.errorf(SideSource, "postcopy", fmt.Errorf("%w; the source's guest is %s, not resumed by QEMU: it is left as it is (the destination may have run the guest)", why, st.Status))
	}
	if r.dst.Err() == nil {
		dst, err := ask(r, ctx, SideDestination, "query-status", r.dst.QueryStatus)
		if err != nil || dst.Running {
			r.res.StateUnknown = true
			return r.errorf(SideDestination, "postcopy", fmt.Errorf("%w: %w; QEMU resumed the guest on the source, and the destination %s: check both QEMUs", ErrPostcopyFailed, why, map[bool]string{true: "runs it too", false: "did not answer"}[err == nil]))
		}
	}
	r.log.Warn("postcopy failed as it started, before the destination ran the guest; QEMU resumed it on the source: rolling back", "desc", info.ErrorDesc)
	r.revert(stagePostcopy)
	r.res.Undone = append(r.res.Undone, "source: guest resumed by QEMU (postcopy failed as it started, before the destination ran it)")
	return nil
}

// dstGone is the error for a destination that died mid-migration. A
// source that goes away with it (within a moment) is the cause: a
// destination whose stream was cut by the source's death exits too.
func (r *run) dstGone(op string) error {
	grace := time.NewTimer(500 * time.Millisecond)
	defer grace.Stop()
	select {
	case <-r.src.Done():
		return r.errorf(SideSource, op, fmt.Errorf("%w: %w: %w (the destination exited with it)", ErrMigrationFailed, ErrSourceGone, r.src.Err()))
	case <-grace.C:
	}
	cause := r.dst.Err()
	if cause == nil {
		cause = qmp.ErrClosed
	}
	return r.errorf(SideDestination, op, fmt.Errorf("%w: %w: %w", ErrMigrationFailed, ErrDestinationGone, cause))
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
		if r.dstAt != dstKept {
			r.dstAt = dstRan
		}
	case side == SideDestination && ev.Name == "MIGRATION":
		if st := migrationStatus(ev); st != "" {
			r.pc.dstEv = st
		}
	}
}

// sourceStopped records that QEMU stopped the source's vCPUs for its
// stop-and-copy (a STOP event, or status device): the switchover began.
// Where the engine paused the source itself, or the switchover is further
// on already, nothing changes.
func (r *run) sourceStopped() {
	switch r.stage {
	case stageStart:
		// migrate had not answered yet: a tiny guest can get there at once.
		r.enter(stagePrecopy)
		r.enter(stageStopCopy)
	case stagePrecopy:
		r.enter(stageStopCopy)
	}
}

func eventTime(ev qmp.Event) time.Time {
	if ev.Time.IsZero() {
		return time.Now()
	}
	return ev.Time
}

func (r *run) sample(info *qmp.MigrationInfo) strategy.Sample {
	s := strategy.Sample{
		Elapsed:          r.elapsed(),
		Status:           string(info.Status),
		ExpectedDowntime: info.ExpectedDowntime,
		ThrottlePercent:  info.CPUThrottlePercentage,
		DowntimeLimit:    r.downtimeLimit,
		SourcePaused:     r.been(stagePaused),
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
