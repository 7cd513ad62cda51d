package strategy

import (
	"fmt"
	"math"
	"slices"
	"time"
)

// auto is the predictive default policy. See the package documentation for
// the rule; the code below follows it section by section.
type auto struct {
	m           *Machine
	c           AutoConfig
	progTimeout time.Duration
	prog        progress

	// Estimator.
	bw, dirty     float64 // EWMA of throughput and dirty rate, bytes/s
	bwOK, dirtyOK bool
	lastDirty     float64       // DirtyRate of the last sample
	guestDirty    float64       // the last GuestDirtyRate measured (0 = none)
	guestPeriod   time.Duration // what guestDirty was measured over (0 = unknown)
	staleDirty    float64       // a DirtyRate value to ignore (-1 = none)
	cur           iterRec       // the iteration in progress
	hist          []iterRec     // closed iterations, oldest first, at most histLen

	// Levers.
	downtime   time.Duration // the limit auto believes is configured
	target     int           // throttle decided (0 = none)
	lever      Action        // the last lever decided (Wait = none yet)
	leverAt    time.Duration
	leverIter  uint64        // iteration when the lever was decided
	seenIter   uint64        // iteration when the lever was first seen in effect (0 = not yet)
	seenAt     time.Duration // when it was seen
	reevaluate bool          // a lever failed to apply: decide again at once
	// prelude: the downtime limit was just raised as the first step of a
	// throttle (judged slow or stuck): the next judgement keeps that
	// verdict, so that a marginal re-estimate one sample later (a dirty
	// rate right at SlowRatio) does not drop the throttle it was raised for.
	prelude bool

	ms       mirrorState // the mirror phase
	bl       trendWindow // the disk backlog after READY (RAM phase)
	diskRate float64     // the mirrors' copy rate: the largest least-squares slope of the bytes done over a window
	ramPred  time.Duration

	// The prediction check: the first "converging" verdict since the last
	// lever says when the migration should have converged (predBy, 0 = none
	// made); a migration still running then, two iterations or more later, is
	// judged too slow (the rates fooled the prediction: a plateau).
	ram      float64 // guest RAM size, bytes: the largest TotalBytes seen
	predBy   time.Duration
	predMade time.Duration
	predFor  time.Duration
	predIter uint64

	last lastModel // the last judgement's figures, for a Remedy
}

// lastModel is what the last judgement measured: the typical dirty set and
// the throughput.
type lastModel struct {
	typical, bw float64
	ok          bool
}

// remedy adds to r what auto's model says would finish the migration: CPU
// throttling when the user refused it (auto's lever before postcopy); the
// maximum downtime under which QEMU would switch over with the typical dirty
// set at the measured throughput (with the Margin, plus the headroom), and
// the throughput at which it fits the current ceiling.
func (a *auto) remedy(_ Sample, r *Remedy) {
	r.Throttle = !a.m.lim.throttleOK()
	m := a.last
	if !m.ok || m.bw <= 0 || m.typical <= 0 {
		return
	}
	h, _ := a.headroom()
	need := mulDur(seconds(m.typical, m.bw), a.c.Margin)
	if dt := roundUp(need+h, 100*time.Millisecond); dt > a.m.lim.maxDowntime() && dt <= QEMUMaxDowntime {
		r.MaxDowntime = dt
	}
	if c := a.ceiling(); c > 0 {
		if bw := m.typical * a.c.Margin / c.Seconds(); bw > m.bw {
			r.Bandwidth = bw
		}
	}
}

// saturatedQ: a dirty rate measured below this × the throughput, in a
// migration that does not converge, is taken as saturated (a lower bound).
const saturatedQ = 1.5

type iterRec struct {
	n     uint64 // dirty-sync-count
	start time.Duration
	peak  uint64 // largest RemainingBytes seen in it: the dirty set at its sync
}

const (
	histLen = 8
)

func newAuto(m *Machine) *auto {
	c := m.cfg.Auto.withDefaults()
	a := &auto{
		m:           m,
		c:           c,
		progTimeout: orDur(m.lim.ProgressTimeout, c.ProgressTimeout),
		lever:       Wait,
		staleDirty:  -1,
	}
	a.downtime = min(c.InitialDowntime, m.lim.maxDowntime())
	return a
}

// holdBack is the throttle set before the start: auto-converge is enabled so
// that auto can throttle later, but QEMU's own ramp is held at 1%.
var holdBack = Throttle{Initial: 1, Increment: 1, Max: 1}

func (a *auto) setup() Setup {
	// SetQEMU came after New: the headroom is known now.
	a.downtime = min(a.c.InitialDowntime, a.ceiling())
	t := holdBack
	return Setup{
		DowntimeLimit: a.downtime,
		AutoConverge:  true,
		Postcopy:      true,
		Throttle:      &t,
		// QEMU's own rate saturates at the throughput: measure the guest's.
		MeasureDirtyRate: true,
	}
}

func (a *auto) step(s Sample, now time.Duration) Decision {
	a.prog.observe(s, now)
	if why, ok := a.prog.stalled(now, a.progTimeout); ok {
		return a.prog.stallAbort(now, "auto: "+why)
	}
	lv := &a.m.levers
	if lv.postcopy {
		return wait("auto: postcopy requested, waiting for QEMU to switch")
	}
	if lv.paused {
		return wait(fmt.Sprintf("auto: source paused, stop-and-copy of %s", bytesStr(float64(s.RemainingBytes))))
	}
	a.observe(s)
	a.lastDirty = s.DirtyRate
	a.backlogObserve(s, now)
	if s.Status != "active" && s.Status != "" {
		return wait("auto: status " + s.Status)
	}
	boundary := a.track(s, now)
	if a.lever == SetThrottle && a.seenIter == 0 && s.ThrottlePercent >= a.target {
		a.seen(now)
	}
	if d, ok := a.backlog(s, now); ok {
		a.reevaluate = a.reevaluate || boundary // judge the RAM at the next sample
		return d
	}
	if !boundary && !a.reevaluate {
		return wait(a.waitReason())
	}
	a.reevaluate = false
	return a.evaluate(s, now)
}

func (a *auto) waitReason() string {
	return fmt.Sprintf("auto: iteration %d in progress", a.cur.n)
}

// observe updates the smoothed rates.
func (a *auto) observe(s Sample) {
	a.ram = max(a.ram, float64(s.TotalBytes))
	if s.GuestDirtyRate > 0 {
		a.guestDirty, a.guestPeriod = s.GuestDirtyRate, s.GuestDirtyPeriod
	}
	if s.Throughput > 0 {
		a.bw, a.bwOK = ewma(a.bw, s.Throughput, a.c.Alpha, a.bwOK), true
	}
	// QEMU's dirty rate is only measured at a sync after the bulk pass.
	// After a lever shows, QEMU keeps reporting the old rate until its next
	// rate update (a sync ≥1 s later): skip it until it changes.
	if s.Iteration >= 2 && s.DirtyRate > 0 && s.DirtyRate != a.staleDirty {
		a.staleDirty = -1
		a.dirty, a.dirtyOK = ewma(a.dirty, s.DirtyRate, a.c.Alpha, a.dirtyOK), true
	}
}

func ewma(old, v, alpha float64, ok bool) float64 {
	if !ok {
		return v
	}
	return alpha*v + (1-alpha)*old
}

// track follows the saw-tooth of RemainingBytes per iteration. It reports
// whether a new iteration started with this sample.
func (a *auto) track(s Sample, now time.Duration) bool {
	if s.Iteration == 0 {
		return false
	}
	switch {
	case a.cur.n == 0:
		a.cur = iterRec{n: s.Iteration, start: now, peak: s.RemainingBytes}
		return false
	case s.Iteration > a.cur.n:
		a.hist = append(a.hist, a.cur)
		if len(a.hist) > histLen {
			a.hist = a.hist[len(a.hist)-histLen:]
		}
		a.cur = iterRec{n: s.Iteration, start: now, peak: s.RemainingBytes}
		return true
	case s.Iteration == a.cur.n:
		a.cur.peak = max(a.cur.peak, s.RemainingBytes)
	}
	return false
}

// peaks returns the iterations observed since iteration from (inclusive),
// the current one last.
func (a *auto) peaks(from uint64) []iterRec {
	var out []iterRec
	for _, r := range a.hist {
		if r.n >= from {
			out = append(out, r)
		}
	}
	if a.cur.n >= from && a.cur.n > 0 {
		out = append(out, a.cur)
	}
	return out
}

// ratio is the per-iteration shrink factor of the peaks over the last (up to)
// two observed intervals, normalised by the iterations they span.
func ratio(p []iterRec) float64 {
	if len(p) < 2 {
		return math.NaN()
	}
	first := p[max(0, len(p)-3)]
	last := p[len(p)-1]
	span := float64(last.n - first.n)
	if span <= 0 {
		return math.NaN()
	}
	if first.peak == 0 {
		if last.peak == 0 {
			return 0
		}
		return math.Inf(1)
	}
	return math.Pow(float64(last.peak)/float64(first.peak), 1/span)
}

// verdict is auto's view of convergence.
type verdict int

const (
	converging verdict = iota // leave it alone
	slow                      // converges, but too slowly: use levers, never abort for it
	stuck                     // will not converge (or not within the budget)
)

func (a *auto) evaluate(s Sample, now time.Duration) Decision {
	lv := &a.m.levers
	limit := a.limit(s)
	if !a.bwOK || a.bw <= 0 {
		return wait("auto: no throughput measured yet")
	}
	// Settle: a lever gets SettleIterations iterations once it shows.
	from := uint64(0)
	if a.lever != Wait {
		if a.seenIter == 0 {
			if s.ThrottlePercent < a.target && now-a.leverAt < a.c.SettleTime {
				return wait(fmt.Sprintf("auto: waiting for the %d%% throttle to apply (now %d%%)", a.target, s.ThrottlePercent))
			}
			a.seen(now) // shown, or never showed within SettleTime: judge from here
		}
		n := a.cur.n - a.seenIter
		// A throttle under which a full iteration still measures the dirty
		// rate at the throughput is not enough: no need to wait for more.
		saturated := n >= 1 && a.lever == SetThrottle && a.dirtyOK && a.dirty >= a.c.FlatRatio*a.bw
		if !saturated && n < uint64(a.c.SettleIterations) && (n < 1 || now-a.seenAt < a.c.SettleTime) {
			return wait(fmt.Sprintf("auto: giving the %s lever %d iterations (%d so far)", a.lever, a.c.SettleIterations, n))
		}
		from = a.seenIter
	}
	p := a.peaks(from)
	if len(p) < 2 {
		return wait(fmt.Sprintf("auto: %d iteration peaks, need 2", len(p)))
	}
	r := ratio(p)
	last := float64(p[len(p)-1].peak)
	// The dirty set a switchover would face: the median of the last three
	// peaks. A sync right after another shows a small peak, which must not
	// pass for the steady state.
	typical := median(p[max(0, len(p)-3):])
	bw, dirty := a.bw, a.dirty
	if !a.dirtyOK {
		dirty = 0
	}
	stats := fmt.Sprintf("peaks ×%.2f/iteration, last %s, dirty %s/s, throughput %s/s, limit %v",
		r, bytesStr(last), bytesStr(dirty), bytesStr(bw), limit)
	fits := r == 0 || seconds(last, bw) <= limit
	v, pred := converging, seconds(last, bw)
	if !fits {
		v, pred = a.judge(r, dirty/bw, last, bw, limit, now)
	}
	missed := a.checkPrediction(v, pred, now)
	if missed != "" {
		v = slow
	}
	if a.prelude {
		a.prelude = false
		if v == converging && !fits {
			v = slow
		}
	}
	a.last = lastModel{typical: typical, bw: bw, ok: true}
	if v == converging && fits {
		a.ramPred = 0
		if ok, why := a.diskCheck(now, limit, 0); !ok {
			// RAM alone would switch now, but the guest would wait for the disks.
			return wait("auto: RAM converging, the next switchover fits, but the " + why + "; " + a.diskLever() + ": " + stats)
		}
		return wait("auto: converging, the next switchover fits: " + stats)
	}
	a.ramPred = pred
	if v == converging {
		if ok, why := a.diskCheck(now, limit, a.diskHorizon(pred)); !ok {
			return wait(fmt.Sprintf("auto: RAM converging in ~%v, but the %s; %s: %s", roundDur(pred), why, a.diskLever(), stats))
		}
		return wait(fmt.Sprintf("auto: converging in ~%v: %s", roundDur(pred), stats))
	}
	what := "not converging"
	// because is the verdict in words, one clause.
	because := fmt.Sprintf("the guest rewrites its %s faster than the link carries it", bytesStr(typical))
	switch {
	case missed != "":
		what = missed
		because = fmt.Sprintf("it did not converge when predicted (in ~%v)", roundDur(a.predFor))
	case v == slow && dirty/bw >= a.c.SlowRatio:
		what = fmt.Sprintf("converging too slowly (~%v; the dirty rate is %.2f × the throughput, at least %.2f)", roundDur(pred), dirty/bw, a.c.SlowRatio)
		because = fmt.Sprintf("the guest dirties memory at %.0f%% of the link's speed, so each pass shrinks too little", 100*dirty/bw)
	case v == slow:
		what = fmt.Sprintf("converging too slowly (~%v)", roundDur(pred))
		because = fmt.Sprintf("it would take ~%v to converge", roundDur(pred))
	case pred < time.Duration(math.MaxInt64):
		what = fmt.Sprintf("not converging within the budget (~%v)", roundDur(pred))
		because = fmt.Sprintf("it would not converge within the %v budget", a.m.lim.Budget)
	}
	stats = what + ": " + stats

	// Lever 1: downtime, if the typical peak fits within the ceiling (the
	// maximum less the headroom).
	maxDT := a.ceiling()
	ceil := fmt.Sprintf("the %v maximum", maxDT)
	if why := a.ceilingWhy(); why != "" {
		ceil = fmt.Sprintf("the %v ceiling, %s", maxDT, why)
	}
	if !lv.downtimeFailed && seconds(typical, bw) <= maxDT && limit < maxDT {
		dl := roundUp(mulDur(seconds(typical, bw), a.c.Margin), 10*time.Millisecond)
		if dl <= limit {
			dl = maxDT // the estimate fitted the limit, yet QEMU did not switch
		}
		dl = min(dl, maxDT)
		return a.decide(Decision{Action: SetDowntime, DowntimeLimit: dl,
			Summary: fmt.Sprintf("downtime limit %v: %s, and its %s dirty set copies in ~%v", dl, because, bytesStr(typical), roundDur(seconds(typical, bw))),
			Reason: fmt.Sprintf("auto: %s; %s / throughput = %v fits %s: downtime limit %v",
				stats, bytesStr(typical), roundDur(seconds(typical, bw)), ceil, dl)}, now)
	}

	// Lever 2: CPU throttle computed from the stats.
	// A plateau: the dirty set hovers within SaturationFactor × what a
	// switchover at the maximum takes, while the measured rate is below the
	// throughput (or a prediction from it failed). The guest is then not
	// saturating the link; QEMU syncs at its threshold, so every peak is that
	// threshold plus what the guest dirtied meanwhile.
	thrMax := bw * maxDT.Seconds()
	plateau := missed != "" || (a.dirtyOK && dirty < a.c.FlatRatio*bw && typical <= a.c.SaturationFactor*thrMax)
	need, how := a.throttleFor(r, dirty, bw, typical, s.ThrottlePercent, plateau)
	if plateau {
		need, how = a.plateauThrottle(need, how, typical, thrMax, s.ThrottlePercent)
	}
	pct := clampInt(need, 1, a.c.MaxThrottle)
	throttleOK := a.m.lim.throttleOK() && !lv.throttleFailed && a.target < a.c.MaxThrottle
	postcopyOK := a.m.lim.AllowPostcopy && !lv.postcopyFailed
	if throttleOK && !(postcopyOK && need > min(a.c.PostcopyThrottle, a.c.MaxThrottle)) {
		if !lv.downtimeFailed && limit < maxDT {
			// The throttled passes then only need to shrink to throughput ×
			// the maximum: less throttling, for a downtime the user accepts.
			// The throttle follows at the next sample.
			a.downtime, a.reevaluate, a.prelude = maxDT, true, true
			return Decision{Action: SetDowntime, DowntimeLimit: maxDT,
				Summary: fmt.Sprintf("downtime limit %v, the most it may be, before a throttle: %s", maxDT, because),
				Reason: fmt.Sprintf("auto: %s; %s / throughput = %v does not fit %s: downtime limit %v before throttling",
					stats, bytesStr(typical), roundDur(seconds(typical, bw)), ceil, maxDT)}
		}
		inc := pct - s.ThrottlePercent
		t := Throttle{Initial: pct, Increment: clampInt(inc, 1, qemuMaxThrottle), Max: pct}
		return a.decide(Decision{Action: SetThrottle, Throttle: t, Summary: fmt.Sprintf("throttle %d%%: %s", pct, because),
			Reason: fmt.Sprintf("auto: %s; %s: throttle %d%%", stats, how, pct)}, now)
	}

	// Lever 3: postcopy.
	if postcopyOK {
		why, words := "throttling exhausted or refused", "and throttling is exhausted or refused"
		if throttleOK {
			why = fmt.Sprintf("%s would need %d%% throttle, above %d%%", how, need, min(a.c.PostcopyThrottle, a.c.MaxThrottle))
			words = fmt.Sprintf("and a throttle would need %d%%", need)
		}
		return a.decide(Decision{Action: StartPostcopy, Summary: fmt.Sprintf("start postcopy: %s, %s", because, words),
			Reason: fmt.Sprintf("auto: %s; %s: start postcopy", stats, why)}, now)
	}
	// The last two are disruptive or final: confirm the verdict with a second
	// sync after the first one (or a measured dirty rate) before taking them.
	if len(p) < 3 && !(a.dirtyOK && dirty/bw >= a.c.FlatRatio) {
		return wait("auto: " + stats + "; confirming over one more iteration before a pause or an abort")
	}
	// Lever 4: pause (stop-and-copy).
	if a.m.lim.AllowPause && !lv.pauseFailed {
		return a.decide(Decision{Action: PauseSource,
			Summary: fmt.Sprintf("pause the guest, a stop-and-copy of ~%v: %s, and no other lever is left", roundDur(seconds(last, bw)), because),
			Reason: fmt.Sprintf(
				"auto: %s; no other lever left: pause the guest, stop-and-copy of ~%v",
				stats, roundDur(seconds(last, bw)))}, now)
	}
	if v == slow {
		return wait("auto: " + stats + "; no lever left, letting it converge")
	}
	return Decision{Action: Abort, Summary: fmt.Sprintf("abort: %s, and no permitted lever can make it converge", because), Reason: fmt.Sprintf(
		"auto: %s; no permitted lever can make it converge (downtime max %v, throttle %s, postcopy %s, pause %s)",
		stats, maxDT, permittedStr(a.m.lim.throttleOK() && !lv.throttleFailed, fmt.Sprintf("at %d%%", a.target)),
		permittedStr(a.m.lim.AllowPostcopy && !lv.postcopyFailed, ""), permittedStr(a.m.lim.AllowPause && !lv.pauseFailed, ""))}
}

// checkPrediction keeps the first converging prediction since the last lever
// and reports, once it is overdue by two iterations or more, how it failed
// ("" while it holds, or for a verdict other than converging, which forgets
// it). Overdue means past twice the predicted time (at least SettleTime).
func (a *auto) checkPrediction(v verdict, pred, now time.Duration) string {
	if v != converging {
		a.predBy = 0
		return ""
	}
	if a.predBy == 0 {
		a.predMade, a.predFor, a.predIter = now, pred, a.cur.n
		a.predBy = now + max(mulDur(pred, 2), a.c.SettleTime)
		return ""
	}
	if now <= a.predBy || a.cur.n < a.predIter+2 {
		return ""
	}
	return fmt.Sprintf("predicted at %v to converge in ~%v, still not converged %v later",
		roundDur(a.predMade), roundDur(a.predFor), roundDur(now-a.predMade))
}

// plateauThrottle sizes the throttle for a plateau: the guest's run time is
// cut in the ratio of the switchover threshold thr (throughput × the maximum
// downtime) to the typical dirty set, with the Margin. It returns the larger
// of that and the rate-based throttle.
func (a *auto) plateauThrottle(need int, how string, typical, thr float64, cur int) (int, string) {
	if thr <= 0 || typical <= thr {
		return need, how
	}
	run := runFraction(cur)
	p := clampInt(int(math.Ceil((1-run*thr/(typical*a.c.Margin))*100)), 1, 100)
	if p <= need {
		return need, how
	}
	return p, fmt.Sprintf("dirty set %s above the %s a %v switchover takes: run time ×%.2f",
		bytesStr(typical), bytesStr(thr), a.ceiling(), thr/(typical*a.c.Margin))
}

// limit is the downtime limit in force: the sample's, else the one auto set.
func (a *auto) limit(s Sample) time.Duration {
	if s.DowntimeLimit > 0 {
		return s.DowntimeLimit
	}
	return a.downtime
}

// seen marks the last lever as in effect from now.
func (a *auto) seen(now time.Duration) {
	a.seenIter, a.seenAt = a.cur.n, now
	a.dirtyOK = false // measure the dirty rate afresh under the lever
	a.staleDirty = a.lastDirty
}

func permittedStr(ok bool, extra string) string {
	if !ok {
		return "not permitted"
	}
	if extra != "" {
		return extra
	}
	return "permitted"
}

// judge classifies the trend. The per-pass shrink factor is the measured
// dirty rate over the throughput (q) when known, robust to syncs in the middle
// of a pass; flat peaks (r) override it, because a saturated dirty rate is
// only a lower bound. pred is the predicted time until the dirty set fits
// bw×limit: passes shrinking geometrically from last.
// nearThreshold: the last peak is within 10% of the switchover threshold and
// the measured dirty rate (known, q > 0) is clearly below the throughput.
func nearThreshold(last, thr, q float64) bool {
	return last <= 1.1*thr && q > 0 && q < 0.9
}

func (a *auto) judge(r, q, last, bw float64, limit, now time.Duration) (verdict, time.Duration) {
	inf := time.Duration(math.MaxInt64)
	flat := a.c.FlatRatio
	if q >= flat || ((math.IsNaN(r) || r >= flat) && !nearThreshold(last, bw*limit.Seconds(), q)) {
		return stuck, inf
	}
	rr := r
	if q > 0 {
		rr = q
	}
	thr := bw * limit.Seconds()
	if nearThreshold(last, thr, q) {
		// Near the threshold QEMU syncs on every pass check, so the peaks
		// look flat: what matters is that the dirty rate is below the link.
		return converging, seconds(last, bw)
	}
	n := 1.0
	if thr > 0 && last > thr && rr > 0 {
		n = math.Ceil(math.Log(thr/last) / math.Log(rr))
	}
	pred := seconds(last*(1-math.Pow(rr, n))/(1-rr), bw)
	if b := a.m.lim.Budget; b > 0 && (pred >= b || now+pred > b) {
		return stuck, pred
	}
	if pred > a.slowAfter(bw) || (q >= a.c.SlowRatio && pred > a.onePassTime(bw)) {
		return slow, pred
	}
	return converging, pred
}

// throttleFor computes p = 1 - k×throughput/dirty for the guest's true dirty
// rate: the measured one divided by the run fraction left by the current
// throttle. When the peaks are flat or the measured rate is close to the
// throughput, the working set is re-dirtied every pass and QEMU's rate
// (distinct pages per sync period) is only a lower bound: the true rate is
// then taken as at least the throughput times the SaturationFactor. An escalation at least halves the guest's
// remaining run time.
//
// On a plateau (see evaluate) the measured rate is taken as it is.
func (a *auto) throttleFor(r, dirty, bw, typical float64, cur int, plateau bool) (int, string) {
	run := runFraction(cur)
	est, src := dirty, ""
	if dirty <= 0 && !math.IsNaN(r) && !math.IsInf(r, 0) {
		// Not measured yet: the peaks shrink by about dirty/throughput per pass.
		est, src = r*bw, " (from the peaks' ratio)"
	}
	trueDirty := est / run
	how := fmt.Sprintf("true dirty rate ~%s/s%s", bytesStr(trueDirty), src)
	if !plateau && a.guestDirty > trueDirty {
		// QEMU's rate counts the distinct pages of a whole sync period,
		// pass-long: a guest that rewrites pages within it is faster than
		// that. Its own rate, measured over a shorter period, says so.
		trueDirty = a.guestDirty
		how += fmt.Sprintf(", guest dirty rate measured ~%s/s", bytesStr(a.guestDirty))
	}
	q := dirty / bw
	if !plateau && (math.IsNaN(r) || r >= a.c.FlatRatio || (q >= a.c.FlatRatio && q < saturatedQ)) {
		lower := math.Max(dirty, bw) / run
		trueDirty = lower * a.c.SaturationFactor
		how = fmt.Sprintf("working set re-dirtied every pass, true dirty rate ≥ ~%s/s", bytesStr(trueDirty))
		switch {
		case a.guestDirty > 0 && a.measureSaturated(typical):
			// The measurement counts distinct pages: a guest that rewrote
			// its whole working set within the period reads working set /
			// period, whatever its true rate. A lower bound, taken as
			// SaturationFactor × like the peaks' when nothing is measured.
			trueDirty = math.Max(a.guestDirty*a.c.SaturationFactor, lower)
			how = fmt.Sprintf("working set re-dirtied every pass, guest dirty rate measured ~%s/s, its whole working set (~%s) within the %v measurement: true rate ≥ ~%s/s (at least ~%s/s)",
				bytesStr(a.guestDirty), bytesStr(typical), a.guestPeriod, bytesStr(a.guestDirty*a.c.SaturationFactor), bytesStr(lower))
		case a.guestDirty > 0:
			// Measured apart from the migration, unthrottled: no guess.
			trueDirty = math.Max(a.guestDirty, lower)
			how = fmt.Sprintf("working set re-dirtied every pass, guest dirty rate measured ~%s/s (at least ~%s/s)",
				bytesStr(a.guestDirty), bytesStr(lower))
		}
	}
	p := 1.0
	if trueDirty > 0 {
		p = 1 - a.c.TargetRatio*bw/trueDirty
	}
	how += fmt.Sprintf(" vs %.0f%% of %s/s", a.c.TargetRatio*100, bytesStr(bw))
	if p1, why, ok := a.onePass(trueDirty, bw, typical); ok && p1 > p {
		p, how = p1, how+"; "+why
	}
	pct := int(math.Ceil(p * 100))
	if a.target > 0 {
		pct = max(pct, 100-(100-max(a.target, cur))/2)
	}
	return clampInt(pct, 1, 100), how
}

// onePass sizes a throttle for a guest that dirties at least as fast as
// the link (trueDirty ≥ bw) so that the next pass, which sends the typical
// dirty set, leaves at most what a switchover at the maximum downtime sends
// (with the Margin): the run fraction f = threshold / (typical × Margin) ×
// bw / trueDirty. With q = trueDirty / bw ≥ 1 this is the cheapest throttle
// for the guest too, not only the fastest: a throttle leaving f shrinks each
// pass by r = f×q, and the n passes down to the threshold (r^n = x =
// threshold / (typical × Margin)) take P×(1-x)/(1-r) (P: one pass of the
// typical set) during which the guest loses 1 - r/q of its time; that loss,
// (1-r/q)(1-x)/(1-r)×P, grows with r when q ≥ 1, so one pass (r = x) loses
// the least. Below the link (q < 1) fewer, lighter passes lose less; the
// TargetRatio rule applies there.
func (a *auto) onePass(trueDirty, bw, typical float64) (float64, string, bool) {
	maxDT := a.ceiling()
	thr := bw * maxDT.Seconds()
	if trueDirty < bw || bw <= 0 || typical*a.c.Margin <= thr {
		return 0, "", false
	}
	f := thr / (typical * a.c.Margin) * bw / trueDirty
	return 1 - f, fmt.Sprintf("at or above the throughput, one throttled pass of the %s dirty set (%v) must leave at most %s (a %v switchover / %.2f): run time ×%.3f",
		bytesStr(typical), roundDur(seconds(typical, bw)), bytesStr(thr/a.c.Margin), maxDT, a.c.Margin, f), true
}

// measuredSaturatedShare: a guest dirty-rate measurement that counted at
// least this share of the working set within its period is saturated.
const measuredSaturatedShare = 0.85

// measureSaturated reports whether the guest's measured dirty rate covered
// about its whole working set (typical, the dirty set of a pass) within the
// measurement's period, so that it only bounds the true rate from below.
func (a *auto) measureSaturated(typical float64) bool {
	return a.guestPeriod > 0 && typical > 0 && a.guestDirty*a.guestPeriod.Seconds() >= measuredSaturatedShare*typical
}

// runFraction is the share of time a guest throttled at pct% runs (at
// least 1%).
func runFraction(pct int) float64 { return math.Max(1-float64(pct)/100, 0.01) }

// onePassTime is one full RAM pass at the throughput (0 when the RAM size
// is unknown).
func (a *auto) onePassTime(bw float64) time.Duration {
	if a.ram <= 0 || bw <= 0 {
		return 0
	}
	return seconds(a.ram, bw)
}

// slowAfter is the predicted time beyond which converging is too slow:
// SlowPasses full RAM passes at the throughput, at most MaxConvergeTime.
// Without a measured dirty rate the prediction rests on the ratio of a few
// saw-tooth peaks, too noisy to act on early: MaxConvergeTime then.
func (a *auto) slowAfter(bw float64) time.Duration {
	if a.ram <= 0 || bw <= 0 || !a.dirtyOK {
		return a.c.MaxConvergeTime
	}
	return min(a.c.MaxConvergeTime, mulDur(a.onePassTime(bw), a.c.SlowPasses))
}

// decide records a lever decision for the settle rule.
func (a *auto) decide(d Decision, now time.Duration) Decision {
	a.lever, a.leverAt, a.leverIter, a.seenIter = d.Action, now, a.cur.n, 0
	a.predBy = 0
	switch d.Action {
	case SetDowntime:
		a.downtime = d.DowntimeLimit
		a.seen(now) // in effect at once
	case SetThrottle:
		a.target = d.Throttle.Max
	}
	return d
}

func (a *auto) deadline(s Sample, now time.Duration) Decision {
	lv := &a.m.levers
	why := fmt.Sprintf("auto: budget %v reached at %v", a.m.lim.Budget, roundDur(now))
	ran := fmt.Sprintf("the %v budget ran out", a.m.lim.Budget)
	if a.m.lim.AllowPostcopy && !lv.postcopyFailed {
		return Decision{Action: StartPostcopy, Summary: "start postcopy: " + ran, Reason: why + ": finish by postcopy"}
	}
	if a.m.lim.AllowPause && !lv.pauseFailed {
		return Decision{Action: PauseSource, Summary: "pause the guest (stop-and-copy): " + ran, Reason: why + ": finish by stop-and-copy"}
	}
	return Decision{Action: Abort, Summary: "abort: " + ran + ", and neither postcopy nor a pause is permitted", Reason: why + ": no finishing lever permitted"}
}

func (a *auto) applied(d Decision, err error) {
	if err == nil {
		return
	}
	switch d.Action {
	case SetDowntime, SetThrottle, StartPostcopy, PauseSource:
		a.lever, a.seenIter = Wait, 0
		a.reevaluate = true
	}
	if d.Action == SetDowntime {
		a.downtime = 0
	}
}

func roundUp(d, unit time.Duration) time.Duration {
	if d <= 0 || d >= time.Duration(math.MaxInt64)-unit {
		return d
	}
	if r := d % unit; r != 0 {
		d += unit - r
	}
	return d
}

// median of the peaks (the lower middle one for an even count).
func median(p []iterRec) float64 {
	v := make([]float64, len(p))
	for i, r := range p {
		v[i] = float64(r.peak)
	}
	slices.Sort(v)
	return v[(len(v)-1)/2]
}
