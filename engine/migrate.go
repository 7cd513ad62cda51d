package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/strategy"
	"github.com/qmigrate/qmigrate/transport"
)

// run is the state of one migration. It is owned by its job's goroutine
// (job.go); nothing else touches it.
type run struct {
	job   *Job
	cfg   Config
	token string // this migration's id: the suffix of what it creates on the QEMUs (journal.go)
	// adoptedBandwidth is the source's max-bandwidth Adopt found.
	adoptedBandwidth *uint64
	log              *slog.Logger
	t0               time.Time
	res              *Result
	phase            Phase
	m                *strategy.Machine
	setup            strategy.Setup
	dirty            dirtyMeter // the guest's dirty rate (Setup.MeasureDirtyRate)

	ch     transport.Channel // where the destination listens, as configured (Config.Listen, or URI)
	uri    transport.Channel // where the source connects, as configured (Config.URI)
	listen transport.Channel // where the destination listens (port resolved): migrate-recover's too
	migCh  transport.Channel // what the source connects to (port resolved)
	pc     postcopyWatch     // postcopy's link and its recoveries (recover.go)

	src, dst   *qmp.Client
	srcF, dstF *qmp.Features // the schemas' summaries: storage migrations only, nil otherwise
	// The argument forms of migrate (source) and migrate-incoming
	// (destination): the newest until QEMU refuses one of their arguments,
	// or the schema's where it was probed.
	srcForm, dstForm transport.Form
	owned            []*qmp.Client
	srcSub           *qmp.Subscription
	dstSub           *qmp.Subscription

	prevSC, prevDC map[string]bool          // capabilities as they were, for those we changed
	prevSP         *qmp.MigrationParameters // the source's parameters as they were (throttleParams)
	tlsID          string                   // the TLS credentials objects' id (Config.TLS), "" without TLS
	// tlsRestore is the TLS parameters dropTLS sets back on each side, as
	// configure decided them (none before configure ran).
	tlsRestore map[Side]qmp.MigrationParameters

	undo []undoStep

	mirror        *blockmirror.Session
	srcWasRunning bool        // the guest ran on the source when the migration began
	dstAt         destination // what the engine did to the destination and saw of it
	stage         stage       // where the migration stands (stage.go)
	seen          uint32      // the stages visited, a bit each (been)
	silent        sides
	downtimeLimit time.Duration
	stopAt        time.Time
	resumeAt      time.Time
	lastInfo      *qmp.MigrationInfo
	storageDone   uint64
	storageTotal  uint64
}

func (r *run) elapsed() time.Duration { return time.Since(r.t0) }

// emit hands ev to the observer (synchronously, in order) and to the job's
// snapshot and subscribers.
func (r *run) emit(ev Event) {
	ev.Elapsed = r.elapsed()
	if r.cfg.Observer != nil {
		r.cfg.Observer(ev)
	}
	r.job.publish(ev)
}

func (r *run) setPhase(p Phase) {
	if r.phase == p && p != PhasePrepare {
		return
	}
	r.phase = p
	r.log.Debug("phase", "phase", p, "elapsed", r.elapsed())
	r.emit(Event{Kind: EventPhase, Phase: p})
}

func (r *run) execute(ctx context.Context) error {
	defer r.closeAll()
	r.emit(Event{Kind: EventPhase, Phase: PhasePrepare})
	steps := []func(context.Context) error{r.prepare, r.start, r.running, r.converge, r.complete}
	for _, step := range steps {
		if err := step(ctx); err != nil {
			return r.fail(ctx, err)
		}
	}
	return nil
}

// running tells Start that the migration runs: it returns the Job.
func (r *run) running(context.Context) error {
	select {
	case <-r.job.start:
	default:
		close(r.job.start)
	}
	return nil
}

// fail runs the rollback when it is still possible and returns err (or nil
// when the migration turned out to have completed).
func (r *run) fail(ctx context.Context, err error) error {
	r.log.Debug("migration failed", "stage", r.stage, "err", err)
	if r.stage.postcopy() {
		switch started := r.lastInfo != nil && r.lastInfo.Status.Postcopy(); {
		case r.res.Lost == GuestLost:
			r.res.UndoErrors = append(r.res.UndoErrors, "rollback impossible: the destination QEMU went away in postcopy: the guest is lost; the source's stale copy is left paused (never resumed)")
		case r.res.Lost == PagesLost:
			r.res.UndoErrors = append(r.res.UndoErrors, "rollback impossible: the source QEMU went away in postcopy: the pages the destination had not received are lost; the destination holds the guest, stalled, left as it is")
		case r.res.Lost == PostcopyPaused:
			r.res.UndoErrors = append(r.res.UndoErrors, "rollback impossible: postcopy paused and not recovered: both QEMUs left in postcopy-paused (the destination holds the guest, the source its missing pages); qmigrate adopt may recover it")
		case !isUnanswered(err):
			r.res.UndoErrors = append(r.res.UndoErrors, "rollback impossible: postcopy started, the guest runs on the destination")
		case started:
			r.res.StateUnknown = true
			r.res.UndoErrors = append(r.res.UndoErrors, "rollback impossible: postcopy started, the guest runs on the destination; a monitor then stopped answering: where the migration stands is unknown, check both QEMUs")
		default:
			r.res.StateUnknown = true
			r.res.UndoErrors = append(r.res.UndoErrors, "rollback impossible: postcopy was asked for and may have started when a monitor stopped answering: the migration's state is unknown, check both QEMUs")
		}
		if errors.Is(err, ErrPostcopyFailed) {
			return err
		}
		return fmt.Errorf("%w: %w", ErrPostcopyFailed, err)
	}
	if r.stage.rollsBack() && r.pastSwitchover() && errors.Is(err, ErrUnresponsive) {
		// The source stopped for the stop-and-copy (or was paused by us)
		// and a monitor stopped answering: the engine finishes rather than
		// aborts from here, and cannot tell where things stand.
		r.res.StateUnknown = true
		r.res.UndoErrors = append(r.res.UndoErrors, "rollback not attempted: a monitor stopped answering after the switchover began: the migration's state is unknown, check both QEMUs")
		return err
	}
	// The rollback runs under a context of its own, bounded: the caller's
	// may have ended already, and a cancel arriving during the rollback
	// must not leave the source half restored.
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
	defer cancel()
	if r.stage.rollsBack() {
		if len(r.undo) == 0 {
			return err
		}
		r.enter(stageRollback)
		r.unwind(uctx)
		if !r.stage.sourceCompleted() {
			return err
		}
		// The migration completed before the cancel took effect: the
		// guest's state is on the destination and the source stopped for
		// good. Rolling back further would lose the guest; finish
		// instead, and report what really happened.
		r.log.Warn("migration completed before the cancel took effect; finishing it", "cause", err)
		cerr := r.complete(uctx)
		if cerr == nil {
			return nil
		}
		err = errors.Join(err, cerr)
	}
	// The source completed but the destination did not take the guest
	// over: where it never ran there, the source gets it back.
	return r.rescue(uctx, err)
}

// unwind runs the undo stack from the top, removing each step as it runs,
// and stops early (leaving the rest) once the source turns out to have
// completed (a step entered stageComplete). Each step is bounded by undoStepTimeout; a step on a side that
// did not answer an earlier rollback command is not attempted, and says so
// in UndoErrors.
func (r *run) unwind(ctx context.Context) {
	for len(r.undo) > 0 {
		u := r.undo[len(r.undo)-1]
		r.undo = r.undo[:len(r.undo)-1]
		if u.side != "" && r.silent.isMute(u.side) {
			err := &quietWrap{fmt.Sprintf("not attempted: the %s QEMU's monitor stopped answering", u.side), ErrUnresponsive}
			r.res.UndoErrors = append(r.res.UndoErrors, u.name+": "+err.Error())
			r.res.Rollback = append(r.res.Rollback, RollbackStep{Name: u.name, Side: u.acts(), Err: err})
			continue
		}
		sctx, cancel := context.WithTimeout(ctx, undoStepTimeout)
		did, uerr := u.fn(sctx)
		if uerr != nil && sctx.Err() != nil && ctx.Err() == nil && !isUnanswered(uerr) {
			uerr = fmt.Errorf("did not finish within %v: %w", undoStepTimeout, uerr)
		}
		cancel()
		if uerr != nil {
			r.log.Debug("undo failed", "step", u.name, "err", uerr)
			r.res.UndoErrors = append(r.res.UndoErrors, u.name+": "+uerr.Error())
			did = ""
		} else if did != "" {
			r.log.Debug("undone", "step", did)
			r.res.Undone = append(r.res.Undone, did)
		}
		r.res.Rollback = append(r.res.Rollback, RollbackStep{Name: u.name, Side: u.acts(), Did: did, Err: uerr})
		if r.stage.sourceCompleted() {
			return
		}
	}
}

func (r *run) finish(err error) {
	r.enter(stageEnded)
	res := r.res
	res.Total = r.elapsed()
	res.Err = err
	switch {
	case err == nil:
		res.Status = StatusCompleted
	case errors.Is(err, ErrCancelled):
		res.Status = StatusCancelled
	default:
		res.Status = StatusFailed
	}
	if res.TransferredBytes == 0 && r.lastInfo != nil && r.lastInfo.RAM != nil {
		// Not completed: what was sent before the end, as last polled.
		res.TransferredBytes = r.lastInfo.RAM.Transferred
	}
	r.log.Debug("migration ended", "status", res.Status, "total", res.Total, "downtime", res.Downtime, "err", err)
	r.emit(Event{Kind: EventResult, Result: res})
}

func (r *run) closeAll() {
	r.endProbe()
	if r.srcSub != nil {
		r.srcSub.Close()
	}
	if r.dstSub != nil {
		r.dstSub.Close()
	}
	for _, c := range r.owned {
		_ = c.Close()
	}
}

// undoStep is one entry of the undo stack. fn returns what it did ("" when
// there was nothing to do) or why it failed. side is the QEMU it talks to
// first ("" when none in particular).
type undoStep struct {
	name string
	side Side
	fn   func(context.Context) (string, error)
}

// acts is the side the step acts on: the side it names first.
func (u undoStep) acts() Side {
	for _, s := range []Side{SideSource, SideDestination} {
		if strings.HasPrefix(u.name, string(s)+":") {
			return s
		}
	}
	return u.side
}

func (r *run) pushUndo(side Side, name string, fn func(context.Context) (string, error)) {
	r.undo = append(r.undo, undoStep{name: name, side: side, fn: fn})
}

// errorf builds an *Error in the current phase.
func (r *run) errorf(side Side, op string, err error) error {
	return &Error{Phase: r.phase, Side: side, Op: op, Err: err}
}

// badInput is an *Error in prepare, of the given check, that wraps
// ErrBadInput and the cause.
func (r *run) badInput(check Check, side Side, op string, err error) error {
	return &Error{Phase: r.phase, Side: side, Op: op, Check: check, Err: fmt.Errorf("%w: %w", ErrBadInput, err)}
}

// cancelled is the error for the caller's context ending.
func (r *run) cancelled(ctx context.Context, op string) error {
	return &Error{Phase: r.phase, Op: op, Err: fmt.Errorf("%w: %w", ErrCancelled, ctx.Err())}
}

// callErr classifies the failure of a QMP call made with the caller's ctx
// (or a context derived from it).
func (r *run) callErr(ctx context.Context, side Side, op string, err error) error {
	if ctx.Err() != nil {
		return r.cancelled(ctx, op)
	}
	if isUnanswered(err) {
		return err // already an *Error naming the side and the command
	}
	if errors.Is(err, qmp.ErrClosed) {
		gone := ErrSourceGone
		if side == SideDestination {
			gone = ErrDestinationGone
		}
		err = fmt.Errorf("%w: %w", gone, err)
	}
	return r.errorf(side, op, err)
}

func (r *run) client(side Side) *qmp.Client {
	if side == SideSource {
		return r.src
	}
	return r.dst
}

// quietWrap is an error whose text is msg alone, wrapping err for
// errors.Is.
type quietWrap struct {
	msg string
	err error
}

func (e *quietWrap) Error() string { return e.msg }
func (e *quietWrap) Unwrap() error { return e.err }
