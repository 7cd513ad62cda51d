// Package ramsim is a toy model of a QEMU pre-copy migration, used to run the
// strategy policies end to end without QEMU: in tests, and in benchmarks that
// want a deterministic baseline next to the measured numbers.
//
// The model, per 5 ms tick:
//
//   - The link sends Link bytes/s of the dirty bitmap (RemainingBytes).
//   - The guest dirties DirtyRate bytes/s of distinct pages, scaled by
//     (1 - throttle%), zero while paused; the set dirtied since the last
//     bitmap sync is capped at the working set (a sweep over WorkingSet).
//   - When the bitmap drops to threshold = Link × downtime-limit (or empties)
//     QEMU syncs: the dirtied set joins the bitmap, dirty-sync-count grows,
//     and if the bitmap is then below the threshold the migration completes
//     with downtime = bitmap/Link. With auto-converge on, a sync is also
//     forced every 5 s (QEMU ≥ 9.2).
//   - At a sync at least 1 s after the previous rate update, the dirty rate is
//     measured (distinct pages dirtied in the period / period) and
//     auto-converge checks dirtied > threshold% of sent: the second time it
//     throttles, first at cpu-throttle-initial, then +increment up to
//     max-cpu-throttle.
//   - Postcopy (when requested and postcopy-ram was enabled) stops the
//     source for 20 ms, then the destination runs at min(1, Link/DirtyRate)
//     of its speed while the rest is pulled at Link.
//
// The Machine gets a Sample every PollInterval and at every sync (the
// MIGRATION_PASS event), and its decisions apply at once.
package ramsim

import (
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/qmigrate/qmigrate/strategy"
)

// Scenario describes the guest and the link.
type Scenario struct {
	Name         string
	RAM          uint64        // guest RAM, bytes
	WorkingSet   uint64        // bytes the guest keeps re-dirtying (0 = RAM)
	DirtyRate    float64       // distinct bytes/s dirtied when unthrottled
	Link         float64       // bytes/s
	Limit        time.Duration // stop the run (outcome "timeout") after this long; 0 = 30 min
	PollInterval time.Duration // engine poll period; 0 = 200 ms
}

// Point is one sample of the run, for plots.
type Point struct {
	Elapsed   time.Duration
	Remaining uint64
	Throttle  int
}

// Result of one run.
type Result struct {
	Outcome     string        // "completed", "aborted", "timeout"
	Total       time.Duration // until completion, abort, or the limit
	Downtime    time.Duration // guest stopped: final stop-and-copy, pause, postcopy switch
	Bytes       uint64        // bytes sent over the link
	Slowdown    float64       // 1 - mean guest speed during the migration (0 = none, 1 = stopped)
	GuestLost   time.Duration // guest run time lost to throttling, pauses and postcopy faults: ∫(1 - speed) dt
	MaxThrottle int
	Postcopy    bool
	Paused      bool
	Decisions   []strategy.Decision // the non-wait decisions
	Trace       []Point
}

func (r Result) String() string {
	return fmt.Sprintf("%s in %v, downtime %v, %.0f MiB sent, slowdown %.0f%% (%v guest time lost), max throttle %d%%",
		r.Outcome, r.Total.Round(10*time.Millisecond), r.Downtime.Round(time.Millisecond),
		float64(r.Bytes)/(1<<20), r.Slowdown*100, r.GuestLost.Round(10*time.Millisecond), r.MaxThrottle)
}

const (
	tick          = 5 * time.Millisecond
	forcedSync    = 5 * time.Second
	rateWindow    = time.Second
	postcopyPause = 20 * time.Millisecond
	qemuDowntime  = 300 * time.Millisecond
)

type qemu struct {
	sc Scenario
	ws float64

	// parameters and capabilities
	autoConverge, postcopyRAM bool
	measure                   bool // Setup.MeasureDirtyRate: the engine's calc-dirty-rate at the start
	downtimeLimit             time.Duration
	thr                       strategy.Throttle

	// state
	now           time.Duration
	status        string
	iteration     uint64
	remaining     float64 // dirty bitmap, bytes
	dirtyLog      float64 // distinct bytes dirtied since the last sync
	sent          float64
	throttle      int
	highCount     int
	lastSync      time.Duration
	lastRate      time.Duration
	dirtyPeriod   float64
	sentAtRate    float64
	dirtyRate     float64 // last measured
	lastDirty     float64 // dirtied set at the last sync (expected-downtime)
	paused        bool
	pausedAt      time.Duration
	postcopy      bool
	postAt        time.Duration
	wantPost      bool
	runTime       float64 // ∫ guest speed dt, seconds
	finalDowntime time.Duration
}

// Run drives a strategy.Machine configured by cfg through the scenario.
func Run(sc Scenario, cfg strategy.Config) (Result, error) {
	if sc.RAM == 0 || sc.Link <= 0 || sc.DirtyRate < 0 || math.IsNaN(sc.DirtyRate) {
		return Result{}, errors.New("ramsim: scenario needs RAM > 0, Link > 0, DirtyRate ≥ 0")
	}
	if sc.Limit == 0 {
		sc.Limit = 30 * time.Minute
	}
	if sc.PollInterval == 0 {
		sc.PollInterval = 200 * time.Millisecond
	}
	m, err := strategy.New(cfg)
	if err != nil {
		return Result{}, err
	}
	q := &qemu{sc: sc, ws: float64(sc.RAM), status: "active", iteration: 1,
		remaining: float64(sc.RAM), downtimeLimit: qemuDowntime,
		thr: strategy.Throttle{Initial: 20, Increment: 10, Max: 99, TriggerThreshold: 50}}
	if sc.WorkingSet > 0 && sc.WorkingSet < sc.RAM {
		q.ws = float64(sc.WorkingSet)
	}
	setup := m.Setup()
	q.autoConverge, q.postcopyRAM, q.measure = setup.AutoConverge, setup.Postcopy, setup.MeasureDirtyRate
	if setup.DowntimeLimit > 0 {
		q.downtimeLimit = setup.DowntimeLimit
	}
	if setup.Throttle != nil {
		if err := q.setThrottle(*setup.Throttle); err != nil {
			return Result{}, fmt.Errorf("ramsim: setup throttle: %w", err)
		}
	}

	var res Result
	nextPoll := time.Duration(0)
	for {
		synced := q.advance()
		done := q.status == "completed"
		if synced || q.now >= nextPoll || done {
			if q.now >= nextPoll {
				nextPoll += sc.PollInterval
			}
			s := q.sample()
			res.Trace = append(res.Trace, Point{Elapsed: q.now, Remaining: s.RemainingBytes, Throttle: q.throttle})
			d := m.Step(s)
			if d.Action != strategy.Wait {
				res.Decisions = append(res.Decisions, d)
				m.Applied(d, q.apply(d))
			}
			if d.Action == strategy.Abort {
				res.Outcome = "aborted"
				break
			}
		}
		if done {
			res.Outcome = "completed"
			break
		}
		if q.now >= sc.Limit {
			res.Outcome = "timeout"
			break
		}
	}
	res.Total = q.now
	res.Bytes = uint64(q.sent)
	if q.now > 0 {
		res.Slowdown = math.Max(0, 1-q.runTime/q.now.Seconds())
		res.GuestLost = max(0, q.now-time.Duration(q.runTime*float64(time.Second)))
	}
	res.Postcopy, res.Paused = q.postcopy, q.paused
	for _, p := range res.Trace {
		res.MaxThrottle = max(res.MaxThrottle, p.Throttle)
	}
	res.Downtime = q.downtime()
	return res, nil
}

func (q *qemu) downtime() time.Duration {
	if q.status != "completed" {
		if q.paused {
			return q.now - q.pausedAt
		}
		return 0
	}
	return q.finalDowntime
}

// measurePeriod is the engine's calc-dirty-rate period.
const measurePeriod = 200 * time.Millisecond

func (q *qemu) sample() strategy.Sample {
	s := strategy.Sample{
		Elapsed:          q.now,
		Status:           q.status,
		Iteration:        q.iteration,
		RemainingBytes:   uint64(q.remaining),
		TransferredBytes: uint64(q.sent),
		TotalBytes:       q.sc.RAM,
		DirtyRate:        q.dirtyRate,
		ThrottlePercent:  q.throttle,
		DowntimeLimit:    q.downtimeLimit,
		SourcePaused:     q.paused,
	}
	if q.measure && q.now >= measurePeriod {
		// calc-dirty-rate over the first 200 ms, unthrottled: distinct
		// pages, so at most the working set per period.
		s.GuestDirtyRate = math.Min(q.sc.DirtyRate, q.ws/measurePeriod.Seconds())
	}
	if q.status != "completed" {
		s.Throughput = q.sc.Link
		s.ExpectedDowntime = time.Duration(q.lastDirty / q.sc.Link * float64(time.Second))
	}
	return s
}

func (q *qemu) setThrottle(t strategy.Throttle) error {
	switch {
	case t.Initial < 1 || t.Initial > 99:
		return errors.New("cpu_throttle_initial must be in 1..99")
	case t.Increment < 1 || t.Increment > 99:
		return errors.New("cpu_throttle_increment must be in 1..99")
	case t.Max < t.Initial || t.Max > 99:
		return errors.New("max_cpu_throttle must be in initial..99")
	case t.TriggerThreshold < 0 || t.TriggerThreshold > 100:
		return errors.New("throttle_trigger_threshold must be in 1..100")
	}
	thr := q.thr.TriggerThreshold
	q.thr = t
	if t.TriggerThreshold == 0 {
		q.thr.TriggerThreshold = thr
	}
	return nil
}

func (q *qemu) apply(d strategy.Decision) error {
	switch d.Action {
	case strategy.SetDowntime:
		if d.DowntimeLimit < 0 || d.DowntimeLimit > strategy.QEMUMaxDowntime {
			return errors.New("downtime_limit out of range")
		}
		q.downtimeLimit = d.DowntimeLimit
	case strategy.SetThrottle:
		return q.setThrottle(d.Throttle)
	case strategy.StartPostcopy:
		if !q.postcopyRAM {
			return errors.New("postcopy-ram not enabled before the start")
		}
		q.wantPost = true
	case strategy.PauseSource:
		if !q.paused {
			q.paused, q.pausedAt = true, q.now
		}
	case strategy.Abort:
		q.status = "cancelled"
	}
	return nil
}

// speed is the guest's run fraction now.
func (q *qemu) speed() float64 {
	switch {
	case q.postcopy:
		if q.now < q.postAt+postcopyPause {
			return 0
		}
		if q.sc.DirtyRate <= q.sc.Link {
			return 1
		}
		return q.sc.Link / q.sc.DirtyRate
	case q.paused:
		return 0
	}
	return 1 - float64(q.throttle)/100
}

// advance moves one tick; it reports whether a bitmap sync happened.
func (q *qemu) advance() bool {
	q.now += tick
	dt := tick.Seconds()
	q.runTime += q.speed() * dt
	send := q.sc.Link * dt
	if q.postcopy {
		if q.now >= q.postAt+postcopyPause {
			q.remaining = math.Max(0, q.remaining-send)
			q.sent += send
			if q.remaining == 0 {
				q.status = "completed"
				q.throttle = 0
			}
		}
		return false
	}
	if !q.paused {
		q.dirtyLog = math.Min(q.ws, q.dirtyLog+q.sc.DirtyRate*(1-float64(q.throttle)/100)*dt)
	}
	sendNow := math.Min(send, q.remaining)
	q.remaining -= sendNow
	q.sent += sendNow
	threshold := q.sc.Link * q.downtimeLimit.Seconds()
	if q.wantPost {
		// must_precopy is ~0 for RAM: postcopy starts at once.
		q.remaining += q.dirtyLog
		q.dirtyLog = 0
		q.postcopy, q.postAt, q.status = true, q.now, "postcopy-active"
		q.finalDowntime = postcopyPause
		q.throttle = 0
		return false
	}
	forced := q.autoConverge && q.now-q.lastSync >= forcedSync
	if q.remaining > threshold && q.remaining > 0 && !forced {
		return false
	}
	q.sync()
	if q.remaining <= threshold {
		dt := time.Duration(q.remaining / q.sc.Link * float64(time.Second))
		q.sent += q.remaining
		q.remaining = 0
		q.status = "completed"
		q.throttle = 0
		q.finalDowntime = dt
		if q.paused {
			q.finalDowntime = q.now - q.pausedAt + dt
		}
		q.now += dt
	}
	return true
}

func (q *qemu) sync() {
	q.remaining = math.Min(float64(q.sc.RAM), q.remaining+q.dirtyLog)
	q.lastDirty = q.dirtyLog
	q.dirtyPeriod += q.dirtyLog
	q.dirtyLog = 0
	q.iteration++
	q.lastSync = q.now
	if q.now-q.lastRate < rateWindow {
		return
	}
	// migration_trigger_throttle, then migration_update_rates.
	xfer := q.sent - q.sentAtRate
	if q.autoConverge && q.dirtyPeriod > xfer*float64(q.thr.TriggerThreshold)/100 {
		q.highCount++
		if q.highCount >= 2 {
			q.highCount = 0
			if q.throttle == 0 {
				q.throttle = q.thr.Initial
			} else {
				q.throttle = min(q.throttle+q.thr.Increment, q.thr.Max)
			}
		}
	}
	q.dirtyRate = q.dirtyPeriod / (q.now - q.lastRate).Seconds()
	q.dirtyPeriod = 0
	q.sentAtRate = q.sent
	q.lastRate = q.now
}

// Standard returns the benchmark scenarios for a guest of ram bytes over a
// link of link bytes/s: idle, converging (dirty 0.3× the link), borderline
// (0.9×), 2× and 10× the link, each dirtying the whole RAM.
func Standard(ram uint64, link float64) []Scenario {
	mk := func(name string, f float64) Scenario {
		return Scenario{Name: name, RAM: ram, DirtyRate: f * link, Link: link}
	}
	return []Scenario{
		mk("idle", 0), mk("converging", 0.3), mk("borderline", 0.9), mk("2x", 2), mk("10x", 10),
	}
}
