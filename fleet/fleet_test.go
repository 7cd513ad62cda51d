package fleet_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/fleet"
	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp"
)

// vm is one guest of a test fleet: its fake QEMU pair and its migration.
type vm struct {
	pair *qemutest.Pair
	m    fleet.Migration
}

// newVM starts a fake pair for a guest moving from src to dst host.
func newVM(t *testing.T, name, src, dst string, opt qemutest.Options) *vm {
	t.Helper()
	p := qemutest.New(opt)
	t.Cleanup(p.Close)
	sc, dc, err := p.Clients(t.Context())
	require.NoError(t, err)
	t.Cleanup(func() { sc.Close(); dc.Close() })
	return &vm{pair: p, m: fleet.Migration{Name: name, SourceHost: src, DestinationHost: dst, Config: engine.Config{
		Source: engine.Endpoint{Client: sc}, Destination: engine.Endpoint{Client: dc}, URI: "tcp:127.0.0.1:0",
	}}}
}

func migrations(vms []*vm) []fleet.Migration {
	var out []fleet.Migration
	for _, v := range vms {
		out = append(out, v.m)
	}
	return out
}

func active(p *qemutest.Pair) bool {
	s := p.Status()
	return s != qmp.StatusNone && !s.Terminal()
}

// watcher checks the limits at every event, from the event stream (the
// fleet's start events, the engine's limits and result events) and from
// the fake QEMUs' own max-bandwidth.
type watcher struct {
	t       *testing.T
	lim     fleet.Limits
	vms     map[string]*vm
	mu      sync.Mutex
	flight  map[string]bool   // name: in flight
	bw      map[string]uint64 // name: bandwidth in force
	maxIn   int
	raises  int // limits events that raised a bandwidth
	samples int
	starts  []string
	events  []fleet.Event
}

func newWatcher(t *testing.T, lim fleet.Limits, vms []*vm) *watcher {
	w := &watcher{t: t, lim: lim, vms: map[string]*vm{}, flight: map[string]bool{}, bw: map[string]uint64{}}
	for _, v := range vms {
		w.vms[v.m.Name] = v
	}
	return w
}

func (w *watcher) observe(ev fleet.Event) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.events = append(w.events, ev)
	switch ev.Kind {
	case fleet.EventStart:
		w.flight[ev.Name] = true
		w.bw[ev.Name] = ev.Bandwidth
		w.starts = append(w.starts, ev.Name)
	case fleet.EventEngine:
		switch ev.Engine.Kind {
		case engine.EventLimits:
			if ev.Engine.Limits.Bandwidth > w.bw[ev.Name] {
				w.raises++
			}
			w.bw[ev.Name] = ev.Engine.Limits.Bandwidth
		case engine.EventResult:
			delete(w.flight, ev.Name)
			delete(w.bw, ev.Name)
		}
	}
	w.check()
}

// check asserts every limit now (w.mu held).
func (w *watcher) check() {
	t := w.t
	src, dst := map[string]int{}, map[string]int{}
	for name := range w.flight {
		src[w.vms[name].m.SourceHost]++
		dst[w.vms[name].m.DestinationHost]++
	}
	w.maxIn = max(w.maxIn, len(w.flight))
	if w.lim.MaxParallel > 0 {
		assert.LessOrEqual(t, len(w.flight), w.lim.MaxParallel, "in flight")
	}
	for h, n := range src {
		if w.lim.MaxPerSource > 0 {
			assert.LessOrEqual(t, n, w.lim.MaxPerSource, "outbound from %s", h)
		}
	}
	for h, n := range dst {
		if w.lim.MaxPerDestination > 0 {
			assert.LessOrEqual(t, n, w.lim.MaxPerDestination, "inbound to %s", h)
		}
	}
	sumEv := map[string]uint64{}
	for name, b := range w.bw {
		sumEv[w.vms[name].m.SourceHost] += b
	}
	for h, budget := range w.lim.HostBandwidth {
		assert.LessOrEqual(t, sumEv[h], budget, "bandwidth of %s's migrations (events)", h)
	}
}

// sample checks the QEMUs' own max-bandwidth every tick until ctx ends:
// for each source host, the sum over the pairs migrating now. (Not from
// the observer: it runs on an engine goroutine, and reading the fakes
// there could wait on a fake that waits on that goroutine.) Each sample
// is taken once every other goroutine of the bubble is blocked.
func (w *watcher) sample(ctx context.Context) {
	tk := time.NewTicker(5 * time.Millisecond)
	defer tk.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tk.C:
		}
		synctest.Wait()
		sum := map[string]uint64{}
		for _, v := range w.vms {
			if active(v.pair) {
				bw, _ := v.pair.Param(qemutest.Source, "max-bandwidth").(uint64)
				sum[v.m.SourceHost] += bw
			}
		}
		w.mu.Lock()
		w.samples++
		w.mu.Unlock()
		for h, budget := range w.lim.HostBandwidth {
			assert.LessOrEqual(w.t, sum[h], budget, "bandwidth of %s's migrations (the QEMUs' max-bandwidth)", h)
		}
	}
}

// Eight guests from two hosts to two: 3 in flight, 2 per host, and a
// bandwidth budget per source host. Every limit holds at every moment,
// from the events and from the QEMUs' max-bandwidth; the budget is split
// again when a migration ends (its neighbours' bandwidth goes up); all
// complete.
func TestLimitsHeldAndBandwidthResplit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		lim := fleet.Limits{MaxParallel: 3, MaxPerSource: 2, MaxPerDestination: 2,
			HostBandwidth: map[string]uint64{"a": 64 << 20, "b": 48 << 20}}
		var vms []*vm
		for i := range 8 {
			src, dst := "a", "c"
			if i%2 == 1 {
				src = "b"
			}
			if i%4 >= 2 {
				dst = "d"
			}
			vms = append(vms, newVM(t, fmt.Sprintf("vm%d", i), src, dst,
				qemutest.Options{RAM: uint64(32+8*i) << 20, Throughput: 1 << 30, DirtyRate: 2 << 20}))
		}
		w := newWatcher(t, lim, vms)
		ctx, stop := context.WithCancel(t.Context())
		go w.sample(ctx)
		rep, err := fleet.Run(t.Context(), fleet.Plan{Migrations: migrations(vms), Limits: lim, Observer: w.observe})
		stop()
		require.NoError(t, err)
		assert.Equal(t, 8, rep.Summary.Completed, "%+v", rep.Summary)
		for i, r := range rep.Results {
			assert.Equal(t, fleet.Completed, r.Outcome, r.Name)
			assert.Equal(t, 1, r.Attempts)
			assert.Positive(t, r.Bytes)
			assert.Equal(t, "running", vms[i].pair.DstRunState(), r.Name)
		}
		assert.Equal(t, 3, w.maxIn, "the fleet ran as many as its limits allowed")
		assert.Positive(t, w.raises, "a share went up when a neighbour ended")
		assert.Positive(t, rep.Summary.Bytes)
		assert.Greater(t, w.samples, 100, "the QEMUs were sampled throughout")
		// The plan's order, where the slots allowed it (vm0 and vm2
		// share a source host: either may get its share first).
		assert.ElementsMatch(t, []string{"vm0", "vm1", "vm2"}, w.starts[:3])
	})
}

// A destination killed mid-migration fails it with the guest on its
// source; the fleet retries it on the fresh destination the manager gives,
// and it completes there.
func TestRetryOnFreshDestination(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newVM(t, "a", "h1", "h2", qemutest.Options{RAM: 64 << 20, Throughput: 32 << 20})
		b := newVM(t, "b", "h1", "h2", qemutest.Options{RAM: 64 << 20, Throughput: 32 << 20})
		var once sync.Once
		var asked []int
		var mu sync.Mutex
		var events []fleet.Event
		plan := fleet.Plan{
			Migrations: migrations([]*vm{a, b}),
			Retries:    2,
			NewDestination: func(ctx context.Context, m fleet.Migration, attempt int) (fleet.Target, error) {
				require.Equal(t, "a", m.Name)
				asked = append(asked, attempt)
				a.pair.RestartDst()
				c, err := a.pair.Dst.Client(ctx)
				if err != nil {
					return fleet.Target{}, err
				}
				t.Cleanup(func() { c.Close() })
				return fleet.Target{Destination: engine.Endpoint{Client: c}, Host: "h3"}, nil
			},
			Observer: func(ev fleet.Event) {
				mu.Lock()
				events = append(events, ev)
				mu.Unlock()
				if ev.Name == "a" && ev.Kind == fleet.EventEngine && ev.Engine.Kind == engine.EventStats &&
					ev.Engine.Stats.TransferredBytes > 16<<20 {
					once.Do(a.pair.KillDst)
				}
			},
		}
		rep, err := fleet.Run(t.Context(), plan)
		require.NoError(t, err)
		require.Len(t, rep.Results, 2)
		ra := rep.Results[0]
		assert.Equal(t, fleet.Completed, ra.Outcome, "%v", ra.Err)
		assert.Equal(t, 2, ra.Attempts)
		assert.Equal(t, "h3", ra.DestinationHost)
		assert.Equal(t, []int{2}, asked)
		assert.Equal(t, "running", a.pair.DstRunState())
		assert.Equal(t, "postmigrate", a.pair.SrcRunState())
		assert.Greater(t, ra.Bytes, uint64(64<<20), "both attempts' bytes")
		assert.Equal(t, fleet.Completed, rep.Results[1].Outcome)
		assert.Equal(t, 1, rep.Results[1].Attempts)
		assert.Equal(t, 1, rep.Summary.Retries)
		var retried bool
		for _, ev := range events {
			if ev.Kind == fleet.EventRetry {
				retried = true
				assert.Equal(t, "a", ev.Name)
				assert.ErrorIs(t, ev.Err, engine.ErrDestinationGone)
			}
		}
		assert.True(t, retried, "a retry event")
	})
}

// Without retries left, a failed migration is reported failed with the
// guest on its source.
func TestFailedWithoutRetries(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newVM(t, "a", "h1", "h2", qemutest.Options{RAM: 64 << 20, FailWith: "boom"})
		rep, err := fleet.Run(t.Context(), fleet.Plan{Migrations: migrations([]*vm{a})})
		require.NoError(t, err)
		r := rep.Results[0]
		assert.Equal(t, fleet.Failed, r.Outcome)
		assert.ErrorIs(t, r.Err, engine.ErrMigrationFailed)
		assert.Equal(t, 1, rep.Summary.Failed)
		assert.Equal(t, "running", a.pair.SrcRunState())
	})
}

// Cancelling the fleet mid-way: nothing new starts, the running ones roll
// back, and every guest is on exactly one side, as its Result says.
func TestCancelMidFleet(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var vms []*vm
		for i := range 6 {
			vms = append(vms, newVM(t, fmt.Sprintf("vm%d", i), "a", "b",
				qemutest.Options{RAM: 64 << 20, Throughput: 32 << 20, DirtyRate: 1 << 20}))
		}
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		var once sync.Once
		rep, err := fleet.Run(ctx, fleet.Plan{Migrations: migrations(vms), Limits: fleet.Limits{MaxParallel: 2},
			Observer: func(ev fleet.Event) {
				// Once the first guest has moved, and the next ones are
				// under way: cancel.
				if ev.Kind == fleet.EventEnd && ev.Result.Outcome == fleet.Completed {
					go func() { time.Sleep(300 * time.Millisecond); once.Do(cancel) }()
				}
			}})
		require.NoError(t, err)
		s := rep.Summary
		assert.Positive(t, s.Completed)
		assert.Positive(t, s.RolledBack)
		assert.Positive(t, s.NotStarted)
		assert.Zero(t, s.Unknown)
		assert.Equal(t, 6, s.Completed+s.RolledBack+s.NotStarted)
		for i, r := range rep.Results {
			p := vms[i].pair
			switch r.Outcome {
			case fleet.Completed:
				assert.Equal(t, "running", p.DstRunState(), r.Name)
				assert.Equal(t, "postmigrate", p.SrcRunState(), r.Name)
			case fleet.RolledBack:
				assert.Equal(t, "running", p.SrcRunState(), r.Name)
				assert.NotEqual(t, "running", p.DstRunState(), r.Name)
				assert.ErrorIs(t, r.Err, engine.ErrCancelled)
			case fleet.NotStarted:
				assert.Equal(t, "running", p.SrcRunState(), r.Name)
				assert.Equal(t, "inmigrate", p.DstRunState(), r.Name)
				assert.Empty(t, p.Src.CallsOf("migrate"), r.Name)
				assert.Zero(t, r.Attempts)
			default:
				t.Errorf("%s: %s", r.Name, r.Outcome)
			}
		}
	})
}

// Priorities first, then the smallest guests (sizes read from the source
// QEMUs), one at a time.
func TestOrderPrioritySmallestFirst(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sizes := []uint64{96, 32, 64, 48}
		var vms []*vm
		for i, sz := range sizes {
			vms = append(vms, newVM(t, fmt.Sprintf("vm%d", i), "a", "b", qemutest.Options{RAM: sz << 20}))
		}
		vms[3].m.Priority = 1
		var starts []string
		plan := fleet.Plan{Migrations: migrations(vms), Limits: fleet.Limits{MaxParallel: 1}, SmallestFirst: true,
			Observer: func(ev fleet.Event) {
				if ev.Kind == fleet.EventStart {
					starts = append(starts, ev.Name)
				}
			}}
		rep, err := fleet.Run(t.Context(), plan)
		require.NoError(t, err)
		assert.Equal(t, 4, rep.Summary.Completed)
		assert.Equal(t, []string{"vm3", "vm1", "vm2", "vm0"}, starts)
		// Results stay in the plan's order.
		assert.Equal(t, "vm0", rep.Results[0].Name)
	})
}

// A bad plan names the migration and the field, and starts nothing.
func TestPlanErrors(t *testing.T) {
	ok := engine.Config{Source: engine.Endpoint{Address: qmp.UnixAddress("/s")}, Destination: engine.Endpoint{Address: qmp.UnixAddress("/d")}, URI: "unix:/m"}
	cases := []struct {
		plan  fleet.Plan
		index int
		field string
	}{
		{fleet.Plan{Migrations: []fleet.Migration{{Config: ok}}}, 0, "Name"},
		{fleet.Plan{Migrations: []fleet.Migration{{Name: "x", Config: ok}, {Name: "x", Config: ok}}}, 1, "Name"},
		{fleet.Plan{Migrations: []fleet.Migration{{Name: "x", Config: ok}}, Limits: fleet.Limits{MaxPerSource: 1}}, 0, "SourceHost"},
		{fleet.Plan{Migrations: []fleet.Migration{{Name: "x", SourceHost: "a", Config: ok}}, Limits: fleet.Limits{MaxPerDestination: 1}}, 0, "DestinationHost"},
		{fleet.Plan{Migrations: []fleet.Migration{{Name: "x", Config: engine.Config{URI: "unix:/m"}}}}, 0, "Config"},
		{fleet.Plan{Migrations: []fleet.Migration{{Name: "x", SourceHost: "a", Config: ok}}, Limits: fleet.Limits{HostBandwidth: map[string]uint64{"b": 1}}}, -1, "Limits.HostBandwidth"},
		{fleet.Plan{Migrations: []fleet.Migration{{Name: "x", Config: ok}}, Retries: 1}, -1, "Retries"},
	}
	for _, c := range cases {
		_, err := fleet.Run(t.Context(), c.plan)
		var pe *fleet.PlanError
		require.ErrorAs(t, err, &pe)
		assert.ErrorIs(t, err, fleet.ErrInvalidPlan)
		assert.Equal(t, c.index, pe.Index, err.Error())
		assert.Equal(t, c.field, pe.Field, err.Error())
	}
}

// A guest lost in postcopy (its destination died) is never retried, even
// with retries left and a fresh destination at hand, and its Result comes
// first.
func TestUnknownStateNotRetriedReportedFirst(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ok := newVM(t, "ok", "h1", "h2", qemutest.Options{RAM: 64 << 20})
		lost := newVM(t, "lost", "h1", "h2", qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20, PostcopyRate: 10 << 20})
		lost.m.Config.Strategy.Limits.Budget = 3 * time.Second
		lost.m.Config.Strategy.Limits.AllowPostcopy = true
		var once sync.Once
		asked := 0
		rep, err := fleet.Run(t.Context(), fleet.Plan{
			Migrations: migrations([]*vm{ok, lost}),
			Retries:    3,
			NewDestination: func(context.Context, fleet.Migration, int) (fleet.Target, error) {
				asked++
				return fleet.Target{}, fmt.Errorf("not expected")
			},
			Observer: func(ev fleet.Event) {
				if ev.Name == "lost" && ev.Kind == fleet.EventEngine && ev.Engine.Kind == engine.EventStats &&
					ev.Engine.Stats.Status == string(qmp.StatusPostcopyActive) {
					once.Do(func() { go lost.pair.KillDst() })
				}
			},
		})
		require.NoError(t, err)
		assert.Zero(t, asked, "no retry of a lost guest")
		r := rep.Results[0]
		assert.Equal(t, "lost", r.Name)
		assert.Equal(t, fleet.Unknown, r.Outcome)
		assert.ErrorIs(t, r.Err, engine.ErrPostcopyFailed)
		assert.Equal(t, 1, r.Attempts)
		assert.Equal(t, fleet.Completed, rep.Results[1].Outcome)
		assert.Equal(t, 1, rep.Summary.Unknown)
		assert.Equal(t, 1, rep.Summary.Completed)
	})
}

// The in-process limiter takes every slot or none, and gives it back once.
func TestLocalLimiter(t *testing.T) {
	l := fleet.NewLimiter(fleet.Limits{MaxParallel: 3, MaxPerSource: 2, MaxPerDestination: 2})
	ctx := t.Context()
	r1, err := l.TryAcquire(ctx, fleet.Slot{Name: "1", Source: "a", Destination: "x"})
	require.NoError(t, err)
	require.NotNil(t, r1)
	r2, _ := l.TryAcquire(ctx, fleet.Slot{Name: "2", Source: "a", Destination: "y"})
	require.NotNil(t, r2)
	r3, _ := l.TryAcquire(ctx, fleet.Slot{Name: "3", Source: "a", Destination: "z"})
	assert.Nil(t, r3, "source a full")
	r4, _ := l.TryAcquire(ctx, fleet.Slot{Name: "4", Source: "b", Destination: "x"})
	require.NotNil(t, r4)
	r5, _ := l.TryAcquire(ctx, fleet.Slot{Name: "5", Source: "c", Destination: "z"})
	assert.Nil(t, r5, "3 in flight")
	assert.Equal(t, 3, l.InFlight())
	freed := l.Freed()
	r1()
	r1() // twice: once
	select {
	case <-freed:
	default:
		t.Fatal("Freed not signalled")
	}
	assert.Equal(t, 2, l.InFlight())
	r6, _ := l.TryAcquire(ctx, fleet.Slot{Name: "6", Source: "b", Destination: "x"})
	require.NotNil(t, r6, "room again in flight, from b and to x")
	r7, _ := l.TryAcquire(ctx, fleet.Slot{Name: "7", Source: "c", Destination: "x"})
	assert.Nil(t, r7, "destination x full")
	r2()
	r8, _ := l.TryAcquire(ctx, fleet.Slot{Name: "8", Source: "c", Destination: "x"})
	assert.Nil(t, r8, "destination x still full")
	r9, _ := l.TryAcquire(ctx, fleet.Slot{Name: "9", Source: "a", Destination: "y"})
	assert.NotNil(t, r9)
}

// A migration still starting (mirroring its disk inside engine.Start)
// keeps the share it started with; when a neighbour ends, the others are
// raised only as far as the budget allows with that share counted, never
// to a sum above the budget. Once it runs, it is split like the others.
func TestBandwidthStartingShareCounted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		lim := fleet.Limits{HostBandwidth: map[string]uint64{"h": 64 << 20}}
		a := newVM(t, "a", "h", "x", qemutest.Options{RAM: 32 << 20})
		s := newVM(t, "s", "h", "x", qemutest.Options{RAM: 32 << 20, Disk: 64 << 20, MirrorRate: 16 << 20})
		s.m.Config.Storage = &blockmirror.Config{}
		d := newVM(t, "d", "h", "x", qemutest.Options{RAM: 256 << 20})
		e := newVM(t, "e", "h", "x", qemutest.Options{RAM: 256 << 20})
		vms := []*vm{a, s, d, e}
		w := newWatcher(t, lim, vms)
		ctx, stop := context.WithCancel(t.Context())
		go w.sample(ctx)
		rep, err := fleet.Run(t.Context(), fleet.Plan{Migrations: migrations(vms), Limits: lim, Observer: w.observe})
		stop()
		require.NoError(t, err)
		assert.Equal(t, 4, rep.Summary.Completed, "%+v", rep.Results)
		assert.Positive(t, w.raises)
	})
}
