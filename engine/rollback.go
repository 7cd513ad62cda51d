package engine

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
)

// How a migrate_cancel near the end of a migration can end, on QEMU 7.2 and
// 10.0 alike. While the source's migration thread runs the stop-and-copy it
// holds the big lock, so a migrate_cancel sent then is carried out only
// once the device state was written: the destination may already have the
// whole stream.
//
//   - The cancel lands first (state cancelling): the stream is cut, the
//     source resumes the guest (cancelled), the destination's load fails
//     and it exits. The usual ending.
//   - The cancel lands after the whole stream was written but before the
//     migration thread set completed: 7.2 keeps cancelling (its
//     completed transition expects the old state) and resumes the source;
//     10.0 mostly the same (its file error check fails after the cancel's
//     shutdown). The source runs the guest again, and the destination,
//     which read the whole stream, completes its incoming migration and
//     starts the guest by itself unless it was started with -S or told not
//     to: two running copies of the guest.
//   - The cancel lands after the file error check: 10.0 sets completed
//     over cancelling. The source stays in postmigrate; the destination
//     has the guest.
//   - The cancel lands after completed: nothing to cancel.
//
// Whether the source resumes is QEMU's decision from the run state it
// recorded at the switchover (7.2: vm_was_running, reset to false for
// every migration and set only when the completion stops a running guest;
// 10.0: vm_old_state): a source that ends not running after a cancel while
// the guest ran before is possible, and so is a destination that completed.
//
// The rollback therefore keeps the guest in exactly one place: before
// migrate_cancel it sends stop to the destination (on a destination still
// in inmigrate stop only turns off its autostart, so one that completes
// after all stays paused; a running one is paused); after the source
// settled it looks at both sides: a source that stopped for good with a
// destination that completed its incoming migration means the migration
// completed (the engine finishes it, cont on the destination); otherwise
// the source keeps or gets the guest back (cont) and a destination holding
// a completed copy is left paused, noted in UndoErrors.

// destinationHoldTimeout bounds the stop sent to the destination before
// migrate_cancel, and destinationSettleTimeout the wait for a destination
// still loading after the source settled.
const (
	destinationHoldTimeout   = 2 * time.Second
	destinationSettleTimeout = 3 * time.Second
)

// undoCancel cancels the migration on the source (never in postcopy),
// waits until the source settles and works out where the guest is: a
// migration that completed after all enters stageComplete (the rollback
// stops and the engine finishes it).
func (r *run) undoCancel(ctx context.Context) (string, error) {
	if r.been(stageRescue) {
		return "", nil // the source's migration completed; the destination failed it: nothing to cancel
	}
	if r.silent.isMute(SideSource) {
		return "", r.cutStream(ctx, errors.New("the source QEMU's monitor stopped answering"), false)
	}
	info, err := ask(r, ctx, SideSource, "query-migrate", r.src.QueryMigrate)
	if isUnanswered(err) {
		return "", r.cutStream(ctx, err, false)
	}
	if err != nil {
		return "", err
	}
	if info.Status.Postcopy() || r.been(stagePostcopy) {
		return "", fmt.Errorf("status %s: postcopy is never cancelled", info.Status)
	}
	if info.Status == qmp.StatusCompleted {
		r.enter(stageComplete)
		return "", errors.New("the migration had completed: the guest runs on the destination")
	}
	r.holdDestination(ctx)
	st, did := info.Status, ""
	if st != qmp.StatusNone && !st.Terminal() {
		r.log.Debug("migrate_cancel", "status", st)
		if err := r.do(ctx, SideSource, "migrate_cancel", r.src.MigrateCancel); err != nil {
			if isUnanswered(err) {
				// QEMU may carry it out later; meanwhile cut the stream.
				return "", r.cutStream(ctx, err, true)
			}
			return "", err
		}
		if st, err = r.waitSourceSettled(ctx); err != nil {
			return "", err
		}
		if st == qmp.StatusCompleted {
			r.enter(stageComplete)
			return "", errors.New("the migration completed before the cancel took effect: the guest runs on the destination")
		}
		did = fmt.Sprintf("source: migrate_cancel from %s, now %s", info.Status, st)
	}
	return did, r.afterCancel(ctx, st)
}

// holdDestination keeps a destination that may still complete its incoming
// migration from starting the guest by itself: stop on a destination in
// inmigrate turns its autostart off (QEMU's qmp_stop), on a running one it
// pauses the guest. A destination that is gone or refuses is left as it is
// (logged): the checks after the cancel still look at it.
func (r *run) holdDestination(ctx context.Context) {
	if r.dstAt == dstUntouched || r.dst.Err() != nil || r.silent.isMute(SideDestination) {
		return
	}
	if err := r.doWithin(ctx, SideDestination, "stop", destinationHoldTimeout, r.dst.Stop); err != nil {
		r.log.Debug("stop on the destination before migrate_cancel", "err", err)
	}
}

// cutStream ends a migration the source cannot be asked to cancel (its
// monitor does not answer; why says so) from the destination's side: the
// destination is held (stop), then its migration channel is shut down with
// yank (QEMU 6.0+), so its incoming migration fails and it exits
// (exit-on-error), and the source's migration fails as soon as the source
// runs again: QEMU then keeps (or resumes) the guest there. Never in
// postcopy, nor after the destination completed its incoming migration:
// then the source completed, and the migration is finished instead
// (stageComplete), unless a migrate_cancel was sent (cancelSent) that QEMU
// may still carry out and resume the source: then the destination stays
// held and the outcome is unknown. The error returned says what was not
// done; the yank, when it worked, is recorded in Undone.
func (r *run) cutStream(ctx context.Context, why error, cancelSent bool) error {
	r.silent.mark(SideSource, true)
	if r.been(stagePostcopy) {
		return fmt.Errorf("%w: postcopy is never cut", why)
	}
	if r.dstAt == dstUntouched || r.dst.Err() != nil {
		return fmt.Errorf("%w: migrate_cancel not sent", why)
	}
	if r.silent.isMute(SideDestination) {
		return fmt.Errorf("%w, nor does the destination's: the migration could not be cancelled; check both QEMUs", why)
	}
	r.holdDestination(ctx)
	dm, err := ask(r, ctx, SideDestination, "query-migrate", r.dst.QueryMigrate)
	if err == nil && dm.Status == qmp.StatusCompleted {
		if cancelSent {
			r.dstAt = dstKept
			r.res.StateUnknown = true
			return fmt.Errorf("%w after migrate_cancel, and the destination completed its incoming migration (held paused): QEMU may still resume the source: the migration's state is unknown, check both QEMUs", why)
		}
		// The whole stream arrived: the source completed (it cannot resume
		// the guest without a cancel, and none was sent). The destination
		// was held, so it waits paused for the engine to finish.
		r.enter(stageComplete)
		return fmt.Errorf("%w, but the destination completed its incoming migration: the migration completed, the guest runs on the destination", why)
	}
	r.log.Warn("the source does not answer: cutting the migration stream on the destination (yank)", "cause", why)
	yank := map[string]any{"instances": []map[string]string{{"type": "migration"}}}
	if err := r.do(ctx, SideDestination, "yank", func(c context.Context) error { return r.dst.Execute(c, "yank", yank, nil) }); err != nil {
		return fmt.Errorf("%w: migrate_cancel not sent, and the stream could not be cut on the destination (yank: %w): the migration may go on once the source answers again; check both QEMUs", why, err)
	}
	r.res.Undone = append(r.res.Undone, "destination: yank migration: the stream is cut, the destination's incoming migration fails and it exits; the source's migration fails once it runs again")
	// The destination exits (exit-on-error): wait a moment for it, so the
	// migration socket can be removed.
	t := time.NewTimer(destinationSettleTimeout)
	defer t.Stop()
	select {
	case <-r.dst.Done():
	case <-t.C:
	case <-ctx.Done():
	}
	return fmt.Errorf("%w: migrate_cancel not sent: the guest stays on the source, where QEMU fails the migration once it runs again", why)
}

// afterCancel looks at both sides once the source's migration ended
// without completing (st: cancelled, failed or none). A source that stopped
// for good (not running, and not about to be resumed by QEMU) while the
// guest ran on it before, with a destination that completed its incoming
// migration, means the guest's latest state is on the destination: the
// migration completed (stageComplete, an error says so). Otherwise the guest
// stays on the source (undoResumeSource resumes it when needed), and a
// destination that completed anyway is kept paused and noted.
func (r *run) afterCancel(ctx context.Context, st qmp.MigrationStatus) error {
	if r.dstAt == dstUntouched {
		return nil
	}
	completed, dstState := r.destinationOutcome(ctx)
	if !completed {
		return nil
	}
	srcState, err := r.sourceRunState(ctx)
	if err != nil {
		return err
	}
	r.log.Debug("destination completed its incoming migration after the cancel", "source", st, "source-runstate", srcState, "destination-runstate", dstState)
	if srcState != "running" && r.srcWasRunning {
		r.enter(stageComplete)
		return fmt.Errorf("the migration completed on the destination as the cancel landed and the source stopped for good (migration %s, run state %s): the guest runs on the destination", st, srcState)
	}
	r.dstAt = dstKept
	note := "destination: completed its incoming migration as the cancel landed; left paused, not to be resumed: the guest runs on the source"
	if dstState == "running" {
		// It started by itself before it could be held: two copies run.
		// Stop one: the destination's, or where that fails the source's
		// (then the migration completed).
		if err := r.do(ctx, SideDestination, "stop", r.dst.Stop); err != nil {
			if serr := r.do(ctx, SideSource, "stop", r.src.Stop); serr != nil {
				return fmt.Errorf("destination completed its incoming migration as the cancel landed and runs the guest, and neither side could be stopped: %w", errors.Join(err, serr))
			}
			r.enter(stageComplete)
			return fmt.Errorf("destination completed its incoming migration as the cancel landed and runs the guest, and refused stop (%w): the source was stopped instead: the guest runs on the destination", err)
		}
		note = "destination: completed its incoming migration as the cancel landed and started the guest; stopped it: the guest runs on the source"
	}
	r.res.UndoErrors = append(r.res.UndoErrors, note)
	return nil
}

// destinationOutcome waits (bounded) while the destination still loads the
// stream, and reports whether it completed its incoming migration and its
// run state then. A destination that is gone, failed, or never got a
// connection did not complete.
func (r *run) destinationOutcome(ctx context.Context) (completed bool, runState string) {
	wctx, cancel := context.WithTimeout(ctx, destinationSettleTimeout)
	defer cancel()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		if r.dst.Err() != nil || r.silent.isMute(SideDestination) {
			return false, ""
		}
		dm, err := ask(r, wctx, SideDestination, "query-migrate", r.dst.QueryMigrate)
		if err != nil {
			r.log.Debug("destination after the cancel", "err", err)
			return false, ""
		}
		switch dm.Status {
		case qmp.StatusCompleted:
			st, err := r.loadedRunState(wctx)
			if err != nil {
				return false, ""
			}
			if st != "" {
				return true, st
			}
		case qmp.StatusActive, qmp.StatusDevice:
			// still loading: it either fails (and exits) or completes
		default:
			return false, "" // none, setup (listening), failed, cancelled
		}
		select {
		case <-wctx.Done():
			r.log.Debug("destination still loading after the cancel", "status", dm.Status)
			return false, ""
		case <-r.dst.Done():
			return false, ""
		case <-t.C:
		}
	}
}

// sourceRunState is the source's run state once it is past finish-migrate:
// QEMU sets the migration's end state before it resumes (or not) a source
// it stopped, so finish-migrate is transient after a failure.
func (r *run) sourceRunState(ctx context.Context) (string, error) {
	wctx, cancel := context.WithTimeout(ctx, destinationSettleTimeout)
	defer cancel()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		st, err := ask(r, wctx, SideSource, "query-status", r.src.QueryStatus)
		if err != nil {
			return "", err
		}
		if st.Status != "finish-migrate" {
			return st.Status, nil
		}
		select {
		case <-wctx.Done():
			return st.Status, nil
		case <-t.C:
		}
	}
}

// waitSourceSettled polls the source until its migration is terminal.
func (r *run) waitSourceSettled(ctx context.Context) (qmp.MigrationStatus, error) {
	t := time.NewTicker(min(r.cfg.pollInterval(), 50*time.Millisecond))
	defer t.Stop()
	for {
		info, err := ask(r, ctx, SideSource, "query-migrate", r.src.QueryMigrate)
		if err != nil {
			return "", err
		}
		if info.Status.Terminal() || info.Status == qmp.StatusNone {
			return info.Status, nil
		}
		select {
		case <-ctx.Done():
			return info.Status, fmt.Errorf("source still %s: %w", info.Status, ctx.Err())
		case <-t.C:
		}
	}
}

// undoResumeSource makes sure a guest that ran on the source runs again.
func (r *run) undoResumeSource(ctx context.Context) (string, error) {
	if !r.srcWasRunning || r.stage.sourceCompleted() {
		return "", nil
	}
	state, err := r.sourceRunState(ctx)
	if err != nil {
		return "", err
	}
	switch state {
	case "running":
		return "", nil
	case "paused", "postmigrate":
	default:
		return "", fmt.Errorf("source in run state %q, not resumed", state)
	}
	if err := r.do(ctx, SideSource, "cont", r.src.Cont); err != nil {
		return "", err
	}
	return fmt.Sprintf("source: cont (was %s)", state), nil
}

// rescue handles a failure after the source completed (the complete phase,
// or finishing a migration that completed as a cancel landed): the guest's
// state left the source, but when it never ran on the destination (which
// failed or went away while loading it, or could not be resumed) the
// source's copy is still the guest's latest. The destination is stopped
// (a destination still loading will not start the guest by itself) and
// the rest of the rollback runs, resuming the source; err is returned (the
// Result says failed, or cancelled, and the guest runs on the source).
// A destination found running the guest makes the migration completed
// (nil, err noted in UndoErrors). Where the guest ran on the destination,
// in postcopy, or the source was not running before, nothing is done.
func (r *run) rescue(ctx context.Context, err error) error {
	r.enter(stageRescue)
	if r.been(stagePostcopy) || r.dstAt == dstRan || !r.srcWasRunning {
		return err
	}
	if r.dst.Err() == nil {
		if st, serr := ask(r, ctx, SideDestination, "query-status", r.dst.QueryStatus); serr == nil && st.Running {
			// It completed and runs the guest after all: that is where
			// the guest is, so the migration counts as completed.
			r.dstAt = dstRan
			r.res.UndoErrors = append(r.res.UndoErrors, "completing: "+err.Error()+"; yet the destination runs the guest")
			return nil
		}
		if serr := r.do(ctx, SideDestination, "stop", r.dst.Stop); serr != nil && r.dst.Err() == nil {
			r.res.StateUnknown = true
			r.res.UndoErrors = append(r.res.UndoErrors, "destination: stop: "+serr.Error()+": the source is not resumed")
			return err
		}
	}
	r.log.Warn("the destination did not take the guest over after the source completed; resuming the source", "cause", err)
	r.enter(stageRollback)
	r.unwind(ctx)
	return err
}
