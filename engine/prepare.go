package engine

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/strategy"
	"github.com/qmigrate/qmigrate/transport"
)

// sideInfo is what prepare learns about one QEMU before changing anything.
type sideInfo struct {
	status  string
	mig     *qmp.MigrationInfo
	feat    *qmp.Features
	memory  uint64 // base + plugged, 0 = unknown
	machine string // "" = unknown
	uuid    string
	caps    map[string]bool
	params  *qmp.MigrationParameters
}

// prepare connects, checks both sides, then (storage) starts the mirrors and
// sets capabilities and parameters on both sides.
func (r *run) prepare(ctx context.Context) error {
	var err error
	if r.src, err = r.connect(ctx, SideSource, r.cfg.Source); err != nil {
		return err
	}
	if r.dst, err = r.connect(ctx, SideDestination, r.cfg.Destination); err != nil {
		return err
	}
	// The two sides are inspected concurrently: query-qmp-schema alone
	// takes 0.1-0.5 s on a busy TCG QEMU. inspect only reads run state.
	var (
		si, di *sideInfo
		derr   error
		done   = make(chan struct{})
	)
	go func() {
		defer close(done)
		di, derr = r.inspect(ctx, SideDestination)
	}()
	si, err = r.inspect(ctx, SideSource)
	<-done
	if err != nil {
		return err
	}
	if derr != nil {
		return derr
	}
	r.srcF, r.dstF = si.feat, di.feat
	if err := r.check(si, di); err != nil {
		return err
	}
	if st := r.cfg.Storage; st != nil {
		r.m.SetStorage(strategy.Storage{Disks: true, CanSwitch: si.feat.BlockJobChange, WriteBlocking: st.WriteBlocking})
	}
	r.setup = r.m.Setup()
	if r.setup.Postcopy && r.cfg.MultifdChannels > 0 &&
		!(si.feat.Version.AtLeast(10, 1) && di.feat.Version.AtLeast(10, 1)) {
		// 8.1-10.0 refuse multifd with postcopy-ram; 7.2 accepts it and
		// crashes the destination when postcopy starts (qemu-protocol.md 3).
		r.log.Debug("postcopy not enabled: multifd with postcopy needs QEMU 10.1 on both sides")
		r.setup.Postcopy = false
	}
	r.log.Debug("strategy setup", "policy", r.m.Policy(), "downtime", r.setup.DowntimeLimit,
		"auto-converge", r.setup.AutoConverge, "postcopy", r.setup.Postcopy, "throttle", r.setup.Throttle)
	srcCaps, dstCaps := r.wantCaps()
	if err := checkCaps(SideSource, si.feat, srcCaps); err != nil {
		return r.badInput(SideSource, "check capabilities", err)
	}
	if err := checkCaps(SideDestination, di.feat, dstCaps); err != nil {
		return r.badInput(SideDestination, "check capabilities", err)
	}
	// From here on things change on the QEMUs.
	if r.cfg.Storage != nil {
		if err := r.startStorage(ctx); err != nil {
			return err
		}
	}
	if err := r.setCaps(ctx, SideSource, si.caps, srcCaps); err != nil {
		return err
	}
	if err := r.setCaps(ctx, SideDestination, di.caps, dstCaps); err != nil {
		return err
	}
	return r.setParams(ctx, si.params, di.params)
}

// connect dials an endpoint (or takes the caller's client), bounded by
// ConnectTimeout.
func (r *run) connect(ctx context.Context, side Side, ep Endpoint) (*qmp.Client, error) {
	if ep.Client != nil {
		select {
		case <-ep.Client.Done():
			return nil, r.badInput(side, "connect", fmt.Errorf("client already closed: %w", ep.Client.Err()))
		default:
		}
		return ep.Client, nil
	}
	cctx, cancel := context.WithTimeout(ctx, r.cfg.connectTimeout())
	defer cancel()
	r.log.Debug("connecting", "side", side, "address", ep.Address)
	c, err := qmp.DialAddress(cctx, ep.Address, qmp.WithLogger(r.log.With("side", string(side))))
	if err != nil {
		if ctx.Err() != nil {
			return nil, r.cancelled(ctx, "connect")
		}
		if cctx.Err() != nil {
			err = fmt.Errorf("no QMP greeting from %s within %v: %w", ep.Address, r.cfg.connectTimeout(), err)
		}
		return nil, r.badInput(side, "connect", err)
	}
	r.owned = append(r.owned, c)
	return c, nil
}

// inspect reads one side's state; every answer must come within ConnectTimeout.
func (r *run) inspect(ctx context.Context, side Side) (*sideInfo, error) {
	c := r.client(side)
	qctx, cancel := context.WithTimeout(ctx, r.cfg.connectTimeout())
	defer cancel()
	fail := func(op string, err error) error {
		if ctx.Err() != nil {
			return r.cancelled(ctx, op)
		}
		if qctx.Err() != nil {
			err = fmt.Errorf("no answer within %v: %w", r.cfg.connectTimeout(), err)
		}
		return r.badInput(side, op, err)
	}
	info := &sideInfo{}
	// The schema is the slow answer; fetch it while the small queries run.
	var (
		feat     *qmp.Features
		featErr  error
		featDone = make(chan struct{})
	)
	go func() {
		defer close(featDone)
		feat, featErr = c.ProbeFeatures(qctx)
	}()
	defer func() {
		cancel() // an early failure does not wait for the schema
		<-featDone
	}()
	st, err := c.QueryStatus(qctx)
	if err != nil {
		return nil, fail("query-status", err)
	}
	info.status = st.Status
	if info.mig, err = c.QueryMigrate(qctx); err != nil {
		return nil, fail("query-migrate", err)
	}
	var mem struct {
		Base    uint64  `json:"base-memory"`
		Plugged *uint64 `json:"plugged-memory"`
	}
	switch err := c.Execute(qctx, "query-memory-size-summary", nil, &mem); {
	case err == nil:
		info.memory = mem.Base
		if mem.Plugged != nil {
			info.memory += *mem.Plugged
		}
	case isQMPError(err):
		r.log.Debug("RAM size unknown", "side", side, "err", err)
	default:
		return nil, fail("query-memory-size-summary", err)
	}
	var machine string
	switch err := c.Execute(qctx, "qom-get", map[string]string{"path": "/machine", "property": "type"}, &machine); {
	case err == nil:
		info.machine = machine
	case isQMPError(err):
		r.log.Debug("machine type unknown", "side", side, "err", err)
	default:
		return nil, fail("qom-get /machine type", err)
	}
	if r.cfg.MultifdChannels > 0 {
		if info.uuid, err = transport.QueryUUID(qctx, c); err != nil {
			return nil, fail("query-uuid", err)
		}
	}
	if info.caps, err = c.QueryMigrateCapabilities(qctx); err != nil {
		return nil, fail("query-migrate-capabilities", err)
	}
	if info.params, err = c.QueryMigrateParameters(qctx); err != nil {
		return nil, fail("query-migrate-parameters", err)
	}
	<-featDone
	if featErr != nil {
		return nil, fail("query-qmp-schema", featErr)
	}
	info.feat = feat
	r.log.Debug("inspected", "side", side, "qemu", c.Version(), "runstate", info.status,
		"migration", info.mig.Status, "memory", info.memory, "machine", info.machine)
	return info, nil
}

func isQMPError(err error) bool {
	var qe *qmp.Error
	return errors.As(err, &qe)
}

// check compares the two sides. Nothing has changed yet: every failure is bad input.
func (r *run) check(si, di *sideInfo) error {
	if di.status != "inmigrate" {
		return r.badInput(SideDestination, "check run state",
			fmt.Errorf("destination is in run state %q, not \"inmigrate\": start it with -incoming defer", di.status))
	}
	if di.mig.Status != qmp.StatusNone || len(di.mig.SocketAddress) > 0 {
		return r.badInput(SideDestination, "check incoming migration",
			fmt.Errorf("destination already listens or migrates (status %q): start it with -incoming defer, not -incoming URI", di.mig.Status))
	}
	switch si.status {
	case "running":
		r.srcWasRunning = true
	case "paused":
	default:
		return r.badInput(SideSource, "check run state",
			fmt.Errorf("source is in run state %q, want \"running\" (or \"paused\")", si.status))
	}
	if s := si.mig.Status; s != qmp.StatusNone && !s.Terminal() {
		return r.badInput(SideSource, "check migration state",
			fmt.Errorf("source already has a migration in status %q", s))
	}
	if si.memory != 0 && di.memory != 0 && si.memory != di.memory {
		return r.badInput(SideDestination, "compare RAM size",
			fmt.Errorf("source has %d bytes of RAM, destination %d", si.memory, di.memory))
	}
	if si.machine != "" && di.machine != "" && si.machine != di.machine {
		return r.badInput(SideDestination, "compare machine type",
			fmt.Errorf("source machine type %q, destination %q", si.machine, di.machine))
	}
	if r.cfg.MultifdChannels > 0 {
		if err := transport.CheckUUIDs(si.uuid, di.uuid); err != nil {
			return r.badInput(SideDestination, "compare uuid for multifd", err)
		}
	}
	if r.cfg.Storage != nil && (!si.feat.HasCommand("blockdev-mirror") || !di.feat.HasCommand("block-export-add")) {
		return r.badInput("", "check storage support", errors.New("storage migration needs blockdev-mirror on the source and block-export-add on the destination"))
	}
	return nil
}

// wantCaps are the capabilities the engine manages, with the state it wants
// on each side. Each is set explicitly (on or off) where the QEMU has it, so
// leftovers of an earlier run cannot interfere; the rest are left alone.
func (r *run) wantCaps() (src, dst map[string]bool) {
	storage := r.cfg.Storage != nil
	multifd := r.cfg.MultifdChannels > 0
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

// checkCaps makes sure every capability wanted on exists on that QEMU.
func checkCaps(side Side, f *qmp.Features, want map[string]bool) error {
	var missing []string
	for _, name := range slices.Sorted(maps.Keys(want)) {
		if want[name] && !f.HasCapability(name) {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%s QEMU %s lacks migration capabilities %v", side, f.Version, missing)
	}
	return nil
}

// setCaps sets the capabilities that differ from cur, reads them back, and
// pushes their restoration.
func (r *run) setCaps(ctx context.Context, side Side, cur, want map[string]bool) error {
	c := r.client(side)
	prev := r.prevSC
	if side == SideDestination {
		prev = r.prevDC
	}
	change := map[string]bool{}
	for name, on := range want {
		has, known := cur[name]
		if !known {
			continue // absent on this QEMU and wanted off (checkCaps passed)
		}
		if has != on {
			change[name] = on
		}
	}
	if len(change) == 0 {
		return nil
	}
	r.log.Debug("set capabilities", "side", side, "caps", change)
	if err := c.MigrateSetCapabilities(ctx, change); err != nil {
		return r.callErr(ctx, side, "migrate-set-capabilities", err)
	}
	for name := range change {
		prev[name] = cur[name]
	}
	restore := maps.Clone(prev)
	r.pushUndo(string(side)+": restore capabilities", func(ctx context.Context) (string, error) {
		if side == SideDestination && r.incoming {
			return "", nil // the destination's incoming migration started: it is not reusable, leave it
		}
		if err := c.MigrateSetCapabilities(ctx, restore); err != nil {
			return "", err
		}
		return fmt.Sprintf("%s: capabilities restored %v", side, restore), nil
	})
	got, err := c.QueryMigrateCapabilities(ctx)
	if err != nil {
		return r.callErr(ctx, side, "query-migrate-capabilities", err)
	}
	for name, on := range change {
		if got[name] != on {
			return r.errorf(side, "check capabilities", fmt.Errorf("capability %s reads %v after setting it to %v", name, got[name], on))
		}
	}
	return nil
}

// setParams sets the parameters on both sides, reads them back and pushes
// their restoration.
func (r *run) setParams(ctx context.Context, srcPrev, dstPrev *qmp.MigrationParameters) error {
	var sp qmp.MigrationParameters
	sp.MaxBandwidth = qmp.Ptr(r.cfg.bandwidth())
	if d := r.setup.DowntimeLimit; d > 0 {
		sp.DowntimeLimit = qmp.Ptr(qmp.MillisOf(r.capDowntime(d)))
	}
	if t := r.setup.Throttle; t != nil && r.setup.AutoConverge {
		r.throttleParams(&sp, *t)
	}
	mf := transport.Multifd{Channels: r.cfg.MultifdChannels}
	mf.Parameters(&sp)
	r.setSP, r.prevSP = sp, srcPrev
	if err := r.applyParams(ctx, SideSource, sp, srcPrev); err != nil {
		return err
	}
	var dp qmp.MigrationParameters
	mf.Parameters(&dp)
	r.setDP, r.prevDP = dp, dstPrev
	if dp.MultifdChannels != nil {
		if err := r.applyParams(ctx, SideDestination, dp, dstPrev); err != nil {
			return err
		}
	}
	// Read back the source and keep the downtime limit in force.
	got, err := r.src.QueryMigrateParameters(ctx)
	if err != nil {
		return r.callErr(ctx, SideSource, "query-migrate-parameters", err)
	}
	if err := paramsMatch(sp, got); err != nil {
		return r.errorf(SideSource, "check parameters", err)
	}
	r.downtimeLimit = got.DowntimeLimitDuration()
	if dp.MultifdChannels != nil {
		dgot, err := r.dst.QueryMigrateParameters(ctx)
		if err != nil {
			return r.callErr(ctx, SideDestination, "query-migrate-parameters", err)
		}
		if err := paramsMatch(dp, dgot); err != nil {
			return r.errorf(SideDestination, "check parameters", err)
		}
		if *dgot.MultifdChannels != *got.MultifdChannels {
			return r.errorf(SideDestination, "check parameters", fmt.Errorf("multifd-channels %d on the destination, %d on the source", *dgot.MultifdChannels, *got.MultifdChannels))
		}
	}
	return nil
}

func (r *run) applyParams(ctx context.Context, side Side, p qmp.MigrationParameters, prev *qmp.MigrationParameters) error {
	c := r.client(side)
	r.log.Debug("set parameters", "side", side, "params", paramString(p))
	if err := c.MigrateSetParameters(ctx, p); err != nil {
		return r.callErr(ctx, side, "migrate-set-parameters", err)
	}
	restore := restoreParams(p, prev)
	r.pushUndo(string(side)+": restore parameters", func(ctx context.Context) (string, error) {
		if side == SideDestination && r.incoming {
			return "", nil
		}
		// Parameters changed later by decisions (downtime, throttle) are
		// covered: restoreParams took every field the engine may touch.
		if err := c.MigrateSetParameters(ctx, restore); err != nil {
			return "", err
		}
		return fmt.Sprintf("%s: parameters restored %s", side, paramString(restore)), nil
	})
	return nil
}

// restoreParams picks from prev the fields set in p, plus the ones decisions
// may change later (downtime and throttle parameters).
func restoreParams(p qmp.MigrationParameters, prev *qmp.MigrationParameters) qmp.MigrationParameters {
	var out qmp.MigrationParameters
	if prev == nil {
		return out
	}
	out.MaxBandwidth = prev.MaxBandwidth
	out.DowntimeLimit = prev.DowntimeLimit
	out.CPUThrottleInitial = prev.CPUThrottleInitial
	out.CPUThrottleIncrement = prev.CPUThrottleIncrement
	out.MaxCPUThrottle = prev.MaxCPUThrottle
	out.ThrottleTriggerThreshold = prev.ThrottleTriggerThreshold
	out.CPUThrottleTailslow = prev.CPUThrottleTailslow
	if p.MultifdChannels != nil {
		out.MultifdChannels = prev.MultifdChannels
	}
	return out
}

func paramsMatch(want qmp.MigrationParameters, got *qmp.MigrationParameters) error {
	chk := func(name string, w, g *uint64) error {
		if w != nil && (g == nil || *g != *w) {
			return fmt.Errorf("%s reads %s after setting it to %d", name, fmtPtr(g), *w)
		}
		return nil
	}
	chkI := func(name string, w, g *int) error {
		if w != nil && (g == nil || *g != *w) {
			return fmt.Errorf("%s reads %s after setting it to %d", name, fmtPtr(g), *w)
		}
		return nil
	}
	return errors.Join(
		chk("max-bandwidth", want.MaxBandwidth, got.MaxBandwidth),
		chk("downtime-limit", want.DowntimeLimit, got.DowntimeLimit),
		chkI("multifd-channels", want.MultifdChannels, got.MultifdChannels),
		chkI("cpu-throttle-initial", want.CPUThrottleInitial, got.CPUThrottleInitial),
		chkI("cpu-throttle-increment", want.CPUThrottleIncrement, got.CPUThrottleIncrement),
		chkI("max-cpu-throttle", want.MaxCPUThrottle, got.MaxCPUThrottle),
		chkI("throttle-trigger-threshold", want.ThrottleTriggerThreshold, got.ThrottleTriggerThreshold),
	)
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
	if r.srcF != nil && r.srcF.HasParameter("cpu-throttle-tailslow") {
		p.CPUThrottleTailslow = qmp.Ptr(t.Tailslow)
	}
}

// startStorage starts the mirrors (blockmirror preflights first: its
// preflight errors are bad input) and pushes their abort.
func (r *run) startStorage(ctx context.Context) error {
	s, err := blockmirror.Start(ctx, r.src, r.dst, r.srcF, r.dstF, *r.cfg.Storage, r.ch.String())
	if err != nil {
		if ctx.Err() != nil {
			return r.cancelled(ctx, "start mirrors")
		}
		if errors.Is(err, blockmirror.ErrPreflight) {
			return r.badInput("", "storage preflight", err)
		}
		return r.errorf("", "start mirrors", err)
	}
	r.mirror = s
	r.pushUndo("storage: abort mirrors", func(ctx context.Context) (string, error) {
		if err := s.Abort(ctx); err != nil {
			return "", err
		}
		return "storage: mirrors aborted, NBD nodes, exports and server removed", nil
	})
	return nil
}
