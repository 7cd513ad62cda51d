package integration

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/fleet"
	"github.com/qmigrate/qmigrate/internal/guest/sweep"
	"github.com/qmigrate/qmigrate/internal/qemulab"
)

// BenchmarkFleet32 moves 32 small guests from one host to another of a
// testbed network over one tbf-shaped link, in this process, under
// presets (the "node" is the source host; all 32 guests are on one):
//
//   - "fleet": all 32 at once, the link's rate B as the source host's
//     bandwidth budget, split among the running migrations and re-split
//     as they end;
//   - "fleet-5/2": KubeVirt's counts (5 in flight, 2 outbound per node)
//     and the budget B, split and re-split;
//   - "kubevirt": KubeVirt's defaults (5 in flight, 2 outbound per node,
//     bandwidthPerMigration unset: each migration unlimited, the link
//     shared by TCP, nothing rebalanced);
//   - "kubevirt-capped": the same counts with a static bandwidthPerMigration
//     of B/5, what keeps 5 migrations within B without rebalancing;
//   - "sequential": one after another, at B.
//
// Each guest is a sweep guest that made one full pass over its 99 MiB
// (every page holds data) and was then paused: 32 running TCG guests would
// make the 2 cores, not the link, the bottleneck, and a paused guest's
// migration is one pass, so the figures measure the scheduling and the
// link. The guests go from host A to host B with the first preset, back
// with the second, and so on.
//
// Figures per preset: the makespan; the link busy ratio, the RAM bytes
// QEMU sent (ram transferred, all migrations) over the link's rate,
// divided by the makespan (the payload's ceiling is about 96 %: TCP/IP
// headers); this process's CPU time per migration (utime+stime from
// /proc/self/stat) and its peak RSS (VmRSS sampled every 100 ms).
//
//	QMIGRATE_BENCH_FLEET=1 go test -run '^$' -bench BenchmarkFleet32 -benchtime 1x -timeout 30m ./integration/
//
// Not in CI: it needs 64 QEMUs at a time and about 5 minutes.
func BenchmarkFleet32(b *testing.B) {
	if os.Getenv("QMIGRATE_BENCH_FLEET") == "" {
		b.Skip("set QMIGRATE_BENCH_FLEET=1 to run (64 QEMUs, minutes)")
	}
	const (
		guests = 32
		link   = 128 << 20
	)
	q := qemulab.RequireQEMU(b)
	v, err := q.Version(b.Context())
	require.NoError(b, err)
	n := qemulab.NewNetworkT(b, link)
	g := qemulab.NewSweepGuest(sweep.UnthrottledRate)

	// The guests, each filled by one pass and paused.
	cur := make([]*qemulab.Instance, guests)
	for i := range cur {
		src := qemulab.StartT(b, q, qemulab.Config{Name: fmt.Sprintf("g%d", i), Guest: g, MemMiB: fleetMemMiB, Netns: n.A.Netns})
		ctx, cancel := context.WithTimeout(b.Context(), 2*time.Minute)
		_, err := src.CountSerial(ctx, sweep.StartChar, sweep.PassChar, 1)
		if err == nil {
			err = src.QMP.Stop(ctx)
		}
		cancel()
		require.NoError(b, err, "guest %d", i)
		cur[i] = src
	}
	from, to := n.A, n.B

	type preset struct {
		name string
		lim  fleet.Limits
		cap  uint64 // each migration's own bandwidth (0: unlimited)
	}
	budget := map[string]uint64{"src": link}
	presets := []preset{
		{"fleet", fleet.Limits{HostBandwidth: budget}, 0},
		{"fleet-5/2", fleet.Limits{MaxParallel: 5, MaxPerSource: 2, HostBandwidth: budget}, 0},
		{"kubevirt", fleet.Limits{MaxParallel: 5, MaxPerSource: 2}, 0},
		{"kubevirt-capped", fleet.Limits{MaxParallel: 5, MaxPerSource: 2}, link / 5},
		{"sequential", fleet.Limits{MaxParallel: 1}, link},
	}
	makespan := map[string]float64{}
	for b.Loop() {
		for round, p := range presets {
			plan := fleet.Plan{Limits: p.lim}
			dsts := make([]*qemulab.Instance, guests)
			for i := range dsts {
				dsts[i] = qemulab.StartT(b, q, qemulab.Config{Name: fmt.Sprintf("g%d-%d", i, round), Guest: g,
					MemMiB: fleetMemMiB, Incoming: true, Netns: to.Netns})
				plan.Migrations = append(plan.Migrations, fleet.Migration{
					Name: fmt.Sprintf("g%d", i), SourceHost: "src", DestinationHost: "dst",
					Config: engine.Config{
						Source:      engine.Endpoint{Client: cur[i].QMP},
						Destination: engine.Endpoint{Client: dsts[i].QMP},
						URI:         fmt.Sprintf("tcp:%s:%d", to.Addr, 48000+100*round+i),
						Bandwidth:   p.cap,
					},
				})
			}
			load0 := loadavg()
			cpu0 := procCPU(b)
			stop := make(chan struct{})
			var peak uint64
			var wg sync.WaitGroup
			wg.Go(func() { peak = peakRSS(stop) })
			ctx, cancel := context.WithTimeout(b.Context(), 10*time.Minute)
			rep, err := fleet.Run(ctx, plan)
			cancel()
			cpu := procCPU(b) - cpu0
			close(stop)
			wg.Wait()
			load1 := loadavg()
			require.NoError(b, err)
			require.Equal(b, guests, rep.Summary.Completed, "%s: %+v", p.name, rep.Summary)

			span := rep.Summary.Total.Seconds()
			busy := float64(rep.Summary.Bytes) / link / span
			makespan[p.name] = span
			b.ReportMetric(span, p.name+"-makespan-s")
			b.ReportMetric(100*busy, p.name+"-link-busy-%")
			b.ReportMetric(float64(cpu.Milliseconds())/guests, p.name+"-cpu-ms/mig")
			b.ReportMetric(float64(peak)/(1<<20), p.name+"-RSS-MiB")
			b.Logf("QEMU %s, %s: %d migrations %+v cap %d MiB/s, makespan %.1f s, %.0f MiB sent over a %d MiB/s link: busy %.1f %%; "+
				"this process: CPU %v (%.1f ms per migration), peak RSS %.1f MiB; load average %s -> %s",
				v, p.name, guests, p.lim, p.cap>>20, span, float64(rep.Summary.Bytes)/(1<<20), link>>20, 100*busy,
				cpu, float64(cpu.Milliseconds())/guests, float64(peak)/(1<<20), load0, load1)

			// The guests now live on the destinations (paused, as their
			// sources were); the spent sources go.
			for i := range cur {
				require.NoError(b, cur[i].Close())
				cur[i] = dsts[i]
			}
			from, to = to, from
		}
	}
	for _, p := range presets[1:] {
		b.ReportMetric(makespan[p.name]/makespan["fleet"], p.name+"/fleet")
	}
}

// procCPU is this process's user+system CPU time from /proc/self/stat.
func procCPU(b *testing.B) time.Duration {
	data, err := os.ReadFile("/proc/self/stat")
	require.NoError(b, err)
	// The fields after the command name (in parentheses, may hold spaces).
	f := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+2:]))
	// utime and stime are fields 14 and 15 of stat(5), 12 and 13 here.
	ut, err := strconv.ParseUint(f[11], 10, 64)
	require.NoError(b, err)
	st, err := strconv.ParseUint(f[12], 10, 64)
	require.NoError(b, err)
	const hz = 100 // USER_HZ
	return time.Duration(ut+st) * time.Second / hz
}

// peakRSS samples this process's VmRSS every 100 ms until stop closes and
// returns the highest, in bytes.
func peakRSS(stop <-chan struct{}) uint64 {
	var peak uint64
	tk := time.NewTicker(100 * time.Millisecond)
	defer tk.Stop()
	for {
		if data, err := os.ReadFile("/proc/self/status"); err == nil {
			for _, l := range strings.Split(string(data), "\n") {
				if rest, ok := strings.CutPrefix(l, "VmRSS:"); ok {
					if f := strings.Fields(rest); len(f) > 0 {
						kb, _ := strconv.ParseUint(f[0], 10, 64)
						peak = max(peak, kb<<10)
					}
				}
			}
		}
		select {
		case <-stop:
			return peak
		case <-tk.C:
		}
	}
}

// loadavg is the machine's 1, 5 and 15 minute load averages.
func loadavg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}
