package metrics

import (
	"math"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/qmigrate/qmigrate/engine"
)

// Options shape a Collector. The zero value is fine.
type Options struct {
	// ConstLabels are added to every series (for example the manager's
	// host: {"host": "hostA"}).
	ConstLabels prometheus.Labels

	// DurationBuckets are the upper bounds, in seconds, of the duration
	// histogram; nil means DefaultDurationBuckets.
	DurationBuckets []float64

	// DowntimeBuckets are the upper bounds, in seconds, of the downtime
	// histogram; nil means DefaultDowntimeBuckets.
	DowntimeBuckets []float64

	// KeepFinished keeps a finished migration's per-migration series
	// (gauges and its decision counter) until Forget is called with its
	// name. By default they are removed when its result event arrives, so
	// a long-running manager does not accumulate series.
	KeepFinished bool
}

// DefaultDurationBuckets span a migration's wall time: 1 s to about 1 h.
var DefaultDurationBuckets = prometheus.ExponentialBuckets(1, 2, 13)

// DefaultDowntimeBuckets span a guest's downtime: 5 ms to about 10 s.
var DefaultDowntimeBuckets = prometheus.ExponentialBuckets(0.005, 2, 12)

// Collector turns the engine events of any number of migrations into
// Prometheus metrics. It is a prometheus.Collector: register it in the
// manager's own registry (it never touches the global one). Its methods are
// safe for concurrent use by many migrations.
type Collector struct {
	opts Options

	phase          *prometheus.GaugeVec // name, phase
	inPhase        *prometheus.GaugeVec // phase
	startTime      *prometheus.GaugeVec // name
	processed      *prometheus.GaugeVec
	remaining      *prometheus.GaugeVec
	total          *prometheus.GaugeVec
	dirtyRate      *prometheus.GaugeVec
	guestDirtyRate *prometheus.GaugeVec
	transferRate   *prometheus.GaugeVec
	iteration      *prometheus.GaugeVec
	expDowntime    *prometheus.GaugeVec
	downtimeLimit  *prometheus.GaugeVec
	throttle       *prometheus.GaugeVec
	diskRemaining  *prometheus.GaugeVec
	diskTotal      *prometheus.GaugeVec
	diskRate       *prometheus.GaugeVec
	decisions      *prometheus.CounterVec // name, action
	decisionsAll   *prometheus.CounterVec // action
	decisionErrors *prometheus.CounterVec // action
	outcomes       *prometheus.CounterVec // status
	unknown        prometheus.Counter
	duration       *prometheus.HistogramVec // status
	downtime       prometheus.Histogram

	// perName are the vectors whose series carry the name label: removed
	// (or kept) together.
	perName []interface {
		DeletePartialMatch(prometheus.Labels) int
	}
	all []prometheus.Collector

	mu      sync.Mutex
	running map[string]int // observers of a name not yet finished
}

// New returns a Collector. Register it with reg.MustRegister(c).
func New(opts Options) *Collector {
	if opts.DurationBuckets == nil {
		opts.DurationBuckets = DefaultDurationBuckets
	}
	if opts.DowntimeBuckets == nil {
		opts.DowntimeBuckets = DefaultDowntimeBuckets
	}
	c := &Collector{opts: opts, running: make(map[string]int)}
	gauge := func(name, help string, labels ...string) *prometheus.GaugeVec {
		g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: help, ConstLabels: opts.ConstLabels}, labels)
		c.all = append(c.all, g)
		return g
	}
	perName := func(name, help string, labels ...string) *prometheus.GaugeVec {
		g := gauge(name, help, append([]string{"name"}, labels...)...)
		c.perName = append(c.perName, g)
		return g
	}
	counter := func(name, help string, labels ...string) *prometheus.CounterVec {
		v := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help, ConstLabels: opts.ConstLabels}, labels)
		c.all = append(c.all, v)
		return v
	}

	c.phase = perName("qmigrate_migration_phase",
		"The phase the migration is in: 1 for the series whose phase label is the current phase.", "phase")
	c.inPhase = gauge("qmigrate_migrations_in_phase",
		"Number of migrations observed now in each phase.", "phase")
	c.startTime = perName("qmigrate_migration_start_time_seconds",
		"When the migration started, in seconds since the Unix epoch.")
	c.processed = perName("qmigrate_migration_data_processed_bytes",
		"RAM bytes sent to the destination so far (QEMU ram.transferred).")
	c.remaining = perName("qmigrate_migration_data_remaining_bytes",
		"RAM bytes still to send in this pass (QEMU ram.remaining).")
	c.total = perName("qmigrate_migration_data_total_bytes",
		"The guest's RAM size (QEMU ram.total).")
	c.dirtyRate = perName("qmigrate_migration_dirty_memory_rate_bytes",
		"Rate at which the guest dirties memory, as QEMU's migration sees it, bytes per second (saturates at about the transfer rate).")
	c.guestDirtyRate = perName("qmigrate_migration_guest_dirty_rate_bytes",
		"The guest's dirty rate measured apart from the migration (calc-dirty-rate), bytes per second; absent until measured.")
	c.transferRate = perName("qmigrate_migration_memory_transfer_rate_bytes",
		"Rate at which RAM is sent, bytes per second (QEMU ram.mbps).")
	c.iteration = perName("qmigrate_migration_iteration",
		"The pass over the guest's RAM (QEMU dirty-sync-count).")
	c.expDowntime = perName("qmigrate_migration_expected_downtime_seconds",
		"The downtime QEMU expects if it switched over now.")
	c.downtimeLimit = perName("qmigrate_migration_downtime_limit_seconds",
		"The downtime limit in force (downtime-limit).")
	c.throttle = perName("qmigrate_migration_cpu_throttle_percent",
		"The guest's CPU throttle in percent (auto-converge), 0 when not throttled.")
	c.diskRemaining = perName("qmigrate_migration_disk_remaining_bytes",
		"Disk bytes still to mirror (storage migrations only).")
	c.diskTotal = perName("qmigrate_migration_disk_total_bytes",
		"Disk bytes to mirror in all (storage migrations only).")
	c.diskRate = perName("qmigrate_migration_disk_transfer_rate_bytes",
		"Rate at which the disks are mirrored, bytes per second (storage migrations only, before the RAM phase).")

	c.decisions = counter("qmigrate_migration_decisions_total",
		"Strategy decisions taken for the migration, by action.", "name", "action")
	c.perName = append(c.perName, c.decisions)
	c.decisionsAll = counter("qmigrate_decisions_total",
		"Strategy decisions taken for all migrations, by action.", "action")
	c.decisionErrors = counter("qmigrate_decision_errors_total",
		"Strategy decisions that could not be applied, by action.", "action")
	c.outcomes = counter("qmigrate_migrations_total",
		"Finished migrations by status: completed, failed or cancelled.", "status")
	c.unknown = prometheus.NewCounter(prometheus.CounterOpts{Name: "qmigrate_migrations_state_unknown_total",
		Help: "Finished migrations after which where the guest runs is unknown (check both QEMUs).", ConstLabels: opts.ConstLabels})
	c.duration = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "qmigrate_migration_duration_seconds",
		Help:        "Wall time of finished migrations, by status.",
		ConstLabels: opts.ConstLabels, Buckets: opts.DurationBuckets}, []string{"status"})
	c.downtime = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "qmigrate_migration_downtime_seconds",
		Help:        "The guest's downtime of completed migrations.",
		ConstLabels: opts.ConstLabels, Buckets: opts.DowntimeBuckets})
	c.all = append(c.all, c.unknown, c.duration, c.downtime)
	for _, s := range []string{engine.StatusCompleted, engine.StatusFailed, engine.StatusCancelled} {
		// Present at 0 from the start, so rate() and alerts see the first one.
		c.outcomes.WithLabelValues(s)
	}
	return c
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range c.all {
		m.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	for _, m := range c.all {
		m.Collect(ch)
	}
}

// Forget removes every per-migration series of name (those labelled with
// it). With Options.KeepFinished it is how a manager drops a finished
// migration; without, it is only needed for a migration whose result
// event never came (its observer abandoned).
func (c *Collector) Forget(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.forgetLocked(name)
}

func (c *Collector) forgetLocked(name string) {
	for _, v := range c.perName {
		v.DeletePartialMatch(prometheus.Labels{"name": name})
	}
}

// Observe returns the function to give every engine event of one migration
// to, in order: set it as engine.Config.Observer, or call it for each event
// of a job's subscription. name labels the migration's series; it is the
// manager's (a VM name, a job id) and should be unique among the
// migrations running at once. The returned function is not safe for
// concurrent use: one migration's events come from one goroutine.
func (c *Collector) Observe(name string) func(engine.Event) {
	o := &observer{c: c, name: name, disks: make(map[string]diskState)}
	return o.event
}

type diskState struct {
	remaining, total uint64
	rate             float64
}

// observer is one migration's state: what it must undo in the shared
// per-phase gauge, and its disks.
type observer struct {
	c        *Collector
	name     string
	started  bool
	finished bool
	phase    engine.Phase
	disks    map[string]diskState
}

func (o *observer) event(ev engine.Event) {
	if o.finished {
		return // the result is the last event; nothing after it counts
	}
	c, name := o.c, o.name
	if !o.started {
		o.started = true
		c.mu.Lock()
		c.running[name]++
		c.mu.Unlock()
		c.startTime.WithLabelValues(name).Set(float64(time.Now().Add(-ev.Elapsed).UnixNano()) / 1e9)
	}
	switch ev.Kind {
	case engine.EventPhase:
		o.setPhase(ev.Phase)
	case engine.EventStats:
		s := ev.Stats
		if s == nil {
			return
		}
		c.processed.WithLabelValues(name).Set(float64(s.TransferredBytes))
		c.remaining.WithLabelValues(name).Set(float64(s.RemainingBytes))
		c.total.WithLabelValues(name).Set(float64(s.TotalBytes))
		setFinite(c.dirtyRate.WithLabelValues(name), s.DirtyRate)
		if s.GuestDirtyRate > 0 {
			setFinite(c.guestDirtyRate.WithLabelValues(name), s.GuestDirtyRate)
		}
		setFinite(c.transferRate.WithLabelValues(name), s.Throughput)
		c.iteration.WithLabelValues(name).Set(float64(s.Iteration))
		c.expDowntime.WithLabelValues(name).Set(s.ExpectedDowntime.Seconds())
		c.downtimeLimit.WithLabelValues(name).Set(s.DowntimeLimit.Seconds())
		c.throttle.WithLabelValues(name).Set(float64(s.ThrottlePercent))
		if s.StorageTotal > 0 {
			c.diskRemaining.WithLabelValues(name).Set(float64(s.StorageRemaining))
			c.diskTotal.WithLabelValues(name).Set(float64(s.StorageTotal))
		}
	case engine.EventDisk:
		p := ev.Disk
		if p == nil {
			return
		}
		d := diskState{total: p.Total, remaining: p.Total - min(p.Done, p.Total)}
		if !p.Ready && !math.IsNaN(p.Rate) && !math.IsInf(p.Rate, 0) {
			d.rate = p.Rate
		}
		o.disks[p.Node] = d
		var sum diskState
		for _, d := range o.disks {
			sum.remaining += d.remaining
			sum.total += d.total
			sum.rate += d.rate
		}
		c.diskRemaining.WithLabelValues(name).Set(float64(sum.remaining))
		c.diskTotal.WithLabelValues(name).Set(float64(sum.total))
		c.diskRate.WithLabelValues(name).Set(sum.rate)
	case engine.EventDecision:
		d := ev.Decision
		if d == nil {
			return
		}
		action := string(d.Action)
		c.decisions.WithLabelValues(name, action).Inc()
		c.decisionsAll.WithLabelValues(action).Inc()
		if ev.DecisionErr != nil {
			c.decisionErrors.WithLabelValues(action).Inc()
		}
	case engine.EventResult:
		o.finish(ev.Result)
	}
}

// setFinite sets g to v unless v is NaN or infinite (left as it was).
func setFinite(g prometheus.Gauge, v float64) {
	if !math.IsNaN(v) && !math.IsInf(v, 0) {
		g.Set(v)
	}
}

func (o *observer) setPhase(p engine.Phase) {
	c, name := o.c, o.name
	if o.phase != "" {
		c.phase.DeleteLabelValues(name, string(o.phase))
		c.inPhase.WithLabelValues(string(o.phase)).Dec()
	}
	o.phase = p
	c.phase.WithLabelValues(name, string(p)).Set(1)
	c.inPhase.WithLabelValues(string(p)).Inc()
}

func (o *observer) finish(res *engine.Result) {
	c, name := o.c, o.name
	o.finished = true
	if o.phase != "" {
		c.inPhase.WithLabelValues(string(o.phase)).Dec()
	}
	if res != nil {
		c.outcomes.WithLabelValues(res.Status).Inc()
		c.duration.WithLabelValues(res.Status).Observe(res.Total.Seconds())
		if res.Status == engine.StatusCompleted {
			c.downtime.Observe(res.Downtime.Seconds())
		}
		if res.StateUnknown {
			c.unknown.Inc()
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.running[name]--
	if c.running[name] > 0 {
		return // another migration of that name still runs: its series stay
	}
	delete(c.running, name)
	if !c.opts.KeepFinished {
		c.forgetLocked(name)
	}
}
