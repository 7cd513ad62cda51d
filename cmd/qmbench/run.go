package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/guest/sweep"
	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/strategy"
)

// point is one poll of a run: elapsed time, RAM bytes still to send, and
// the levers in force (QEMU's throttle and downtime limit; 0 in runs made
// before they were recorded).
type point struct {
	At            time.Duration
	Remaining     uint64
	Throttle      int           `json:",omitempty"`
	DowntimeLimit time.Duration `json:",omitempty"`
}

// guestSample is the guest's own progress over the interval ending At: its
// dirty rate over its vCPU time (rateBetween) since the previous sample.
type guestSample struct {
	At   time.Duration
	Rate float64
}

// hostLoad is the host's load around one run: the 1-minute load average
// before and after the migration, and how many QEMU processes other than
// the run's own were running (at most, of the two looks).
type hostLoad struct {
	Load1Before, Load1After float64
	OtherQEMUs              int
}

// runResult is everything measured in one migration.
type runResult struct {
	Scenario, Profile, Policy string
	Status                    string // completed, aborted, failed, error
	Err                       string
	Total, Downtime           time.Duration
	Sent                      uint64
	// BaseRate is the guest's dirty rate without migration (mean of just
	// before and just after), DuringRate during it, in bytes/s of swept
	// pages over the time its vCPUs did not wait for a host core (rateBetween).
	BaseRate, DuringRate float64
	// BeforeRate and AfterRate are wall-clock rates (what the link faces).
	BeforeRate, AfterRate float64
	Intact                bool
	IntactErr             string
	Decisions             []strategy.Decision
	Points                []point
	Postcopy              bool // the migration switched to postcopy
	MaxThrottle           int
	MovedAnyway           bool // not completed for the engine, yet the guest runs on the destination
	Undone, UndoErrors    []string
	// Guest is the guest's progress rate during the migration, sampled
	// every guestEvery while it runs on the source (not recorded in runs
	// made before it was).
	Guest []guestSample `json:",omitempty"`
	// Host is the host's load during the run (nil: not recorded).
	Host *hostLoad `json:",omitempty"`
	// File is the -json file a render took the run from.
	File string `json:"-"`
}

// speed is the guest's progress during the migration relative to before, or
// NaN when the guest does (almost) nothing (idle).
func (r *runResult) speed() float64 {
	if r.BaseRate < 1e5 { // under 0.1 MB/s of page writes: idle, not measurable
		return math.NaN()
	}
	return r.DuringRate / r.BaseRate
}

// runner runs single migrations on one two-host network.
type runner struct {
	q                   *qemulab.QEMU
	net                 *qemulab.Network
	memMiB              int
	budget, maxDowntime time.Duration
	noPreempt           bool
	warmup              time.Duration // how long a freshly booted guest runs before the baseline (at most)
	base                time.Duration // baseline measurement window
	logf                func(format string, args ...any)
	verbose             bool
	// waits remembers the last runqueue wait read per QEMU process, for a
	// QEMU that has exited since (a destination after an abort).
	waits map[int]time.Duration
}

// pair boots a source running the sweep guest with spin in host A and a
// destination waiting for it in host B.
func (r *runner) pair(ctx context.Context, spin uint32) (src, dst *qemulab.Instance, err error) {
	g := qemulab.SweepGuest{Spin: spin}
	cfg := qemulab.Config{Name: "src", Guest: g, MemMiB: r.memMiB, Netns: r.net.A.Netns, Args: debugThreads("src")}
	if r.verbose {
		cfg.Logf = r.logf
	}
	src, err = r.q.Start(ctx, cfg)
	if err != nil {
		return nil, nil, err
	}
	cfg.Name, cfg.Incoming, cfg.Netns, cfg.Args = "dst", true, r.net.B.Netns, debugThreads("dst")
	dst, err = r.q.Start(ctx, cfg)
	if err != nil {
		src.Close()
		return nil, nil, err
	}
	return src, dst, nil
}

// warm waits until the guest has made one pass (so its pages hold data, not
// zeros) or r.warmup passed, whichever comes first.
func (r *runner) warm(ctx context.Context, src *qemulab.Instance) error {
	wctx, cancel := context.WithTimeout(ctx, r.warmup)
	defer cancel()
	_, err := src.CountSerial(wctx, sweep.StartChar, sweep.PassChar, 1)
	if err != nil && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
		// A slow guest: its started mark is enough.
		_, err = src.CountSerial(ctx, 0, sweep.StartChar, 1)
	}
	return err
}

// mark is the guest's position (in passes) at a moment, with the time its
// vCPUs had spent so far waiting for a host core.
type mark struct {
	Pos  float64
	At   time.Time
	Wait time.Duration
}

// takeMark reads the guest's position on the QEMU it runs on (on) and the
// runqueue wait of every given QEMU's vCPUs. moved says the guest was
// migrated from src to on (its passes are then counted on both serials).
func (r *runner) takeMark(ctx context.Context, on, src *qemulab.Instance, moved bool, all ...*qemulab.Instance) (mark, error) {
	est := serialPasses(on, true)
	if moved {
		est = serialPasses(src, true) + serialPasses(on, false)
	}
	pos, at, err := guestProgress(ctx, on.QMP, est)
	if err != nil {
		return mark{}, err
	}
	var wait time.Duration
	for _, q := range all {
		w, err := vcpuWait(q.Pid())
		last, seen := r.waits[q.Pid()]
		switch {
		case err == nil:
			r.waits[q.Pid()] = w
		case seen:
			// Exited or exiting (its threads gone before it is reaped):
			// its vCPUs wait no more.
			w = last
		default:
			return mark{}, err
		}
		wait += w
	}
	return mark{Pos: pos, At: at, Wait: wait}, nil
}

// rateBetween is the guest's dirty rate (bytes/s of swept pages) from a to
// b, over the time its vCPUs ran or were stopped: the time they were ready
// but waited for a core taken by other processes is left out, so the
// figure does not depend on the host's other load. Throttling, downtime,
// pauses and postcopy faults stop the vCPUs and so do count.
func rateBetween(a, b mark) float64 {
	d := b.At.Sub(a.At) - (b.Wait - a.Wait)
	if d <= 0 {
		return math.NaN()
	}
	return (b.Pos - a.Pos) * sweep.RangeSize / d.Seconds()
}

// wallRate is the guest's dirty rate from a to b in wall-clock time: what
// the migration faces.
func wallRate(a, b mark) float64 {
	return (b.Pos - a.Pos) * sweep.RangeSize / b.At.Sub(a.At).Seconds()
}

// measure returns the rate over window (rateBetween), the wall-clock rate,
// and the mark at its end.
func (r *runner) measure(ctx context.Context, window time.Duration, on, src *qemulab.Instance, moved bool, all ...*qemulab.Instance) (rate, wall float64, end mark, err error) {
	a, err := r.takeMark(ctx, on, src, moved, all...)
	if err != nil {
		return 0, 0, mark{}, err
	}
	select {
	case <-ctx.Done():
		return 0, 0, mark{}, ctx.Err()
	case <-time.After(window):
	}
	b, err := r.takeMark(ctx, on, src, moved, all...)
	if err != nil {
		return 0, 0, mark{}, err
	}
	return rateBetween(a, b), wallRate(a, b), b, nil
}

// vcpuWait sums the runqueue wait (schedstat) of a QEMU's vCPU threads,
// named "CPU n/TCG" (or /KVM) with -name debug-threads=on.
func vcpuWait(pid int) (time.Duration, error) {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", pid))
	if err != nil || len(tasks) == 0 {
		return 0, fmt.Errorf("vcpu wait: no tasks for pid %d", pid)
	}
	var sum time.Duration
	n := 0
	for _, t := range tasks {
		comm, err := os.ReadFile(filepath.Join(t, "comm"))
		if err != nil || !strings.HasPrefix(string(comm), "CPU ") {
			continue
		}
		st, err := os.ReadFile(filepath.Join(t, "schedstat"))
		if err != nil {
			continue // the thread just exited
		}
		f := strings.Fields(string(st))
		if len(f) < 2 {
			return 0, fmt.Errorf("vcpu wait: %s/schedstat: %q", t, st)
		}
		ns, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("vcpu wait: %s/schedstat: %w", t, err)
		}
		sum += time.Duration(ns)
		n++
	}
	if n == 0 {
		return 0, fmt.Errorf("vcpu wait: no vCPU thread in pid %d (debug-threads off?)", pid)
	}
	return sum, nil
}

// calibrate finds the spin count that makes the sweep guest dirty about
// target bytes/s here and now (TCG speed depends on the QEMU version and the
// load), booting a lone source guest up to rounds times, and returns the
// spin count whose measured rate came closest (TCG speed varies by tens of
// percent from one measurement to the next: the last one may be further off
// than an earlier one).
func (r *runner) calibrate(ctx context.Context, target float64, rounds int) (uint32, float64, error) {
	if target <= 0 {
		return math.MaxUint32, 0, nil
	}
	spin := sweep.SpinForRate(target)
	if math.IsInf(target, 1) {
		rounds = 1 // spin 0: nothing to adjust, measure it once
	}
	var got float64
	bestSpin, best := spin, math.NaN()
	for i := range rounds {
		g := qemulab.SweepGuest{Spin: spin}
		src, err := r.q.Start(ctx, qemulab.Config{Name: "cal", Guest: g, MemMiB: r.memMiB, Args: debugThreads("cal")})
		if err != nil {
			return 0, 0, err
		}
		_, err = src.CountSerial(ctx, 0, sweep.StartChar, 1)
		if err == nil {
			time.Sleep(500 * time.Millisecond)
			// On the vCPU's own time: the cores' other load changes by the
			// minute, so a wall-clock calibration would chase it. The runs
			// report the wall-clock rates the link faced.
			got, _, _, err = r.measure(ctx, 2*time.Second, src, src, false, src)
		}
		src.Close()
		if err != nil {
			return 0, 0, err
		}
		r.logf("calibrate %s: spin %d gives %s (round %d)", rateStr(target), spin, rateStr(got), i+1)
		if got > 0 && (math.IsNaN(best) || math.Abs(math.Log(got/target)) < math.Abs(math.Log(best/target))) {
			bestSpin, best = spin, got
		}
		if got <= 0 || math.Abs(got/target-1) < 0.1 || i == rounds-1 {
			break
		}
		// Time per page is fixed cost + spin × cost per spin; scale the spin part.
		perPage := sweep.PageSize / got
		want := sweep.PageSize / target
		fixed := sweep.PageSize / sweep.UnthrottledRate
		// The cores' load changes quickly: move at most 3× per round.
		want = min(max(want, perPage/3), perPage*3)
		if perPage <= fixed {
			spin = uint32(float64(spin) * want / perPage)
		} else {
			spin = uint32(math.Min(float64(spin)*(want-fixed)/(perPage-fixed), math.MaxUint32))
		}
	}
	if !math.IsNaN(best) {
		if bestSpin != spin {
			r.logf("calibrate %s: spin %d, which gave %s", rateStr(target), bestSpin, rateStr(best))
		}
		return bestSpin, best, nil
	}
	return spin, got, nil
}

// debugThreads names QEMU's threads ("CPU 0/TCG"), for vcpuWait; QEMU
// merges it into the qemulab's own -name.
func debugThreads(name string) []string { return []string{"-name", name + ",debug-threads=on"} }

// run migrates a fresh sweep guest with spin under policy and the profile's
// limits and measures it.
func (r *runner) run(ctx context.Context, sc scenario, prof profile, policy string, spin uint32) *runResult {
	res := &runResult{Scenario: sc.Name, Profile: prof.Name, Policy: policy}
	fail := func(err error) *runResult {
		res.Status, res.Err = "error", err.Error()
		return res
	}
	src, dst, err := r.pair(ctx, spin)
	if err != nil {
		return fail(err)
	}
	defer src.Close()
	defer dst.Close()
	if sc.Ratio == 0 {
		_, err = src.CountSerial(ctx, 0, sweep.StartChar, 1) // idle: booted is enough
	} else {
		err = r.warm(ctx, src)
	}
	if err != nil {
		return fail(fmt.Errorf("warm-up: %w", err))
	}
	base, before, m0, err := r.measure(ctx, r.base, src, src, false, src, dst)
	if err != nil {
		return fail(fmt.Errorf("baseline: %w", err))
	}
	res.BaseRate, res.BeforeRate = base, before

	cfg := engine.Config{
		Source:      engine.Endpoint{Client: src.QMP},
		Destination: engine.Endpoint{Client: dst.QMP},
		URI:         fmt.Sprintf("tcp:%s:4444", r.net.B.Addr),
		Strategy:    strategyConfig(policy, prof, r.budget, r.maxDowntime),
		// NoPostcopyPreempt: -no-preempt.
		NoPostcopyPreempt: r.noPreempt,
		Observer: func(e engine.Event) {
			switch e.Kind {
			case engine.EventStats:
				s := e.Stats
				if strings.HasPrefix(s.Status, "postcopy") {
					res.Postcopy = true
				}
				res.MaxThrottle = max(res.MaxThrottle, s.ThrottlePercent)
				res.Sent = max(res.Sent, s.TransferredBytes)
				if s.Status == "active" || strings.HasPrefix(s.Status, "postcopy") || s.Status == "device" || s.Status == "pre-switchover" {
					res.Points = append(res.Points, point{At: e.Elapsed, Remaining: s.RemainingBytes, Throttle: s.ThrottlePercent, DowntimeLimit: s.DowntimeLimit})
				}
			case engine.EventDecision:
				r.logf("  %s/%s/%s %5.1fs %s: %s", sc.Name, prof.Name, policy, e.Elapsed.Seconds(), e.Decision.Action, e.Decision.Reason)
			}
		},
	}
	mctx, cancel := context.WithTimeout(ctx, r.budget+90*time.Second)
	defer cancel()
	load := readHostLoad(src, dst)
	start := time.Now()
	stopSampling := r.sampleGuest(mctx, src, dst, m0, start, &res.Guest)
	out, merr := engine.Migrate(mctx, cfg)
	stopSampling()
	after := readHostLoad(src, dst)
	load.Load1After, load.OtherQEMUs = after.Load1Before, max(load.OtherQEMUs, after.OtherQEMUs)
	res.Host = &load
	if out == nil {
		return fail(merr)
	}
	res.Total, res.Downtime, res.Decisions = out.Total, out.Downtime, out.Decisions
	res.Sent = max(res.Sent, out.TransferredBytes) // the engine reports it after a completion only
	res.Undone, res.UndoErrors = out.Undone, out.UndoErrors
	switch {
	case out.Status == engine.StatusCompleted:
		res.Status = "completed"
	case errors.Is(merr, engine.ErrAborted):
		res.Status = "aborted"
	default:
		res.Status = out.Status
	}
	if merr != nil {
		res.Err = merr.Error()
	}
	if len(res.Points) > 0 {
		res.Points = append(res.Points, point{At: out.Total, Remaining: 0})
		if res.Status != "completed" {
			res.Points[len(res.Points)-1].Remaining = res.Points[len(res.Points)-2].Remaining
		}
	}

	// The guest's speed during the migration: its position at the end (on
	// the destination when it moved) against the baseline's end.
	cctx, ccancel := context.WithTimeout(ctx, 90*time.Second)
	defer ccancel()
	moved := res.Status == "completed"
	if !moved {
		// An abort that lost the race with QEMU's own completion: the
		// source stopped for good and the destination runs the guest.
		sst, serr := src.QMP.QueryStatus(cctx)
		dst2, derr := dst.QMP.QueryStatus(cctx)
		if serr == nil && derr == nil && !sst.Running && dst2.Running {
			moved, res.MovedAnyway = true, true
			r.logf("  the guest runs on the destination after the %s (source %s)", res.Status, sst.Status)
		}
	}
	on := src
	if moved {
		on = dst
	}
	if m1, err := r.takeMark(cctx, on, src, moved, src, dst); err == nil {
		res.DuringRate = rateBetween(m0, m1)
	} else {
		r.logf("  guest progress after the migration: %v", err)
		res.DuringRate = math.NaN()
	}
	// The reference is the mean of the guest's rates just before and just
	// after the migration.
	if after, afterWall, _, err := r.measure(cctx, r.base, on, src, moved, src, dst); err == nil {
		res.AfterRate = afterWall
		res.BaseRate = (base + after) / 2
	} else {
		r.logf("  guest rate after the migration: %v", err)
	}

	// Integrity: the destination after a completed migration, else the
	// source, which must be running the guest.
	var cerr error
	if moved {
		// An idle guest's memory does not change, so its running state is
		// taken from its status instead of two differing dumps.
		opts := qemulab.SweepCheckOptions{Dir: dst.Dir(), SkipRunning: sc.Ratio == 0}
		if st, err := dst.QMP.QueryStatus(cctx); err != nil || st.Status != "running" {
			cerr = fmt.Errorf("destination not running after the migration (%v, %v)", st, err)
		} else {
			_, cerr = qemulab.CheckSweep(cctx, src.QMP, dst.QMP, opts)
		}
	} else {
		st, err := src.QMP.QueryStatus(cctx)
		switch {
		case err != nil:
			cerr = err
		case st.Status != "running":
			cerr = fmt.Errorf("source is %s, not running", st.Status)
		default:
			_, cerr = qemulab.CheckSweep(cctx, nil, src.QMP, qemulab.SweepCheckOptions{Dir: src.Dir(), SkipRunning: sc.Ratio == 0})
		}
	}
	res.Intact = cerr == nil
	if cerr != nil {
		res.IntactErr = cerr.Error()
	}
	return res
}

// guestEvery is how often the guest's progress is sampled during a
// migration.
const guestEvery = time.Second

// sampleGuest samples the guest's progress rate on the source every
// guestEvery into *out until the returned stop is called. It stops on its
// own at the first sample it cannot take (the source paused for the
// switchover or postcopy, or gone): the rate in postcopy is not sampled,
// as reading the destination's memory then would fault pages in.
func (r *runner) sampleGuest(ctx context.Context, src, dst *qemulab.Instance, from mark, start time.Time, out *[]guestSample) (stop func()) {
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(guestEvery)
		defer t.Stop()
		prev := from
		for {
			select {
			case <-sctx.Done():
				return
			case <-t.C:
			}
			st, err := src.QMP.QueryStatus(sctx)
			if err != nil || !st.Running {
				return
			}
			m, err := r.takeMark(sctx, src, src, false, src, dst)
			if err != nil {
				return
			}
			*out = append(*out, guestSample{At: m.At.Sub(start), Rate: rateBetween(prev, m)})
			prev = m
		}
	}()
	return func() {
		cancel()
		<-done
	}
}

// readHostLoad reads the 1-minute load average (into Load1Before) and
// counts the QEMU processes other than the given ones; a figure it cannot
// read is left at -1.
func readHostLoad(own ...*qemulab.Instance) hostLoad {
	h := hostLoad{Load1Before: -1, OtherQEMUs: -1}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 0 {
			if v, err := strconv.ParseFloat(f[0], 64); err == nil {
				h.Load1Before = v
			}
		}
	}
	comms, err := filepath.Glob("/proc/[0-9]*/comm")
	if err != nil {
		return h
	}
	mine := map[string]bool{}
	for _, in := range own {
		mine[strconv.Itoa(in.Pid())] = true
	}
	n := 0
	for _, c := range comms {
		b, err := os.ReadFile(c)
		if err != nil || !strings.HasPrefix(string(b), "qemu-system") {
			continue
		}
		if !mine[filepath.Base(filepath.Dir(c))] {
			n++
		}
	}
	h.OtherQEMUs = n
	return h
}
