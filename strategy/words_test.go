package strategy_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/strategy"
)

// firstDecision replays the real sweep trace (open loop) and returns the
// first non-wait decision.
func firstDecision(t *testing.T, cfg strategy.Config, qemu bool) strategy.Decision {
	t.Helper()
	m, err := strategy.New(cfg)
	require.NoError(t, err)
	if qemu {
		m.SetQEMU(10, 0)
	}
	m.Setup()
	for _, s := range loadTrace(t, "testdata/sweep-qemu10-256MiBps.csv") {
		if d := m.Step(s); d.Action != strategy.Wait {
			return d
		}
	}
	t.Fatal("no decision")
	return strategy.Decision{}
}

// TestDecisionWords: a decision's summary says what and why in words, apart
// from the arithmetic of its Reason.
func TestDecisionWords(t *testing.T) {
	d := firstDecision(t, strategy.Config{}, false)
	require.Equal(t, strategy.SetThrottle, d.Action)
	assert.Equal(t, "throttle 75%: the guest rewrites its 98.1 MiB faster than the link carries it", d.Summary)
	assert.Contains(t, d.Reason, "true dirty rate", "the arithmetic stays in the Reason")
	assert.Nil(t, d.Remedy)
	assert.Equal(t, d.Summary, d.Text())
}

// TestAbortRemedy: an abort ends with what would finish it, computed from
// auto's model: the sweep guest's ~98 MiB dirty set at ~255 MiB/s needs
// 385 ms × 1.25 = 481 ms, so a 500 ms maximum; with the QEMU 10.0 headroom
// (62 ms) 600 ms. A link carrying the set within the ceiling: 98 MiB × 1.25 /
// 300 ms ≈ 409 MiB/s.
func TestAbortRemedy(t *testing.T) {
	cfg := strategy.Config{Limits: strategy.Limits{NoThrottle: true}}
	d := firstDecision(t, cfg, false)
	require.Equal(t, strategy.Abort, d.Action)
	require.NotNil(t, d.Remedy)
	r := *d.Remedy
	assert.True(t, r.Postcopy)
	assert.True(t, r.Pause)
	assert.True(t, r.Throttle)
	assert.Equal(t, 500*time.Millisecond, r.MaxDowntime)
	assert.InDelta(t, 409*MiB, r.Bandwidth, 1*MiB)
	assert.Equal(t, "abort: the guest rewrites its 98.1 MiB faster than the link carries it, and no permitted lever can make it converge", d.Summary)
	assert.Contains(t, d.Text(), "; would complete with postcopy permitted, or with a maximum downtime of 500ms")

	d = firstDecision(t, cfg, true)
	require.Equal(t, strategy.Abort, d.Action)
	assert.Equal(t, 600*time.Millisecond, d.Remedy.MaxDowntime, "the headroom counts: 481 ms + 62 ms")

	// Nothing measured yet: postcopy and a pause still finish, no figure.
	m, err := strategy.New(strategy.Config{Limits: strategy.Limits{NoThrottle: true, Budget: time.Second}})
	require.NoError(t, err)
	d = m.Step(strategy.Sample{Elapsed: 2 * time.Second, Status: "active"})
	require.Equal(t, strategy.Abort, d.Action)
	assert.Equal(t, "abort: the 1s budget ran out, and neither postcopy nor a pause is permitted", d.Summary)
	assert.True(t, d.Remedy.Postcopy)
	assert.Zero(t, d.Remedy.MaxDowntime, "nothing measured: no figure")
}

// TestStallAbortHasNoRemedy: a link that carries nothing is not finished by
// any lever.
func TestStallAbortHasNoRemedy(t *testing.T) {
	m, err := strategy.New(strategy.Config{Policy: strategy.PolicyQEMU, Limits: strategy.Limits{ProgressTimeout: time.Second}})
	require.NoError(t, err)
	s := strategy.Sample{Status: "active", Iteration: 1, RemainingBytes: 10 * MiB, TotalBytes: 64 * MiB}
	m.Step(s)
	s.Elapsed = 2 * time.Second
	d := m.Step(s)
	require.Equal(t, strategy.Abort, d.Action)
	require.NotNil(t, d.Remedy)
	assert.True(t, d.Remedy.None())
	assert.Equal(t, "abort: no progress for 2s, the link carries nothing", d.Text())
}

// TestStallReasonCountsRAMLeftAfterSetup: a sample in QEMU's setup (no RAM
// counted yet, remaining 0) is no new low of the RAM left: the reason
// gives the lowest counted afterwards, and a link that stalls in setup
// says the RAM left was not counted (measured: a link black-holed as the
// source connected read "remaining never below 0 B").
func TestStallReasonCountsRAMLeftAfterSetup(t *testing.T) {
	for _, pol := range []string{strategy.PolicyAuto, strategy.PolicyQEMU} {
		t.Run(pol, func(t *testing.T) {
			m, err := strategy.New(strategy.Config{Policy: pol, Limits: strategy.Limits{ProgressTimeout: time.Second}})
			require.NoError(t, err)
			m.Step(strategy.Sample{Status: "setup", TotalBytes: 64 * MiB})
			s := strategy.Sample{Elapsed: 100 * time.Millisecond, Status: "active", Iteration: 1,
				TransferredBytes: 4 * MiB, RemainingBytes: 60 * MiB, TotalBytes: 64 * MiB}
			m.Step(s)
			s.Elapsed = 2 * time.Second
			d := m.Step(s)
			require.Equal(t, strategy.Abort, d.Action)
			assert.Contains(t, d.Reason, "transferred stuck at 4.0 MiB, remaining never below 60.0 MiB")

			m, err = strategy.New(strategy.Config{Policy: pol, Limits: strategy.Limits{ProgressTimeout: time.Second}})
			require.NoError(t, err)
			m.Step(strategy.Sample{Status: "setup", TotalBytes: 64 * MiB})
			d = m.Step(strategy.Sample{Elapsed: 2 * time.Second, Status: "setup", TotalBytes: 64 * MiB})
			require.Equal(t, strategy.Abort, d.Action)
			assert.Contains(t, d.Reason, "the RAM left not counted yet")
		})
	}
}
