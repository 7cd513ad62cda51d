package strategy_test

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/strategy"
)

// loadTrace reads a recorded query-migrate trace (see testdata).
func loadTrace(t *testing.T, path string) []strategy.Sample {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	var out []strategy.Sample
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		c := strings.Split(line, ",")
		require.Len(t, c, 10, line)
		n := func(i int) uint64 { v, err := strconv.ParseUint(c[i], 10, 64); require.NoError(t, err); return v }
		fl := func(i int) float64 { v, err := strconv.ParseFloat(c[i], 64); require.NoError(t, err); return v }
		out = append(out, strategy.Sample{
			Elapsed: time.Duration(n(0)) * ms, Status: c[1], Iteration: n(2), RemainingBytes: n(3),
			TransferredBytes: n(4), TotalBytes: n(5), DirtyRate: fl(6), Throughput: fl(7),
			ThrottlePercent: int(n(8)), DowntimeLimit: time.Duration(n(9)) * ms,
		})
	}
	require.NotEmpty(t, out)
	return out
}

// TestReplayRealSweep replays 8 s of a real non-converging migration (open
// loop: the trace does not react to the decisions). auto must see it within
// the first iterations and pick the lever the limits allow.
func TestReplayRealSweep(t *testing.T) {
	trace := loadTrace(t, "testdata/sweep-qemu10-256MiBps.csv")
	// QEMU syncs whenever remaining falls to the threshold, so iterations
	// are cheap here (6 by 1 s): the bound that matters is time.
	first := func(cfg strategy.Config) (strategy.Decision, uint64) {
		m, err := strategy.New(cfg)
		require.NoError(t, err)
		for _, s := range trace {
			if d := m.Step(s); d.Action != strategy.Wait {
				return d, s.Iteration
			}
		}
		return strategy.Decision{}, 0
	}
	d, it := first(strategy.Config{})
	assert.Equal(t, strategy.SetThrottle, d.Action, d.Reason)
	assert.LessOrEqual(t, it, uint64(6), "decided within the first iterations")
	assert.LessOrEqual(t, d.At, 1100*ms)
	assert.Equal(t, 75, d.Throttle.Max, d.Reason)

	d, it = first(strategy.Config{Limits: strategy.Limits{AllowPostcopy: true}})
	assert.Equal(t, strategy.StartPostcopy, d.Action, d.Reason)
	assert.LessOrEqual(t, d.At, 1100*ms)

	d, _ = first(strategy.Config{Limits: strategy.Limits{MaxDowntime: sec}})
	assert.Equal(t, strategy.SetDowntime, d.Action, d.Reason)
	assert.LessOrEqual(t, d.DowntimeLimit, sec)

	d, it = first(strategy.Config{Limits: strategy.Limits{NoThrottle: true}})
	assert.Equal(t, strategy.Abort, d.Action, d.Reason)
	assert.LessOrEqual(t, it, uint64(7))
	assert.LessOrEqual(t, d.At, 1500*ms)

	// The presets do nothing in 8 s: QEMU alone, KubeVirt before 150 s,
	// Nova's first step at 150 s, Proxmox only counts growth between 1 s polls.
	for _, pol := range []string{"qemu", "kubevirt", "nova"} {
		d, _ = first(strategy.Config{Policy: pol})
		assert.Equal(t, strategy.Action(""), d.Action, pol)
	}
}
