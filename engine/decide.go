package engine

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/strategy"
)

// decide applies a non-wait decision, feeds its outcome back, records and
// reports it. An Abort ends the migration with ErrAborted.
func (r *run) decide(ctx context.Context, d strategy.Decision) error {
	if d.Action == strategy.Wait {
		return nil
	}
	return r.record(ctx, d, r.apply(ctx, d))
}

// record feeds a decision's outcome (aerr) back to the strategy, records
// and reports it, and returns the error that ends the migration, if any.
func (r *run) record(ctx context.Context, d strategy.Decision, aerr error) error {
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
		if r.stage != stagePrecopy {
			return fmt.Errorf("postcopy can start only in pre-copy, not in stage %s", r.stage)
		}
		if !r.setup.Postcopy {
			return errors.New("postcopy-ram was not enabled before the start")
		}
		// From the moment it is sent QEMU may switch at any moment: never
		// cancel again, unless QEMU refused it. (Set before sending, so the
		// command is bounded as past the switchover: by
		// UnresponsiveTimeout, not the budget; one left unanswered may
		// still be carried out.)
		r.enter(stagePostcopy)
		if err := r.do(ctx, SideSource, "migrate-start-postcopy", r.src.MigrateStartPostcopy); err != nil {
			if isQMPError(err) { // refused: not started
				r.revert(stagePostcopy)
			}
			return err
		}
	case strategy.PauseSource:
		if !r.cfg.Strategy.Limits.AllowPause {
			return errors.New("pausing the source is not permitted")
		}
		return r.pauseSource(ctx)
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
		if r.stage != stageMirror {
			return errors.New("write-blocking restart refused after READY (block-job-change missing on the source)")
		}
		return r.do(ctx, SideSource, "restart mirrors write-blocking", r.mirror.RestartWriteBlocking)
	case strategy.Abort:
	default:
		return fmt.Errorf("unknown action %q", d.Action)
	}
	return nil
}

// pauseSource stops the guest on the source so that QEMU finishes with a
// stop-and-copy (the strategy's PauseSource, or the job's ForceComplete).
func (r *run) pauseSource(ctx context.Context) error {
	if r.stage != stagePrecopy {
		return fmt.Errorf("the source can be paused only in pre-copy, not in stage %s", r.stage)
	}
	r.enter(stagePaused) // as for postcopy: the stop may land late
	if err := r.do(ctx, SideSource, "stop", r.src.Stop); err != nil {
		if isQMPError(err) { // refused: not paused
			r.revert(stagePaused)
		}
		return err
	}
	return nil
}

// setSourceParams sets parameters on the source (what names them, for
// the logs).
func (r *run) setSourceParams(ctx context.Context, what string, p qmp.MigrationParameters) error {
	r.log.Debug("set source parameters", "what", what, "params", paramString(p))
	return r.do(ctx, SideSource, "migrate-set-parameters", func(c context.Context) error { return r.src.MigrateSetParameters(c, p) })
}

// paramsBandwidth is the user's bandwidth limit as QEMU's parameters: the
// same value as max-bandwidth (pre-copy) and max-postcopy-bandwidth
// (postcopy's background stream, whose default 0 is unlimited), so that
// the limit holds once postcopy starts too.
func paramsBandwidth(bps uint64) qmp.MigrationParameters {
	return qmp.MigrationParameters{MaxBandwidth: qmp.Ptr(bps), MaxPostcopyBandwidth: qmp.Ptr(postcopyBandwidth(bps))}
}

// postcopyBandwidth is max-postcopy-bandwidth for a max-bandwidth of bps:
// QEMU's 0 (unlimited) for UnlimitedBandwidth, bps otherwise.
func postcopyBandwidth(bps uint64) uint64 {
	if bps >= UnlimitedBandwidth {
		return 0
	}
	return bps
}

func paramsDowntime(d time.Duration) qmp.MigrationParameters {
	return qmp.MigrationParameters{DowntimeLimit: qmp.Ptr(qmp.MillisOf(d))}
}
