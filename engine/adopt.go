package engine

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/qmp"
)

// Errors of Adopt.
var (
	// ErrNothingToAdopt: no migration of qmigrate's is in flight between
	// the two QEMUs and nothing of qmigrate's is left on them. Nothing was
	// touched. It wraps ErrBadInput (Error.Check CheckAdopt).
	ErrNothingToAdopt = fmt.Errorf("nothing to adopt: %w", ErrBadInput)
	// ErrNotOurs: the source migrates, but not a migration qmigrate
	// started (no journal): Adopt leaves it alone. Wraps ErrBadInput.
	ErrNotOurs = fmt.Errorf("a migration qmigrate did not start: %w", ErrBadInput)
	// ErrAbandoned: the process that started the migration died before it
	// was under way (in prepare, or with its mirrors still copying); Adopt
	// rolled it back.
	ErrAbandoned = errors.New("migration abandoned before it was under way")
)

// CheckAdopt is Error.Check of Adopt's refusals (ErrNothingToAdopt,
// ErrNotOurs).
const CheckAdopt Check = "adopt"

// Adopt takes over a migration another process (crashed, killed, or
// upgraded) left between cfg.Source and cfg.Destination, and sees it to an
// end as Start does: it returns a Job once it holds the migration, or the
// error. QEMU is the truth: Adopt reads both sides (run states,
// query-migrate, capabilities and parameters, the journal the first
// process left on each QEMU, TLS objects, mirror jobs, NBD exports) and
// rebuilds the undo stack from that and from cfg (given again as it was:
// addresses, URI, limits, policy, TLS, storage). What it does, by the
// source's migration status:
//
//   - setup, active, pre-switchover, device: the migration goes on under
//     the strategy, the budget counted from QEMU's total-time; with disk
//     mirrors (which Adopt cannot finish: their session died with the
//     first process) it is rolled back instead (ErrAbandoned);
//   - postcopy-active and the other postcopy states: seen through to the
//     end; a postcopy-paused one (its link lost, maybe while nobody
//     watched) is recovered first (recover.go), at the address the
//     destination reports it listened on (Config.Listen or URI, their
//     port 0 resolved from the destination's query-migrate); a recovery
//     the first process left under way (the source in
//     postcopy-recover(-setup)) is given an attempt's time
//     (PostcopyStallTimeout) to finish before it is paused and retried;
//   - completed: finished on the destination (cont where the guest ran
//     before), leftovers removed;
//   - failed or cancelled, or no migration yet with qmigrate's journal:
//     the leftovers of qmigrate's on both sides are removed, the
//     capabilities and parameters set back to the journal's (what the
//     first process found), the guest resumed on the source where it ran
//     (Result: failed or cancelled, with ErrMigrationFailed, ErrCancelled
//     or ErrAbandoned);
//   - nothing of qmigrate's on either QEMU: ErrNothingToAdopt, nothing
//     touched; a migration without qmigrate's journal: ErrNotOurs.
func Adopt(ctx context.Context, cfg Config) (*Job, error) {
	return startWith(ctx, cfg, (*run).adopt)
}

// adopt is the job's body for Adopt (execute's for Start).
func (r *run) adopt(ctx context.Context) error {
	defer r.closeAll()
	r.emit(Event{Kind: EventPhase, Phase: PhasePrepare})
	rest, err := r.takeOver(ctx)
	if err != nil {
		return r.fail(ctx, err)
	}
	_ = r.running(ctx)
	for _, step := range rest {
		if err := step(ctx); err != nil {
			return r.fail(ctx, err)
		}
	}
	return nil
}

// found is what Adopt reads of both QEMUs.
type found struct {
	srcRun, dstRun   string
	srcMig, dstMig   *qmp.MigrationInfo
	srcCaps, dstCaps map[string]bool
	srcPar, dstPar   *qmp.MigrationParameters
	srcObjs, dstObjs []string
	srcJour, dstJour *journal
	storage          blockmirror.Leftovers
	dstGone          bool
}

// takeOver connects, reads both sides, rebuilds the run's state and undo
// stack, and returns the steps that remain.
func (r *run) takeOver(ctx context.Context) ([]func(context.Context) error, error) {
	srcErr, dstErr := r.connectBoth(ctx)
	if srcErr != nil {
		return nil, srcErr
	}
	f := &found{}
	if dstErr != nil {
		// A destination that exited (a failed incoming migration) leaves
		// the source to clean up; any other failure is the caller's.
		var ce *ConnectError
		if !errors.As(dstErr, &ce) || ctx.Err() != nil || ce.Timeout > 0 {
			return nil, dstErr
		}
		r.log.Info("destination unreachable: adopting the source alone", "err", dstErr)
		r.dst = qmp.Closed(dstErr)
		f.dstGone = true
	}
	if err := r.read(ctx, f); err != nil {
		return nil, err
	}
	j := f.srcJour
	if j == nil {
		j = f.dstJour
	}
	status := qmp.StatusNone
	if f.srcMig != nil {
		status = f.srcMig.Status
	}
	inFlight := status != qmp.StatusNone && !status.Terminal()
	switch {
	case j == nil && inFlight:
		return nil, r.adoptRefused(fmt.Errorf("%w: the source's migration is %s, with no journal of qmigrate's on it", ErrNotOurs, status))
	case j == nil && f.storage.Empty() && len(f.srcObjs) == 0 && len(f.dstObjs) == 0:
		return nil, r.adoptRefused(fmt.Errorf("%w: the source's migration status is %q, and nothing of qmigrate's is on either QEMU", ErrNothingToAdopt, orNone(status)))
	}
	r.rebuild(f, j)
	r.log.Info("adopting", "status", status, "source", f.srcRun, "destination", f.dstRun, "token", r.token)

	fail := func(err error) []func(context.Context) error {
		return []func(context.Context) error{func(context.Context) error { return err }}
	}
	switch {
	case status.Postcopy():
		r.adoptAt(stagePostcopy)
		r.dstAt = dstRan // the guest ran there
		if f.dstMig != nil {
			if ch, err := r.ch.WithPort(f.dstMig); err == nil {
				if err := r.listensAt(ch); err != nil {
					r.log.Debug("adopt: source address", "err", err)
				}
			}
		}
		return []func(context.Context) error{r.converge, r.complete}, nil
	case status == qmp.StatusCompleted:
		r.adoptAt(stageSourceDone)
		r.lastInfo = f.srcMig
		return []func(context.Context) error{r.complete}, nil
	case inFlight && !f.storage.Empty():
		r.adoptAt(stagePrecopy)
		return fail(r.errorf("", "adopt", fmt.Errorf("%w: its disk mirrors (%s) belonged to the process that died: rolled back, the guest stays on the source",
			ErrAbandoned, strings.Join(f.storage.Jobs, ", ")))), nil
	case inFlight:
		r.adoptAt(stagePrecopy)
		if st := status; st == qmp.StatusDevice || f.srcRun == "finish-migrate" {
			r.sourceStopped()
		}
		// The budget counts from QEMU's own start of the migration.
		if tt := f.srcMig.TotalTime; tt > 0 {
			r.t0 = time.Now().Add(-tt)
		}
		return []func(context.Context) error{r.adoptLimits, r.converge, r.complete}, nil
	case status == qmp.StatusFailed:
		r.adoptAt(stagePrecopy)
		return fail(r.errorf(SideSource, "migrate", fmt.Errorf("%w: %s (found when adopting)", ErrMigrationFailed, orUnknown(f.srcMig.ErrorDesc)))), nil
	case status == qmp.StatusCancelled:
		r.adoptAt(stagePrecopy)
		return fail(r.errorf(SideSource, "adopt", fmt.Errorf("%w: found cancelled when adopting", ErrCancelled))), nil
	}
	// No migration started on the source (it died in prepare or while the
	// mirrors copied): undo what it did.
	return fail(r.errorf("", "adopt", fmt.Errorf("%w: the source has no migration (status %q)", ErrAbandoned, orNone(status)))), nil
}

func orNone(s qmp.MigrationStatus) string {
	if s == "" {
		return "none"
	}
	return string(s)
}

func (r *run) adoptRefused(err error) error {
	return &Error{Phase: r.phase, Op: "adopt", Check: CheckAdopt, Err: err}
}

// read reads both sides for Adopt: queries only.
func (r *run) read(ctx context.Context, f *found) error {
	qctx, cancel := context.WithTimeout(ctx, r.answerTimeout())
	defer cancel()
	type side struct {
		s    Side
		c    *qmp.Client
		run  *string
		mig  **qmp.MigrationInfo
		caps *map[string]bool
		par  **qmp.MigrationParameters
		objs *[]string
		jour **journal
	}
	sides := []side{{SideSource, r.src, &f.srcRun, &f.srcMig, &f.srcCaps, &f.srcPar, &f.srcObjs, &f.srcJour}}
	if !f.dstGone {
		sides = append(sides, side{SideDestination, r.dst, &f.dstRun, &f.dstMig, &f.dstCaps, &f.dstPar, &f.dstObjs, &f.dstJour})
	}
	for _, s := range sides {
		wrap := func(op string, err error) error {
			if ctx.Err() != nil {
				return r.cancelled(ctx, op)
			}
			return r.badInput(CheckInspect, s.s, op, err)
		}
		st, err := s.c.QueryStatus(qctx)
		if err != nil {
			return wrap("query-status", err)
		}
		*s.run = st.Status
		if *s.mig, err = s.c.QueryMigrate(qctx); err != nil {
			return wrap("query-migrate", err)
		}
		if *s.caps, err = s.c.QueryMigrateCapabilities(qctx); err != nil {
			return wrap("query-migrate-capabilities", err)
		}
		if *s.par, err = s.c.QueryMigrateParameters(qctx); err != nil {
			return wrap("query-migrate-parameters", err)
		}
		if *s.objs, err = ownedObjects(qctx, s.c); err != nil {
			return wrap("qom-list /objects", err)
		}
		js, err := readJournals(qctx, s.c, *s.objs)
		if err != nil {
			return wrap("read journal", err)
		}
		if len(js) > 1 {
			return r.badInput(CheckAdopt, s.s, "read journal", fmt.Errorf("%d journals of qmigrate's on the %s QEMU: check it by hand", len(js), s.s))
		}
		if len(js) == 1 {
			*s.jour = &js[0]
		}
	}
	var dst *qmp.Client
	if !f.dstGone {
		dst = r.dst
	}
	l, err := blockmirror.FindLeftovers(qctx, r.src, dst)
	if err != nil {
		if ctx.Err() != nil {
			return r.cancelled(ctx, "find leftovers")
		}
		return r.badInput(CheckInspect, "", "find leftovers", err)
	}
	f.storage = l
	return nil
}

// adoptAt sets the stage Adopt found the migration in, as if the engine
// had gone through the stages before it.
func (r *run) adoptAt(s stage) {
	for t := stagePrepare; t <= s; t++ {
		if t == stageMirror && r.cfg.Storage == nil {
			continue
		}
		r.seen |= 1 << t
	}
	r.stage = s
	r.job.setStage(s)
	if p := s.phase(); p != "" {
		r.setPhase(p)
	}
}

// rebuild restores the run's state from what was found and pushes the
// undo steps the first process would have had on its stack, in the same
// order: the journals, the TLS credentials, the disks' leftovers, the
// capabilities and parameters, the migration socket, the migration.
func (r *run) rebuild(f *found, j *journal) {
	if j != nil {
		r.token = j.Token
		r.srcWasRunning = j.Running
		if f.srcJour == nil {
			// Only the destination's journal: the source was not touched
			// (the first process died between the two object-adds).
			r.srcWasRunning = f.srcRun == "running"
		}
	} else {
		r.srcWasRunning = f.srcRun == "running"
	}
	// The destination: reusable only while it never started an incoming
	// migration (still inmigrate, status none, not listening).
	switch {
	case f.dstGone:
		r.dstAt = dstIncoming
	case f.dstRun == "running" || (f.dstMig != nil && f.dstMig.Status == qmp.StatusCompleted && f.dstRun != "inmigrate"):
		r.dstAt = dstRan
	case f.dstRun != "inmigrate" || (f.dstMig != nil && (f.dstMig.Status != qmp.StatusNone || len(f.dstMig.SocketAddress) > 0)):
		r.dstAt = dstIncoming
	}
	r.setup.Postcopy = f.srcCaps["postcopy-ram"]
	r.setup.AutoConverge = f.srcCaps["auto-converge"]
	if f.srcPar != nil {
		r.downtimeLimit = f.srcPar.DowntimeLimitDuration()
		r.adoptedBandwidth = f.srcPar.MaxBandwidth
	}
	// Events from here on (the ones before the adoption are gone).
	r.srcSub = r.src.SubscribeNames("MIGRATION", "MIGRATION_PASS", "STOP")
	r.dstSub = r.dst.SubscribeNames("MIGRATION", "RESUME")

	for _, side := range []Side{SideSource, SideDestination} {
		if r.hasObject(f, side, journalID(r.token)) {
			undoSide := side
			if side == SideDestination {
				undoSide = ""
			}
			r.pushUndo(undoSide, string(side)+": remove journal", func(ctx context.Context) (string, error) { return r.dropJournal(ctx, side) })
		}
	}
	tj := map[Side]*journal{SideSource: f.srcJour, SideDestination: f.dstJour}
	if r.hasObject(f, SideSource, tlsID(r.token)) || r.hasObject(f, SideDestination, tlsID(r.token)) {
		r.tlsID = tlsID(r.token)
		r.tlsRestore = map[Side]qmp.MigrationParameters{}
		for _, side := range []Side{SideSource, SideDestination} {
			cur := f.srcPar
			if side == SideDestination {
				cur = f.dstPar
			}
			if tj[side] != nil && cur != nil {
				r.tlsRestore[side] = tlsPart(changedParams(cur, tj[side].Params))
			}
			if r.hasObject(f, side, r.tlsID) {
				r.pushUndo(side, string(side)+": remove TLS credentials", func(ctx context.Context) (string, error) { return r.dropTLS(ctx, side) })
			}
		}
	}
	if !f.storage.Empty() {
		l := f.storage
		r.pushUndo("", "source: remove disk mirrors", func(ctx context.Context) (string, error) {
			var dst *qmp.Client
			if r.dst.Err() == nil && !r.silent.isMute(SideDestination) {
				dst = r.dst
			} else {
				l.Exports = nil
			}
			did, err := blockmirror.RemoveLeftovers(ctx, r.src, dst, l)
			return strings.Join(did, "; "), err
		})
	}
	for _, side := range []Side{SideSource, SideDestination} {
		cur, caps := f.srcPar, f.srcCaps
		prev := r.prevSC
		if side == SideDestination {
			cur, caps, prev = f.dstPar, f.dstCaps, r.prevDC
		}
		if tj[side] == nil || cur == nil {
			continue
		}
		for name, was := range tj[side].Caps {
			if now, ok := caps[name]; ok && now != was {
				prev[name] = was
			}
		}
		if len(prev) > 0 {
			r.pushCapsUndo(side)
		}
		if restore := changedParams(cur, tj[side].Params); restore != (qmp.MigrationParameters{}) {
			r.pushParamsUndo(side, restore)
		}
	}
	if f.srcMig != nil && f.srcMig.Status != qmp.StatusNone {
		r.pushSocketUndo()
		r.pushMigrationUndo()
	} else if r.dstAt != dstUntouched {
		r.pushSocketUndo()
	}
}

// hasObject reports whether side has the object id (of qmigrate's).
func (r *run) hasObject(f *found, side Side, id string) bool {
	objs := f.srcObjs
	if side == SideDestination {
		objs = f.dstObjs
	}
	for _, o := range objs {
		if o == id {
			return true
		}
	}
	return false
}

// changedParams are the parameters the engine sets whose value now differs
// from was (the journal's): what a rollback sets back.
func changedParams(now, was *qmp.MigrationParameters) qmp.MigrationParameters {
	var out qmp.MigrationParameters
	if was == nil {
		return out
	}
	pick := func(n, w *uint64) *uint64 {
		if w != nil && (n == nil || *n != *w) {
			return w
		}
		return nil
	}
	pickInt := func(n, w *int) *int {
		if w != nil && (n == nil || *n != *w) {
			return w
		}
		return nil
	}
	pickStr := func(n, w *string) *string {
		if (n == nil) == (w == nil) && (n == nil || *n == *w) {
			return nil
		}
		return orEmpty(w)
	}
	out.MaxBandwidth = pick(now.MaxBandwidth, was.MaxBandwidth)
	out.MaxPostcopyBandwidth = pick(now.MaxPostcopyBandwidth, was.MaxPostcopyBandwidth)
	out.DowntimeLimit = pick(now.DowntimeLimit, was.DowntimeLimit)
	out.CPUThrottleInitial = pickInt(now.CPUThrottleInitial, was.CPUThrottleInitial)
	out.CPUThrottleIncrement = pickInt(now.CPUThrottleIncrement, was.CPUThrottleIncrement)
	out.MaxCPUThrottle = pickInt(now.MaxCPUThrottle, was.MaxCPUThrottle)
	out.ThrottleTriggerThreshold = pickInt(now.ThrottleTriggerThreshold, was.ThrottleTriggerThreshold)
	if was.CPUThrottleTailslow != nil && (now.CPUThrottleTailslow == nil || *now.CPUThrottleTailslow != *was.CPUThrottleTailslow) {
		out.CPUThrottleTailslow = was.CPUThrottleTailslow
	}
	out.MultifdChannels = pickInt(now.MultifdChannels, was.MultifdChannels)
	out.TLSCreds = pickStr(now.TLSCreds, was.TLSCreds)
	out.TLSHostname = pickStr(now.TLSHostname, was.TLSHostname)
	out.TLSAuthz = pickStr(now.TLSAuthz, was.TLSAuthz)
	return out
}

// adoptLimits puts the caller's limits in force on a migration adopted in
// pre-copy: the bandwidth as Config.Bandwidth says (the first process may
// have changed it mid-flight), and a downtime limit above the maximum
// lowered to it.
func (r *run) adoptLimits(ctx context.Context) error {
	var p qmp.MigrationParameters
	if bw := r.cfg.bandwidth(); r.adoptedBandwidth == nil || *r.adoptedBandwidth != bw {
		p = paramsBandwidth(bw)
	}
	if d := r.capDowntime(r.downtimeLimit); r.downtimeLimit > d {
		p.DowntimeLimit = qmp.Ptr(qmp.MillisOf(d))
		r.downtimeLimit = d
	}
	if p == (qmp.MigrationParameters{}) {
		return nil
	}
	if err := r.setSourceParams(ctx, "adopted limits", p); err != nil {
		return r.callErr(ctx, SideSource, "migrate-set-parameters", err)
	}
	return nil
}
