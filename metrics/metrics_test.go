package metrics_test

import (
	"errors"
	"math"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/metrics"
	"github.com/qmigrate/qmigrate/strategy"
)

// server registers c in a fresh registry and serves it like a manager would.
func server(t *testing.T, c *metrics.Collector) string {
	t.Helper()
	reg := prometheus.NewRegistry()
	require.NoError(t, reg.Register(c))
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.HTTPErrorOnError}))
	t.Cleanup(srv.Close)
	return srv.URL
}

// scrape fetches the exposition in the text format and parses it.
func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	require.NoError(t, err)
	req.Header.Set("Accept", "text/plain; version=0.0.4")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, expfmt.TypeTextPlain, expfmt.ResponseFormat(resp.Header).FormatType())
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	require.NoError(t, err)
	return fams
}

// find returns the metric of family name whose labels include want.
func find(fams map[string]*dto.MetricFamily, name string, want map[string]string) (*dto.Metric, bool) {
	f, ok := fams[name]
	if !ok {
		return nil, false
	}
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		return m, true
	}
	return nil, false
}

// value is the value of a gauge or counter series; it fails the test when
// the series is absent.
func value(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	t.Helper()
	m, ok := find(fams, name, labels)
	require.True(t, ok, "no series %s%v", name, labels)
	switch fams[name].GetType() {
	case dto.MetricType_GAUGE:
		return m.GetGauge().GetValue()
	case dto.MetricType_COUNTER:
		return m.GetCounter().GetValue()
	}
	t.Fatalf("%s is a %s", name, fams[name].GetType())
	return 0
}

// seriesOf counts the series of every family that carry name="name".
func seriesOf(fams map[string]*dto.MetricFamily, name string) []string {
	var out []string
	for fname, f := range fams {
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "name" && l.GetValue() == name {
					out = append(out, fname)
				}
			}
		}
	}
	return out
}

func vm(name string) map[string]string { return map[string]string{"name": name} }

func stats(at time.Duration, sent, rem uint64, dirty, tput float64, exp time.Duration, thr int) engine.Event {
	return engine.Event{Kind: engine.EventStats, Elapsed: at, Stats: &engine.Stats{
		Status: "active", Iteration: 3, TransferredBytes: sent, RemainingBytes: rem, TotalBytes: 256 << 20,
		DirtyRate: dirty, Throughput: tput, ExpectedDowntime: exp, ThrottlePercent: thr,
		DowntimeLimit: 300 * time.Millisecond, GuestDirtyRate: 50 << 20,
	}}
}

func phase(at time.Duration, p engine.Phase) engine.Event {
	return engine.Event{Kind: engine.EventPhase, Elapsed: at, Phase: p}
}

func TestMigrationSeriesWhileRunningAndAfter(t *testing.T) {
	c := metrics.New(metrics.Options{ConstLabels: prometheus.Labels{"host": "hostA"}})
	url := server(t, c)
	obs := c.Observe("vm1")

	throttle := strategy.Decision{Action: strategy.SetThrottle, Throttle: strategy.Throttle{Initial: 20, Increment: 10, Max: 99}}
	downtime := strategy.Decision{Action: strategy.SetDowntime, DowntimeLimit: time.Second}
	before := time.Now()
	for _, ev := range []engine.Event{
		phase(0, engine.PhasePrepare),
		{Kind: engine.EventDisk, Elapsed: 100 * time.Millisecond, Disk: &blockmirror.Progress{Node: "d0", Done: 10 << 20, Total: 64 << 20, Rate: 30 << 20}},
		{Kind: engine.EventDisk, Elapsed: 100 * time.Millisecond, Disk: &blockmirror.Progress{Node: "d1", Done: 0, Total: 16 << 20, Rate: math.NaN()}},
	} {
		obs(ev)
	}
	fams := scrape(t, url)
	assert.Equal(t, float64(70<<20), value(t, fams, "qmigrate_migration_disk_remaining_bytes", vm("vm1")))
	assert.Equal(t, float64(80<<20), value(t, fams, "qmigrate_migration_disk_total_bytes", vm("vm1")))
	assert.Equal(t, float64(30<<20), value(t, fams, "qmigrate_migration_disk_transfer_rate_bytes", vm("vm1")), "NaN rates are left out of the sum")
	assert.Equal(t, 1.0, value(t, fams, "qmigrate_migration_phase", map[string]string{"name": "vm1", "phase": "prepare"}))
	start := value(t, fams, "qmigrate_migration_start_time_seconds", vm("vm1"))
	assert.InDelta(t, float64(before.UnixNano())/1e9, start, 5)

	for _, ev := range []engine.Event{
		phase(time.Second, engine.PhaseStart),
		phase(time.Second, engine.PhaseConverge),
		stats(1200*time.Millisecond, 100<<20, 156<<20, 300<<20, 100<<20, 2*time.Second, 0),
		{Kind: engine.EventDecision, Elapsed: 1300 * time.Millisecond, Decision: &downtime},
		{Kind: engine.EventDecision, Elapsed: 1400 * time.Millisecond, Decision: &throttle, DecisionErr: errors.New("refused")},
		{Kind: engine.EventDecision, Elapsed: 1500 * time.Millisecond, Decision: &throttle},
		stats(1600*time.Millisecond, 200<<20, 56<<20, 90<<20, 110<<20, 400*time.Millisecond, 30),
	} {
		obs(ev)
	}
	fams = scrape(t, url)
	for name, want := range map[string]float64{
		"qmigrate_migration_data_processed_bytes":       200 << 20,
		"qmigrate_migration_data_remaining_bytes":       56 << 20,
		"qmigrate_migration_data_total_bytes":           256 << 20,
		"qmigrate_migration_dirty_memory_rate_bytes":    90 << 20,
		"qmigrate_migration_guest_dirty_rate_bytes":     50 << 20,
		"qmigrate_migration_memory_transfer_rate_bytes": 110 << 20,
		"qmigrate_migration_iteration":                  3,
		"qmigrate_migration_expected_downtime_seconds":  0.4,
		"qmigrate_migration_downtime_limit_seconds":     0.3,
		"qmigrate_migration_cpu_throttle_percent":       30,
	} {
		assert.Equal(t, want, value(t, fams, name, map[string]string{"name": "vm1", "host": "hostA"}), name)
	}
	// One phase series at a time, and the fleet-wide count follows it.
	assert.Len(t, fams["qmigrate_migration_phase"].GetMetric(), 1)
	assert.Equal(t, 1.0, value(t, fams, "qmigrate_migration_phase", map[string]string{"name": "vm1", "phase": "converge"}))
	assert.Equal(t, 1.0, value(t, fams, "qmigrate_migrations_in_phase", map[string]string{"phase": "converge"}))
	assert.Equal(t, 0.0, value(t, fams, "qmigrate_migrations_in_phase", map[string]string{"phase": "prepare"}))
	assert.Equal(t, 2.0, value(t, fams, "qmigrate_migration_decisions_total", map[string]string{"name": "vm1", "action": "set-throttle"}))
	assert.Equal(t, 1.0, value(t, fams, "qmigrate_migration_decisions_total", map[string]string{"name": "vm1", "action": "set-downtime"}))
	assert.Equal(t, 1.0, value(t, fams, "qmigrate_decision_errors_total", map[string]string{"action": "set-throttle"}))
	assert.Equal(t, 0.0, value(t, fams, "qmigrate_migrations_total", map[string]string{"status": "completed"}))

	res := &engine.Result{Status: engine.StatusCompleted, Total: 3 * time.Second, Downtime: 40 * time.Millisecond}
	obs(phase(2*time.Second, engine.PhaseSwitchover))
	obs(phase(2*time.Second, engine.PhaseComplete))
	obs(engine.Event{Kind: engine.EventResult, Elapsed: 3 * time.Second, Result: res})
	// Nothing after the result counts.
	obs(stats(4*time.Second, 1, 1, 1, 1, 0, 0))

	fams = scrape(t, url)
	assert.Empty(t, seriesOf(fams, "vm1"), "a finished migration's series are removed")
	assert.Equal(t, 1.0, value(t, fams, "qmigrate_migrations_total", map[string]string{"status": "completed"}))
	assert.Equal(t, 0.0, value(t, fams, "qmigrate_migrations_total", map[string]string{"status": "failed"}))
	assert.Equal(t, 2.0, value(t, fams, "qmigrate_decisions_total", map[string]string{"action": "set-throttle"}))
	assert.Equal(t, 0.0, value(t, fams, "qmigrate_migrations_in_phase", map[string]string{"phase": "complete"}))
	assert.Equal(t, 0.0, value(t, fams, "qmigrate_migrations_state_unknown_total", nil))

	h, ok := find(fams, "qmigrate_migration_duration_seconds", map[string]string{"status": "completed"})
	require.True(t, ok)
	assert.Equal(t, uint64(1), h.GetHistogram().GetSampleCount())
	assert.Equal(t, 3.0, h.GetHistogram().GetSampleSum())
	for _, b := range h.GetHistogram().GetBucket() {
		if b.GetUpperBound() >= 4 {
			assert.Equal(t, uint64(1), b.GetCumulativeCount(), "le=%v", b.GetUpperBound())
		} else if b.GetUpperBound() < 2 {
			assert.Equal(t, uint64(0), b.GetCumulativeCount(), "le=%v", b.GetUpperBound())
		}
	}
	d, ok := find(fams, "qmigrate_migration_downtime_seconds", nil)
	require.True(t, ok)
	assert.Equal(t, uint64(1), d.GetHistogram().GetSampleCount())
	assert.InDelta(t, 0.04, d.GetHistogram().GetSampleSum(), 1e-9)
}

// Several migrations at once, each from its own goroutine, as a fleet runs
// them; each outcome is counted, and only the running one keeps series.
func TestConcurrentMigrationsOutcomes(t *testing.T) {
	c := metrics.New(metrics.Options{})
	url := server(t, c)

	outcomes := map[string]*engine.Result{
		"ok":        {Status: engine.StatusCompleted, Total: time.Second},
		"failed":    {Status: engine.StatusFailed, Total: 2 * time.Second, Err: engine.ErrMigrationFailed},
		"cancelled": {Status: engine.StatusCancelled, Total: time.Second, Err: engine.ErrCancelled},
		"unknown":   {Status: engine.StatusFailed, Total: time.Second, StateUnknown: true, Err: engine.ErrUnresponsive},
	}
	done := make(chan struct{})
	for name, res := range outcomes {
		go func() {
			defer func() { done <- struct{}{} }()
			obs := c.Observe(name)
			obs(phase(0, engine.PhasePrepare))
			obs(phase(0, engine.PhaseConverge))
			obs(stats(time.Second, 1, 2, 3, 4, 0, 0))
			if res.Status != engine.StatusCompleted {
				obs(phase(0, engine.PhaseRollback))
			}
			obs(engine.Event{Kind: engine.EventResult, Result: res})
		}()
	}
	running := c.Observe("running")
	running(phase(0, engine.PhasePrepare))
	running(phase(0, engine.PhaseConverge))
	for range outcomes {
		<-done
	}

	fams := scrape(t, url)
	assert.Equal(t, 1.0, value(t, fams, "qmigrate_migrations_total", map[string]string{"status": "completed"}))
	assert.Equal(t, 2.0, value(t, fams, "qmigrate_migrations_total", map[string]string{"status": "failed"}))
	assert.Equal(t, 1.0, value(t, fams, "qmigrate_migrations_total", map[string]string{"status": "cancelled"}))
	assert.Equal(t, 1.0, value(t, fams, "qmigrate_migrations_state_unknown_total", nil))
	assert.Equal(t, 1.0, value(t, fams, "qmigrate_migrations_in_phase", map[string]string{"phase": "converge"}))
	assert.Equal(t, 0.0, value(t, fams, "qmigrate_migrations_in_phase", map[string]string{"phase": "rollback"}))
	for name := range outcomes {
		assert.Empty(t, seriesOf(fams, name), name)
	}
	assert.NotEmpty(t, seriesOf(fams, "running"))
	h, ok := find(fams, "qmigrate_migration_duration_seconds", map[string]string{"status": "failed"})
	require.True(t, ok)
	assert.Equal(t, uint64(2), h.GetHistogram().GetSampleCount())
	d, ok := find(fams, "qmigrate_migration_downtime_seconds", nil)
	require.True(t, ok)
	assert.Equal(t, uint64(1), d.GetHistogram().GetSampleCount(), "only completed migrations have a downtime")
}

func TestKeepFinishedUntilForget(t *testing.T) {
	c := metrics.New(metrics.Options{KeepFinished: true})
	url := server(t, c)
	obs := c.Observe("vm1")
	obs(phase(0, engine.PhaseConverge))
	obs(stats(time.Second, 10, 20, 0, 0, 0, 0))
	obs(phase(0, engine.PhaseRollback))
	obs(engine.Event{Kind: engine.EventResult, Result: &engine.Result{Status: engine.StatusFailed}})

	fams := scrape(t, url)
	assert.Equal(t, 10.0, value(t, fams, "qmigrate_migration_data_processed_bytes", vm("vm1")))
	assert.Equal(t, 1.0, value(t, fams, "qmigrate_migration_phase", map[string]string{"name": "vm1", "phase": "rollback"}))
	assert.Equal(t, 0.0, value(t, fams, "qmigrate_migrations_in_phase", map[string]string{"phase": "rollback"}), "no longer running")

	c.Forget("vm1")
	assert.Empty(t, seriesOf(scrape(t, url), "vm1"))
}

// Two collectors in two registries do not collide, and nothing goes to the
// global registry.
func TestOwnRegistryOnly(t *testing.T) {
	a, b := metrics.New(metrics.Options{}), metrics.New(metrics.Options{})
	server(t, a)
	server(t, b)
	fams, err := prometheus.DefaultGatherer.Gather()
	require.NoError(t, err)
	for _, f := range fams {
		assert.NotContains(t, f.GetName(), "qmigrate")
	}
	// Registering the same collector twice in one registry is refused.
	reg := prometheus.NewRegistry()
	require.NoError(t, reg.Register(a))
	var are prometheus.AlreadyRegisteredError
	require.ErrorAs(t, reg.Register(a), &are)
}
