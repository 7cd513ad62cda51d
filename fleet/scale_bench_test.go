package fleet_test

import (
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/fleet"
	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp"
)

// The scale benchmark: many concurrent migrations against fake QEMUs, to
// measure the engine and the fleet themselves (no QEMU, no byte moved).
// Each fake guest has scaleRAM of RAM sent at scaleRate, so a migration
// lasts about scaleRAM/scaleRate; the fakes step their model every
// scaleTick, a tenth of the default rate, to keep them cheap.
//
// The fakes run in the same process, so their cost is measured apart: the
// same number of pairs migrated by a bare driver (migrate-incoming,
// migrate, wait for the MIGRATION event: the fakes' own work and the
// least a QMP client must do) and subtracted.
//
//	go test -run '^$' -bench BenchmarkScale -benchtime 1x ./fleet/
//
// QMIGRATE_SCALE_N changes the number of migrations (1000).
const (
	scaleRAM  = 32 << 20
	scaleRate = 4 << 20
	scaleTick = 100 * time.Millisecond
)

func scaleN(b *testing.B) int {
	n := 1000
	if s := os.Getenv("QMIGRATE_SCALE_N"); s != "" {
		v, err := strconv.Atoi(s)
		require.NoError(b, err)
		n = v
	}
	return n
}

// scalePairs starts n fake pairs and their clients.
func scalePairs(b *testing.B, n int) (clients [][2]*qmp.Client, closeAll func()) {
	pairs := make([]*qemutest.Pair, n)
	clients = make([][2]*qmp.Client, n)
	for i := range pairs {
		p := qemutest.New(qemutest.Options{RAM: scaleRAM, Throughput: scaleRate, Tick: scaleTick})
		src, dst, err := p.Clients(b.Context())
		require.NoError(b, err)
		pairs[i], clients[i] = p, [2]*qmp.Client{src, dst}
	}
	var once sync.Once
	closeAll = func() {
		once.Do(func() {
			for i, p := range pairs {
				clients[i][0].Close()
				clients[i][1].Close()
				p.Close()
			}
		})
	}
	b.Cleanup(closeAll)
	return clients, closeAll
}

// usage is the process's resources at one moment.
type usage struct {
	cpu        time.Duration // user + system
	heap, rss  uint64        // HeapInuse (live objects and garbage not yet collected), VmRSS
	alloc      uint64        // HeapAlloc
	goroutines int
}

func now() usage {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return usage{
		cpu:        time.Duration(ru.Utime.Nano() + ru.Stime.Nano()),
		heap:       ms.HeapInuse,
		alloc:      ms.HeapAlloc,
		rss:        rss(),
		goroutines: runtime.NumGoroutine(),
	}
}

// rss reads the resident set from /proc/self/statm.
func rss() uint64 {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0
	}
	pages, _ := strconv.ParseUint(f[1], 10, 64)
	return pages * uint64(os.Getpagesize())
}

// peak samples the usage while all n migrations run (running() true)
// until stop is closed.
type peak struct {
	mu      sync.Mutex
	samples []usage
	live    uint64 // HeapAlloc right after a GC at the fourth sample: the live heap
}

func (pk *peak) sample(stop <-chan struct{}, running func() bool) {
	tk := time.NewTicker(250 * time.Millisecond)
	defer tk.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tk.C:
		}
		if !running() {
			continue
		}
		u := now()
		pk.mu.Lock()
		if len(pk.samples) == 3 {
			runtime.GC()
			pk.live = now().alloc
		}
		pk.samples = append(pk.samples, u)
		pk.mu.Unlock()
	}
}

// stat is the median and the highest of one figure over the samples.
func stat(samples []usage, f func(usage) float64) (median, highest float64) {
	v := make([]float64, len(samples))
	for i, u := range samples {
		v[i] = f(u)
	}
	slices.Sort(v)
	return v[len(v)/2], v[len(v)-1]
}

// scaleRun is one measured run: CPU over the run, the migrations' summed
// durations, and the peak usage while all ran, minus the usage before.
type scaleRun struct {
	cpu                time.Duration
	migSeconds         float64
	heap, rss          float64 // bytes per running migration, median of the samples
	goroutines         float64 // per running migration, median
	heapMax, rssMax    float64 // the highest sample
	live               float64 // live heap per running migration (after a GC)
	goroutinesMax      float64
	samples, completed int
}

func measure(b *testing.B, n int, run func(running *atomic.Int64) (migSeconds float64, completed int)) scaleRun {
	runtime.GC()
	before := now()
	var running atomic.Int64
	pk := &peak{}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { pk.sample(stop, func() bool { return running.Load() == int64(n) }); close(done) }()
	migSeconds, completed := run(&running)
	after := now()
	close(stop)
	<-done
	require.NotEmpty(b, pk.samples, "no sample with all %d migrations running", n)
	r := scaleRun{cpu: after.cpu - before.cpu, migSeconds: migSeconds, samples: len(pk.samples), completed: completed}
	r.live = (float64(pk.live) - float64(before.alloc)) / float64(n)
	r.heap, r.heapMax = stat(pk.samples, func(u usage) float64 { return (float64(u.heap) - float64(before.heap)) / float64(n) })
	r.rss, r.rssMax = stat(pk.samples, func(u usage) float64 { return (float64(u.rss) - float64(before.rss)) / float64(n) })
	r.goroutines, r.goroutinesMax = stat(pk.samples, func(u usage) float64 {
		return float64(u.goroutines-before.goroutines) / float64(n)
	})
	return r
}

// bare migrates every pair with the least QMP: the fakes' own cost.
func bare(b *testing.B, clients [][2]*qmp.Client) scaleRun {
	ctx := b.Context()
	return measure(b, len(clients), func(running *atomic.Int64) (float64, int) {
		var wg sync.WaitGroup
		var mu sync.Mutex
		var total time.Duration
		completed := 0
		for i, c := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				src, dst := c[0], c[1]
				uri := fmt.Sprintf("unix:/bench/%d.sock", i)
				sub := src.SubscribeNames("MIGRATION")
				defer sub.Close()
				caps := map[string]any{"capabilities": []map[string]any{{"capability": "events", "state": true}}}
				if err := src.Execute(ctx, "migrate-set-capabilities", caps, nil); err != nil {
					b.Error(err)
					return
				}
				start := time.Now()
				if err := dst.Execute(ctx, "migrate-incoming", map[string]any{"uri": uri}, nil); err != nil {
					b.Error(err)
					return
				}
				if err := src.Execute(ctx, "migrate", map[string]any{"uri": uri}, nil); err != nil {
					b.Error(err)
					return
				}
				running.Add(1)
				defer running.Add(-1)
				for ev := range sub.C {
					s := qmp.MigrationStatus(ev.Field("status"))
					if s.Terminal() {
						mu.Lock()
						total += time.Since(start)
						if s == qmp.StatusCompleted {
							completed++
						}
						mu.Unlock()
						return
					}
				}
			}()
		}
		wg.Wait()
		return total.Seconds(), completed
	})
}

// viaFleet migrates every pair with fleet.Run, no limits: every
// migration an engine job at once.
func viaFleet(b *testing.B, clients [][2]*qmp.Client) scaleRun {
	plan := fleet.Plan{}
	for i, c := range clients {
		plan.Migrations = append(plan.Migrations, fleet.Migration{
			Name: fmt.Sprintf("vm%d", i),
			Config: engine.Config{
				Source:      engine.Endpoint{Client: c[0]},
				Destination: engine.Endpoint{Client: c[1]},
				URI:         fmt.Sprintf("unix:/bench/%d.sock", i),
			},
		})
	}
	return measure(b, len(clients), func(running *atomic.Int64) (float64, int) {
		plan.Observer = func(ev fleet.Event) {
			switch {
			case ev.Kind == fleet.EventStart:
				running.Add(1)
			case ev.Kind == fleet.EventEngine && ev.Engine.Kind == engine.EventResult:
				running.Add(-1)
			}
		}
		rep, err := fleet.Run(b.Context(), plan)
		require.NoError(b, err)
		var total time.Duration
		for _, r := range rep.Results {
			total += r.Time
		}
		return total.Seconds(), rep.Summary.Completed
	})
}

// BenchmarkScale runs N migrations at once through fleet.Run (engine
// jobs) against fake pairs, and the same N fake pairs migrated by a bare
// driver; it reports the fleet's figures with the bare run's subtracted:
// CPU (in % of a core) per second of migration, and heap, RSS and
// goroutines per running migration: the live heap after a GC once all N
// run, and HeapInuse (garbage not yet collected included), RSS and
// goroutines as the median of the samples taken while all N ran and the
// highest.
func BenchmarkScale(b *testing.B) {
	n := scaleN(b)
	for b.Loop() {
		// The fleet first: memory the bare run freed could otherwise
		// be reused by the fleet's and hide part of its growth (the bare
		// run's growth may be the one understated: the fleet's net
		// figures then err high).
		fc, closeFleet := scalePairs(b, n)
		fl := viaFleet(b, fc)
		require.Equal(b, n, fl.completed, "fleet run")
		closeFleet()
		runtime.GC()
		debug.FreeOSMemory()
		bc, closeBare := scalePairs(b, n)
		base := bare(b, bc)
		require.Equal(b, n, base.completed, "bare run")
		closeBare()

		baseCore := base.cpu.Seconds() / base.migSeconds
		fleetCore := fl.cpu.Seconds() / fl.migSeconds
		b.ReportMetric(100*fleetCore, "%core/mig-total")
		b.ReportMetric(100*baseCore, "%core/mig-fakes")
		b.ReportMetric(100*(fleetCore-baseCore), "%core/mig")
		b.ReportMetric((fl.live-base.live)/(1<<10), "KiB-live-heap/mig")
		b.ReportMetric((fl.heap-base.heap)/(1<<10), "KiB-heap/mig")
		b.ReportMetric((fl.rss-base.rss)/(1<<10), "KiB-RSS/mig")
		b.ReportMetric(fl.goroutines-base.goroutines, "goroutines/mig")
		b.ReportMetric((fl.heapMax-base.heapMax)/(1<<10), "KiB-heap/mig-peak")
		b.ReportMetric((fl.rssMax-base.rssMax)/(1<<10), "KiB-RSS/mig-peak")
		b.ReportMetric(fl.goroutinesMax-base.goroutinesMax, "goroutines/mig-peak")
		b.ReportMetric(fl.migSeconds/float64(n), "s/mig")
		for _, r := range []struct {
			name string
			r    scaleRun
		}{{"fleet", fl}, {"bare", base}} {
			b.Logf("n=%d %s: cpu %v over %.0f migration-seconds; per running migration: live heap %+.0f KiB (after a GC), median/highest of %d samples: heap in use %+.0f/%+.0f KiB, rss %+.0f/%+.0f KiB, goroutines %+.1f/%+.1f",
				n, r.name, r.r.cpu, r.r.migSeconds, r.r.live/1024, r.r.samples, r.r.heap/1024, r.r.heapMax/1024, r.r.rss/1024, r.r.rssMax/1024, r.r.goroutines, r.r.goroutinesMax)
		}
	}
}
