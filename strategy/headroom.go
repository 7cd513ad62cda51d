package strategy

import (
	"fmt"
	"math"
	"slices"
	"time"
)

// The downtime promise. QEMU switches over when the RAM it has left to send
// fits its bandwidth estimate × downtime-limit, but the downtime it then
// measures also holds what its estimate leaves out: stopping the vCPUs, the
// final bitmap sync and what the guest dirtied since the last one, the device
// state, the destination's load. On the benchmark's first runs (docs/results/wave1) that
// excess does not grow with the limit: runs at 100 ms, 300 ms and 500 ms
// limits overshoot alike (tens of milliseconds), so it is a duration to keep
// free below the user's maximum, not a share of it. auto therefore sets its
// downtime limits at most at the maximum less a headroom, learned per QEMU
// version from completions as QEMU reported them (LearnHeadroom).

// Completion is one pre-copy completion as QEMU reported it: the
// downtime-limit in force at the switchover and the downtime it measured.
type Completion struct {
	Limit, Downtime time.Duration
}

// atLimitShare: a completion whose downtime reached this share of its limit
// switched over at the limit (QEMU's estimate met its threshold); one far
// below it switched on a dirty set that suddenly fitted, and says nothing
// about the excess.
const atLimitShare = 0.9

// LearnHeadroom returns the headroom that would have kept the given quantile
// (0.95: 95%) of the completions that switched over at their limit within it
// (Downtime - Limit at that quantile, at least 0), and how many such
// completions there were. A manager can learn its own from the Results of its
// migrations (engine.Result.DowntimeLimit and Downtime) and pass it as
// AutoConfig.Headroom.
func LearnHeadroom(cs []Completion, quantile float64) (time.Duration, int) {
	var over []time.Duration
	for _, c := range cs {
		if c.Limit > 0 && float64(c.Downtime) >= atLimitShare*float64(c.Limit) {
			over = append(over, c.Downtime-c.Limit)
		}
	}
	if len(over) == 0 || math.IsNaN(quantile) {
		return 0, 0
	}
	slices.Sort(over)
	q := min(max(quantile, 0), 1)
	i := max(int(math.Ceil(q*float64(len(over))))-1, 0)
	return max(over[i], 0), len(over)
}

// headroomQuantile is the share of completions the learned headroom keeps
// within the maximum.
const headroomQuantile = 0.95

// learned is the headroom learned from the benchmark's raw runs
// (docs/results/wave1/*.json, the runs made before auto kept it: every pre-copy completion, the limit in force from the
// last set-downtime decision or the policy's setup) with LearnHeadroom at
// headroomQuantile. TestLearnedHeadroomMatchesResults recomputes it from
// those files.
var learned = []struct {
	major, minor int
	headroom     time.Duration
	runs         int           // completions at the limit it was learned from
	most         time.Duration // the largest excess among them
}{
	{7, 2, 68922 * time.Microsecond, 68, 88132 * time.Microsecond},
	{10, 0, 61453 * time.Microsecond, 70, 74169 * time.Microsecond},
}

// headroomFor is the headroom auto keeps for a QEMU version (the learned
// one, up to the millisecond) and why, in words. A version not learned gets the largest learned headroom.
func headroomFor(major, minor int) (time.Duration, string) {
	best := -1
	for i, l := range learned {
		if l.major == major && l.minor == minor {
			best = i
			break
		}
		if best < 0 || l.headroom > learned[best].headroom {
			best = i
		}
	}
	l := learned[best]
	h := roundUp(l.headroom, time.Millisecond)
	if l.major == major && l.minor == minor {
		return h, fmt.Sprintf("QEMU %d.%d's downtime exceeded its limit by at most %v in %.0f%% of %d completions at the limit (at most %v)",
			major, minor, h, headroomQuantile*100, l.runs, l.most.Round(time.Millisecond))
	}
	return h, fmt.Sprintf("QEMU %d.%d is not learned: the largest learned headroom, QEMU %d.%d's (its downtime exceeded its limit by at most %v in %.0f%% of %d completions at the limit)",
		major, minor, l.major, l.minor, h, headroomQuantile*100, l.runs)
}

// SetQEMU tells the Machine the source QEMU's version (major.minor) before
// Setup: auto then keeps the headroom learned for it below the user's
// maximum downtime (see AutoConfig.Headroom). Without it, and without
// AutoConfig.Headroom, auto keeps none.
func (m *Machine) SetQEMU(major, minor int) {
	m.qemuMajor, m.qemuMinor, m.qemuKnown = major, minor, true
}

// MaxDowntime is the user's maximum downtime in force (Limits.MaxDowntime,
// or DefaultMaxDowntime when zero).
func (m *Machine) MaxDowntime() time.Duration { return m.lim.maxDowntime() }

// headroom is what auto keeps free below the maximum, and why (0, "" = none).
func (a *auto) headroom() (time.Duration, string) {
	if h := a.c.Headroom; h > 0 {
		return h, "set by the configuration"
	}
	if !a.m.qemuKnown {
		return 0, ""
	}
	return headroomFor(a.m.qemuMajor, a.m.qemuMinor)
}

// ceiling is the largest downtime limit auto sets: the user's maximum less
// the headroom, at least half the maximum (below that no limit keeps the
// promise, and a smaller one would only cost convergence).
func (a *auto) ceiling() time.Duration {
	maxDT := a.m.lim.maxDowntime()
	h, _ := a.headroom()
	if h <= 0 {
		return maxDT
	}
	return max(maxDT-h, maxDT/2)
}

// ceilingWhy says, for a reason, how the ceiling derives from the maximum
// ("" when it is the maximum).
func (a *auto) ceilingWhy() string {
	h, why := a.headroom()
	if h <= 0 {
		return ""
	}
	maxDT := a.m.lim.maxDowntime()
	c := a.ceiling()
	s := fmt.Sprintf("the %v maximum less %v headroom (%s)", maxDT, h, why)
	if c != maxDT-h {
		s += fmt.Sprintf(", at least half the maximum: %v", c)
	}
	return s
}
