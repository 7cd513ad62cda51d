package strategy

import (
	"fmt"
	"math"
	"time"
)

// mirrorFlatRate: remaining bytes shrinking slower than this (64 KiB/s)
// count as not shrinking at all.
const mirrorFlatRate = 64 << 10

// mirrorPoint is one observation of the mirrors' remaining bytes.
type mirrorPoint struct {
	at   time.Duration
	rem  float64 // StorageRemaining
	done float64 // StorageTotal - StorageRemaining: bytes the mirrors copied
}

func newMirrorPoint(s Sample, now time.Duration) mirrorPoint {
	rem, total := float64(s.StorageRemaining), float64(s.StorageTotal)
	return mirrorPoint{at: now, rem: rem, done: math.Max(total-rem, 0)}
}

// window appends p to pts and drops the points older than w (keeping the one
// just before the window).
func window(pts []mirrorPoint, p mirrorPoint, w time.Duration) []mirrorPoint {
	pts = append(pts, p)
	for len(pts) > 2 && pts[1].at <= p.at-w {
		pts = pts[1:]
	}
	return pts
}

// trendWindow is a measurement of the mirrors over the last MirrorWindow
// (plus the point just before it), since a start a lever resets.
type trendWindow struct {
	pts     []mirrorPoint
	since   time.Duration // start of the current measurement
	started bool
}

// begin starts the first measurement at now; it reports whether it did.
func (t *trendWindow) begin(now time.Duration) bool {
	if t.started {
		return false
	}
	t.started, t.since = true, now
	return true
}

// add records p, keeping the last w.
func (t *trendWindow) add(p mirrorPoint, w time.Duration) { t.pts = window(t.pts, p, w) }

// full reports whether a whole window w is measured (3 points at least).
func (t *trendWindow) full(now, w time.Duration) bool {
	return t.started && now-t.since >= w && len(t.pts) >= 3
}

// reset measures afresh from now (a lever changed the trend).
func (t *trendWindow) reset(now time.Duration) { t.pts, t.since = nil, now }

// copied records the mirrors' copy rate over a full window: the least-squares
// slope of the bytes done. auto keeps the largest seen as the mirrors'
// capacity (a mirror that keeps up with a slow writer copies only what it is
// given, so a single window understates it).
func (a *auto) copied(pts []mirrorPoint) {
	if r := slopeOf(pts, func(p mirrorPoint) float64 { return p.done }); r > a.diskRate {
		a.diskRate = r
	}
}

// mirrorState is auto's view of the mirror phase.
type mirrorState struct {
	trendWindow
	stuckSince time.Duration // -1 = not stuck
}

// mirror is auto's rule for the mirror phase: the least-squares slope of
// StorageRemaining over the last MirrorWindow gives the rate the mirrors
// converge at. Not shrinking, or not READY within the budget (stuck), or not
// within MaxConvergeTime (slow): switch the mirrors to write-blocking where
// possible. Stuck with no switch left for two windows: abort, the mirrors
// would never get READY.
func (a *auto) mirror(s Sample, now time.Duration) Decision {
	a.prog.observe(s, now)
	if why, ok := a.prog.storageStalled(now, a.progTimeout); ok {
		return Decision{Action: Abort, Summary: fmt.Sprintf("abort: the disk mirrors made no progress for %v", roundDur(now-a.prog.last)),
			Reason: "auto: " + why, Remedy: &Remedy{}}
	}
	ms := &a.ms
	if ms.begin(now) {
		ms.stuckSince = -1
	}
	if s.StorageTotal == 0 {
		return wait("auto: waiting for the mirrors to report progress")
	}
	rem := float64(s.StorageRemaining)
	w := a.c.MirrorWindow
	ms.add(newMirrorPoint(s, now), w)
	left := fmt.Sprintf("%s of %s left", bytesStr(rem), bytesStr(float64(s.StorageTotal)))
	if !ms.full(now, w) {
		return wait(fmt.Sprintf("auto: mirrors at %s, measuring their trend over %v", left, w))
	}
	a.copied(ms.pts)
	rate := -slope(ms.pts) // bytes/s the remaining shrinks by
	pred := seconds(rem, rate)
	budget := a.m.lim.Budget
	stats := fmt.Sprintf("%s, shrinking %s/s over the last %v", left, bytesStr(math.Max(rate, 0)), w)
	flat := rate < mirrorFlatRate
	if flat {
		stats = fmt.Sprintf("%s, not shrinking over the last %v (%s)", left, w, trend(rate))
	}
	stuck := flat || (budget > 0 && (pred >= budget || now+pred > budget))
	slow := !stuck && pred > a.c.MaxConvergeTime
	if !stuck && !slow {
		ms.stuckSince = -1
		return wait(fmt.Sprintf("auto: mirrors converging, READY in ~%v: %s", roundDur(pred), stats))
	}
	what := fmt.Sprintf("READY only in ~%v", roundDur(pred))
	words := fmt.Sprintf("the disk mirrors would take ~%v to be READY", roundDur(pred))
	switch {
	case flat:
		what = "never READY"
		words = "the guest writes its disks faster than the mirrors copy them"
	case stuck:
		what = fmt.Sprintf("READY in ~%v, beyond the %v budget", roundDur(pred), budget)
		words = fmt.Sprintf("the disk mirrors would not be READY within the %v budget", budget)
	}
	if a.m.canSwitch() {
		ms.reset(now)
		ms.stuckSince = -1 // measure afresh under write-blocking
		return Decision{Action: MirrorWriteBlocking, Summary: "switch the disk mirrors to write-blocking: " + words,
			Reason: fmt.Sprintf("auto: disk mirrors %s: %s: switch them to write-blocking", what, stats)}
	}
	if a.m.canWriteBlock(true) {
		// The restart copies the disks again from the start: the trend and
		// the progress timeout begin afresh with it.
		ms.reset(now)
		ms.stuckSince = -1
		a.prog = progress{}
		return Decision{Action: MirrorWriteBlocking, Summary: "restart the disk mirrors in write-blocking mode (a full re-copy): " + words, Reason: fmt.Sprintf(
			"auto: disk mirrors %s: %s: restart them in write-blocking mode (no block-job-change on the source: a full re-copy)", what, stats)}
	}
	if !stuck {
		ms.stuckSince = -1
		return wait(fmt.Sprintf("auto: disk mirrors %s: %s; %s, letting them converge", what, stats, a.noSwitch()))
	}
	if ms.stuckSince < 0 {
		ms.stuckSince = now
	}
	if now-ms.stuckSince < w {
		return wait(fmt.Sprintf("auto: disk mirrors %s: %s; %s, confirming over %v before an abort", what, stats, a.noSwitch(), w))
	}
	return Decision{Action: Abort, Summary: fmt.Sprintf("abort: %s, and they cannot be made write-blocking (%s)", words, a.noSwitch()),
		Reason: fmt.Sprintf("auto: disk mirrors %s: %s; %s", what, stats, a.noSwitch())}
}

// noSwitch says why the mirrors cannot be switched to write-blocking.
func (a *auto) noSwitch() string {
	st := a.m.storage
	switch {
	case st.WriteBlocking:
		return "write-blocking from the start"
	case a.m.levers.wbFailed:
		return "switching to write-blocking failed"
	case a.m.levers.writeBlocking:
		return "already switched to write-blocking"
	case a.m.lim.NoWriteBlocking:
		return "write-blocking refused by the user"
	case !st.CanSwitch && st.CanRestart:
		return "the source QEMU cannot switch a running mirror (block-job-change needs 8.2) and a restart is only possible before READY"
	case !st.CanSwitch:
		return "the source QEMU cannot switch a running mirror (block-job-change needs 8.2; start the mirrors write-blocking)"
	}
	return "no storage lever"
}

// slope is the least-squares slope of rem over time, in bytes per second.
func slope(p []mirrorPoint) float64 {
	return slopeOf(p, func(q mirrorPoint) float64 { return q.rem })
}

// slopeOf is the least-squares slope of f over time, per second.
func slopeOf(p []mirrorPoint, f func(mirrorPoint) float64) float64 {
	k, _ := fitOf(p, f)
	return k
}

// fitOf is the least-squares line of f over time: its slope per second and
// its value at the last point's time.
func fitOf(p []mirrorPoint, f func(mirrorPoint) float64) (k, last float64) {
	if len(p) == 0 {
		return 0, 0
	}
	n := float64(len(p))
	var st, sr float64
	for _, q := range p {
		st += q.at.Seconds()
		sr += f(q)
	}
	mt, mr := st/n, sr/n
	var num, den float64
	for _, q := range p {
		dt := q.at.Seconds() - mt
		num += dt * (f(q) - mr)
		den += dt * dt
	}
	if den != 0 {
		k = num / den
	}
	return k, mr + k*(p[len(p)-1].at.Seconds()-mt)
}

func trend(rate float64) string {
	switch {
	case rate >= 1:
		return fmt.Sprintf("%s/s", bytesStr(rate))
	case rate <= -1:
		return fmt.Sprintf("growing %s/s", bytesStr(-rate))
	}
	return "flat"
}
