package engine

import (
	"context"
	"fmt"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/transport"
)

// completeTimeout bounds the wait for the destination to finish loading
// after the source completed.
const completeTimeout = 60 * time.Second

// complete waits for the destination to finish its incoming migration, cleans
// up storage, resumes the destination if needed and measures the downtime.
// The source completed: a cancel now would leave the guest paused nowhere,
// so this phase finishes whatever the caller's context, bounded by
// completeTimeout. Result.Downtime is the larger of QEMU's own "downtime"
// (the source's query-migrate after completion) and the wall time from the
// source's STOP event to the destination's RESUME (QEMU's event timestamps;
// the engine's cont when it resumed the destination): with a pause of the
// source, the whole stop-and-copy the guest saw.
func (r *run) complete(ctx context.Context) error {
	r.enter(stageComplete)
	// The source completed: the guest's state is on the destination. A
	// cancel now would leave it paused nowhere, so this phase finishes
	// regardless, bounded by completeTimeout.
	ctx = context.WithoutCancel(ctx)
	info := r.lastInfo
	if info == nil || info.Status != qmp.StatusCompleted {
		// After a lost race with a cancel, lastInfo is older (or none).
		if fresh, err := ask(r, ctx, SideSource, "query-migrate", r.src.QueryMigrate); err == nil && fresh.Status == qmp.StatusCompleted {
			info = fresh
		}
	}
	if info == nil {
		info = &qmp.MigrationInfo{}
	}
	if info.RAM != nil {
		r.res.TransferredBytes = info.RAM.Transferred
	}
	qemuDowntime := info.Downtime

	wctx, cancel := context.WithTimeout(ctx, completeTimeout)
	defer cancel()
	r.drainEvents()
	st, err := r.waitDestination(wctx)
	if err != nil {
		return err
	}
	if st == "running" {
		r.dstAt = dstRan
	}
	if st == "running" && r.resumeAt.IsZero() {
		// It started by itself; its RESUME may still be on the way.
		r.waitResume(wctx, false)
	}
	if r.mirror != nil {
		if err := r.do(ctx, SideSource, "storage clean-up", r.mirror.Cleanup); err != nil {
			// The guest is on the destination; leftovers are reported, the
			// migration still counts as completed.
			r.res.UndoErrors = append(r.res.UndoErrors, "storage clean-up: "+err.Error())
		}
	}
	if st != "running" && r.srcWasRunning {
		r.log.Debug("cont on destination", "runstate", st)
		if err := r.do(ctx, SideDestination, "cont", r.dst.Cont); err != nil {
			return r.callErr(ctx, SideDestination, "cont", err)
		}
		r.dstAt = dstRan
		r.resumeAt = time.Time{}
		r.waitResume(wctx, true)
	}
	r.finishTLS(ctx)
	r.finishJournal(ctx)
	// QEMU sets the migration's status to completed a moment before the
	// source's run state leaves finish-migrate for postmigrate: the Result
	// says completed once the source is there (bounded; measured on 7.2.22,
	// where an integrity check right after the call found finish-migrate).
	if st, err := r.sourceRunState(ctx); err != nil || st == "finish-migrate" {
		r.log.Debug("source still finishing the migration", "runstate", st, "err", err)
	}
	if r.ch.Scheme == transport.Unix {
		if err := transport.RemoveSocket(r.ch); err != nil {
			r.log.Debug("remove migration socket", "err", err)
		}
	}
	r.res.Downtime = qemuDowntime
	if !r.stopAt.IsZero() && r.resumeAt.After(r.stopAt) {
		if wall := r.resumeAt.Sub(r.stopAt); wall > r.res.Downtime {
			r.res.Downtime = wall
		}
	}
	r.res.MaxDowntime = r.m.MaxDowntime()
	r.res.DowntimeHeld = r.res.Downtime <= r.res.MaxDowntime
	r.res.DowntimeLimit = r.downtimeLimit
	r.log.Debug("completed", "qemu-downtime", qemuDowntime, "downtime", r.res.Downtime,
		"transferred", r.res.TransferredBytes)
	return nil
}

// waitDestination waits until the destination's incoming migration completed
// and returns its run state then.
func (r *run) waitDestination(ctx context.Context) (string, error) {
	poll := min(r.cfg.pollInterval(), 50*time.Millisecond)
	t := time.NewTicker(poll)
	defer t.Stop()
	// ctx ends only at completeTimeout (complete ignores the caller's
	// cancel): a call cut by it is that timeout, not a cancel.
	var last qmp.MigrationStatus
	// Not wrapping ctx's DeadlineExceeded: that says a caller's deadline
	// (ErrCancelled).
	timedOut := func() error {
		what := "still " + string(last)
		switch last {
		case "":
			what = "unread (its query-migrate unanswered)"
		case qmp.StatusCompleted:
			what = "completed, its run state still loading"
		}
		return r.errorf(SideDestination, "wait for completion", fmt.Errorf("destination %s after %v", what, completeTimeout))
	}
	for {
		r.drainEvents()
		dm, err := ask(r, ctx, SideDestination, "query-migrate", r.dst.QueryMigrate)
		if err != nil {
			if ctx.Err() != nil {
				return "", timedOut()
			}
			return "", r.callErr(ctx, SideDestination, "query-migrate", err)
		}
		last = dm.Status
		switch dm.Status {
		case qmp.StatusFailed:
			return "", r.errorf(SideDestination, "incoming migration", fmt.Errorf("%w: %s", ErrMigrationFailed, orUnknown(dm.ErrorDesc)))
		case qmp.StatusCompleted:
			st, err := r.loadedRunState(ctx)
			if err != nil {
				if ctx.Err() != nil {
					return "", timedOut()
				}
				return "", r.callErr(ctx, SideDestination, "query-status", err)
			}
			if st != "" {
				return st, nil
			}
		}
		select {
		case <-ctx.Done():
			return "", timedOut()
		case <-r.dst.Done():
			return "", r.dstGone("wait for completion")
		case <-t.C:
		}
	}
}

// waitResume waits briefly for the destination's RESUME so the downtime
// measure includes it. Without the event, orNow takes the current time (the
// engine's cont returned, so the guest runs).
func (r *run) waitResume(ctx context.Context, orNow bool) {
	if r.dstSub == nil {
		return
	}
	deadline := time.NewTimer(time.Second)
	defer deadline.Stop()
	for r.resumeAt.IsZero() {
		select {
		case ev, ok := <-r.dstSub.C:
			if !ok {
				return
			}
			r.event(SideDestination, ev)
		case <-deadline.C:
			if orNow {
				r.resumeAt = time.Now()
			}
			return
		case <-ctx.Done():
			return
		}
	}
}

func (r *run) drainEvents() {
	r.drain(SideSource, r.srcSub)
	r.drain(SideDestination, r.dstSub)
}

// drain records the events already queued on sub without blocking.
func (r *run) drain(side Side, sub *qmp.Subscription) {
	if sub == nil {
		return
	}
	for {
		select {
		case ev, ok := <-sub.C:
			if !ok {
				return
			}
			r.event(side, ev)
		default:
			return
		}
	}
}

// loadedRunState asks a destination whose incoming migration completed for
// its run state: "" while it still finishes loading the stream.
func (r *run) loadedRunState(ctx context.Context) (string, error) {
	st, err := ask(r, ctx, SideDestination, "query-status", r.dst.QueryStatus)
	if err != nil {
		return "", err
	}
	switch st.Status {
	case "inmigrate", "finish-migrate", "restore-vm":
		return "", nil
	}
	return st.Status, nil
}
