package engine

import (
	"context"
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
	args := qmp.CalcDirtyRateArgs{CalcTime: dirtyRatePeriodMS, CalcTimeUnit: "millisecond", SamplePages: dirtyRateSamplePages}
	err := calc(args)
	if qmp.IsUnexpectedArgument(err, "calc-time-unit") {
		args = qmp.CalcDirtyRateArgs{CalcTime: 1, SamplePages: dirtyRateSamplePages}
		err = calc(args)
	}
	if isUnanswered(err) {
		return err
	}
	if err != nil {
		r.log.Debug("calc-dirty-rate: no guest dirty-rate measurement", "err", err)
		return nil
	}
	r.log.Debug("calc-dirty-rate started", "calc-time", args.CalcTime, "unit", args.CalcTimeUnit)
	period := time.Duration(args.CalcTime) * time.Second
	if args.CalcTimeUnit == "millisecond" {
		period = time.Duration(args.CalcTime) * time.Millisecond
	}
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
