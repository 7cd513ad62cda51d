package engine

import "fmt"

// stage is where a migration stands, as the engine sees it: one value,
// changed only by enter (and by revert, for a lever QEMU refused). What a
// stage permits (a cancel that rolls back, the budget bounding commands,
// the strategy steering) is a method of the stage, so a new stage is one
// row in the table below and one line in each method.
//
//	prepare ─▶ mirror ─▶ start ─▶ precopy ─┬─▶ paused ────┐
//	   │          │        │         │     ├─▶ stopcopy ──┼─▶ switchover ─┐
//	   │          │        │         │     └─▶ postcopy ──┼───────────────┤
//	   │          │        │         │                    ▼               ▼
//	   └──────────┴────────┴─────────┴──────────▶ rollback ◀─┐     sourcedone ─▶ complete
//	                                                 │        │         │            ▲  │
//	                                                 │        └─ rescue ◀┴────────────┼──┘
//	                                                 └────────────────────────────────┘
//
// Every stage before postcopy may end in rollback; the rollback may find
// that the migration completed after all (complete); a failure after the
// source completed goes to rescue, which rolls back (resuming the source)
// when the guest never ran on the destination. Any stage may end (ended).
// Postcopy has a loop of its own (recover.go), never rolled back:
// postcopy ─▶ postcopy-paused (the link was lost) ─▶ recovering ─▶ postcopy,
// or back to postcopy-paused for the next attempt.
type stage uint8

const (
	stagePrepare        stage = iota // reading and configuring both QEMUs; the undo stack grows
	stageMirror                      // disk mirrors copying, waiting for every mirror to be READY
	stageStart                       // migrate-incoming on the destination, then migrate on the source
	stagePrecopy                     // RAM pre-copy running: the strategy steers
	stagePaused                      // the engine stopped the source (stop-and-copy forced); QEMU finishes
	stageStopCopy                    // QEMU stopped the source for its stop-and-copy (STOP, device, pre-switchover)
	stageSwitchover                  // pre-switchover handled: mirrors finished, migrate-continue sent
	stagePostcopy                    // postcopy asked for or running: the guest runs on the destination; no way back
	stagePostcopyPaused              // postcopy's link lost: both sides in (or being put in) postcopy-paused (recover.go)
	stageRecovering                  // a recovery attempt: migrate-recover on the destination, migrate resume on the source
	stageSourceDone                  // the source completed: the point of no return
	stageComplete                    // finishing on the destination (wait for it, cont, clean up)
	stageRollback                    // the undo stack runs
	stageRescue                      // failed after the source completed: resume the source if the guest never left it
	stageEnded                       // the Result is final
	numStages
)

var stageNames = [numStages]string{
	"prepare", "mirror", "start", "precopy", "paused", "stopcopy", "switchover",
	"postcopy", "postcopy-paused", "recovering", "sourcedone", "complete", "rollback", "rescue", "ended",
}

func (s stage) String() string {
	if s < numStages {
		return stageNames[s]
	}
	return fmt.Sprintf("stage(%d)", s)
}

// next lists the stages that may follow each stage, besides ended, which
// any stage may be followed by (the migration ends there, with its Result).
// Anything else is a bug in the engine: enter panics on it (tests see it
// before a user does).
var next = [numStages][]stage{
	stagePrepare:    {stageMirror, stageStart, stageRollback},
	stageMirror:     {stageStart, stageRollback},
	stageStart:      {stagePrecopy, stageRollback},
	stagePrecopy:    {stagePaused, stageStopCopy, stageSwitchover, stagePostcopy, stageSourceDone, stageRollback},
	stagePaused:     {stageSwitchover, stagePostcopy, stageSourceDone, stageRollback},
	stageStopCopy:   {stageSwitchover, stagePostcopy, stageSourceDone, stageRollback},
	stageSwitchover: {stagePostcopy, stageSourceDone, stageRollback},
	stagePostcopy:   {stagePostcopyPaused, stageSourceDone},
	// A lost link pauses postcopy; each recovery attempt either brings it
	// back (postcopy) or falls back to paused for the next one.
	stagePostcopyPaused: {stageRecovering, stagePostcopy, stageSourceDone},
	stageRecovering:     {stagePostcopy, stagePostcopyPaused, stageSourceDone},
	stageSourceDone:     {stageComplete, stageRescue},
	stageComplete:       {stageRescue},
	stageRollback:       {stageComplete},
	stageRescue:         {stageRollback},
}

// phase is the Phase a stage reports to the observer; "" keeps the one
// reported before (rescue reports rollback only once it resumes the source).
func (s stage) phase() Phase {
	switch s {
	case stagePrepare:
		return PhasePrepare
	case stageMirror, stageStart:
		return PhaseStart
	case stagePrecopy:
		return PhaseConverge
	case stagePaused, stageStopCopy, stageSwitchover, stagePostcopy, stagePostcopyPaused, stageRecovering, stageSourceDone:
		return PhaseSwitchover
	case stageComplete:
		return PhaseComplete
	case stageRollback:
		return PhaseRollback
	}
	return ""
}

// steered: the strategy is asked for decisions (the mirror phase and
// pre-copy). Past the switchover the engine finishes: nothing to decide.
func (s stage) steered() bool { return s == stageMirror || s == stagePrecopy }

// budgeted: the budget bounds commands and ends the migration when spent.
// From the switchover on (the engine's pause, QEMU's stop-and-copy,
// postcopy, a completed source) the engine finishes rather than aborts, and
// only UnresponsiveTimeout bounds a command.
func (s stage) budgeted() bool { return s <= stagePrecopy }

// progressWatched: the progress timeout applies (nothing transferred for
// that long ends the migration): in pre-copy and during QEMU's own
// stop-and-copy, which may still fail; not once the engine finishes on
// purpose (its pause, pre-switchover handled, postcopy).
func (s stage) progressWatched() bool { return s == stagePrecopy || s == stageStopCopy }

// rollsBack: a failure or a cancel here is undone with the undo stack, the
// guest kept (or put back) on the source. Never once postcopy began (the
// guest runs on the destination) nor once the source completed (rescue
// decides there).
func (s stage) rollsBack() bool { return s < stagePostcopy }

// cancellable: a cancel of the caller's context ends the migration (with a
// rollback). In postcopy a cancel is ignored and the migration finishes;
// once the source completed the engine finishes regardless.
func (s stage) cancellable() bool { return s.rollsBack() }

// postcopy: postcopy was asked for or runs, its link possibly lost and
// being recovered: the guest's state is split between the two QEMUs.
func (s stage) postcopy() bool {
	return s == stagePostcopy || s == stagePostcopyPaused || s == stageRecovering
}

// sourceCompleted: the source's migration completed; the guest's state is
// on the destination.
func (s stage) sourceCompleted() bool { return s == stageSourceDone || s == stageComplete }

// enter moves the migration to stage t, reports t's phase, and remembers
// that t was visited. Entering the current stage again does nothing.
func (r *run) enter(t stage) {
	if r.stage == t {
		return
	}
	ok := t == stageEnded
	for _, n := range next[r.stage] {
		ok = ok || n == t
	}
	if !ok {
		panic(fmt.Sprintf("engine: no transition from stage %s to %s", r.stage, t))
	}
	r.log.Debug("stage", "from", r.stage, "to", t, "elapsed", r.elapsed())
	r.stage = t
	r.seen |= 1 << t
	// The phase event goes out before the stage is published to the Job's
	// callers: an observer hears of a rollback or a completion before a
	// steering call can be refused for it (the fleet hands a refused
	// share on to the others).
	if p := t.phase(); p != "" {
		r.setPhase(p)
	}
	r.job.setStage(t)
}

// revert takes back a lever's stage that QEMU refused (stop, or
// migrate-start-postcopy answered with an error: nothing happened), or a
// postcopy whose start failed before the destination ran the guest
// (postcopyStartFailed), back to pre-copy, as if it had never been entered.
func (r *run) revert(from stage) {
	if r.stage != from || (from != stagePaused && from != stagePostcopy) {
		panic(fmt.Sprintf("engine: revert of stage %s in stage %s", from, r.stage))
	}
	r.log.Debug("stage", "from", r.stage, "to", stagePrecopy, "why", "refused by QEMU")
	r.stage = stagePrecopy
	r.seen &^= 1 << from
	r.job.setStage(stagePrecopy)
	r.setPhase(PhaseConverge)
}

// been reports whether the migration was ever in stage s.
func (r *run) been(s stage) bool { return r.seen&(1<<s) != 0 }

// pastSwitchover reports whether the switchover began: from here the
// engine finishes rather than aborts.
func (r *run) pastSwitchover() bool { return r.stage >= stagePaused && r.stage <= stageComplete }

// undoing reports whether the rollback (or the rescue) runs or ran: its
// commands have bounds of their own (bounds.go).
func (r *run) undoing() bool { return r.been(stageRollback) || r.been(stageRescue) }

// destination is what the engine did to the destination QEMU and saw of it.
type destination uint8

const (
	dstUntouched destination = iota // reusable: nothing of the migration started there
	dstIncoming                     // migrate-incoming ran: not reusable, it exits when the migration fails
	dstKept                         // completed its incoming migration as a cancel landed: kept paused
	dstRan                          // the guest ran there (RESUME, or seen running)
)
