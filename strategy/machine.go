package strategy

import (
	"fmt"
	"math"
	"time"
)

// Machine is the switchover state machine of one migration. It is not safe
// for concurrent use: one goroutine (the engine's owner loop) calls Step and
// Applied in turn.
type Machine struct {
	cfg     Config
	lim     Limits
	pol     policy
	now     time.Duration // monotonic: the largest Elapsed seen
	done    bool
	last    Decision // the last non-wait decision
	levers  levers
	storage Storage
	mprog   progress // the mirror phase, for policies without a storage lever

	qemuKnown            bool // SetQEMU was called
	qemuMajor, qemuMinor int
}

// levers is what the policies share about the levers: which failed to apply
// and whether a finishing lever (postcopy, pause) is in flight.
type levers struct {
	downtimeFailed bool
	throttleFailed bool
	postcopyFailed bool
	pauseFailed    bool
	postcopy       bool // StartPostcopy decided and not failed
	paused         bool // PauseSource decided and not failed, or the sample says so
	inPostcopy     bool // a postcopy status was seen
	writeBlocking  bool // MirrorWriteBlocking decided (applied or failed): never again
	wbFailed       bool // MirrorWriteBlocking failed to apply
}

func (l *levers) finishing() bool { return l.postcopy || l.paused || l.inPostcopy }

// policy is one decision rule. step is called only for non-terminal,
// non-postcopy samples, sanitized, with now = the monotonic elapsed time.
type policy interface {
	setup() Setup
	step(s Sample, now time.Duration) Decision
	// deadline is called when the user's Budget is reached and no finishing
	// lever is in flight; it must return Abort, StartPostcopy or PauseSource.
	deadline(s Sample, now time.Duration) Decision
	applied(d Decision, err error)
}

// mirrorPolicy is a policy with a storage lever: mirror is called for the
// samples of the mirror phase (Sample.Mirroring) instead of step, and may
// return Wait, MirrorWriteBlocking or Abort. Policies without it wait in the
// mirror phase; the Machine still enforces the budget there.
type mirrorPolicy interface {
	mirror(s Sample, now time.Duration) Decision
}

// New validates cfg and returns a Machine for one migration.
func New(cfg Config) (*Machine, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Policy == "" {
		cfg.Policy = PolicyAuto
	}
	m := &Machine{cfg: cfg, lim: cfg.Limits}
	switch cfg.Policy {
	case PolicyAuto:
		m.pol = newAuto(m)
	case PolicyQEMU:
		m.pol = &qemuPolicy{m: m}
	case PolicyKubeVirt:
		m.pol = newKubeVirt(m)
	case PolicyNova:
		m.pol = newNova(m)
	case PolicyProxmox:
		m.pol = newProxmox(m)
	}
	return m, nil
}

// Policy returns the name of the policy in use.
func (m *Machine) Policy() string { return m.cfg.Policy }

// SetStorage tells the Machine about the disk migration. The engine calls it
// once, before Setup and the first Step.
func (m *Machine) SetStorage(st Storage) { m.storage = st }

// canSwitch reports whether MirrorWriteBlocking may be decided now as a live
// switch (block-job-change), in either phase.
func (m *Machine) canSwitch() bool {
	return m.wbPermitted() && m.storage.CanSwitch
}

// canWriteBlock reports whether MirrorWriteBlocking may be decided now, by a
// live switch or, in the mirror phase only (before READY), by a restart.
func (m *Machine) canWriteBlock(mirroring bool) bool {
	return m.wbPermitted() && (m.storage.CanSwitch || (mirroring && m.storage.CanRestart))
}

// wbPermitted: disks mirrored, not write-blocking from the start, not refused
// by the user, not decided before.
func (m *Machine) wbPermitted() bool {
	st := m.storage
	return st.Disks && !st.WriteBlocking && !m.lim.NoWriteBlocking && !m.levers.writeBlocking
}

// Setup returns what the engine must configure before it starts the
// migration. It obeys the Limits: the downtime limit is at most MaxDowntime,
// AutoConverge only when throttling is permitted, Postcopy only when allowed.
func (m *Machine) Setup() Setup {
	s := m.pol.setup()
	// Every policy sets the downtime limit explicitly: one that keeps
	// QEMU's default gets QEMU's default (300 ms) written, so a limit left
	// on the source by someone else (a stale 5 s) is not what decides.
	if s.DowntimeLimit <= 0 {
		s.DowntimeLimit = DefaultMaxDowntime
	}
	s.DowntimeLimit = min(s.DowntimeLimit, m.lim.maxDowntime())
	if m.lim.NoThrottle {
		s.AutoConverge = false
		s.Throttle = nil
		s.MeasureDirtyRate = false // it only sizes throttles
	}
	if !s.AutoConverge {
		s.Throttle = nil
	} else if s.Throttle == nil {
		// Throttling permitted with QEMU's own rule: QEMU's defaults
		// written, not whatever an earlier user left.
		t := DefaultThrottle
		s.Throttle = &t
	}
	if s.Throttle != nil {
		t := clampThrottle(*s.Throttle)
		s.Throttle = &t
	}
	if !m.lim.AllowPostcopy {
		s.Postcopy = false
	}
	return s
}

// SetLimits changes the user's limits mid-migration (the engine's job
// handle: SetMaxDowntime, SetBudget); the next Step obeys them. Only the
// maximum downtime and the budget may change: the permissions and the
// progress timeout decided the Setup and are refused.
func (m *Machine) SetLimits(l Limits) error {
	c := m.cfg
	c.Limits = l
	if err := c.Validate(); err != nil {
		return err
	}
	old := m.lim
	old.MaxDowntime, old.Budget = l.MaxDowntime, l.Budget
	if old != l {
		return fmt.Errorf("strategy: only MaxDowntime and Budget may change during a migration")
	}
	m.lim = l
	return nil
}

// Limits returns the limits in force.
func (m *Machine) Limits() Limits { return m.lim }

// Done reports whether a terminal status was seen or Abort was decided.
// Step then only returns Wait.
func (m *Machine) Done() bool { return m.done }

// Step takes the next sample and returns the decision. It never panics:
// NaN or infinite rates count as zero and time going backwards is ignored
// (the largest Elapsed seen is "now").
func (m *Machine) Step(s Sample) Decision {
	at := s.Elapsed
	if m.done {
		return Decision{Action: Wait, Summary: "done", Reason: "done", At: at}
	}
	s = sanitize(s)
	if s.Elapsed > m.now {
		m.now = s.Elapsed
	}
	now := m.now
	switch classify(s.Status) {
	case statusTerminal:
		m.done = true
		return Decision{Action: Wait, Summary: "migration " + s.Status, Reason: fmt.Sprintf("migration %s", s.Status), At: at}
	case statusPostcopy:
		m.levers.inPostcopy = true
		return Decision{Action: Wait, Summary: "postcopy under way: never aborted",
			Reason: fmt.Sprintf("%s: postcopy is never aborted", s.Status), At: at}
	}
	if s.SourcePaused {
		m.levers.paused = true
	}
	var d Decision
	switch mp, ok := m.pol.(mirrorPolicy); {
	case s.Mirroring && ok:
		d = mp.mirror(s, now)
	case s.Mirroring:
		m.mprog.observe(s, now)
		d = wait(fmt.Sprintf("%s: no storage lever, waiting for the mirrors (%s of %s left)",
			m.cfg.Policy, bytesStr(float64(s.StorageRemaining)), bytesStr(float64(s.StorageTotal))))
		if why, ok := m.mprog.storageStalled(now, m.lim.ProgressTimeout); ok {
			d = Decision{Action: Abort, Summary: fmt.Sprintf("abort: the disk mirrors made no progress for %v", roundDur(now-m.mprog.last)),
				Reason: m.cfg.Policy + ": " + why, Remedy: &Remedy{}}
		}
	default:
		d = m.pol.step(s, now)
	}
	if b := m.lim.Budget; b > 0 && now >= b && !m.levers.finishing() && !isFinishing(d.Action) {
		if s.Mirroring {
			// No RAM migration yet: nothing to finish by postcopy or pause.
			d = Decision{Action: Abort, Summary: fmt.Sprintf("abort: the %v budget ran out before the disk mirrors were READY", b),
				Reason: fmt.Sprintf("budget %v reached at %v with the disk mirrors not READY (%s of %s left)",
					b, roundDur(now), bytesStr(float64(s.StorageRemaining)), bytesStr(float64(s.StorageTotal)))}
		} else {
			d = m.pol.deadline(s, now)
		}
		if !isFinishing(d.Action) || !m.permitted(d.Action) {
			d = Decision{Action: Abort, Summary: fmt.Sprintf("abort: the %v budget ran out", b),
				Reason: fmt.Sprintf("budget %v reached at %v", b, roundDur(now))}
		}
	}
	d = m.enforce(d, s)
	d.At = at
	if d.Summary == "" {
		d.Summary = defaultSummary(d)
	}
	if d.Action == Abort && d.Remedy == nil {
		d.Remedy = m.remedy(s)
	} else if d.Action != Abort {
		d.Remedy = nil
	}
	switch d.Action {
	case Wait:
		return d
	case Abort:
		m.done = true
	case StartPostcopy:
		m.levers.postcopy = true
	case PauseSource:
		m.levers.paused = true
	case MirrorWriteBlocking:
		m.levers.writeBlocking = true
	}
	m.last = d
	return d
}

// Applied reports the outcome of the last non-wait decision: err != nil means
// it failed to apply. A failed lever is not tried again; a failed finishing
// lever (postcopy, pause) lets the policy and the budget act again. Without
// a failure the Machine assumes a decision took effect when Step returned
// it.
func (m *Machine) Applied(d Decision, err error) {
	if m.done || d.Action == Wait {
		return
	}
	if err == nil {
		// A lever applied on the caller's request (the engine's job
		// handle) counts as decided here.
		switch d.Action {
		case StartPostcopy:
			m.levers.postcopy = true
		case PauseSource:
			m.levers.paused = true
		}
	}
	if err != nil {
		switch d.Action {
		case SetDowntime:
			m.levers.downtimeFailed = true
		case SetThrottle:
			m.levers.throttleFailed = true
		case StartPostcopy:
			m.levers.postcopyFailed = true
			m.levers.postcopy = false
		case PauseSource:
			m.levers.pauseFailed = true
			m.levers.paused = false
		case MirrorWriteBlocking:
			m.levers.wbFailed = true
		}
	}
	m.pol.applied(d, err)
}

// enforce is the last guard of the hard limits, whatever a policy decided.
func (m *Machine) enforce(d Decision, s Sample) Decision {
	if s.Mirroring && d.Action != Wait && d.Action != Abort && d.Action != MirrorWriteBlocking {
		return wait(fmt.Sprintf("%s has no effect before RAM migration starts", d.Action))
	}
	switch d.Action {
	case MirrorWriteBlocking:
		// Only while the disks are still being mirrored: the mirror phase,
		// or RAM migration running before the switchover (and no postcopy
		// or pause under way: the guest no longer writes on the source). A
		// restart (no block-job-change) only in the mirror phase.
		if !(s.Mirroring || s.Status == "active") || m.levers.finishing() || !m.canWriteBlock(s.Mirroring) {
			return wait("switching the mirrors to write-blocking is not possible or not permitted")
		}
	case SetDowntime:
		if m.levers.downtimeFailed {
			return wait("downtime limit cannot be set")
		}
		max := m.lim.maxDowntime()
		if d.DowntimeLimit > max {
			d.DowntimeLimit = max
			d.Reason += fmt.Sprintf(" (capped at the %v maximum)", max)
			if d.Summary != "" {
				d.Summary += fmt.Sprintf(" (capped at the %v maximum)", max)
			}
		}
		if d.DowntimeLimit < 0 {
			d.DowntimeLimit = 0
		}
		if d.DowntimeLimit == s.DowntimeLimit && s.DowntimeLimit != 0 {
			return wait(fmt.Sprintf("downtime limit already %v", d.DowntimeLimit))
		}
	case SetThrottle:
		if !m.lim.throttleOK() || m.levers.throttleFailed {
			return wait("throttling not permitted")
		}
		d.Throttle = clampThrottle(d.Throttle)
	case StartPostcopy:
		if !m.permitted(StartPostcopy) {
			return wait("postcopy not permitted")
		}
	case PauseSource:
		if !m.permitted(PauseSource) {
			return wait("pause not permitted")
		}
	case Abort:
		if m.levers.postcopy || m.levers.inPostcopy {
			// migrate-start-postcopy was accepted: QEMU may switch at any
			// moment, and a cancelled postcopy loses the guest.
			w := wait("postcopy requested, never aborted: " + d.Reason)
			w.Summary = "postcopy under way: never aborted"
			return w
		}
	default:
		if d.Action != Wait {
			return wait(fmt.Sprintf("unknown action %q", d.Action))
		}
		d.Action = Wait
	}
	return d
}

// permitted reports whether a finishing action is allowed now.
func (m *Machine) permitted(a Action) bool {
	switch a {
	case StartPostcopy:
		return m.lim.AllowPostcopy && !m.levers.postcopyFailed && !m.levers.finishing()
	case PauseSource:
		return m.lim.AllowPause && !m.levers.pauseFailed && !m.levers.finishing()
	}
	return true
}

func isFinishing(a Action) bool { return a == Abort || a == StartPostcopy || a == PauseSource }

func wait(reason string) Decision { return Decision{Action: Wait, Reason: reason} }

// defaultSummary words a decision whose policy gave no Summary.
func defaultSummary(d Decision) string {
	switch d.Action {
	case Wait:
		return "waiting"
	case SetDowntime:
		return fmt.Sprintf("downtime limit %v", d.DowntimeLimit)
	case SetThrottle:
		return fmt.Sprintf("throttle %d%%", d.Throttle.Max)
	case StartPostcopy:
		return "start postcopy"
	case PauseSource:
		return "pause the guest (stop-and-copy)"
	case MirrorWriteBlocking:
		return "switch the disk mirrors to write-blocking"
	}
	return string(d.Action)
}

// remedyModel is a policy that can say what would have finished a
// migration it aborts (auto: from its measurements).
type remedyModel interface {
	remedy(s Sample, r *Remedy)
}

// remedy is what would have finished a migration aborted at s: in the
// mirror phase only write-blocking mirrors; else postcopy and a pause, which
// finish whatever the guest does, when they were not permitted, and what the
// policy's model adds.
func (m *Machine) remedy(s Sample) *Remedy {
	r := &Remedy{}
	if s.Mirroring {
		st := m.storage
		r.WriteBlocking = m.lim.NoWriteBlocking && st.Disks && !st.WriteBlocking && (st.CanSwitch || st.CanRestart)
		return r
	}
	r.Postcopy = !m.lim.AllowPostcopy
	r.Pause = !m.lim.AllowPause
	if rm, ok := m.pol.(remedyModel); ok {
		rm.remedy(s, r)
	}
	return r
}

// clampThrottle keeps the parameters within what QEMU accepts:
// initial and increment 1..99, initial ≤ max ≤ 99, threshold 0 (leave) .. 100.
func clampThrottle(t Throttle) Throttle {
	t.Initial = clampInt(t.Initial, 1, qemuMaxThrottle)
	t.Increment = clampInt(t.Increment, 1, qemuMaxThrottle)
	t.Max = clampInt(t.Max, t.Initial, qemuMaxThrottle)
	t.TriggerThreshold = clampInt(t.TriggerThreshold, 0, qemuMaxTriggerThreshold)
	return t
}

func clampInt(v, lo, hi int) int {
	if v < lo {
		return lo
	}
	if v > hi {
		return hi
	}
	return v
}

type statusClass int

const (
	statusActive statusClass = iota
	statusTerminal
	statusPostcopy
)

func classify(status string) statusClass {
	switch status {
	case "completed", "failed", "cancelled":
		return statusTerminal
	case "postcopy-active", "postcopy-paused", "postcopy-recover", "postcopy-recover-setup", "postcopy-device":
		return statusPostcopy
	}
	return statusActive
}

func sanitize(s Sample) Sample {
	if s.Elapsed < 0 {
		s.Elapsed = 0
	}
	s.DirtyRate = finite(s.DirtyRate)
	s.GuestDirtyRate = finite(s.GuestDirtyRate)
	if s.GuestDirtyPeriod < 0 {
		s.GuestDirtyPeriod = 0
	}
	s.Throughput = finite(s.Throughput)
	if s.ExpectedDowntime < 0 {
		s.ExpectedDowntime = 0
	}
	if s.DowntimeLimit < 0 {
		s.DowntimeLimit = 0
	}
	s.ThrottlePercent = clampInt(s.ThrottlePercent, 0, 100)
	return s
}

// finite maps NaN, ±Inf and negative values to 0 and caps absurd values.
func finite(v float64) float64 {
	if math.IsNaN(v) || math.IsInf(v, 0) || v < 0 {
		return 0
	}
	if v > 1e18 {
		return 1e18
	}
	return v
}

func roundDur(d time.Duration) time.Duration {
	if d > time.Second {
		return d.Round(100 * time.Millisecond)
	}
	return d.Round(time.Millisecond)
}

// bytesStr renders a byte count or rate readably (binary units).
func bytesStr(b float64) string {
	switch {
	case b >= gib:
		return fmt.Sprintf("%.2f GiB", b/gib)
	case b >= mib:
		return fmt.Sprintf("%.1f MiB", b/mib)
	case b >= 1024:
		return fmt.Sprintf("%.1f KiB", b/1024)
	}
	return fmt.Sprintf("%.0f B", b)
}

// seconds converts bytes / (bytes/s) to a duration, saturating.
func seconds(bytes, rate float64) time.Duration {
	if rate <= 0 {
		return time.Duration(math.MaxInt64)
	}
	s := bytes / rate
	if s >= float64(math.MaxInt64)/float64(time.Second) {
		return time.Duration(math.MaxInt64)
	}
	return time.Duration(s * float64(time.Second))
}
