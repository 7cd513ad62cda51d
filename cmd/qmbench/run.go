package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/guest/sweep"
	"github.com/qmigrate/qmigrate/internal/testbed"
	"github.com/qmigrate/qmigrate/strategy"
)

// point is one poll of a run: elapsed time and RAM bytes still to send.
type point struct {
	At        time.Duration
	Remaining uint64
}

// runResult is everything measured in one migration.
type runResult struct {
	Scenario, Profile, Policy string
	Status                    string // completed, aborted, failed, error
	Err                       string
	Total, Downtime           time.Duration
	Sent                      uint64
	BaseRate                  float64 // guest dirty rate without migration (mean of before and after), bytes/s (passes × swept range)
	BeforeRate, AfterRate     float64 // the same just before and just after the migration
	DuringRate                float64 // the same during the migration
	Intact                    bool
	IntactErr                 string
	Decisions                 []strategy.Decision
	Points                    []point
	Postcopy                  bool // the migration switched to postcopy
	MaxThrottle               int
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
	q       *testbed.QEMU
	net     *testbed.Network
	memMiB  int
	budget  time.Duration
	warmup  time.Duration // how long a freshly booted guest runs before the baseline (at most)
	base    time.Duration // baseline measurement window
	logf    func(format string, args ...any)
	verbose bool
}

// pair boots a source running the sweep guest with spin in host A and a
// destination waiting for it in host B.
func (r *runner) pair(ctx context.Context, spin uint32) (src, dst *testbed.Instance, err error) {
	g := testbed.SweepGuest{Spin: spin}
	cfg := testbed.Config{Name: "src", Guest: g, MemMiB: r.memMiB, Netns: r.net.A.Netns}
	if r.verbose {
		cfg.Logf = r.logf
	}
	src, err = r.q.Start(ctx, cfg)
	if err != nil {
		return nil, nil, err
	}
	cfg.Name, cfg.Incoming, cfg.Netns = "dst", true, r.net.B.Netns
	dst, err = r.q.Start(ctx, cfg)
	if err != nil {
		src.Close()
		return nil, nil, err
	}
	return src, dst, nil
}

// warm waits until the guest has made one pass (so its pages hold data, not
// zeros) or r.warmup passed, whichever comes first.
func (r *runner) warm(ctx context.Context, src *testbed.Instance) error {
	wctx, cancel := context.WithTimeout(ctx, r.warmup)
	defer cancel()
	_, err := src.CountSerial(wctx, sweep.StartChar, sweep.PassChar, 1)
	if err != nil && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
		// A slow guest: its started mark is enough.
		_, err = src.CountSerial(ctx, 0, sweep.StartChar, 1)
	}
	return err
}

// measureRate returns the guest's dirty rate (bytes/s of swept pages) over
// window, and its position (passes) and time at the end.
func measureRate(ctx context.Context, src *testbed.Instance, window time.Duration) (rate, pos float64, at time.Time, err error) {
	p0, t0, err := guestProgress(ctx, src.QMP, serialPasses(src, true))
	if err != nil {
		return 0, 0, time.Time{}, err
	}
	select {
	case <-ctx.Done():
		return 0, 0, time.Time{}, ctx.Err()
	case <-time.After(window):
	}
	p1, t1, err := guestProgress(ctx, src.QMP, serialPasses(src, true))
	if err != nil {
		return 0, 0, time.Time{}, err
	}
	return (p1 - p0) * sweep.RangeSize / t1.Sub(t0).Seconds(), p1, t1, nil
}

// measureRateOn is measureRate on the QEMU the guest runs on after the
// migration: the destination (moved) counts passes from both serial ports.
func measureRateOn(ctx context.Context, on *testbed.Instance, moved bool, src *testbed.Instance, window time.Duration) (float64, error) {
	est := func() int {
		if moved {
			return serialPasses(src, true) + serialPasses(on, false)
		}
		return serialPasses(on, true)
	}
	p0, t0, err := guestProgress(ctx, on.QMP, est())
	if err != nil {
		return 0, err
	}
	select {
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-time.After(window):
	}
	p1, t1, err := guestProgress(ctx, on.QMP, est())
	if err != nil {
		return 0, err
	}
	return (p1 - p0) * sweep.RangeSize / t1.Sub(t0).Seconds(), nil
}

// calibrate finds the spin count that makes the sweep guest dirty about
// target bytes/s here and now (TCG speed depends on the QEMU version and the
// load), booting a lone source guest a few times.
func (r *runner) calibrate(ctx context.Context, target float64, rounds int) (uint32, float64, error) {
	if target <= 0 {
		return math.MaxUint32, 0, nil
	}
	spin := sweep.SpinForRate(target)
	var got float64
	for i := range rounds {
		g := testbed.SweepGuest{Spin: spin}
		src, err := r.q.Start(ctx, testbed.Config{Name: "cal", Guest: g, MemMiB: r.memMiB})
		if err != nil {
			return 0, 0, err
		}
		_, err = src.CountSerial(ctx, 0, sweep.StartChar, 1)
		if err == nil {
			time.Sleep(500 * time.Millisecond)
			got, _, _, err = measureRate(ctx, src, 2*time.Second)
		}
		src.Close()
		if err != nil {
			return 0, 0, err
		}
		r.logf("calibrate %s: spin %d gives %s (round %d)", rateStr(target), spin, rateStr(got), i+1)
		if got <= 0 || math.Abs(got/target-1) < 0.1 || i == rounds-1 {
			break
		}
		// Time per page is fixed cost + spin × cost per spin; scale the spin part.
		perPage := sweep.PageSize / got
		want := sweep.PageSize / target
		fixed := sweep.PageSize / sweep.UnthrottledRate
		if perPage <= fixed {
			spin = uint32(float64(spin) * want / perPage)
		} else {
			spin = uint32(math.Min(float64(spin)*(want-fixed)/(perPage-fixed), math.MaxUint32))
		}
	}
	return spin, got, nil
}

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
	if err := r.warm(ctx, src); err != nil {
		return fail(fmt.Errorf("warm-up: %w", err))
	}
	base, pos0, t0, err := measureRate(ctx, src, r.base)
	if err != nil {
		return fail(fmt.Errorf("baseline: %w", err))
	}
	res.BaseRate, res.BeforeRate = base, base

	cfg := engine.Config{
		Source:      engine.Endpoint{Client: src.QMP},
		Destination: engine.Endpoint{Client: dst.QMP},
		URI:         fmt.Sprintf("tcp:%s:4444", r.net.B.Addr),
		Strategy:    strategyConfig(policy, prof, r.budget),
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
					res.Points = append(res.Points, point{At: e.Elapsed, Remaining: s.RemainingBytes})
				}
			case engine.EventDecision:
				r.logf("  %s/%s/%s %5.1fs %s: %s", sc.Name, prof.Name, policy, e.Elapsed.Seconds(), e.Decision.Action, e.Decision.Reason)
			}
		},
	}
	mctx, cancel := context.WithTimeout(ctx, r.budget+90*time.Second)
	defer cancel()
	out, merr := engine.Migrate(mctx, cfg)
	if out == nil {
		return fail(merr)
	}
	res.Total, res.Downtime, res.Decisions = out.Total, out.Downtime, out.Decisions
	res.Sent = max(res.Sent, out.TransferredBytes) // the engine reports it after a completion only
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
	on := src
	est := serialPasses(src, true)
	if res.Status == "completed" {
		on = dst
		est += serialPasses(dst, false)
	}
	if pos1, t1, err := guestProgress(cctx, on.QMP, est); err == nil {
		res.DuringRate = (pos1 - pos0) * sweep.RangeSize / t1.Sub(t0).Seconds()
	} else {
		r.logf("  guest progress after the migration: %v", err)
		res.DuringRate = math.NaN()
	}
	// The cores are shared with other work, so the guest's speed drifts: the
	// reference is the mean of its rate just before and just after.
	if after, err := measureRateOn(cctx, on, res.Status == "completed", src, r.base); err == nil {
		res.AfterRate = after
		res.BaseRate = (base + after) / 2
	} else {
		r.logf("  guest rate after the migration: %v", err)
	}

	// Integrity: the destination after a completed migration, else the
	// source, which must be running the guest.
	var cerr error
	if res.Status == "completed" {
		_, cerr = testbed.CheckSweep(cctx, src.QMP, dst.QMP, testbed.SweepCheckOptions{Dir: dst.Dir()})
	} else {
		st, err := src.QMP.QueryStatus(cctx)
		switch {
		case err != nil:
			cerr = err
		case st.Status != "running":
			cerr = fmt.Errorf("source is %s, not running", st.Status)
		default:
			_, cerr = testbed.CheckSweep(cctx, nil, src.QMP, testbed.SweepCheckOptions{Dir: src.Dir()})
		}
	}
	res.Intact = cerr == nil
	if cerr != nil {
		res.IntactErr = cerr.Error()
	}
	return res
}
