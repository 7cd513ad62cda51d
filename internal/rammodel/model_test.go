package rammodel_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/internal/rammodel"
)

const MiB = float64(1 << 20)

const tick = 10 * time.Millisecond

// run steps m until an event in stop (or the limit) and returns it.
func run(m *rammodel.Model, env rammodel.Env, limit time.Duration, stop ...rammodel.Event) rammodel.Event {
	for m.Elapsed < limit {
		ev := m.Step(tick, env)
		for _, s := range stop {
			if ev == s {
				return ev
			}
		}
	}
	return rammodel.None
}

func params() rammodel.Params {
	return rammodel.Params{DowntimeLimit: 300 * time.Millisecond, Throttle: rammodel.DefaultThrottle}
}

// An idle guest: one pass, synced once what is left fits in the downtime
// limit (30 MiB at 100 MiB/s), which converges; the rest goes in the
// stop-and-copy.
func TestIdleConvergesAtThreshold(t *testing.T) {
	m := rammodel.New(150<<20, 0, params())
	env := rammodel.Env{Link: 100 * MiB}
	require.Equal(t, rammodel.Converged, run(m, env, time.Minute, rammodel.Synced, rammodel.Converged))
	assert.InDelta(t, 1.2, m.Elapsed.Seconds(), 0.001)
	assert.Equal(t, uint64(2), m.Iteration)
	assert.InDelta(t, 30*MiB, m.Remaining, 1)
	assert.Equal(t, rammodel.StopCopy, m.Phase)

	m.FinalSync()
	assert.Equal(t, uint64(3), m.Iteration)
	assert.Equal(t, rammodel.None, m.Step(tick, env), "the guest is stopped: nothing joins")
	assert.Equal(t, rammodel.Finished, run(m, env, time.Minute, rammodel.Finished))
	assert.InDelta(t, 1.5, m.Elapsed.Seconds(), 0.001)
	assert.InDelta(t, 150*MiB, m.Sent, 1)
	assert.Equal(t, rammodel.Done, m.Phase)
}

// A guest dirtying less than the link: the sync at the threshold brings
// back what was dirtied, until a sync finds little enough.
func TestConvergingGuest(t *testing.T) {
	m := rammodel.New(150<<20, 0, params())
	env := rammodel.Env{Link: 100 * MiB, Dirty: 20 * MiB}
	ev := run(m, env, time.Minute, rammodel.Synced)
	require.Equal(t, rammodel.Synced, ev)
	assert.InDelta(t, 30*MiB+1.2*20*MiB, m.Remaining, 1, "the first pass's dirtied set joins")
	assert.InDelta(t, 1.2*20*MiB, m.LastDirty, 1)
	assert.InDelta(t, 240*time.Millisecond, m.ExpectedDowntime(env.Link), float64(time.Microsecond))
	require.Equal(t, rammodel.Converged, run(m, env, time.Minute, rammodel.Converged))
	assert.LessOrEqual(t, m.Remaining, 30*MiB)
	assert.Less(t, m.Elapsed, 2*time.Second)
}

// The dirty rate is measured at the first sync a second or more after the
// previous measurement, as distinct bytes over the period; auto-converge
// throttles at the second high reading, then steps up by the increment.
func TestAutoConvergeNeedsTwoHighReadings(t *testing.T) {
	p := params()
	p.AutoConverge = true
	m := rammodel.New(1024<<20, 0, p)
	env := rammodel.Env{Link: 100 * MiB, Dirty: 400 * MiB}
	var rates []float64
	var throttles []int
	var at []time.Duration
	for m.Elapsed < time.Minute && len(throttles) < 3 {
		ev := m.Step(tick, env)
		if ev != rammodel.Synced {
			continue
		}
		if len(rates) == 0 || m.DirtyRate != rates[len(rates)-1] {
			rates = append(rates, m.DirtyRate)
		}
		if m.Throttle > 0 && (len(throttles) == 0 || throttles[len(throttles)-1] != m.Throttle) {
			throttles = append(throttles, m.Throttle)
			at = append(at, m.Elapsed)
		}
	}
	require.Len(t, throttles, 3)
	assert.Equal(t, []int{20, 30, 40}, throttles)
	// With 1 GiB to send and the link at 100 MiB/s the first pass would last
	// ~10 s: the forced sync every 5 s is what measures, and throttles at
	// the second (10 s).
	assert.Equal(t, 10*time.Second, at[0])
	assert.InDelta(t, 1024*MiB/5, rates[0], 1, "the whole RAM dirtied within the first 5 s period")
}

// Without auto-converge there is no forced sync: a pass lasts until the
// bitmap drains to the threshold.
func TestNoForcedSyncWithoutAutoConverge(t *testing.T) {
	m := rammodel.New(1024<<20, 0, params())
	env := rammodel.Env{Link: 100 * MiB, Dirty: 400 * MiB}
	require.Equal(t, rammodel.Synced, run(m, env, time.Minute, rammodel.Synced))
	assert.InDelta(t, 10.24-0.3, m.Elapsed.Seconds(), 0.011)
	assert.Equal(t, 1024*MiB, m.Remaining, "capped at the RAM")
	assert.Zero(t, m.Throttle)
}

// The working set caps what is dirtied between two syncs.
func TestWorkingSetCapsDirtied(t *testing.T) {
	m := rammodel.New(1024<<20, 64<<20, params())
	env := rammodel.Env{Link: 100 * MiB, Dirty: 400 * MiB}
	require.Equal(t, rammodel.Synced, run(m, env, time.Minute, rammodel.Synced))
	assert.Equal(t, 64*MiB, m.LastDirty)
	assert.Equal(t, 64*MiB, m.WorkingSet())
}

// A stalled link moves nothing and never syncs, not even the forced sync.
func TestStalledLink(t *testing.T) {
	p := params()
	p.AutoConverge = true
	m := rammodel.New(64<<20, 0, p)
	assert.Equal(t, rammodel.None, run(m, rammodel.Env{Dirty: 10 * MiB}, 20*time.Second, rammodel.Synced, rammodel.Converged))
	assert.Equal(t, uint64(1), m.Iteration)
	assert.Zero(t, m.Sent)
}

// Postcopy switches at the end of the next step with a sync of its own; the
// rest is then pulled, and the throttle is gone.
func TestPostcopy(t *testing.T) {
	m := rammodel.New(256<<20, 0, params())
	env := rammodel.Env{Link: 100 * MiB, Dirty: 400 * MiB}
	run(m, env, time.Second)
	m.RequestPostcopy()
	require.Equal(t, rammodel.PostcopyStarted, m.Step(tick, env))
	assert.Equal(t, rammodel.Postcopy, m.Phase)
	assert.Equal(t, uint64(2), m.Iteration)
	assert.Equal(t, 256*MiB, m.Remaining, "everything dirtied again, at most the RAM")
	require.Equal(t, rammodel.Finished, run(m, env, time.Minute, rammodel.Finished))
	assert.InDelta(t, 1.01+2.56, m.Elapsed.Seconds(), 0.011)
	assert.Equal(t, rammodel.Done, m.Phase)
}

// Drain sends the rest at once, for drivers that skip the time.
func TestDrain(t *testing.T) {
	m := rammodel.New(150<<20, 0, params())
	env := rammodel.Env{Link: 100 * MiB}
	require.Equal(t, rammodel.Converged, run(m, env, time.Minute, rammodel.Converged))
	d := m.Drain(env.Link)
	assert.InDelta(t, 0.3, d.Seconds(), 0.001)
	assert.InDelta(t, 150*MiB, m.Sent, 1)
	assert.Zero(t, m.Remaining)
	assert.Equal(t, rammodel.Done, m.Phase)
}
