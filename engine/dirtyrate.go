package engine

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
)

// The guest's dirty rate measured apart from the migration, for a strategy
// whose Setup asks for it (strategy.Setup.MeasureDirtyRate; auto does):
// QEMU's own dirty-pages-rate counts distinct pages per sync period and so
// reads about the link's throughput whenever the guest re-dirties its
// working set every pass, whatever its true rate. calc-dirty-rate in
// page-sampling mode hashes sampled pages at the start and end of a short
// period instead; it runs in its own thread on the source, reads guest RAM
// only, and leaves nothing behind. It is started once, as the migration
// starts (the guest unthrottled), over 200 ms where QEMU takes milliseconds
// (8.2+), else over 1 s; the engine reads it back on its polls. A QEMU that
// lacks it or refuses it only means no measurement: never a failure.

const (
	dirtyRatePeriodMS    = 200
	dirtyRateSamplePages = 4096 // per GiB: QEMU's default 512 is coarse for small guests
)

// dirtyRateGrace is how long past its period a measurement may take to
// report before the engine gives up on it. QEMU's status stays "unstarted"
// until its measuring thread runs, then "measuring".
const dirtyRateGrace = 3 * time.Second

// dirtyMeter is the measurement's state on the engine goroutine.
type dirtyMeter struct {
	measuring bool
	deadline  time.Time
	rate      float64       // bytes/s, 0 = not measured
	period    time.Duration // what rate was measured over
}

// startDirtyRate starts the measurement on the source, when asked for. Only
// a command left unanswered (ask) is an error.
func (r *run) startDirtyRate(ctx context.Context) error {
	if !r.setup.MeasureDirtyRate {
		return nil
	}
	calc := func(args qmp.CalcDirtyRateArgs) error {
		return r.do(ctx, SideSource, "calc-dirty-rate", func(c context.Context) error { return r.src.CalcDirtyRate(c, args) })
	}
	args, err := startCalc(calc, dirtyRatePeriodMS*time.Millisecond)
	if isUnanswered(err) {
		return err
	}
	if err != nil {
		r.log.Debug("calc-dirty-rate: no guest dirty-rate measurement", "err", err)
		return nil
	}
	r.log.Debug("calc-dirty-rate started", "calc-time", args.CalcTime, "unit", args.CalcTimeUnit)
	period := calcPeriod(args)
	r.dirty.measuring, r.dirty.deadline, r.dirty.period = true, time.Now().Add(period+dirtyRateGrace), period
	return nil
}

// pollDirtyRate reads the measurement back while it runs. Only a command
// left unanswered (ask) is an error.
func (r *run) pollDirtyRate(ctx context.Context) error {
	if !r.dirty.measuring {
		return nil
	}
	d, err := ask(r, ctx, SideSource, "query-dirty-rate", r.src.QueryDirtyRate)
	if err != nil {
		r.dirty.measuring = false
		r.log.Debug("query-dirty-rate", "err", err)
		if isUnanswered(err) {
			return err
		}
		return nil
	}
	if rate, ok := d.Measured(); ok {
		r.dirty.measuring, r.dirty.rate = false, rate
		r.log.Debug("guest dirty rate measured", "bytes/s", rate, "calc-time", d.CalcTime, "mode", d.Mode)
		return nil
	}
	if time.Now().After(r.dirty.deadline) {
		r.dirty.measuring = false
		r.log.Debug("calc-dirty-rate: no result in time", "status", d.Status)
	}
	return nil
}

// startCalc starts calc-dirty-rate over period (page sampling, the engine's
// sample count): in milliseconds where QEMU takes them (8.2+), else in whole
// seconds (at least 1). It returns the arguments QEMU accepted.
func startCalc(calc func(qmp.CalcDirtyRateArgs) error, period time.Duration) (qmp.CalcDirtyRateArgs, error) {
	args := qmp.CalcDirtyRateArgs{CalcTime: max(period.Milliseconds(), 1), CalcTimeUnit: "millisecond", SamplePages: dirtyRateSamplePages}
	err := calc(args)
	if qmp.IsUnexpectedArgument(err, "calc-time-unit") {
		args = qmp.CalcDirtyRateArgs{CalcTime: max(int64((period+time.Second-1)/time.Second), 1), SamplePages: dirtyRateSamplePages}
		err = calc(args)
	}
	return args, err
}

// calcPeriod is the period calc-dirty-rate measures over with args.
func calcPeriod(args qmp.CalcDirtyRateArgs) time.Duration {
	if args.CalcTimeUnit == "millisecond" {
		return time.Duration(args.CalcTime) * time.Millisecond
	}
	return time.Duration(args.CalcTime) * time.Second
}

// ErrNoDirtyRate: the source QEMU gave no dirty-rate measurement (it lacks
// calc-dirty-rate, refused it, or did not report within the grace).
var ErrNoDirtyRate = errors.New("engine: no guest dirty-rate measurement")

// DirtyRate is one measurement of the guest's own dirty rate.
type DirtyRate struct {
	Rate   float64       // bytes/s: distinct sampled pages written over Period
	Period time.Duration // what QEMU measured over (7.2 rounds up to whole seconds)
}

// MeasureDirtyRate measures the guest's dirty rate on c (a source QEMU)
// as the engine does during a migration (calc-dirty-rate, page sampling),
// over period, or the next whole second where QEMU takes only seconds
// (before 8.2). It is read-only for the guest: QEMU hashes sampled pages
// in a thread of its own and leaves nothing configured. It polls
// query-dirty-rate every poll (100 ms when 0) until the result, at most
// the period and dirtyRateGrace. A QEMU that gives none is ErrNoDirtyRate
// (wrapping its error when it refused).
func MeasureDirtyRate(ctx context.Context, c *qmp.Client, period, poll time.Duration) (DirtyRate, error) {
	if poll <= 0 {
		poll = 100 * time.Millisecond
	}
	args, err := startCalc(func(a qmp.CalcDirtyRateArgs) error { return c.CalcDirtyRate(ctx, a) }, period)
	if err != nil {
		if ctx.Err() != nil {
			return DirtyRate{}, err
		}
		return DirtyRate{}, fmt.Errorf("%w: calc-dirty-rate: %w", ErrNoDirtyRate, err)
	}
	p := calcPeriod(args)
	deadline := time.NewTimer(p + dirtyRateGrace)
	defer deadline.Stop()
	tick := time.NewTicker(poll)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return DirtyRate{}, ctx.Err()
		case <-deadline.C:
			return DirtyRate{}, fmt.Errorf("%w: no result within %v", ErrNoDirtyRate, p+dirtyRateGrace)
		case <-tick.C:
		}
		d, err := c.QueryDirtyRate(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return DirtyRate{}, err
			}
			return DirtyRate{}, fmt.Errorf("%w: query-dirty-rate: %w", ErrNoDirtyRate, err)
		}
		// The measurement asked for: an earlier one's result stays until
		// this one starts measuring.
		if rate, ok := d.Measured(); ok && reportsPeriod(d, args) {
			return DirtyRate{Rate: rate, Period: p}, nil
		}
	}
}

// reportsPeriod reports whether d is a result of the measurement args asked
// for: its calc-time, in the unit QEMU reports it in, is the period asked
// for (QEMU 10.0 reports a 200 ms measurement as 0 seconds: measured on
// 10.0.2, which a comparison of the raw numbers never matched).
func reportsPeriod(d *qmp.DirtyRateInfo, args qmp.CalcDirtyRateArgs) bool {
	if d.CalcTimeUnit == "" && d.CalcTime == args.CalcTime {
		return true // the number asked for, in the unit asked in
	}
	unit := time.Second
	if d.CalcTimeUnit == "millisecond" {
		unit = time.Millisecond
	}
	return time.Duration(d.CalcTime)*unit == calcPeriod(args).Truncate(unit)
}
