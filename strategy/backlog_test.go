package strategy_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/strategy"
)

// diskRun is a storage migration: a mirror phase of 3 s copying a 128 MiB
// disk at 48 MiB/s (READY at ~2.7 s), then from 3.2 s a RAM migration that
// converges on its own (peaks halving every 1 s iteration at 256 MiB/s,
// 16 MiB last: fits the 100 ms limit) while the guest writes wr bytes/s of
// new disk data against mirrors that copy at most cp bytes/s. The backlog is
// capped at the 128 MiB disk (reached at once from 1 GiB/s); a mirror that keeps up shows a small saw-tooth
// (0, 256, 512 KiB) of requests in flight.
func diskRun(wr, cp float64) []strategy.Sample {
	out := mirrorTrace(3*sec, 128*MiB, 0, 48*MiB)
	t0 := 3200 * ms
	bw := 256.0 * MiB
	peaks := []uint64{1024 * MiB, 512 * MiB, 256 * MiB, 128 * MiB, 64 * MiB, 32 * MiB, 16 * MiB}
	done0 := 128.0 * MiB
	for i, s := range saw(t0, sec, 1, peaks, bw/2, bw, 2*GiB) {
		dt := (s.Elapsed - t0).Seconds()
		var backlog, done float64
		if wr > cp {
			backlog = min((wr-cp)*dt, 128*MiB)
			if wr >= GiB {
				backlog = 128 * MiB // the whole disk dirtied at once
			}
			done = done0 + cp*dt
		} else {
			backlog = float64(i%3) * 256 * 1024
			done = done0 + wr*dt
		}
		s.StorageRemaining, s.StorageTotal = uint64(backlog), uint64(done+backlog)
		out = append(out, s)
	}
	return out
}

// runDisk feeds the samples and returns every decision.
func runDisk(t *testing.T, cfg strategy.Config, st strategy.Storage, samples []strategy.Sample) []strategy.Decision {
	t.Helper()
	return runStorage(t, cfg, st, samples, false)
}

// runStorage feeds the samples to a Machine with storage st and returns
// every decision; each non-wait one is applied, a MirrorWriteBlocking one
// failing when fail is set.
func runStorage(t *testing.T, cfg strategy.Config, st strategy.Storage, samples []strategy.Sample, fail bool) []strategy.Decision {
	t.Helper()
	m, err := strategy.New(cfg)
	require.NoError(t, err)
	m.SetStorage(st)
	m.Setup()
	var out []strategy.Decision
	for _, s := range samples {
		d := m.Step(s)
		out = append(out, d)
		if d.Action == strategy.Wait {
			continue
		}
		var aerr error
		if fail && d.Action == strategy.MirrorWriteBlocking {
			aerr = errors.New("block-job-change: unsupported")
		}
		m.Applied(d, aerr)
	}
	return out
}

func nonWait(ds []strategy.Decision) []strategy.Decision {
	var out []strategy.Decision
	for _, d := range ds {
		if d.Action != strategy.Wait {
			out = append(out, d)
		}
	}
	return out
}

// reasons joins the wait reasons of the RAM phase.
func reasons(ds []strategy.Decision, from time.Duration) string {
	var b strings.Builder
	for _, d := range ds {
		if d.At >= from {
			b.WriteString(d.Reason + "\n")
		}
	}
	return b.String()
}

// After READY the writer outpaces the mirrors (64 vs 48 MiB/s): the backlog
// grows 16 MiB/s, RAM alone converges. auto switches the mirrors to
// write-blocking once, one MirrorWindow into the RAM phase, with the numbers.
func TestBacklogGrowingSwitches(t *testing.T) {
	ds := nonWait(runDisk(t, strategy.Config{}, canSwitch, diskRun(64*MiB, 48*MiB)))
	require.Equal(t, []strategy.Action{strategy.MirrorWriteBlocking}, actions(ds))
	d := ds[0]
	assert.Equal(t, 6200*ms, d.At, "one MirrorWindow after the first RAM sample")
	assert.Contains(t, d.Reason, "RAM phase")
	assert.Contains(t, d.Reason, "growing 16.0 MiB/s")
	assert.Contains(t, d.Reason, "beyond the 200ms the 100ms downtime limit leaves of the 300ms maximum")
	t.Log(d.Reason)
}

// A saturated backlog (the writer dirtied the whole disk, the backlog is flat
// at 128 MiB) does not fit either: a switch, although nothing grows.
func TestBacklogSaturatedSwitches(t *testing.T) {
	ds := nonWait(runDisk(t, strategy.Config{}, canSwitch, diskRun(2048*MiB, 48*MiB)))
	require.Equal(t, []strategy.Action{strategy.MirrorWriteBlocking}, actions(ds))
	assert.Contains(t, ds[0].Reason, "disk backlog 128.0 MiB (steady")
}

// A writer the mirrors keep up with (8 of 48 MiB/s) leaves a small steady
// backlog: no switch, and the RAM is judged converging as usual.
func TestBacklogSteadySmallNoSwitch(t *testing.T) {
	all := runDisk(t, strategy.Config{}, canSwitch, diskRun(8*MiB, 48*MiB))
	assert.Empty(t, nonWait(all))
	r := reasons(all, 3200*ms)
	assert.Contains(t, r, "converging, the next switchover fits")
	assert.NotContains(t, r, "disk backlog")
}

// Without block-job-change (7.2), with write-blocking refused, or started
// write-blocking: never a switch. RAM convergence is then not reported as a
// switchover that fits: the reason names the backlog and why it stays.
func TestBacklogNoSwitch(t *testing.T) {
	for _, tt := range []struct {
		name string
		cfg  strategy.Config
		st   strategy.Storage
		why  string
	}{
		{"7.2", strategy.Config{}, strategy.Storage{Disks: true}, "block-job-change needs 8.2"},
		{"refused", strategy.Config{Limits: strategy.Limits{NoWriteBlocking: true}}, canSwitch, "refused by the user"},
		{"from the start", strategy.Config{}, strategy.Storage{Disks: true, CanSwitch: true, WriteBlocking: true}, "write-blocking from the start"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			all := runDisk(t, tt.cfg, tt.st, diskRun(64*MiB, 48*MiB))
			assert.Empty(t, nonWait(all), "no decision: the RAM converges and no storage lever is left")
			r := reasons(all, 6200*ms)
			assert.Contains(t, r, "RAM converging")
			assert.Contains(t, r, "disk backlog")
			assert.Contains(t, r, tt.why)
			assert.Contains(t, r, "the switchover will drain it")
			assert.NotContains(t, r, "auto: converging")
		})
	}
}

// A switch that failed is not tried again, in the RAM phase or after one in
// the mirror phase; the presets never switch.
func TestBacklogAtMostOnce(t *testing.T) {
	m, err := strategy.New(strategy.Config{})
	require.NoError(t, err)
	m.SetStorage(canSwitch)
	m.Setup()
	var n int
	for _, s := range diskRun(64*MiB, 48*MiB) {
		if d := m.Step(s); d.Action == strategy.MirrorWriteBlocking {
			n++
			m.Applied(d, assert.AnError)
		}
	}
	assert.Equal(t, 1, n)

	// A mirror phase that needed the switch, then a growing backlog.
	trace := append(mirrorTrace(3*sec, 64*MiB, 30*MiB, 8*MiB), diskRun(64*MiB, 48*MiB)[16:]...)
	ds := nonWait(runDisk(t, strategy.Config{}, canSwitch, trace))
	assert.Equal(t, []strategy.Action{strategy.MirrorWriteBlocking}, actions(ds))
	assert.True(t, ds[0].At <= 3*sec, "switched in the mirror phase")

	for _, pol := range []string{strategy.PolicyQEMU, strategy.PolicyKubeVirt, strategy.PolicyNova, strategy.PolicyProxmox} {
		assert.Empty(t, nonWait(runDisk(t, strategy.Config{Policy: pol}, canSwitch, diskRun(64*MiB, 48*MiB))), pol)
	}
}

// Never in postcopy or after a pause: the guest no longer writes on the
// source.
func TestBacklogNotWhileFinishing(t *testing.T) {
	for _, s := range []func(*strategy.Sample){
		func(s *strategy.Sample) { s.SourcePaused = true },
		func(s *strategy.Sample) { s.Status = "postcopy-active" },
		func(s *strategy.Sample) { s.Status = "pre-switchover" },
	} {
		trace := diskRun(64*MiB, 48*MiB)
		for i := range trace {
			if !trace[i].Mirroring && trace[i].Elapsed >= 5*sec {
				s(&trace[i])
			}
		}
		assert.NotContains(t, actions(nonWait(runDisk(t, strategy.Config{Limits: strategy.Limits{AllowPause: true}}, canSwitch, trace))),
			strategy.MirrorWriteBlocking)
	}
}

// A restart (no block-job-change) is a mirror-phase lever only: after READY
// a growing backlog gets no write-blocking decision.
func TestBacklogNoRestartAfterReady(t *testing.T) {
	ds := nonWait(runDisk(t, strategy.Config{}, strategy.Storage{Disks: true, CanRestart: true}, diskRun(64*MiB, 48*MiB)))
	assert.NotContains(t, actions(ds), strategy.MirrorWriteBlocking)
}
