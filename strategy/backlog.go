package strategy

import (
	"fmt"
	"math"
	"time"
)

// The disk backlog in the RAM phase: once the mirrors are READY, every guest
// write dirties the mirrors again, and what they have not copied yet
// (StorageRemaining) must be copied at switchover, with the guest stopped (the
// engine finishes the mirrors in the pre-switchover window). A writer faster
// than the mirrors grows that backlog until it is the whole written set.

// diskBacklogFloor: a backlog under 1 MiB (one mirror request,
// MAX_IO_BYTES) never forces a switch by itself. A mirror keeping up with a
// slow writer only copies what it is given, so its measured rate can
// understate what it could drain; the floor keeps that noise from switching.
const diskBacklogFloor = 1 << 20

// diskShareMin: the storage drain may always take a quarter of the user's
// maximum downtime, even when the RAM downtime limit is at the maximum.
const diskShareMin = 4

// diskView is the backlog measured over the last MirrorWindow.
type diskView struct {
	backlog float64 // least-squares StorageRemaining now, bytes
	growth  float64 // bytes/s the backlog grows by (least-squares slope)
	rate    float64 // the mirrors' copy rate (the largest seen over a window), bytes/s
}

// backlogObserve records a RAM-phase sample's storage fields.
func (a *auto) backlogObserve(s Sample, now time.Duration) {
	if !a.m.storage.Disks || s.StorageTotal == 0 {
		return
	}
	bs := &a.bl
	bs.begin(now)
	bs.add(newMirrorPoint(s, now), a.c.MirrorWindow)
	if bs.full(now, a.c.MirrorWindow) {
		a.copied(bs.pts)
	}
}

// disk returns the backlog once a full window is measured.
func (a *auto) disk(now time.Duration) (diskView, bool) {
	bs := &a.bl
	if !bs.full(now, a.c.MirrorWindow) {
		return diskView{}, false
	}
	g, b := fitOf(bs.pts, func(p mirrorPoint) float64 { return p.rem })
	return diskView{backlog: math.Max(b, 0), growth: g, rate: a.diskRate}, true
}

// after is the backlog expected horizon from now: growing at its slope when
// it grows (by at least 64 KiB/s), as it is otherwise.
func (v diskView) after(horizon time.Duration) float64 {
	b := v.backlog
	if v.growth >= mirrorFlatRate {
		b += v.growth * horizon.Seconds()
	}
	return b
}

// drain is the time the mirrors need to copy b bytes at their rate.
func (v diskView) drain(b float64) time.Duration {
	if b < diskBacklogFloor {
		return 0
	}
	return seconds(b, v.rate)
}

func (v diskView) String() string {
	g := "steady"
	switch {
	case v.growth >= mirrorFlatRate:
		g = fmt.Sprintf("growing %s/s", bytesStr(v.growth))
	case v.growth <= -mirrorFlatRate:
		g = fmt.Sprintf("shrinking %s/s", bytesStr(-v.growth))
	}
	return fmt.Sprintf("disk backlog %s (%s, mirrors copying %s/s)", bytesStr(v.backlog), g, bytesStr(v.rate))
}

// diskShare is the part of the user's maximum downtime left for the storage
// drain at switchover next to a RAM downtime limit: the maximum minus the
// limit, and at least a quarter of the maximum.
func (a *auto) diskShare(limit time.Duration) time.Duration {
	maxDT := a.ceiling()
	return max(maxDT-limit, maxDT/diskShareMin)
}

// diskHorizon is how far ahead the backlog is judged: the window, or the
// predicted time until the RAM switchover when longer (at most
// MaxConvergeTime).
func (a *auto) diskHorizon(ramPred time.Duration) time.Duration {
	return max(a.c.MirrorWindow, min(ramPred, a.c.MaxConvergeTime))
}

// diskCheck reports whether the backlog expected at the switchover (horizon
// from now) drains within the share the downtime limit leaves; why says what
// does not fit. Without a full window it does not judge (fits).
func (a *auto) diskCheck(now, limit, horizon time.Duration) (bool, string) {
	v, ok := a.disk(now)
	if !ok {
		return true, ""
	}
	b := v.after(horizon)
	d, share := v.drain(b), a.diskShare(limit)
	if d <= share {
		return true, ""
	}
	when := "now"
	if b > v.backlog {
		when = fmt.Sprintf("%s in ~%v", bytesStr(b), roundDur(horizon))
	}
	return false, fmt.Sprintf("%s: draining it at switchover (%s) takes ~%v, beyond the %v the %v downtime limit leaves of the %v maximum",
		v, when, roundDur(d), share, limit, a.m.lim.maxDowntime())
}

// backlog is auto's storage rule in the RAM phase: when the disk backlog
// does not fit the downtime (or will not within the horizon, growing), switch
// the mirrors to write-blocking, once, where permitted.
func (a *auto) backlog(s Sample, now time.Duration) (Decision, bool) {
	if s.Status != "active" || !a.m.canSwitch() {
		return Decision{}, false
	}
	limit := a.limit(s)
	ok, why := a.diskCheck(now, limit, a.diskHorizon(a.ramPred))
	if ok {
		return Decision{}, false
	}
	a.bl.reset(now) // measure afresh under write-blocking
	return Decision{Action: MirrorWriteBlocking,
		Summary: "switch the disk mirrors to write-blocking: the disk writes they have not copied would not fit the downtime at switchover",
		Reason:  "auto: RAM phase, " + why + ": switch the mirrors to write-blocking"}, true
}

// diskLever says what happens about a backlog that does not fit.
func (a *auto) diskLever() string {
	if a.m.canSwitch() {
		return "switching the mirrors to write-blocking once their trend is measured"
	}
	return a.noSwitch() + ": the switchover will drain it"
}
