package strategy

import (
	"errors"
	"fmt"
	"math"
	"time"
)

// Predict answers, before a migration starts, what auto will need to finish
// it: from the guest's RAM, its own dirty rate (calc-dirty-rate on the
// source, which is read-only) and the bandwidth the migration will get, with
// the user's Limits. It is a closed form of auto's rule (auto.go), built on
// the same figures and functions: the verdict (FlatRatio, SlowPasses,
// SlowRatio, MaxConvergeTime), the downtime lever (the dirty set × Margin
// within the ceiling, the maximum less the learned headroom), the throttle
// (TargetRatio, the one-pass throttle, the plateau throttle), postcopy
// above PostcopyThrottle, the pause, and on an abort the Remedy an Abort
// decision carries.
//
// The model: the first pass sends the whole RAM at Bandwidth; each later
// pass sends what the guest dirtied during the previous one (DirtyRate ×
// its time, at most the working set); QEMU switches over when that fits
// Bandwidth × the downtime limit. It assumes every RAM page holds data
// (zero pages cost QEMU almost nothing, so the first pass of a guest that
// has not touched its RAM is shorter), a steady dirty rate, and the
// bandwidth reached from the start. docs/predict.md measures its error.

// ErrPlan marks a Plan that Predict cannot model (see its message).
var ErrPlan = errors.New("strategy: bad plan")

// Plan is what Predict needs about one migration.
type Plan struct {
	RAM uint64 // guest RAM, bytes: the first pass sends it all
	// DirtyRate is the guest's own dirty rate, bytes/s, unthrottled
	// (calc-dirty-rate: distinct sampled pages written over DirtyPeriod).
	DirtyRate float64
	// DirtyPeriod is what DirtyRate was measured over (0 = unknown). A
	// measurement whose rate × period covers about the whole WorkingSet is
	// only a lower bound of the rate, taken as SaturationFactor × it, as auto
	// takes it.
	DirtyPeriod time.Duration
	// WorkingSet is the memory the guest keeps rewriting, bytes: the most a
	// pass can leave dirty (0 = unknown: the RAM). EstimateWorkingSet gives
	// it from two measurements.
	WorkingSet uint64
	Bandwidth  float64 // bytes/s the migration gets: the link, or max-bandwidth when lower
	// Policy must be auto ("" is auto): the presets have no model here.
	Policy string
	Limits Limits
	Auto   AutoConfig // auto's tunables (zero: the defaults)
	// QEMUMajor and QEMUMinor are the source QEMU's version, for auto's
	// headroom below the maximum downtime (0.0 = unknown: none, as a
	// Machine without SetQEMU).
	QEMUMajor, QEMUMinor int
}

// Lever is what a migration needs beyond pre-copy as it is.
type Lever string

// The levers, in auto's order of guest impact.
const (
	LeverNone     Lever = "none"     // converges as is
	LeverDowntime Lever = "downtime" // a higher downtime limit (within the maximum)
	LeverThrottle Lever = "throttle" // CPU throttling
	LeverPostcopy Lever = "postcopy"
	LeverPause    Lever = "pause" // stop-and-copy
)

// Prediction is Predict's answer.
type Prediction struct {
	// Converges: the migration finishes with what the Limits permit.
	Converges bool
	// Time is the predicted migration time, switchover included (when
	// Converges; else how long auto would run before it aborts).
	Time time.Duration
	// Lever is what auto will need; LeverNone when it converges as is.
	// When it does not converge, the lever auto would try last (LeverNone:
	// none permitted helps).
	Lever Lever
	// Throttle is the CPU throttle auto will set, percent (LeverThrottle).
	Throttle int
	// DowntimeLimit is the downtime limit in force at the switchover: auto's
	// initial one, or the one it raises it to.
	DowntimeLimit time.Duration
	// Downtime is the predicted pause of the guest at the switchover: the
	// last dirty set at the bandwidth (with a pause, the stop-and-copy); 0
	// with postcopy, whose switch only moves the device state.
	Downtime time.Duration
	// Remedy, when it does not converge, is what would (as on auto's Abort).
	Remedy *Remedy
	// Budget, when non-zero, is the Limits.Budget auto would need: the
	// budget is what keeps the migration from finishing.
	Budget time.Duration
	// DirtyRate and WorkingSet are the figures the model used, bytes/s and
	// bytes: the true dirty rate (the measured one, or SaturationFactor × a
	// saturated measurement) and the dirty set of a pass.
	DirtyRate  float64
	WorkingSet float64
	Summary    string // in words: "converges as is in about 4.2s"
	Reason     string // the arithmetic
}

// EstimateWorkingSet infers the working set from two dirty-rate
// measurements of the same guest over periods short < long (bytes/s):
// distinct pages grow with the period until the guest has rewritten its
// whole working set. When the longer one counted clearly fewer bytes than
// the shorter rate over its period (less than 90 %), it saturated: the
// working set is about what it counted. Otherwise it is unknown (0).
func EstimateWorkingSet(shortRate float64, short time.Duration, longRate float64, long time.Duration) uint64 {
	if !(shortRate > 0) || !(longRate > 0) || math.IsInf(shortRate, 0) || math.IsInf(longRate, 0) || short <= 0 || long <= short {
		return 0
	}
	counted := longRate * long.Seconds()
	if counted >= 0.9*shortRate*long.Seconds() {
		return 0
	}
	return uint64(math.Min(counted, math.MaxUint64/2))
}

// predictMaxPasses bounds the geometric series: past it the migration is
// taken as never converging.
const predictMaxPasses = 10000

// Predict models the migration p describes under auto. The error wraps
// ErrPlan.
func Predict(p Plan) (Prediction, error) {
	if p.Policy != "" && p.Policy != PolicyAuto {
		return Prediction{}, fmt.Errorf("%w: policy %q: only auto is modelled", ErrPlan, p.Policy)
	}
	if p.RAM == 0 {
		return Prediction{}, fmt.Errorf("%w: RAM must be more than 0", ErrPlan)
	}
	if !(p.Bandwidth > 0) || math.IsInf(p.Bandwidth, 0) {
		return Prediction{}, fmt.Errorf("%w: Bandwidth %v must be a positive rate", ErrPlan, p.Bandwidth)
	}
	if !(p.DirtyRate >= 0) || math.IsInf(p.DirtyRate, 0) {
		return Prediction{}, fmt.Errorf("%w: DirtyRate %v must be a rate, 0 or more", ErrPlan, p.DirtyRate)
	}
	if p.DirtyPeriod < 0 {
		return Prediction{}, fmt.Errorf("%w: DirtyPeriod %v must not be negative", ErrPlan, p.DirtyPeriod)
	}
	m, err := New(Config{Policy: PolicyAuto, Limits: p.Limits, Auto: p.Auto})
	if err != nil {
		return Prediction{}, fmt.Errorf("%w: %w", ErrPlan, err)
	}
	if p.QEMUMajor > 0 {
		m.SetQEMU(p.QEMUMajor, p.QEMUMinor)
	}
	m.Setup()
	a := m.pol.(*auto)
	return a.predict(p), nil
}

// pm holds one prediction's figures: bytes, bytes/s, seconds.
type pm struct {
	a                *auto
	ram, ws, bw, d   float64
	ceil, lim0       time.Duration
	measuredDirty    float64
	saturatedMeasure bool
}

// series follows the passes from one that sends x until the dirty set fits
// bw × limit: the time to the end of the switchover (its stop-and-copy
// included), the last dirty set, and whether it got there.
func (m pm) series(x float64, rate float64, limit time.Duration) (time.Duration, float64, bool) {
	thr := m.bw * limit.Seconds()
	t := 0.0
	for range predictMaxPasses {
		if x <= thr {
			return secondsDur(t + x/m.bw), x, true
		}
		t += x / m.bw
		x = math.Min(rate*x/m.bw, m.ws)
	}
	return 0, x, false
}

func secondsDur(s float64) time.Duration { return seconds(s, 1) }

func (a *auto) predict(p Plan) Prediction {
	m := pm{a: a, ram: float64(p.RAM), bw: p.Bandwidth, d: p.DirtyRate, measuredDirty: p.DirtyRate}
	m.ws = m.ram
	if p.WorkingSet > 0 {
		m.ws = math.Min(float64(p.WorkingSet), m.ram)
	}
	// A measurement that counted about the whole working set within its
	// period is a lower bound: auto takes SaturationFactor × it.
	if p.WorkingSet > 0 && p.DirtyPeriod > 0 && m.d*p.DirtyPeriod.Seconds() >= measuredSaturatedShare*m.ws {
		m.saturatedMeasure = true
		m.d *= a.c.SaturationFactor
	}
	m.ceil = a.ceiling()
	m.lim0 = a.downtime // Setup's: min(InitialDowntime, ceiling)
	pr := m.run()
	pr.DirtyRate = m.d
	return m.budget(pr)
}

// run is auto's rule in closed form.
func (m pm) run() Prediction {
	c := m.a.c
	q := m.d / m.bw
	t1 := m.ram / m.bw           // the first pass
	x1 := math.Min(m.d*t1, m.ws) // dirtied meanwhile
	stats := fmt.Sprintf("RAM %s at %s/s: first pass %v; guest dirties %s/s (%.2f × the bandwidth), working set %s",
		bytesStr(m.ram), bytesStr(m.bw), roundDur(secondsDur(t1)), bytesStr(m.d), q, bytesStr(m.ws))
	if m.saturatedMeasure {
		stats += fmt.Sprintf(" (measured %s/s over the whole working set: a lower bound, ×%.0f)", bytesStr(m.measuredDirty), c.SaturationFactor)
	}
	conv, last, ok := m.series(x1, m.d, m.lim0)
	total := secondsDur(t1) + conv
	if ok && (x1 <= m.bw*m.lim0.Seconds() || q < c.FlatRatio) {
		// Converging; auto judges it after the second pass.
		pred := conv - secondsDur(x1/m.bw)
		slowAfter := min(c.MaxConvergeTime, mulDur(secondsDur(t1), c.SlowPasses))
		slow := x1 > m.bw*m.lim0.Seconds() && (pred > slowAfter || (q >= c.SlowRatio && pred > secondsDur(t1)))
		if !slow {
			return Prediction{Converges: true, Time: total, Lever: LeverNone, DowntimeLimit: m.lim0,
				Downtime: secondsDur(last / m.bw), WorkingSet: x1,
				Summary: fmt.Sprintf("converges as is in about %v (downtime ~%v)", roundDur(total), roundDur(secondsDur(last/m.bw))),
				Reason:  fmt.Sprintf("%s; the passes shrink ×%.2f to %s, within %v at the bandwidth", stats, q, bytesStr(last), m.lim0)}
		}
		stats += fmt.Sprintf("; converging too slowly (~%v after the second pass)", roundDur(pred))
	} else {
		stats += "; pre-copy alone does not converge"
	}
	return m.levers(t1, x1, q, stats, ok, total, last)
}

// levers picks auto's lever for a migration judged slow or stuck after its
// second pass. converges/total/last are pre-copy's own outcome (a slow one).
func (m pm) levers(t1, x1, q float64, stats string, converges bool, total time.Duration, last float64) Prediction {
	a, c := m.a, m.a.c
	typical := math.Min(m.d*x1/m.bw, m.ws) // the dirty set auto judges on
	if typical <= 0 {
		typical = x1
	}
	pass := typical / m.bw
	// auto's verdict: at once when the first pass left the whole RAM dirty
	// (the peaks are flat), else at the second pass's end.
	flat := q >= c.FlatRatio
	judged := t1
	if x1 < c.FlatRatio*m.ram {
		judged += x1 / m.bw
	}
	pr := Prediction{WorkingSet: typical}

	// Lever 1: the downtime, when the dirty set fits the ceiling.
	if secondsDur(pass) <= m.ceil && m.lim0 < m.ceil {
		dl := min(roundUp(mulDur(secondsDur(pass), c.Margin), 10*time.Millisecond), m.ceil)
		pr.Converges, pr.Lever, pr.DowntimeLimit = true, LeverDowntime, dl
		pr.Time = secondsDur(judged + 2*pass) // the pass under way, then its stop-and-copy
		pr.Downtime = secondsDur(pass)
		pr.Summary = fmt.Sprintf("needs a downtime of %v: converges in about %v", dl, roundDur(pr.Time))
		pr.Reason = fmt.Sprintf("%s; its %s dirty set copies in %v × %.2f: downtime limit %v, within %s",
			stats, bytesStr(typical), roundDur(secondsDur(pass)), c.Margin, dl, m.ceilWords())
		return pr
	}

	// Lever 2: the throttle, sized as auto sizes it.
	trueDirty, plateau := m.d, false
	if q >= c.FlatRatio {
		trueDirty = math.Max(m.d, m.bw)
	} else {
		plateau = typical <= c.SaturationFactor*m.bw*m.ceil.Seconds()
	}
	need := 1.0
	if trueDirty > 0 {
		need = 1 - c.TargetRatio*m.bw/trueDirty
	}
	if p1, _, ok := a.onePass(trueDirty, m.bw, typical); ok && p1 > need {
		need = p1
	}
	pct := clampInt(int(math.Ceil(need*100)), 1, 100)
	if plateau {
		pct, _ = a.plateauThrottle(pct, "", typical, m.bw*m.ceil.Seconds(), 0)
	}
	postcopyOK := m.a.m.lim.AllowPostcopy
	if a.m.lim.throttleOK() && !(postcopyOK && pct > min(c.PostcopyThrottle, c.MaxThrottle)) {
		// Escalations halve the guest's remaining run time until the
		// throttled pass fits the ceiling.
		p := clampInt(pct, 1, c.MaxThrottle)
		steps := 0
		slowAfter := min(c.MaxConvergeTime, mulDur(secondsDur(t1), c.SlowPasses))
		for {
			rate := trueDirty * runFraction(p)
			// Shown within two syncs (QEMU's trigger), then throttled passes down to the
			// ceiling; each escalation costs a settle.
			conv, xt, ok := m.series(math.Min(rate*pass, m.ws), rate, m.ceil)
			if ok && conv <= slowAfter && (rate < c.SlowRatio*m.bw || conv <= secondsDur(t1)) {
				pr.Converges, pr.Lever, pr.Throttle, pr.DowntimeLimit = true, LeverThrottle, p, m.ceil
				pr.Time = secondsDur(judged+pass*float64(2+2*steps)) + conv
				pr.Downtime = secondsDur(xt / m.bw)
				pr.Summary = fmt.Sprintf("needs a throttle of about %d%%: converges in about %v", p, roundDur(pr.Time))
				pr.Reason = fmt.Sprintf("%s; a %d%% throttle leaves %s/s: the throttled passes shrink to %s, within %v at the bandwidth",
					stats, p, bytesStr(rate), bytesStr(xt), m.ceil)
				return pr
			}
			if p >= c.MaxThrottle {
				break
			}
			p = min(max(p+1, 100-(100-p)/2), c.MaxThrottle)
			steps++
		}
		stats += fmt.Sprintf("; even a %d%% throttle leaves more than %v of dirty set", c.MaxThrottle, m.ceil)
		judged += pass * float64(2+2*steps)
	}

	// Lever 3: postcopy finishes in about one pass of the dirty set.
	if postcopyOK {
		pr.Converges, pr.Lever, pr.DowntimeLimit = true, LeverPostcopy, m.ceil
		pr.Time = secondsDur(judged + pass)
		pr.Summary = fmt.Sprintf("needs postcopy: completes in about %v", roundDur(pr.Time))
		if a.m.lim.throttleOK() && pct > min(c.PostcopyThrottle, c.MaxThrottle) {
			pr.Summary += fmt.Sprintf(" (a throttle would need %d%%)", pct)
		}
		pr.Reason = fmt.Sprintf("%s; postcopy moves the %s dirty set once", stats, bytesStr(typical))
		return pr
	}
	// Lever 4: a pause, confirmed over one more pass.
	if a.m.lim.AllowPause {
		pr.Converges, pr.Lever, pr.DowntimeLimit = true, LeverPause, m.ceil
		pr.Time = secondsDur(judged + pass)
		if !flat {
			pr.Time += secondsDur(pass) // confirmed over one more pass
		}
		pr.Downtime = secondsDur(pass)
		pr.Summary = fmt.Sprintf("needs a pause (a stop-and-copy of ~%v): completes in about %v", roundDur(pr.Downtime), roundDur(pr.Time))
		pr.Reason = fmt.Sprintf("%s; no other lever: pause, stop-and-copy of %s", stats, bytesStr(typical))
		return pr
	}
	if converges {
		// Too slow, but no lever: auto lets it converge.
		pr.Converges, pr.Lever, pr.Time, pr.DowntimeLimit = true, LeverNone, total, m.lim0
		pr.Downtime = secondsDur(last / m.bw)
		pr.Summary = fmt.Sprintf("converges as is, slowly, in about %v (no lever permitted would be faster)", roundDur(total))
		pr.Reason = stats + "; no permitted lever: letting it converge"
		return pr
	}
	// Abort, with the Remedy auto's Abort would carry.
	a.last = lastModel{typical: typical, bw: m.bw, ok: true}
	r := a.m.remedy(Sample{})
	pr.Converges, pr.Lever, pr.Remedy = false, LeverNone, r
	if a.m.lim.throttleOK() {
		pr.Lever, pr.Throttle = LeverThrottle, c.MaxThrottle
	}
	pr.Time = secondsDur(judged)
	if !flat {
		pr.Time += secondsDur(pass) // confirmed over one more pass
	}
	pr.Summary = "cannot finish with what is permitted"
	if s := r.String(); s != "" {
		pr.Summary += "; " + s
	}
	pr.Reason = stats + fmt.Sprintf("; no permitted lever converges (downtime max %v)", m.ceil)
	return pr
}

// budget applies Limits.Budget: a migration predicted to outlast it gets
// auto's finishing decision at the budget (postcopy, a pause, else abort).
func (m pm) budget(pr Prediction) Prediction {
	b := m.a.m.lim.Budget
	if b <= 0 || !pr.Converges || pr.Time <= b {
		return pr
	}
	lim := m.a.m.lim
	left := pr.WorkingSet / m.bw
	words := fmt.Sprintf("the %v budget runs out first (it needs about %v)", b, roundDur(pr.Time))
	pr.Reason += "; " + words
	switch {
	case lim.AllowPostcopy:
		pr.Lever, pr.Throttle, pr.Downtime = LeverPostcopy, 0, 0
		pr.Time = b + secondsDur(left)
		pr.Summary = fmt.Sprintf("needs postcopy at the budget: %s; completes in about %v", words, roundDur(pr.Time))
	case lim.AllowPause:
		pr.Lever, pr.Throttle = LeverPause, 0
		pr.Time, pr.Downtime = b+secondsDur(left), secondsDur(left)
		pr.Summary = fmt.Sprintf("needs a pause at the budget (a stop-and-copy of ~%v): %s; completes in about %v", roundDur(pr.Downtime), words, roundDur(pr.Time))
	default:
		r := &Remedy{Postcopy: true, Pause: true}
		pr.Budget = roundUp(pr.Time, time.Second)
		pr.Converges, pr.Remedy, pr.Time, pr.Downtime = false, r, b, 0
		pr.Summary = fmt.Sprintf("cannot finish with what is permitted: %s; %s, or with a budget of %v", words, r.String(), pr.Budget)
	}
	return pr
}

// ceilWords says what the downtime ceiling is.
func (m pm) ceilWords() string {
	if why := m.a.ceilingWhy(); why != "" {
		return fmt.Sprintf("the %v ceiling (%s)", m.ceil, why)
	}
	return fmt.Sprintf("the %v maximum", m.ceil)
}

// String is the Prediction's Summary.
func (p Prediction) String() string { return p.Summary }
