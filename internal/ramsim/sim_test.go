package ramsim_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/internal/ramsim"
	"github.com/qmigrate/qmigrate/strategy"
)

const MiB = 1 << 20

func TestInvalidScenario(t *testing.T) {
	_, err := ramsim.Run(ramsim.Scenario{}, strategy.Config{})
	assert.Error(t, err)
	_, err = ramsim.Run(ramsim.Scenario{RAM: MiB, Link: MiB}, strategy.Config{Policy: "nope"})
	assert.Error(t, err)
}

func TestIdleGuestIsOnePass(t *testing.T) {
	r, err := ramsim.Run(ramsim.Scenario{RAM: 512 * MiB, Link: 256 * MiB}, strategy.Config{Policy: "qemu"})
	require.NoError(t, err)
	assert.Equal(t, "completed", r.Outcome)
	// The pass stops at the 300 ms threshold (76.8 MiB), which goes in the downtime.
	assert.InDelta(t, 2.0, r.Total.Seconds(), 0.02)
	assert.InDelta(t, 0.3, r.Downtime.Seconds(), 0.01)
	assert.Equal(t, uint64(512*MiB), r.Bytes)
	assert.Empty(t, r.Decisions)
}

// QEMU's own auto-converge ramp, as the proxmox preset leaves it: 20%, then
// +10% per trigger.
func TestAutoConvergeRamp(t *testing.T) {
	sc := ramsim.Scenario{RAM: 128 * MiB, WorkingSet: 99 * MiB, DirtyRate: 1024 * MiB, Link: 256 * MiB}
	r, err := ramsim.Run(sc, strategy.Config{Policy: "proxmox"})
	require.NoError(t, err)
	require.Equal(t, "completed", r.Outcome)
	var steps []int
	last := 0
	for _, p := range r.Trace {
		if p.Throttle != last && p.Throttle != 0 {
			steps = append(steps, p.Throttle)
			last = p.Throttle
		}
	}
	require.NotEmpty(t, steps)
	assert.Equal(t, 20, steps[0])
	for i := 1; i < len(steps); i++ {
		assert.Equal(t, steps[i-1]+10, steps[i])
	}
}

func TestPostcopyAndPause(t *testing.T) {
	sc := ramsim.Scenario{RAM: 256 * MiB, DirtyRate: 1024 * MiB, Link: 256 * MiB, Limit: time.Minute}
	r, err := ramsim.Run(sc, strategy.Config{Limits: strategy.Limits{AllowPostcopy: true}})
	require.NoError(t, err)
	assert.Equal(t, "completed", r.Outcome)
	assert.True(t, r.Postcopy)
	assert.Equal(t, 20*time.Millisecond, r.Downtime)

	r, err = ramsim.Run(sc, strategy.Config{Limits: strategy.Limits{NoThrottle: true, AllowPause: true}})
	require.NoError(t, err)
	assert.Equal(t, "completed", r.Outcome)
	assert.True(t, r.Paused)
	assert.Greater(t, r.Downtime, 300*time.Millisecond, "stop-and-copy downtime is what it is")
}

func TestStandard(t *testing.T) {
	var names []string
	for _, s := range ramsim.Standard(MiB, MiB) {
		names = append(names, s.Name)
	}
	assert.Equal(t, []string{"idle", "converging", "borderline", "2x", "10x"}, names)
}
