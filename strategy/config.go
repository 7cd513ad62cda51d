package strategy

import (
	"fmt"
	"math"
	"strings"
	"time"
)

// Config selects a policy and sets the user's limits. The zero value is valid:
// policy auto, QEMU's 300 ms downtime ceiling, throttling permitted, no postcopy,
// no pause, no budget.
type Config struct {
	Policy string // "auto" (default when ""), "qemu", "kubevirt", "nova", "proxmox"
	Limits Limits

	// Preset tunables. Zero means the anchor's default; times scale with these
	// so a test can shrink them.
	KubeVirt KubeVirtConfig
	Nova     NovaConfig
	Proxmox  ProxmoxConfig
	Auto     AutoConfig
}

// KubeVirtConfig tunes the kubevirt preset (KubeVirt's legacy migration monitor).
type KubeVirtConfig struct {
	// ProgressTimeout: abort after this long without RemainingBytes decreasing
	// versus the previous sample (progressTimeout, 150 s). Limits.ProgressTimeout overrides it.
	ProgressTimeout time.Duration
	// CompletionTimeoutPerGiB: the completion budget is this × the migrated data
	// size in decimal GB rounded up (completionTimeoutPerGiB, 150 s).
	CompletionTimeoutPerGiB time.Duration
	// AllowAutoConverge enables QEMU's auto-converge with its default ramp
	// (allowAutoConverge, false).
	AllowAutoConverge bool
}

// NovaConfig tunes the nova preset (Nova's libvirt driver monitor).
type NovaConfig struct {
	Downtime    time.Duration // live_migration_downtime: the last step of the ramp (500 ms, min 100 ms)
	Steps       int           // live_migration_downtime_steps (10, min 3)
	DelayPerGiB time.Duration // live_migration_downtime_delay, per GiB of data (75 s)
	// CompletionTimeoutPerGiB is live_migration_completion_timeout per GiB (800 s).
	// A negative value disables the timeout (Nova's 0).
	CompletionTimeoutPerGiB time.Duration
	TimeoutAction           string // live_migration_timeout_action: "abort" (default) or "force_complete"
	// PermitAutoConverge enables QEMU's auto-converge with its default ramp,
	// only when postcopy is not enabled (live_migration_permit_auto_converge, false).
	PermitAutoConverge bool
}

// ProxmoxConfig tunes the proxmox preset (qemu-server's phase2 loop).
type ProxmoxConfig struct {
	InitialDowntime time.Duration // migrate_downtime (100 ms)
	StallPolls      int           // the downtime doubles when the bad-poll counter exceeds this (5)
	// PollInterval is Proxmox's poll period (1 s): samples closer together than
	// this to the last counted one are not counted, so a faster engine poll does
	// not speed the preset up.
	PollInterval time.Duration
}

// AutoConfig tunes the auto policy. Zero fields take the documented defaults.
type AutoConfig struct {
	// InitialDowntime is the downtime limit set before the start (100 ms,
	// capped at Limits.MaxDowntime): converging guests finish with a third of
	// QEMU's default 300 ms; auto raises it when that does not converge.
	InitialDowntime time.Duration
	// FlatRatio: when the per-iteration peaks of RemainingBytes (the dirty set
	// at each bitmap sync) shrink by less than this factor per iteration, or
	// the measured dirty rate is at least this × the throughput, pre-copy is
	// judged never to converge (0.97).
	FlatRatio float64
	// MaxConvergeTime: a converging migration whose predicted remaining time
	// exceeds this is "too slow": auto uses levers on it, but never aborts it
	// for that alone (60 s). SlowPasses may make it too slow sooner.
	MaxConvergeTime time.Duration
	// SlowPasses: a converging migration whose predicted remaining time
	// exceeds this many full RAM passes (TotalBytes / throughput: 5 s for
	// 150 MiB at 30 MiB/s) is also too slow (3). A guest that dirties almost
	// as fast as the link converges, but over dozens of shrinking passes,
	// which a throttle or postcopy cut to a few.
	SlowPasses float64
	// SlowRatio: a migration whose measured dirty rate is at least this ×
	// the throughput is too slow once its prediction exceeds one full RAM
	// pass, however far below SlowPasses (0.8; 1 turns the rule off). Its
	// passes shrink by that ratio at best, about three full RAM passes to a
	// 500 ms switchover from a full working set, and a prediction ∝ 1/(1-q)
	// is too sensitive there to the dirty rate's noise to wait on.
	SlowRatio float64
	// TargetRatio is k in p = 1 - k×throughput/dirty: the throttled dirty rate
	// aimed for, as a fraction of the throughput (0.5). A guest dirtying at
	// least as fast as the link gets at least the throttle that converges in
	// one pass (see the package documentation).
	TargetRatio float64
	// SaturationFactor: when the peaks are flat, every pass re-dirties the
	// whole working set and QEMU's dirty rate (distinct pages per sync period)
	// is only a lower bound; the true rate is assumed to be this × the
	// measured one (at least the throughput) (2).
	SaturationFactor float64
	// Margin on the downtime needed: set remaining/throughput × Margin (1.25).
	Margin float64
	// SettleIterations: iterations a lever gets, once it shows in the samples,
	// before auto escalates (2).
	SettleIterations int
	// SettleTime shortens the wait when iterations are long: one iteration
	// suffices once the lever has shown for this long. It is also how long a
	// throttle may take to show (QEMU applies it only at its next trigger,
	// after two ≥1 s sync periods) before auto judges anyway (4 s).
	SettleTime time.Duration
	// MaxThrottle is the highest CPU throttle auto sets (99).
	MaxThrottle int
	// PostcopyThrottle: when postcopy is permitted, a throttle above this
	// percentage is not applied; postcopy is started instead (25). Postcopy
	// finishes in about one pass of the working set whatever the dirty rate,
	// while a throttle that large slows the guest for several passes.
	PostcopyThrottle int
	// ProgressTimeout: abort when neither transferred bytes grow nor remaining
	// bytes reach a new low for this long (30 s). Limits.ProgressTimeout overrides it.
	ProgressTimeout time.Duration
	// Alpha is the EWMA weight of a new throughput/dirty-rate sample (0.4).
	Alpha float64
	// MirrorWindow is how much of the mirror phase auto looks at to judge
	// whether the disk mirrors converge: the remaining bytes' trend is the
	// least-squares slope over this window (3 s). An abort for a mirror that
	// cannot converge waits for two windows. After READY, the disk backlog
	// (StorageRemaining in the RAM phase) is judged over the same window.
	MirrorWindow time.Duration
	// Headroom is kept free below Limits.MaxDowntime: auto's downtime limits
	// are at most the maximum less it (and at least half the maximum),
	// because QEMU's measured downtime exceeds its downtime-limit by what its
	// estimate leaves out. 0 = the headroom learned for the source QEMU's
	// version (Machine.SetQEMU; none when it was not called): see
	// LearnHeadroom. The presets keep none, like their anchors.
	Headroom time.Duration
}

// Anchor defaults.
const (
	defKubeVirtProgressTimeout  = 150 * time.Second
	defKubeVirtCompletionPerGiB = 150 * time.Second
	defNovaDowntime             = 500 * time.Millisecond
	defNovaSteps                = 10
	defNovaDelayPerGiB          = 75 * time.Second
	defNovaCompletionPerGiB     = 800 * time.Second
	defProxmoxInitialDowntime   = 100 * time.Millisecond
	defProxmoxStallPolls        = 5
	defProxmoxPollInterval      = time.Second
	defAutoInitialDowntime      = 100 * time.Millisecond
	defAutoFlatRatio            = 0.97
	defAutoMaxConvergeTime      = 60 * time.Second
	defAutoSlowPasses           = 3
	defAutoSlowRatio            = 0.8
	defAutoTargetRatio          = 0.5
	defAutoSaturationFactor     = 2
	defAutoMargin               = 1.25
	defAutoSettleIterations     = 2
	defAutoSettleTime           = 4 * time.Second
	defAutoMaxThrottle          = 99
	defAutoPostcopyThrottle     = 25
	defAutoProgressTimeout      = 30 * time.Second
	defAutoAlpha                = 0.4
	defAutoMirrorWindow         = 3 * time.Second
	novaTimeoutAbort            = "abort"
	novaTimeoutForceComplete    = "force_complete"
	novaMinDowntime             = 100 * time.Millisecond
	novaMinSteps                = 3
	qemuMaxThrottle             = 99
	qemuMaxTriggerThreshold     = 100
	gib                         = 1 << 30
	mib                         = 1 << 20
	decimalGB                   = 1_000_000_000
)

// Validate reports the first invalid field by name. An unknown policy is an
// error listing the valid names.
func (c Config) Validate() error {
	switch c.Policy {
	case "", PolicyAuto, PolicyQEMU, PolicyKubeVirt, PolicyNova, PolicyProxmox:
	default:
		return fmt.Errorf("strategy: Config.Policy %q is unknown; valid: %s", c.Policy, strings.Join(Policies(), ", "))
	}
	l := c.Limits
	if err := nonNeg("Limits.MaxDowntime", l.MaxDowntime); err != nil {
		return err
	}
	if l.MaxDowntime > QEMUMaxDowntime {
		return fmt.Errorf("strategy: Limits.MaxDowntime %v exceeds QEMU's maximum %v", l.MaxDowntime, QEMUMaxDowntime)
	}
	if err := nonNeg("Limits.Budget", l.Budget); err != nil {
		return err
	}
	if err := nonNeg("Limits.ProgressTimeout", l.ProgressTimeout); err != nil {
		return err
	}
	k := c.KubeVirt
	if err := nonNeg("KubeVirt.ProgressTimeout", k.ProgressTimeout); err != nil {
		return err
	}
	if err := nonNeg("KubeVirt.CompletionTimeoutPerGiB", k.CompletionTimeoutPerGiB); err != nil {
		return err
	}
	n := c.Nova
	if n.Downtime < 0 || (n.Downtime > 0 && n.Downtime < novaMinDowntime) {
		return fmt.Errorf("strategy: Nova.Downtime %v must be 0 (default 500ms) or at least %v", n.Downtime, novaMinDowntime)
	}
	if n.Steps < 0 || (n.Steps > 0 && n.Steps < novaMinSteps) {
		return fmt.Errorf("strategy: Nova.Steps %d must be 0 (default 10) or at least %d", n.Steps, novaMinSteps)
	}
	if err := nonNeg("Nova.DelayPerGiB", n.DelayPerGiB); err != nil {
		return err
	}
	switch n.TimeoutAction {
	case "", novaTimeoutAbort, novaTimeoutForceComplete:
	default:
		return fmt.Errorf("strategy: Nova.TimeoutAction %q is unknown; valid: abort, force_complete", n.TimeoutAction)
	}
	p := c.Proxmox
	if err := nonNeg("Proxmox.InitialDowntime", p.InitialDowntime); err != nil {
		return err
	}
	if p.StallPolls < 0 {
		return fmt.Errorf("strategy: Proxmox.StallPolls %d must not be negative", p.StallPolls)
	}
	if err := nonNeg("Proxmox.PollInterval", p.PollInterval); err != nil {
		return err
	}
	a := c.Auto
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"Auto.InitialDowntime", a.InitialDowntime},
		{"Auto.MaxConvergeTime", a.MaxConvergeTime},
		{"Auto.SettleTime", a.SettleTime},
		{"Auto.ProgressTimeout", a.ProgressTimeout},
		{"Auto.MirrorWindow", a.MirrorWindow},
		{"Auto.Headroom", a.Headroom},
	} {
		if err := nonNeg(d.name, d.v); err != nil {
			return err
		}
	}
	for _, f := range []struct {
		name   string
		v      float64
		lo, hi float64
	}{
		{"Auto.FlatRatio", a.FlatRatio, 0, 1},
		{"Auto.SlowRatio", a.SlowRatio, 0, 1},
		{"Auto.TargetRatio", a.TargetRatio, 0, 1},
		{"Auto.Alpha", a.Alpha, 0, 1},
	} {
		if math.IsNaN(f.v) || f.v < f.lo || f.v > f.hi {
			return fmt.Errorf("strategy: %s %v must be within [%v, %v] (0 = default)", f.name, f.v, f.lo, f.hi)
		}
	}
	if math.IsNaN(a.SaturationFactor) || math.IsInf(a.SaturationFactor, 0) || (a.SaturationFactor != 0 && a.SaturationFactor < 1) {
		return fmt.Errorf("strategy: Auto.SaturationFactor %v must be 0 (default 2) or at least 1", a.SaturationFactor)
	}
	if math.IsNaN(a.SlowPasses) || math.IsInf(a.SlowPasses, 0) || a.SlowPasses < 0 {
		return fmt.Errorf("strategy: Auto.SlowPasses %v must be 0 (default 3) or positive", a.SlowPasses)
	}
	if math.IsNaN(a.Margin) || math.IsInf(a.Margin, 0) || (a.Margin != 0 && a.Margin < 1) {
		return fmt.Errorf("strategy: Auto.Margin %v must be 0 (default 1.25) or at least 1", a.Margin)
	}
	if a.SettleIterations < 0 {
		return fmt.Errorf("strategy: Auto.SettleIterations %d must not be negative", a.SettleIterations)
	}
	if a.MaxThrottle < 0 || a.MaxThrottle > qemuMaxThrottle {
		return fmt.Errorf("strategy: Auto.MaxThrottle %d must be within 0..%d (0 = default 99)", a.MaxThrottle, qemuMaxThrottle)
	}
	if a.PostcopyThrottle < 0 || a.PostcopyThrottle > qemuMaxThrottle {
		return fmt.Errorf("strategy: Auto.PostcopyThrottle %d must be within 0..%d (0 = default 25)", a.PostcopyThrottle, qemuMaxThrottle)
	}
	return nil
}

func nonNeg(name string, d time.Duration) error {
	if d < 0 {
		return fmt.Errorf("strategy: %s %v must not be negative", name, d)
	}
	return nil
}

func orDur(v, def time.Duration) time.Duration {
	if v == 0 {
		return def
	}
	return v
}

func orInt(v, def int) int {
	if v == 0 {
		return def
	}
	return v
}

func orFloat(v, def float64) float64 {
	if v == 0 {
		return def
	}
	return v
}

func (l Limits) maxDowntime() time.Duration {
	return orDur(l.MaxDowntime, DefaultMaxDowntime)
}

func (l Limits) throttleOK() bool { return !l.NoThrottle }

// withDefaults returns a copy with every zero tunable replaced by its default.
func (a AutoConfig) withDefaults() AutoConfig {
	a.InitialDowntime = orDur(a.InitialDowntime, defAutoInitialDowntime)
	a.FlatRatio = orFloat(a.FlatRatio, defAutoFlatRatio)
	a.MaxConvergeTime = orDur(a.MaxConvergeTime, defAutoMaxConvergeTime)
	a.SlowPasses = orFloat(a.SlowPasses, defAutoSlowPasses)
	a.SlowRatio = orFloat(a.SlowRatio, defAutoSlowRatio)
	a.TargetRatio = orFloat(a.TargetRatio, defAutoTargetRatio)
	a.SaturationFactor = orFloat(a.SaturationFactor, defAutoSaturationFactor)
	a.Margin = orFloat(a.Margin, defAutoMargin)
	a.SettleIterations = orInt(a.SettleIterations, defAutoSettleIterations)
	a.SettleTime = orDur(a.SettleTime, defAutoSettleTime)
	a.MaxThrottle = orInt(a.MaxThrottle, defAutoMaxThrottle)
	a.PostcopyThrottle = orInt(a.PostcopyThrottle, defAutoPostcopyThrottle)
	a.ProgressTimeout = orDur(a.ProgressTimeout, defAutoProgressTimeout)
	a.Alpha = orFloat(a.Alpha, defAutoAlpha)
	a.MirrorWindow = orDur(a.MirrorWindow, defAutoMirrorWindow)
	return a
}
