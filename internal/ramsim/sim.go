// Package ramsim runs the strategy policies end to end without QEMU, on the
// RAM-migration model the fake QEMU steps too (internal/rammodel): in
// tests, and in benchmarks that want a deterministic baseline next to the
// measured numbers.
//
// Run steps the model every 5 ms with a fixed link and dirty rate, gives
// the Machine a Sample every PollInterval and at every sync (the
// MIGRATION_PASS event), and applies its decisions at once. Around the
// model it adds what QEMU's run state does: the stop-and-copy after
// convergence takes Remaining/Link (its time is skipped, not stepped),
// PauseSource stops the guest's dirtying, and postcopy stops the source
// for 20 ms, then the destination runs at min(1, Link/DirtyRate) of its
// speed while the rest is pulled at Link.
package ramsim

import (
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/qmigrate/qmigrate/internal/rammodel"
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
	postcopyPause = 20 * time.Millisecond
	qemuDowntime  = 300 * time.Millisecond
)

// qemu is the model with the run state around it.
type qemu struct {
	sc Scenario
	m  *rammodel.Model

	postcopyRAM bool
	measure     bool // Setup.MeasureDirtyRate: the engine's calc-dirty-rate at the start

	now           time.Duration
	status        string
	paused        bool
	pausedAt      time.Duration
	postcopy      bool
	postAt        time.Duration
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
	setup := m.Setup()
	params := rammodel.Params{DowntimeLimit: qemuDowntime, AutoConverge: setup.AutoConverge, Throttle: rammodel.DefaultThrottle}
	if setup.DowntimeLimit > 0 {
		params.DowntimeLimit = setup.DowntimeLimit
	}
	q := &qemu{sc: sc, m: rammodel.New(sc.RAM, sc.WorkingSet, params), status: "active",
		postcopyRAM: setup.Postcopy, measure: setup.MeasureDirtyRate}
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
			res.Trace = append(res.Trace, Point{Elapsed: q.now, Remaining: s.RemainingBytes, Throttle: q.m.Throttle})
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
	res.Bytes = uint64(q.m.Sent)
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
		Iteration:        q.m.Iteration,
		RemainingBytes:   uint64(q.m.Remaining),
		TransferredBytes: uint64(q.m.Sent),
		TotalBytes:       q.sc.RAM,
		DirtyRate:        q.m.DirtyRate,
		ThrottlePercent:  q.m.Throttle,
		DowntimeLimit:    q.m.Params.DowntimeLimit,
		SourcePaused:     q.paused,
	}
	if q.measure && q.now >= measurePeriod {
		// calc-dirty-rate over the first 200 ms, unthrottled: distinct
		// pages, so at most the working set per period.
		s.GuestDirtyRate = math.Min(q.sc.DirtyRate, q.m.WorkingSet()/measurePeriod.Seconds())
	}
	if q.status != "completed" {
		s.Throughput = q.sc.Link
		s.ExpectedDowntime = q.m.ExpectedDowntime(q.sc.Link)
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
	thr := &q.m.Params.Throttle
	thr.Initial, thr.Increment, thr.Max = t.Initial, t.Increment, t.Max
	if t.TriggerThreshold != 0 {
		thr.TriggerThreshold = t.TriggerThreshold
	}
	return nil
}

func (q *qemu) apply(d strategy.Decision) error {
	switch d.Action {
	case strategy.SetDowntime:
		if d.DowntimeLimit < 0 || d.DowntimeLimit > strategy.QEMUMaxDowntime {
			return errors.New("downtime_limit out of range")
		}
		q.m.Params.DowntimeLimit = d.DowntimeLimit
	case strategy.SetThrottle:
		return q.setThrottle(d.Throttle)
	case strategy.StartPostcopy:
		if !q.postcopyRAM {
			return errors.New("postcopy-ram not enabled before the start")
		}
		q.m.RequestPostcopy()
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
	return 1 - float64(q.m.Throttle)/100
}

// advance moves one tick; it reports whether a bitmap sync happened.
func (q *qemu) advance() bool {
	q.now += tick
	q.runTime += q.speed() * tick.Seconds()
	env := rammodel.Env{Link: q.sc.Link}
	if !q.paused {
		env.Dirty = q.sc.DirtyRate
	}
	if q.postcopy && q.now < q.postAt+postcopyPause {
		env.Link = 0 // the switch: nothing moves yet
	}
	switch q.m.Step(tick, env) {
	case rammodel.Synced:
		return true
	case rammodel.Converged:
		// Stop-and-copy: the rest goes at Link with the guest stopped.
		q.m.FinalSync()
		dt := q.m.Drain(q.sc.Link)
		q.status = "completed"
		q.finalDowntime = dt
		if q.paused {
			q.finalDowntime = q.now - q.pausedAt + dt
		}
		q.now += dt
		return true
	case rammodel.PostcopyStarted:
		q.postcopy, q.postAt, q.status = true, q.now, "postcopy-active"
		q.finalDowntime = postcopyPause
	case rammodel.Finished:
		q.status = "completed"
	}
	return false
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
