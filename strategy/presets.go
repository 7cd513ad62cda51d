package strategy

import (
	"fmt"
	"math"
	"time"
)

// progress is the generic stall detector: progress is made when the
// transferred bytes grow or the remaining RAM or storage bytes reach a new low.
// It only detects a stuck migration (a dead link), not a non-converging one.
type progress struct {
	seen        bool
	last        time.Duration
	transferred uint64
	remainSeen  bool // a sample counted the RAM left (minRemain holds)
	minRemain   uint64
	minStorage  uint64
}

func (p *progress) observe(s Sample, now time.Duration) {
	// The RAM left is counted once QEMU's setup is done; the mirror
	// phase's samples carry none (their zero is no new low).
	counted := !s.Mirroring && s.Status != "setup"
	if !p.seen {
		*p = progress{seen: true, last: now, transferred: s.TransferredBytes, minStorage: s.StorageRemaining}
	} else if s.TransferredBytes > p.transferred || s.StorageRemaining < p.minStorage ||
		(counted && p.remainSeen && s.RemainingBytes < p.minRemain) {
		p.last = now
	}
	p.transferred = max(p.transferred, s.TransferredBytes)
	p.minStorage = min(p.minStorage, s.StorageRemaining)
	if counted && (!p.remainSeen || s.RemainingBytes < p.minRemain) {
		p.remainSeen, p.minRemain = true, s.RemainingBytes
	}
}

// stalled returns a reason when no progress was seen for timeout (> 0).
func (p *progress) stalled(now, timeout time.Duration) (string, bool) {
	if timeout <= 0 || !p.seen || now-p.last < timeout {
		return "", false
	}
	remain := "the RAM left not counted yet"
	if p.remainSeen {
		remain = "remaining never below " + bytesStr(float64(p.minRemain))
	}
	return fmt.Sprintf("no progress for %v (transferred stuck at %s, %s): progress timeout %v",
		roundDur(now-p.last), bytesStr(float64(p.transferred)), remain, timeout), true
}

// stallAbort is the Abort for a migration that made no progress: nothing
// the limits could permit would finish it (the link carries nothing).
func (p *progress) stallAbort(now time.Duration, reason string) Decision {
	return Decision{Action: Abort, Summary: fmt.Sprintf("abort: no progress for %v, the link carries nothing", roundDur(now-p.last)),
		Reason: reason, Remedy: &Remedy{}}
}

// storageStalled is stalled's reason for the mirror phase, where progress
// is the disk bytes left reaching a new low.
func (p *progress) storageStalled(now, timeout time.Duration) (string, bool) {
	if timeout <= 0 || !p.seen || now-p.last < timeout {
		return "", false
	}
	return fmt.Sprintf("no progress for %v in the mirror phase (disk bytes left never below %s): progress timeout %v",
		roundDur(now-p.last), bytesStr(float64(p.minStorage)), timeout), true
}

// ---------------------------------------------------------------- qemu

// qemuPolicy is QEMU alone: no lever, never an abort unless the user set a
// budget or a progress timeout. Its downtime limit is the user's maximum
// (QEMU's own 300 ms when none is given): what a QEMU user sets before
// migrate.
type qemuPolicy struct {
	m    *Machine
	prog progress
}

func (p *qemuPolicy) setup() Setup { return Setup{DowntimeLimit: p.m.lim.maxDowntime()} }

func (p *qemuPolicy) step(s Sample, now time.Duration) Decision {
	p.prog.observe(s, now)
	if why, ok := p.prog.stalled(now, p.m.lim.ProgressTimeout); ok {
		return p.prog.stallAbort(now, why)
	}
	return wait("qemu: QEMU decides the switchover alone")
}

func (p *qemuPolicy) deadline(s Sample, now time.Duration) Decision {
	return budgetAbort("qemu", p.m.lim.Budget, now)
}

func (p *qemuPolicy) applied(Decision, error) {}

// ---------------------------------------------------------------- kubevirt

// kubeVirt is KubeVirt's legacy migration monitor (handleLegacyConvergence).
type kubeVirt struct {
	m               *Machine
	progressTimeout time.Duration
	perGiB          time.Duration
	acceptable      time.Duration // completion budget; 0 until the size is known
	lastProgress    time.Duration
	watermark       uint64
	started         bool
	paused          bool
}

func newKubeVirt(m *Machine) *kubeVirt {
	return &kubeVirt{
		m:               m,
		progressTimeout: orDur(m.lim.ProgressTimeout, orDur(m.cfg.KubeVirt.ProgressTimeout, defKubeVirtProgressTimeout)),
		perGiB:          orDur(m.cfg.KubeVirt.CompletionTimeoutPerGiB, defKubeVirtCompletionPerGiB),
	}
}

func (p *kubeVirt) setup() Setup {
	// VIR_MIGRATE_POSTCOPY when allowPostCopy; auto-converge (off by default)
	// with QEMU's own parameters.
	return Setup{Postcopy: true, AutoConverge: p.m.cfg.KubeVirt.AllowAutoConverge}
}

// kubeVirtGB is getVMIMigrationDataSize: RAM plus migrated disks, in decimal
// GB rounded up.
func kubeVirtGB(s Sample) uint64 {
	b := s.TotalBytes + s.StorageTotal
	return (b + decimalGB - 1) / decimalGB
}

func (p *kubeVirt) awd() bool { return p.m.lim.AllowPostcopy || p.m.lim.AllowPause }

func (p *kubeVirt) step(s Sample, now time.Duration) Decision {
	if p.acceptable == 0 && s.TotalBytes > 0 {
		p.acceptable = mulDur(p.perGiB, float64(kubeVirtGB(s)))
	}
	if !p.started || p.watermark == 0 || s.RemainingBytes < p.watermark {
		p.lastProgress = now
	}
	p.started = true
	p.watermark = s.RemainingBytes
	lv := &p.m.levers
	if lv.postcopy {
		return wait("kubevirt: postcopy requested, nothing more to do")
	}
	over := p.acceptable > 0 && now > p.acceptable
	switch {
	case p.awd() && over && !p.paused:
		if p.m.lim.AllowPostcopy && !lv.postcopyFailed {
			return Decision{Action: StartPostcopy, Summary: fmt.Sprintf("start postcopy: the migration ran past KubeVirt's %v completion timeout", p.acceptable),
				Reason: fmt.Sprintf(
					"kubevirt: %v elapsed exceeds the completion timeout %v (%v per GB × %d GB): switch to postcopy",
					roundDur(now), p.acceptable, p.perGiB, kubeVirtGB(s))}
		}
		if p.m.lim.AllowPause && !lv.pauseFailed {
			old := p.acceptable
			p.acceptable *= 2
			p.paused = true
			return Decision{Action: PauseSource, Summary: fmt.Sprintf("pause the guest: the migration ran past KubeVirt's %v completion timeout", old),
				Reason: fmt.Sprintf(
					"kubevirt: %v elapsed exceeds the completion timeout %v: pause the guest, completion timeout now %v",
					roundDur(now), old, p.acceptable)}
		}
		return Decision{Action: Abort, Summary: fmt.Sprintf("abort: the migration ran past KubeVirt's %v completion timeout, and neither postcopy nor a pause could be applied", p.acceptable),
			Reason: fmt.Sprintf(
				"kubevirt: %v elapsed exceeds the completion timeout %v and no workload-disruption lever could be applied",
				roundDur(now), p.acceptable)}
	case now-p.lastProgress > p.progressTimeout:
		return Decision{Action: Abort, Summary: fmt.Sprintf("abort: the memory left to copy has not shrunk for %v (KubeVirt's progress timeout)", roundDur(now-p.lastProgress)),
			Reason: fmt.Sprintf(
				"kubevirt: remaining %s has not decreased for %v (progress timeout %v): migration stuck",
				bytesStr(float64(s.RemainingBytes)), roundDur(now-p.lastProgress), p.progressTimeout)}
	case over:
		return Decision{Action: Abort, Summary: fmt.Sprintf("abort: the migration ran past KubeVirt's %v completion timeout", p.acceptable),
			Reason: fmt.Sprintf(
				"kubevirt: %v elapsed exceeds the completion timeout %v (%v per GB × %d GB)",
				roundDur(now), p.acceptable, p.perGiB, kubeVirtGB(s))}
	}
	return wait("kubevirt: within the progress and completion timeouts")
}

func (p *kubeVirt) deadline(s Sample, now time.Duration) Decision {
	return budgetAbort("kubevirt", p.m.lim.Budget, now)
}

func (p *kubeVirt) applied(d Decision, err error) {
	if err != nil && d.Action == PauseSource {
		p.paused = false
		p.acceptable /= 2
	}
}

// ---------------------------------------------------------------- nova

// nova is Nova's libvirt-driver monitor: the downtime ramp (downtime_steps,
// update_downtime) and the completion timeout with its action.
type nova struct {
	m        *Machine
	downtime time.Duration
	steps    int
	delayPer time.Duration
	complPer time.Duration
	action   string
	dataGB   float64
	delay    time.Duration // one step every delay
	timeout  time.Duration // 0 = off
	current  time.Duration // olddowntime
	sized    bool
	prog     progress
}

func newNova(m *Machine) *nova {
	n := m.cfg.Nova
	p := &nova{
		m:        m,
		downtime: orDur(n.Downtime, defNovaDowntime),
		steps:    orInt(n.Steps, defNovaSteps),
		delayPer: orDur(n.DelayPerGiB, defNovaDelayPerGiB),
		complPer: orDur(n.CompletionTimeoutPerGiB, defNovaCompletionPerGiB),
		action:   n.TimeoutAction,
	}
	if p.action == "" {
		p.action = novaTimeoutAbort
	}
	p.current = p.stepValue(0)
	return p
}

// stepValue is int(base + offset×i) in milliseconds, as downtime_steps yields.
func (p *nova) stepValue(i int) time.Duration {
	ms := float64(p.downtime) / float64(time.Millisecond)
	base := ms / float64(p.steps)
	offset := (ms - base) / float64(p.steps)
	return time.Duration(int64(base+offset*float64(i))) * time.Millisecond
}

// novaDataGB is _live_migration_data_gb: max(RAM GiB, 2) plus max(disk GiB, 2)
// for block-migrated storage (all disks counted as one here).
func novaDataGB(s Sample) float64 {
	gb := math.Max(float64(s.TotalBytes)/gib, 2)
	if s.StorageTotal > 0 {
		gb += math.Max(float64(s.StorageTotal)/gib, 2)
	}
	return gb
}

// novaSeconds is Nova's int(x × data_gb): whole seconds. Below one second
// (shrunk test configurations) the value is kept to the millisecond.
func novaSeconds(per time.Duration, gb float64) time.Duration {
	d := mulDur(per, gb)
	if d >= time.Second {
		return d.Truncate(time.Second)
	}
	return d.Truncate(time.Millisecond)
}

func (p *nova) setup() Setup {
	// _handle_live_migration_auto_converge: only without post-copy.
	ac := p.m.cfg.Nova.PermitAutoConverge && !p.m.lim.AllowPostcopy
	return Setup{DowntimeLimit: p.stepValue(0), Postcopy: true, AutoConverge: ac}
}

func (p *nova) step(s Sample, now time.Duration) Decision {
	if !p.sized && s.TotalBytes > 0 {
		p.sized = true
		p.dataGB = novaDataGB(s)
		p.delay = novaSeconds(p.delayPer, p.dataGB)
		if p.complPer > 0 {
			p.timeout = novaSeconds(p.complPer, p.dataGB)
		}
	}
	p.prog.observe(s, now)
	if why, ok := p.prog.stalled(now, p.m.lim.ProgressTimeout); ok {
		return p.prog.stallAbort(now, "nova: "+why)
	}
	if !p.sized {
		return wait("nova: guest size not known yet")
	}
	lv := &p.m.levers
	if p.timeout > 0 && now > p.timeout && !lv.finishing() {
		why := fmt.Sprintf("nova: %v elapsed exceeds the completion timeout %v (%v per GiB × %.2f GiB)",
			roundDur(now), p.timeout, p.complPer, p.dataGB)
		past := fmt.Sprintf("the migration ran past Nova's %v completion timeout", p.timeout)
		if p.action == novaTimeoutAbort {
			return Decision{Action: Abort, Summary: "abort: " + past, Reason: why + ": timeout action abort"}
		}
		if p.m.lim.AllowPostcopy && !lv.postcopyFailed {
			return Decision{Action: StartPostcopy, Summary: "start postcopy: " + past, Reason: why + ": force complete by postcopy"}
		}
		if p.m.lim.AllowPause && !lv.pauseFailed {
			return Decision{Action: PauseSource, Summary: "pause the guest: " + past, Reason: why + ": force complete by pausing the guest"}
		}
		return Decision{Action: Abort, Summary: "abort: " + past + ", and neither postcopy nor a pause is permitted",
			Reason: why + ": force complete not permitted (no postcopy, no pause)"}
	}
	// update_downtime: the last step whose time marker is below elapsed.
	i := -1
	for j := 0; j <= p.steps; j++ {
		if now > mulDur(p.delay, float64(j)) {
			i = j
		}
	}
	if i < 0 || lv.downtimeFailed {
		return wait("nova: downtime ramp not started")
	}
	v := min(p.stepValue(i), p.m.lim.maxDowntime())
	if v == p.current {
		return wait(fmt.Sprintf("nova: downtime step %d/%d holds at %v", i, p.steps, v))
	}
	p.current = v
	return Decision{Action: SetDowntime, DowntimeLimit: v, Summary: fmt.Sprintf("downtime limit %v: step %d of %d of Nova's ramp", v, i, p.steps), Reason: fmt.Sprintf(
		"nova: downtime step %d/%d at %v (one step per %v = %v per GiB × %.2f GiB)",
		i, p.steps, roundDur(now), p.delay, p.delayPer, p.dataGB)}
}

func (p *nova) deadline(s Sample, now time.Duration) Decision {
	return budgetAbort("nova", p.m.lim.Budget, now)
}

func (p *nova) applied(Decision, error) {}

// ---------------------------------------------------------------- proxmox

// proxmox is qemu-server's phase2 loop: downtime starts at migrate_downtime
// and doubles whenever a cumulative counter of bad polls (remaining grew
// versus the previous poll, or is 0) exceeds 5. Auto-converge is always on
// with QEMU's default parameters. There is no timeout.
type proxmox struct {
	m         *Machine
	downtime  time.Duration
	polls     int
	interval  time.Duration
	counter   int
	lastRem   uint64
	lastPoll  time.Duration
	polled    bool
	lastSetTo time.Duration
	prog      progress
}

func newProxmox(m *Machine) *proxmox {
	c := m.cfg.Proxmox
	p := &proxmox{
		m:        m,
		downtime: orDur(c.InitialDowntime, defProxmoxInitialDowntime),
		polls:    orInt(c.StallPolls, defProxmoxStallPolls),
		interval: orDur(c.PollInterval, defProxmoxPollInterval),
	}
	p.lastSetTo = min(p.downtime, m.lim.maxDowntime())
	return p
}

func (p *proxmox) setup() Setup {
	return Setup{DowntimeLimit: p.downtime, AutoConverge: true}
}

func (p *proxmox) step(s Sample, now time.Duration) Decision {
	p.prog.observe(s, now)
	if why, ok := p.prog.stalled(now, p.m.lim.ProgressTimeout); ok {
		return p.prog.stallAbort(now, "proxmox: "+why)
	}
	if s.Status != "active" && s.Status != "device" {
		return wait("proxmox: status " + s.Status)
	}
	if p.polled && now-p.lastPoll < p.interval {
		return wait("proxmox: between polls")
	}
	rem := s.RemainingBytes
	if (p.polled && p.lastRem != 0 && rem > p.lastRem) || rem == 0 {
		p.counter++
	}
	p.polled, p.lastPoll, p.lastRem = true, now, rem
	if p.counter <= p.polls {
		return wait(fmt.Sprintf("proxmox: %d/%d bad polls", p.counter, p.polls))
	}
	p.counter = 0
	p.downtime = min(p.downtime*2, QEMUMaxDowntime)
	v := min(p.downtime, p.m.lim.maxDowntime())
	if v == p.lastSetTo || p.m.levers.downtimeFailed {
		return wait(fmt.Sprintf("proxmox: downtime would double to %v, held at the %v maximum", p.downtime, v))
	}
	p.lastSetTo = v
	return Decision{Action: SetDowntime, DowntimeLimit: v, Summary: fmt.Sprintf("downtime limit %v: the memory left to copy grew on more than %d polls, so Proxmox doubles it", v, p.polls), Reason: fmt.Sprintf(
		"proxmox: remaining grew on more than %d polls: auto-increased downtime to %v", p.polls, p.downtime)}
}

func (p *proxmox) deadline(s Sample, now time.Duration) Decision {
	return budgetAbort("proxmox", p.m.lim.Budget, now)
}

func (p *proxmox) applied(Decision, error) {}

// budgetAbort is a preset's Abort when the user's Budget runs out.
func budgetAbort(policy string, budget, now time.Duration) Decision {
	return Decision{Action: Abort, Summary: fmt.Sprintf("abort: the %v budget ran out", budget),
		Reason: fmt.Sprintf("%s: user budget %v reached at %v", policy, budget, roundDur(now))}
}

// mulDur multiplies a duration by a factor, saturating.
func mulDur(d time.Duration, f float64) time.Duration {
	v := float64(d) * f
	if math.IsNaN(v) || v <= 0 {
		return 0
	}
	if v >= math.MaxInt64 {
		return time.Duration(math.MaxInt64)
	}
	return time.Duration(v)
}
