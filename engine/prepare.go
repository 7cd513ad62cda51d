package engine

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/preflight"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/strategy"
	"github.com/qmigrate/qmigrate/transport"
)

// sideInfo is what prepare learns about one QEMU before changing anything.
type sideInfo struct {
	status  string
	mig     *qmp.MigrationInfo
	memory  uint64 // base + plugged, 0 = unknown
	machine string // "" = unknown
	uuid    string
	caps    map[string]bool // query-migrate-capabilities: every capability the QEMU has
	params  *qmp.MigrationParameters
	feat    *qmp.Features // query-qmp-schema, probed for storage migrations only
}

// prepare connects, checks both sides, then (storage) starts the mirrors and
// sets capabilities and parameters on both sides. Without storage no schema
// is probed: what the engine needs comes from small queries (capabilities,
// parameters), and the argument forms of migrate-incoming and migrate are
// found out by trying them in the start phase.
func (r *run) prepare(ctx context.Context) error {
	err, derr := r.connectBoth(ctx)
	if err != nil && derr != nil {
		return errors.Join(err, derr) // each side's ConnectError
	}
	if err != nil {
		return err
	}
	if derr != nil {
		return derr
	}
	var wg sync.WaitGroup
	// The two sides are inspected concurrently; inspect only reads run
	// state.
	var si, di *sideInfo
	wg.Go(func() { di, derr = r.inspect(ctx, SideDestination) })
	si, err = r.inspect(ctx, SideSource)
	wg.Wait()
	if err != nil {
		return err
	}
	if derr != nil {
		return derr
	}
	if err := r.check(si, di); err != nil {
		return err
	}
	rep, err := r.preflight(ctx)
	if err != nil {
		return err
	}
	r.srcForm, r.dstForm = transport.Newest(), transport.Newest()
	if st := r.cfg.Storage; st != nil {
		r.srcF, r.dstF = si.feat, di.feat
		r.srcForm, r.dstForm = transport.FormOf(r.srcF), transport.FormOf(r.dstF)
		if !r.srcF.HasCommand("blockdev-mirror") || !r.dstF.HasCommand("block-export-add") {
			return r.badInput(CheckFeatures, "", "check storage support", errors.New("storage migration needs blockdev-mirror on the source and block-export-add on the destination"))
		}
		r.m.SetStorage(strategy.Storage{Disks: true, CanSwitch: r.srcF.BlockJobChange, CanRestart: !r.srcF.BlockJobChange, WriteBlocking: st.WriteBlocking})
	}
	r.m.SetQEMU(r.src.Version().Major, r.src.Version().Minor) // auto's downtime headroom is learned per version
	r.setup = r.m.Setup()
	// Postcopy permitted: its capability is on whatever the policy, so
	// that the caller can start it through the job (StartPostcopy).
	r.setup.Postcopy = r.setup.Postcopy || r.cfg.Strategy.Limits.AllowPostcopy
	if r.setup.Postcopy && r.cfg.Strategy.Limits.AllowPostcopy && !rep.Postcopy {
		// A device forbids postcopy (VFIO) or a QEMU cannot take it: the
		// postcopy-* results say which. The migration runs without it.
		r.log.Warn("postcopy not enabled", "reason", postcopyReason(rep))
		r.setup.Postcopy = false
	}
	if r.setup.Postcopy && r.cfg.MultifdChannels > 0 &&
		!(r.src.Version().AtLeast(10, 1) && r.dst.Version().AtLeast(10, 1)) {
		// 8.1-10.0 refuse multifd with postcopy-ram; 7.2 accepts it and
		// crashes the destination when postcopy starts (qemu-protocol.md 3).
		r.log.Debug("postcopy not enabled: multifd with postcopy needs QEMU 10.1 on both sides")
		r.setup.Postcopy = false
	}
	r.log.Debug("strategy setup", "policy", r.m.Policy(), "downtime", r.setup.DowntimeLimit,
		"auto-converge", r.setup.AutoConverge, "postcopy", r.setup.Postcopy, "throttle", r.setup.Throttle)
	srcCaps, dstCaps := r.wantCaps()
	if err := checkCaps(SideSource, r.src.Version(), si.caps, srcCaps); err != nil {
		return r.badInput(CheckFeatures, SideSource, "check capabilities", err)
	}
	if err := checkCaps(SideDestination, r.dst.Version(), di.caps, dstCaps); err != nil {
		return r.badInput(CheckFeatures, SideDestination, "check capabilities", err)
	}
	// From here on things change on the QEMUs: first the journal of what
	// they were (journal.go), removed last by a rollback.
	if err := r.writeJournal(ctx, si, di); err != nil {
		return err
	}
	if err := r.addTLS(ctx); err != nil {
		return err
	}
	if r.cfg.Storage != nil {
		if err := r.startStorage(ctx); err != nil {
			return err
		}
	}
	return r.configure(ctx, si, di, srcCaps, dstCaps)
}

// answerTimeout bounds the connection and the first answers of one side:
// ConnectTimeout, but never past the end of the Budget, which counts from
// the call to Migrate (a migration that cannot even connect within its
// budget cannot finish within it).
func (r *run) answerTimeout() time.Duration {
	d := r.cfg.connectTimeout()
	if b := r.cfg.Strategy.Limits.Budget; b > 0 {
		d = min(d, max(b-r.elapsed(), time.Millisecond))
	}
	return d
}

// connectBoth connects to both QEMUs at once and returns each side's
// error; the clients it dialled are closed with the run.
func (r *run) connectBoth(ctx context.Context) (srcErr, dstErr error) {
	var wg sync.WaitGroup
	wg.Go(func() { r.dst, dstErr = r.connect(ctx, SideDestination, r.cfg.Destination) })
	r.src, srcErr = r.connect(ctx, SideSource, r.cfg.Source)
	wg.Wait()
	for _, p := range []struct {
		c  *qmp.Client
		ep Endpoint
	}{{r.src, r.cfg.Source}, {r.dst, r.cfg.Destination}} {
		if p.c != nil && p.ep.Client == nil {
			r.owned = append(r.owned, p.c)
		}
	}
	return srcErr, dstErr
}

// connect dials an endpoint (or takes the caller's client), bounded by
// ConnectTimeout. The caller records a dialled client in owned.
func (r *run) connect(ctx context.Context, side Side, ep Endpoint) (*qmp.Client, error) {
	if ep.Client != nil {
		select {
		case <-ep.Client.Done():
			return nil, r.badInput(CheckConnect, side, "connect", fmt.Errorf("client already closed: %w", ep.Client.Err()))
		default:
		}
		return ep.Client, nil
	}
	timeout := r.answerTimeout()
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	r.log.Debug("connecting", "side", side, "address", ep.Address)
	opts := []qmp.Option{qmp.WithLogger(r.log.With("side", string(side)))}
	if ep.TLS != nil {
		opts = append(opts, qmp.WithTLS(ep.TLS))
	}
	c, err := qmp.DialAddress(cctx, ep.Address, opts...)
	if err != nil {
		ce := &ConnectError{Side: side, Address: ep.Address, Err: err}
		switch {
		case ctx.Err() != nil:
			ce.Err = ctx.Err()
			return nil, &Error{Phase: r.phase, Op: "connect", Err: fmt.Errorf("%w: %w", ErrCancelled, ce)}
		case cctx.Err() != nil:
			ce.Timeout = timeout
		default:
			ce.Path = PathKindOf(ep.Address, err)
		}
		return nil, r.badInput(CheckConnect, side, "connect", ce)
	}
	return c, nil
}

// inspect reads one side's state with concurrent queries; every answer must
// come within ConnectTimeout. The schema (query-qmp-schema, the largest
// reply by far and a long stall of QEMU's main loop) is probed along for a
// storage migration only, whose preflight needs it.
func (r *run) inspect(ctx context.Context, side Side) (*sideInfo, error) {
	c := r.client(side)
	timeout := r.answerTimeout()
	qctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	fail := func(op string, err error) error {
		if ctx.Err() != nil {
			return r.cancelled(ctx, op)
		}
		if qctx.Err() != nil {
			err = fmt.Errorf("no answer within %v: %w", timeout.Round(time.Millisecond), err)
		}
		return r.badInput(CheckInspect, side, op, err)
	}
	info := &sideInfo{}
	var (
		st                                                               *qmp.StatusInfo
		stErr, migErr, memErr, machErr, uuidErr, capErr, parErr, featErr error
		mem                                                              struct {
			Base    uint64  `json:"base-memory"`
			Plugged *uint64 `json:"plugged-memory"`
		}
		machine string
		wg      sync.WaitGroup
	)
	wg.Go(func() { st, stErr = c.QueryStatus(qctx) })
	wg.Go(func() { info.mig, migErr = c.QueryMigrate(qctx) })
	wg.Go(func() { memErr = c.Execute(qctx, "query-memory-size-summary", nil, &mem) })
	wg.Go(func() {
		machErr = c.Execute(qctx, "qom-get", map[string]string{"path": "/machine", "property": "type"}, &machine)
	})
	if r.cfg.MultifdChannels > 0 {
		wg.Go(func() { info.uuid, uuidErr = c.QueryUUID(qctx) })
	}
	wg.Go(func() { info.caps, capErr = c.QueryMigrateCapabilities(qctx) })
	wg.Go(func() { info.params, parErr = c.QueryMigrateParameters(qctx) })
	if r.cfg.Storage != nil {
		wg.Go(func() { info.feat, featErr = c.ProbeFeatures(qctx) })
	}
	wg.Wait()
	if stErr != nil {
		return nil, fail("query-status", stErr)
	}
	info.status = st.Status
	if migErr != nil {
		return nil, fail("query-migrate", migErr)
	}
	switch {
	case memErr == nil:
		info.memory = mem.Base
		if mem.Plugged != nil {
			info.memory += *mem.Plugged
		}
	case isQMPError(memErr):
		r.log.Debug("RAM size unknown", "side", side, "err", memErr)
	default:
		return nil, fail("query-memory-size-summary", memErr)
	}
	switch {
	case machErr == nil:
		info.machine = machine
	case isQMPError(machErr):
		r.log.Debug("machine type unknown", "side", side, "err", machErr)
	default:
		return nil, fail("qom-get /machine type", machErr)
	}
	if uuidErr != nil {
		return nil, fail("query-uuid", uuidErr)
	}
	if capErr != nil {
		return nil, fail("query-migrate-capabilities", capErr)
	}
	if parErr != nil {
		return nil, fail("query-migrate-parameters", parErr)
	}
	if featErr != nil {
		return nil, fail("query-qmp-schema", featErr)
	}
	r.log.Debug("inspected", "side", side, "qemu", c.Version(), "runstate", info.status,
		"migration", info.mig.Status, "memory", info.memory, "machine", info.machine)
	return info, nil
}

func isQMPError(err error) bool {
	var qe *qmp.Error
	return errors.As(err, &qe)
}

// check verifies the run states (and multifd's uuids), which make the
// comparison of preflight meaningful. Nothing has changed yet: every
// failure is bad input.
func (r *run) check(si, di *sideInfo) error {
	if di.status != "inmigrate" {
		return r.badInput(CheckRunState, SideDestination, "check run state",
			fmt.Errorf("destination is in run state %q, not \"inmigrate\": start it with -incoming defer", di.status))
	}
	if di.mig.Status != qmp.StatusNone || len(di.mig.SocketAddress) > 0 {
		return r.badInput(CheckRunState, SideDestination, "check incoming migration",
			fmt.Errorf("destination already listens or migrates (status %q): start it with -incoming defer, not -incoming URI", di.mig.Status))
	}
	switch si.status {
	case "running":
		r.srcWasRunning = true
	case "paused":
	default:
		return r.badInput(CheckRunState, SideSource, "check run state",
			fmt.Errorf("source is in run state %q, want \"running\" (or \"paused\")", si.status))
	}
	if s := si.mig.Status; s != qmp.StatusNone && !s.Terminal() {
		return r.badInput(CheckRunState, SideSource, "check migration state",
			fmt.Errorf("source already has a migration in status %q", s))
	}
	// RAM size and machine type are preflight's (ram-size, machine-type),
	// with every other difference at once.
	if r.cfg.MultifdChannels > 0 {
		if err := transport.CheckUUIDs(si.uuid, di.uuid); err != nil {
			return r.badInput(CheckMultifd, SideDestination, "compare uuid for multifd", err)
		}
	}
	return nil
}

// preflight runs every check of package preflight on both QEMUs (queries
// only) after check, before anything changes. Every failed check comes at
// once, as bad input with CheckPreflight wrapping a *preflight.Error (its
// Checks name them); a QEMU that cannot be read at all is bad input too
// (*preflight.SideError), the caller's ctx ending ErrCancelled.
func (r *run) preflight(ctx context.Context) (*preflight.Report, error) {
	opts := preflight.Options{
		// check did the run states.
		Skip: []preflight.Name{preflight.RunState},
	}
	if r.cfg.Strategy.Limits.AllowPostcopy {
		opts.Postcopy = preflight.PostcopyAllowed
	}
	if st := r.cfg.Storage; st != nil {
		opts.Storage = &preflight.Storage{Disks: st.Disks, Shared: st.Shared}
	}
	timeout := r.answerTimeout()
	qctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	rep, err := preflight.Run(qctx, r.src, r.dst, opts)
	r.log.Debug("preflight done", "took", time.Since(start), "err", err)
	if err != nil {
		if ctx.Err() != nil {
			return nil, r.cancelled(ctx, "preflight")
		}
		var se *preflight.SideError
		side := Side("")
		if errors.As(err, &se) {
			side = Side(se.Side) // "source" / "destination", the engine's Side values
		}
		if qctx.Err() != nil {
			err = fmt.Errorf("no answer within %v: %w", timeout.Round(time.Millisecond), err)
		}
		return nil, r.badInput(CheckPreflight, side, "preflight", err)
	}
	for _, res := range rep.Results {
		if res.Status == preflight.Warn {
			r.log.Warn("preflight", "check", res.Check, "detail", res.Detail)
		}
	}
	if err := rep.Err(); err != nil {
		return nil, r.badInput(CheckPreflight, failedSide(rep), "preflight", err)
	}
	return rep, nil
}

// failedSide is the side a failed preflight asks to change: the source for
// its migration blockers alone, else the destination (each difference is
// worded as what the destination must match).
func failedSide(rep *preflight.Report) Side {
	for _, f := range rep.Failed() {
		if f.Check != preflight.MigrationBlockers {
			return SideDestination
		}
	}
	return SideSource
}

// postcopyReason is what turned postcopy off: the details of the postcopy
// checks that did not pass.
func postcopyReason(rep *preflight.Report) string {
	var why []string
	for _, n := range []preflight.Name{preflight.PostcopyDevices, preflight.PostcopyUserfaultfd} {
		if res, ok := rep.Result(n); ok && res.Status != preflight.Pass {
			why = append(why, string(n)+": "+res.Detail)
		}
	}
	return strings.Join(why, "; ")
}

// wantCaps are the capabilities the engine manages, with the state it wants
// on each side. Each is set explicitly (on or off) where the QEMU has it, so
// leftovers of an earlier run cannot interfere; the rest are left alone.
func (r *run) wantCaps() (src, dst map[string]bool) {
	storage := r.cfg.Storage != nil
	multifd := r.cfg.MultifdChannels > 0
	preempt := r.postcopyPreempt()
	defer func() { src["postcopy-preempt"], dst["postcopy-preempt"] = preempt, preempt }()
	src = map[string]bool{
		"events":                  true,
		"auto-converge":           r.setup.AutoConverge,
		"postcopy-ram":            r.setup.Postcopy,
		"multifd":                 multifd,
		"pause-before-switchover": storage,
	}
	dst = map[string]bool{
		"events":              true,
		"postcopy-ram":        r.setup.Postcopy,
		"multifd":             multifd,
		"late-block-activate": storage,
	}
	return src, dst
}

// checkCaps makes sure every capability wanted on exists on that QEMU: its
// query-migrate-capabilities reply lists every capability it has.
func checkCaps(side Side, v qmp.Version, have, want map[string]bool) error {
	var missing []string
	for _, name := range slices.Sorted(maps.Keys(want)) {
		if _, ok := have[name]; want[name] && !ok {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%s QEMU %s lacks migration capabilities %v", side, v, missing)
	}
	return nil
}

// sideConfig is what configure sets on one side and what came of it.
type sideConfig struct {
	side   Side
	caps   map[string]bool // capabilities to change (nil: none)
	params *qmp.MigrationParameters
	prev   *qmp.MigrationParameters

	capErr, parErr         error // setting
	gotCaps                map[string]bool
	gotParams              *qmp.MigrationParameters
	capReadErr, parReadErr error // reading back
}

// configure sets the capabilities and parameters on both sides, reads back
// what it set and pushes their restoration. The sides run concurrently, and
// on each side the two sets, then the two read-backs, are in flight together
// (capabilities and parameters are independent in QEMU).
func (r *run) configure(ctx context.Context, si, di *sideInfo, srcCaps, dstCaps map[string]bool) error {
	r.prevSP = si.params
	var sp qmp.MigrationParameters
	bw := paramsBandwidth(r.cfg.bandwidth())
	sp.MaxBandwidth, sp.MaxPostcopyBandwidth = bw.MaxBandwidth, bw.MaxPostcopyBandwidth
	if d := r.setup.DowntimeLimit; d > 0 {
		sp.DowntimeLimit = qmp.Ptr(qmp.MillisOf(r.capDowntime(d)))
	}
	if t := r.setup.Throttle; t != nil && r.setup.AutoConverge {
		r.throttleParams(&sp, *t)
	}
	mf := transport.Multifd{Channels: r.cfg.MultifdChannels}
	mf.Parameters(&sp)
	var dp qmp.MigrationParameters
	mf.Parameters(&dp)
	r.tlsParameters(&sp, &dp, si.params, di.params)
	src := &sideConfig{side: SideSource, caps: capChanges(si.caps, srcCaps, r.prevSC), params: &sp, prev: si.params}
	dst := &sideConfig{side: SideDestination, caps: capChanges(di.caps, dstCaps, r.prevDC), prev: di.params}
	if dp != (qmp.MigrationParameters{}) {
		dst.params = &dp
	}
	var wg sync.WaitGroup
	wg.Go(func() { r.configureSide(ctx, dst) })
	r.configureSide(ctx, src)
	wg.Wait()
	// Restoration for whatever was set, whatever else failed.
	for _, s := range []*sideConfig{src, dst} {
		if s.caps != nil && s.capErr == nil {
			r.pushCapsUndo(s.side)
		}
	}
	for _, s := range []*sideConfig{src, dst} {
		if s.params != nil && s.parErr == nil {
			r.pushParamsUndo(s.side, restoreParams(*s.params, s.prev))
		}
	}
	for _, s := range []*sideConfig{src, dst} {
		if s.capErr != nil {
			return r.callErr(ctx, s.side, "migrate-set-capabilities", s.capErr)
		}
	}
	for _, s := range []*sideConfig{src, dst} {
		if s.parErr != nil {
			return r.callErr(ctx, s.side, "migrate-set-parameters", s.parErr)
		}
	}
	for _, s := range []*sideConfig{src, dst} {
		if s.capReadErr != nil {
			return r.callErr(ctx, s.side, "query-migrate-capabilities", s.capReadErr)
		}
		for _, name := range slices.Sorted(maps.Keys(s.caps)) {
			if on := s.caps[name]; s.gotCaps[name] != on {
				return r.errorf(s.side, "check capabilities", fmt.Errorf("capability %s reads %v after setting it to %v", name, s.gotCaps[name], on))
			}
		}
	}
	for _, s := range []*sideConfig{src, dst} {
		if s.parReadErr != nil {
			return r.callErr(ctx, s.side, "query-migrate-parameters", s.parReadErr)
		}
		if s.params != nil {
			if err := paramsMatch(*s.params, s.gotParams); err != nil {
				return r.errorf(s.side, "check parameters", err)
			}
		}
	}
	// Keep the downtime limit in force.
	r.downtimeLimit = src.gotParams.DowntimeLimitDuration()
	if dp.MultifdChannels != nil && *dst.gotParams.MultifdChannels != *src.gotParams.MultifdChannels {
		return r.errorf(SideDestination, "check parameters", fmt.Errorf("multifd-channels %d on the destination, %d on the source", *dst.gotParams.MultifdChannels, *src.gotParams.MultifdChannels))
	}
	return nil
}

// capChanges are the wanted capabilities that differ from cur (nil when
// none); their previous states go to prev. A capability the QEMU lacks is
// wanted off (checkCaps passed) and skipped.
func capChanges(cur, want, prev map[string]bool) map[string]bool {
	var change map[string]bool
	for name, on := range want {
		has, known := cur[name]
		if !known || has == on {
			continue
		}
		if change == nil {
			change = map[string]bool{}
		}
		change[name] = on
		prev[name] = has
	}
	return change
}

// configureSide sets s.caps and s.params on one QEMU, then reads back what
// it set. It only talks to QEMU: the caller pushes the undo steps. Each
// command is bounded (ask).
func (r *run) configureSide(ctx context.Context, s *sideConfig) {
	c := r.client(s.side)
	var wg sync.WaitGroup
	if s.caps != nil {
		r.log.Debug("set capabilities", "side", s.side, "caps", s.caps)
		wg.Go(func() {
			s.capErr = r.do(ctx, s.side, "migrate-set-capabilities", func(ctx context.Context) error { return c.MigrateSetCapabilities(ctx, s.caps) })
		})
	}
	if s.params != nil {
		r.log.Debug("set parameters", "side", s.side, "params", paramString(*s.params))
		wg.Go(func() {
			s.parErr = r.do(ctx, s.side, "migrate-set-parameters", func(ctx context.Context) error { return c.MigrateSetParameters(ctx, *s.params) })
		})
	}
	wg.Wait()
	if s.capErr != nil || s.parErr != nil {
		return
	}
	if s.caps != nil {
		wg.Go(func() {
			s.gotCaps, s.capReadErr = ask(r, ctx, s.side, "query-migrate-capabilities", c.QueryMigrateCapabilities)
		})
	}
	if s.params != nil {
		wg.Go(func() {
			s.gotParams, s.parReadErr = ask(r, ctx, s.side, "query-migrate-parameters", c.QueryMigrateParameters)
		})
	}
	wg.Wait()
}

// pushCapsUndo pushes the restoration of the capabilities changed on side.
func (r *run) pushCapsUndo(side Side) {
	c := r.client(side)
	prev := r.prevSC
	if side == SideDestination {
		prev = r.prevDC
	}
	restore := maps.Clone(prev)
	r.pushUndo("", string(side)+": restore capabilities", func(ctx context.Context) (string, error) {
		if side == SideDestination && r.dstAt != dstUntouched {
			return "", nil // the destination's incoming migration started: it is not reusable, leave it
		}
		if err := r.do(ctx, side, "migrate-set-capabilities", func(ctx context.Context) error { return c.MigrateSetCapabilities(ctx, restore) }); err != nil {
			return "", err
		}
		return fmt.Sprintf("%s: capabilities restored: %s", side, capWords(restore)), nil
	})
}

// pushParamsUndo pushes the restoration of the parameters set on side.
func (r *run) pushParamsUndo(side Side, restore qmp.MigrationParameters) {
	c := r.client(side)
	r.pushUndo("", string(side)+": restore parameters", func(ctx context.Context) (string, error) {
		if side == SideDestination && r.dstAt != dstUntouched {
			return "", nil
		}
		// Parameters changed later by decisions (downtime, throttle) are
		// covered: restoreParams took every field the engine may touch.
		if err := r.do(ctx, side, "migrate-set-parameters", func(ctx context.Context) error { return c.MigrateSetParameters(ctx, restore) }); err != nil {
			return "", err
		}
		return fmt.Sprintf("%s: parameters restored %s", side, paramString(restore)), nil
	})
}

// restoreParams picks from prev the fields set in p, plus the ones decisions
// may change later (downtime and throttle parameters).
func restoreParams(p qmp.MigrationParameters, prev *qmp.MigrationParameters) qmp.MigrationParameters {
	var out qmp.MigrationParameters
	if prev == nil {
		return out
	}
	out.MaxBandwidth = prev.MaxBandwidth
	if p.MaxPostcopyBandwidth != nil {
		out.MaxPostcopyBandwidth = prev.MaxPostcopyBandwidth
	}
	out.DowntimeLimit = prev.DowntimeLimit
	out.CPUThrottleInitial = prev.CPUThrottleInitial
	out.CPUThrottleIncrement = prev.CPUThrottleIncrement
	out.MaxCPUThrottle = prev.MaxCPUThrottle
	out.ThrottleTriggerThreshold = prev.ThrottleTriggerThreshold
	out.CPUThrottleTailslow = prev.CPUThrottleTailslow
	if p.MultifdChannels != nil {
		out.MultifdChannels = prev.MultifdChannels
	}
	if p.TLSCreds != nil {
		out.TLSCreds = orEmpty(prev.TLSCreds)
	}
	if p.TLSHostname != nil {
		out.TLSHostname = orEmpty(prev.TLSHostname)
	}
	if p.TLSAuthz != nil {
		out.TLSAuthz = orEmpty(prev.TLSAuthz)
	}
	return out
}

func paramsMatch(want qmp.MigrationParameters, got *qmp.MigrationParameters) error {
	return errors.Join(
		paramReads("max-bandwidth", want.MaxBandwidth, got.MaxBandwidth),
		paramReads("max-postcopy-bandwidth", want.MaxPostcopyBandwidth, got.MaxPostcopyBandwidth),
		paramReads("downtime-limit", want.DowntimeLimit, got.DowntimeLimit),
		paramReads("multifd-channels", want.MultifdChannels, got.MultifdChannels),
		paramReads("cpu-throttle-initial", want.CPUThrottleInitial, got.CPUThrottleInitial),
		paramReads("cpu-throttle-increment", want.CPUThrottleIncrement, got.CPUThrottleIncrement),
		paramReads("max-cpu-throttle", want.MaxCPUThrottle, got.MaxCPUThrottle),
		paramReads("throttle-trigger-threshold", want.ThrottleTriggerThreshold, got.ThrottleTriggerThreshold),
		paramReads("tls-creds", want.TLSCreds, got.TLSCreds),
		paramReads("tls-hostname", want.TLSHostname, got.TLSHostname),
		paramReads("tls-authz", want.TLSAuthz, got.TLSAuthz),
	)
}

// paramReads checks that a parameter set to w (nil: not set) reads back g.
func paramReads[T comparable](name string, w, g *T) error {
	if w != nil && (g == nil || *g != *w) {
		return fmt.Errorf("%s reads %s after setting it to %v", name, fmtPtr(g), *w)
	}
	return nil
}

func fmtPtr[T any](p *T) string {
	if p == nil {
		return "nothing"
	}
	return fmt.Sprint(*p)
}

func paramString(p qmp.MigrationParameters) string {
	s := ""
	add := func(name string, v any) { s += fmt.Sprintf(" %s=%v", name, v) }
	if p.MaxBandwidth != nil {
		add("max-bandwidth", *p.MaxBandwidth)
	}
	if p.MaxPostcopyBandwidth != nil {
		add("max-postcopy-bandwidth", *p.MaxPostcopyBandwidth)
	}
	if p.DowntimeLimit != nil {
		add("downtime-limit", *p.DowntimeLimit)
	}
	if p.MultifdChannels != nil {
		add("multifd-channels", *p.MultifdChannels)
	}
	if p.CPUThrottleInitial != nil {
		add("cpu-throttle-initial", *p.CPUThrottleInitial)
	}
	if p.CPUThrottleIncrement != nil {
		add("cpu-throttle-increment", *p.CPUThrottleIncrement)
	}
	if p.MaxCPUThrottle != nil {
		add("max-cpu-throttle", *p.MaxCPUThrottle)
	}
	if p.ThrottleTriggerThreshold != nil {
		add("throttle-trigger-threshold", *p.ThrottleTriggerThreshold)
	}
	if p.CPUThrottleTailslow != nil {
		add("cpu-throttle-tailslow", *p.CPUThrottleTailslow)
	}
	for _, f := range []struct {
		name string
		v    *string
	}{{"tls-creds", p.TLSCreds}, {"tls-hostname", p.TLSHostname}, {"tls-authz", p.TLSAuthz}} {
		if f.v != nil {
			add(f.name, fmt.Sprintf("%q", *f.v))
		}
	}
	if s == "" {
		return "{}"
	}
	return s[1:]
}

// capDowntime bounds a downtime limit by the user's maximum and QEMU's.
func (r *run) capDowntime(d time.Duration) time.Duration {
	ceiling := r.cfg.Strategy.Limits.MaxDowntime
	if ceiling <= 0 {
		ceiling = strategy.DefaultMaxDowntime
	}
	d = min(d, ceiling, strategy.QEMUMaxDowntime)
	return max(d, time.Millisecond)
}

func (r *run) throttleParams(p *qmp.MigrationParameters, t strategy.Throttle) {
	if t.Initial > 0 {
		p.CPUThrottleInitial = qmp.Ptr(t.Initial)
	}
	if t.Increment > 0 {
		p.CPUThrottleIncrement = qmp.Ptr(t.Increment)
	}
	if t.Max > 0 {
		p.MaxCPUThrottle = qmp.Ptr(t.Max)
	}
	if t.TriggerThreshold > 0 {
		p.ThrottleTriggerThreshold = qmp.Ptr(t.TriggerThreshold)
	}
	if r.prevSP != nil && r.prevSP.CPUThrottleTailslow != nil { // the source has it
		p.CPUThrottleTailslow = qmp.Ptr(t.Tailslow)
	}
}

// startStorage starts the mirrors (blockmirror preflights first: its
// preflight errors are bad input) and pushes their abort.
func (r *run) startStorage(ctx context.Context) error {
	env := blockmirror.Env{
		Source:      blockmirror.QEMU{Client: r.src, Features: r.srcF},
		Destination: blockmirror.QEMU{Client: r.dst, Features: r.dstF},
		Migration:   r.ch.Address,
		Logger:      r.log,
	}
	if t := r.cfg.TLS; t != nil {
		env.TLSCreds, env.TLSHostname = r.tlsID, t.Hostname
	}
	s, err := blockmirror.Start(ctx, *r.cfg.Storage, env)
	if err != nil {
		if ctx.Err() != nil {
			return r.cancelled(ctx, "start mirrors")
		}
		if errors.Is(err, blockmirror.ErrPreflight) {
			return r.badInput(CheckStorage, "", "storage preflight", err)
		}
		return r.errorf("", "start mirrors", err)
	}
	r.mirror = s
	// Abort talks to the source first; it is bounded by undoStepTimeout as
	// a whole (it waits for the cancelled mirrors).
	r.pushUndo(SideSource, "storage: abort mirrors", func(ctx context.Context) (string, error) {
		if err := s.Abort(ctx); err != nil {
			return "", err
		}
		return "storage: mirrors aborted, NBD nodes, exports and server removed", nil
	})
	return nil
}

// capWords says capabilities in words, sorted: "auto-converge off, events on".
func capWords(caps map[string]bool) string {
	var out []string
	for _, name := range slices.Sorted(maps.Keys(caps)) {
		state := "off"
		if caps[name] {
			state = "on"
		}
		out = append(out, name+" "+state)
	}
	return strings.Join(out, ", ")
}
