package engine

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Every QMP command the engine sends after prepare's first answers goes
// through ask or do, which bound how long it may wait for the answer:
//
//   - before the switchover, with a Budget: by what is left of the budget
//     plus PollInterval (the grace of the budget's safety net), measured
//     from the call when the budget is already spent; the timeout is
//     ErrAborted, as the safety net reports it;
//   - always: by UnresponsiveTimeout; the timeout is ErrUnresponsive;
//   - in the rollback: by undoCallTimeout (undoProbeTimeout for a side that
//     already let a command go unanswered), with no budget. A side that
//     does not answer a rollback command gets no further commands: its
//     remaining steps are reported in UndoErrors instead.
//
// A command that timed out may still be carried out once its QEMU answers
// again (it was written to the socket); the engine never assumes it was not.

// callBound is the bound a command got.
type callBound struct {
	budget bool          // the budget's end (plus the grace) came first
	wait   time.Duration // how long the command was given
}

// sides records which QEMU let a command go unanswered. Commands of one
// side may run on several goroutines (configure), hence the lock.
type sides struct {
	mu      sync.Mutex
	suspect map[Side]bool // some command timed out
	mute    map[Side]bool // a rollback command timed out: send it nothing more
}

func (s *sides) mark(side Side, undoing bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.suspect == nil {
		s.suspect, s.mute = map[Side]bool{}, map[Side]bool{}
	}
	s.suspect[side] = true
	if undoing {
		s.mute[side] = true
	}
}

func (s *sides) isSuspect(side Side) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.suspect[side]
}

func (s *sides) isMute(side Side) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mute[side]
}

// callContext bounds one command to side sent now; limit > 0 bounds it
// further (a step's own deadline, reported like the others).
func (r *run) callContext(ctx context.Context, side Side, limit time.Duration) (context.Context, context.CancelFunc, callBound) {
	cb := callBound{wait: r.cfg.unresponsiveTimeout()}
	if limit > 0 {
		cb.wait = min(cb.wait, limit)
	}
	switch {
	case r.undoing():
		cb.wait = min(cb.wait, undoCallTimeout)
		if r.silent.isSuspect(side) {
			cb.wait = min(cb.wait, undoProbeTimeout)
		}
	case r.cfg.Strategy.Limits.Budget > 0 && r.stage.budgeted():
		left := max(r.cfg.Strategy.Limits.Budget-r.elapsed(), 0) + r.cfg.pollInterval()
		if left < cb.wait {
			cb = callBound{budget: true, wait: left}
		}
	}
	cctx, cancel := context.WithTimeout(ctx, cb.wait)
	return cctx, cancel, cb
}

// ask sends one command to side (f) under the bound that applies now. A
// bound that fires gives an *Error (see unanswered); any other error,
// a cancel of ctx included, is returned as it is. In the rollback a side
// that did not answer an earlier rollback command is not sent anything.
func ask[T any](r *run, ctx context.Context, side Side, op string, f func(context.Context) (T, error)) (T, error) {
	return askWithin(r, ctx, side, op, 0, f)
}

// askWithin is ask with the command also bounded by limit (when > 0).
func askWithin[T any](r *run, ctx context.Context, side Side, op string, limit time.Duration, f func(context.Context) (T, error)) (T, error) {
	if r.undoing() && r.silent.isMute(side) {
		var zero T
		return zero, r.errorf(side, op, &noAnswer{fmt.Errorf("%w: not sent, the %s QEMU's monitor did not answer an earlier command", ErrUnresponsive, side)})
	}
	cctx, cancel, cb := r.callContext(ctx, side, limit)
	defer cancel()
	if cb.budget && r.srcSub != nil {
		return askWatching(r, ctx, side, op, cb, f)
	}
	v, err := f(cctx)
	if err != nil && ctx.Err() == nil && errors.Is(cctx.Err(), context.DeadlineExceeded) {
		return v, r.unanswered(side, op, cb)
	}
	return v, err
}

// askWatching is ask for a command bounded by the budget once the source's
// events flow (start and converge, on the engine goroutine): while it waits
// for the answer it watches the source's events, and a STOP (the
// stop-and-copy began: QEMU's migration thread may hold the big lock, and
// the monitor with it, until the device state is written) lifts the budget's
// bound, leaving UnresponsiveTimeout.
func askWatching[T any](r *run, ctx context.Context, side Side, op string, cb callBound, f func(context.Context) (T, error)) (T, error) {
	unresponsive := callBound{wait: r.cfg.unresponsiveTimeout()}
	uctx, cancelU := context.WithTimeout(ctx, unresponsive.wait)
	defer cancelU()
	cctx, cancel := context.WithCancel(uctx)
	defer cancel()
	type answer struct {
		v   T
		err error
	}
	done := make(chan answer, 1)
	go func() {
		v, err := f(cctx)
		done <- answer{v, err}
	}()
	budget := time.NewTimer(cb.wait)
	defer budget.Stop()
	budgetFired := false
	events := r.srcSub.C
	for {
		select {
		case a := <-done:
			switch {
			case a.err == nil || ctx.Err() != nil:
			case budgetFired:
				a.err = r.unanswered(side, op, cb)
			case errors.Is(uctx.Err(), context.DeadlineExceeded):
				a.err = r.unanswered(side, op, unresponsive)
			}
			return a.v, a.err
		case <-budget.C:
			budgetFired = true
			cancel() // f returns at once
		case ev, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			r.event(SideSource, ev)
			if ev.Name == "STOP" && !budgetFired {
				r.log.Debug("source stopped while a command waits for its answer: the budget no longer bounds it", "command", op)
				r.sourceStopped()
				budget.Stop()
			}
		}
	}
}

// do is ask for a command without a result.
func (r *run) do(ctx context.Context, side Side, op string, f func(context.Context) error) error {
	return r.doWithin(ctx, side, op, 0, f)
}

// doWithin is askWithin for a command without a result.
func (r *run) doWithin(ctx context.Context, side Side, op string, limit time.Duration, f func(context.Context) error) error {
	_, err := askWithin(r, ctx, side, op, limit, func(c context.Context) (struct{}, error) { return struct{}{}, f(c) })
	return err
}

// unanswered is the error for a command whose bound fired, and notes the
// side as not answering.
func (r *run) unanswered(side Side, op string, cb callBound) error {
	r.silent.mark(side, r.undoing())
	wait := cb.wait.Round(time.Millisecond)
	if cb.budget {
		b := r.cfg.Strategy.Limits.Budget
		return r.errorf(side, op, &noAnswer{fmt.Errorf("%w: budget %v exhausted at %v: the %s QEMU's monitor did not answer %s within the budget (waited %v)",
			ErrAborted, b, r.elapsed().Round(time.Millisecond), side, op, wait)})
	}
	msg := fmt.Sprintf("the %s QEMU's monitor did not answer %s within %v (its process stopped or its main loop stuck?)", side, op, wait)
	if !r.undoing() && r.pastSwitchover() {
		msg += "; the switchover had begun, so nothing is rolled back: the migration's state is unknown, check both QEMUs"
	}
	return r.errorf(side, op, &noAnswer{fmt.Errorf("%w: %s", ErrUnresponsive, msg)})
}

// noAnswer marks the cause of an *Error as a command's bound firing.
type noAnswer struct{ err error }

func (e *noAnswer) Error() string { return e.err.Error() }
func (e *noAnswer) Unwrap() error { return e.err }

// isUnanswered reports whether err is a command's bound firing (ask).
func isUnanswered(err error) bool {
	var na *noAnswer
	return errors.As(err, &na)
}
