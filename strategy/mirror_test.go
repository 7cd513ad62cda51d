package strategy_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/strategy"
)

// mirrorTrace is a mirror phase every 200 ms for d: total grows by grow
// bytes/s (the guest's writes), the copy advances by copyRate bytes/s.
func mirrorTrace(d time.Duration, total, grow, copyRate float64) []strategy.Sample {
	var out []strategy.Sample
	done := 0.0
	for at := time.Duration(0); at <= d; at += 200 * ms {
		rem := max(total-done, 0)
		out = append(out, strategy.Sample{Elapsed: at, Mirroring: true, StorageTotal: uint64(total), StorageRemaining: uint64(rem)})
		total += grow * 0.2
		done += copyRate * 0.2
	}
	return out
}

// runMirror feeds the samples and returns the non-wait decisions; fail makes
// Applied report an error for MirrorWriteBlocking.
func runMirror(t *testing.T, cfg strategy.Config, st strategy.Storage, samples []strategy.Sample, fail bool) []strategy.Decision {
	t.Helper()
	return nonWait(runStorage(t, cfg, st, samples, fail))
}

func actions(ds []strategy.Decision) []strategy.Action {
	var out []strategy.Action
	for _, d := range ds {
		out = append(out, d.Action)
	}
	return out
}

var canSwitch = strategy.Storage{Disks: true, CanSwitch: true}

// A writer outpaces the mirror: auto switches to write-blocking once, after
// one window, with the numbers in the reason; then the mirror shrinks.
func TestMirrorAutoSwitches(t *testing.T) {
	stuck := mirrorTrace(5*sec, 64*MiB, 30*MiB, 8*MiB)
	ds := runMirror(t, strategy.Config{}, canSwitch, stuck, false)
	require.Equal(t, []strategy.Action{strategy.MirrorWriteBlocking}, actions(ds))
	d := ds[0]
	assert.Equal(t, 3*sec, d.At, "decided after one MirrorWindow")
	assert.Contains(t, d.Reason, "never READY")
	assert.Contains(t, d.Reason, "MiB of")
	assert.Contains(t, d.Reason, "not shrinking over the last 3s")
	t.Log(d.Reason)
}

// A mirror that converges, even slowly within MaxConvergeTime, is left alone.
func TestMirrorAutoConvergingLeftAlone(t *testing.T) {
	ds := runMirror(t, strategy.Config{}, canSwitch, mirrorTrace(20*sec, 512*MiB, 10*MiB, 40*MiB), false)
	assert.Empty(t, ds)
}

// Converging, but not within the budget: switch.
func TestMirrorAutoBeyondBudget(t *testing.T) {
	cfg := strategy.Config{Limits: strategy.Limits{Budget: 30 * sec}}
	ds := runMirror(t, cfg, canSwitch, mirrorTrace(5*sec, 1024*MiB, 10*MiB, 20*MiB), false)
	require.Equal(t, []strategy.Action{strategy.MirrorWriteBlocking}, actions(ds))
	assert.Contains(t, ds[0].Reason, "beyond the 30s budget")
}

// Too slow for MaxConvergeTime but no budget: a switch, never an abort.
func TestMirrorAutoSlow(t *testing.T) {
	ds := runMirror(t, strategy.Config{}, canSwitch, mirrorTrace(5*sec, 4096*MiB, 10*MiB, 20*MiB), false)
	require.Equal(t, []strategy.Action{strategy.MirrorWriteBlocking}, actions(ds))
	assert.Contains(t, ds[0].Reason, "READY only in")
	none := strategy.Storage{Disks: true}
	assert.Empty(t, runMirror(t, strategy.Config{}, none, mirrorTrace(30*sec, 4096*MiB, 10*MiB, 20*MiB), false),
		"slow without a lever: let it converge")
}

// Without block-job-change (7.2) auto cannot switch: stuck for two windows,
// it aborts, saying why.
func TestMirrorAutoCannotSwitchAborts(t *testing.T) {
	st := strategy.Storage{Disks: true}
	ds := runMirror(t, strategy.Config{}, st, mirrorTrace(10*sec, 64*MiB, 30*MiB, 8*MiB), false)
	require.Equal(t, []strategy.Action{strategy.Abort}, actions(ds))
	assert.Equal(t, 6*sec, ds[0].At)
	assert.Contains(t, ds[0].Reason, "block-job-change needs 8.2")
}

// Write-blocking from the start, or refused, or failed: never (again) a switch.
func TestMirrorAutoNoSwitch(t *testing.T) {
	trace := mirrorTrace(10*sec, 64*MiB, 30*MiB, 8*MiB)
	ds := runMirror(t, strategy.Config{}, strategy.Storage{Disks: true, CanSwitch: true, WriteBlocking: true}, trace, false)
	require.Equal(t, []strategy.Action{strategy.Abort}, actions(ds))
	assert.Contains(t, ds[0].Reason, "write-blocking from the start")

	ds = runMirror(t, strategy.Config{Limits: strategy.Limits{NoWriteBlocking: true}}, canSwitch, trace, false)
	require.Equal(t, []strategy.Action{strategy.Abort}, actions(ds))
	assert.Contains(t, ds[0].Reason, "refused by the user")

	ds = runMirror(t, strategy.Config{}, canSwitch, trace, true)
	require.Equal(t, []strategy.Action{strategy.MirrorWriteBlocking, strategy.Abort}, actions(ds))
	assert.Equal(t, 9*sec, ds[1].At, "a failed switch: measure again, confirm, abort")
	assert.Contains(t, ds[1].Reason, "switching to write-blocking failed")

	ds = runMirror(t, strategy.Config{}, strategy.Storage{}, trace, false)
	for _, d := range ds {
		assert.NotEqual(t, strategy.MirrorWriteBlocking, d.Action, "no storage declared")
	}
}

// The presets have no storage lever: they wait in the mirror phase, and the
// Machine aborts there at the budget (counted from the start, storage
// included).
func TestMirrorPresetsRespectBudget(t *testing.T) {
	trace := mirrorTrace(8*sec, 64*MiB, 30*MiB, 8*MiB)
	for _, pol := range []string{strategy.PolicyQEMU, strategy.PolicyKubeVirt, strategy.PolicyNova, strategy.PolicyProxmox} {
		t.Run(pol, func(t *testing.T) {
			cfg := strategy.Config{Policy: pol, Limits: strategy.Limits{Budget: 5 * sec, AllowPostcopy: true, AllowPause: true}}
			ds := runMirror(t, cfg, canSwitch, trace, false)
			require.Equal(t, []strategy.Action{strategy.Abort}, actions(ds))
			assert.Equal(t, 5*sec, ds[0].At)
			assert.Contains(t, ds[0].Reason, "mirrors not READY")
			assert.Empty(t, runMirror(t, strategy.Config{Policy: pol}, canSwitch, trace, false), "no budget: wait")
		})
	}
}

// auto at the budget in the mirror phase: an abort, never postcopy or pause.
func TestMirrorBudgetAbortsEvenWithFinishingLevers(t *testing.T) {
	cfg := strategy.Config{Limits: strategy.Limits{Budget: 2 * sec, AllowPostcopy: true, AllowPause: true}}
	ds := runMirror(t, cfg, strategy.Storage{Disks: true}, mirrorTrace(3*sec, 64*MiB, 0, 8*MiB), false)
	require.Equal(t, []strategy.Action{strategy.Abort}, actions(ds))
	assert.Equal(t, 2*sec, ds[0].At)
}

// A preset in a mirror phase that makes no progress (a dead link): the
// user's ProgressTimeout aborts it.
func TestMirrorPresetProgressTimeout(t *testing.T) {
	trace := mirrorTrace(8*sec, 64*MiB, 0, 0)
	cfg := strategy.Config{Policy: strategy.PolicyQEMU, Limits: strategy.Limits{ProgressTimeout: 4 * sec}}
	ds := runMirror(t, cfg, canSwitch, trace, false)
	require.Equal(t, []strategy.Action{strategy.Abort}, actions(ds))
	assert.Equal(t, 4*sec, ds[0].At)
	assert.Contains(t, ds[0].Reason, "no progress for 4s in the mirror phase")
	assert.Empty(t, runMirror(t, cfg, canSwitch, mirrorTrace(8*sec, 64*MiB, 0, 4*MiB), false), "copying: progress")
}

// Without block-job-change but with a restart possible (7.2): auto asks for
// write-blocking in the mirror phase just the same, says it is a restart (a
// full re-copy), and after it measures afresh: the progress timeout does not
// count the re-copy's jump back as a stall.
func TestMirrorAutoRestarts(t *testing.T) {
	restart := strategy.Storage{Disks: true, CanRestart: true}
	ds := runMirror(t, strategy.Config{}, restart, mirrorTrace(5*sec, 64*MiB, 30*MiB, 8*MiB), false)
	require.Equal(t, []strategy.Action{strategy.MirrorWriteBlocking}, actions(ds))
	assert.Equal(t, 3*sec, ds[0].At)
	assert.Contains(t, ds[0].Reason, "restart them in write-blocking mode")
	assert.Contains(t, ds[0].Reason, "full re-copy")

	// Refused by the user: the abort as before.
	ds = runMirror(t, strategy.Config{Limits: strategy.Limits{NoWriteBlocking: true}}, restart, mirrorTrace(10*sec, 64*MiB, 30*MiB, 8*MiB), false)
	require.Equal(t, []strategy.Action{strategy.Abort}, actions(ds))
	assert.Contains(t, ds[0].Reason, "refused by the user")

	// The presets never decide it.
	for _, pol := range []string{strategy.PolicyQEMU, strategy.PolicyKubeVirt, strategy.PolicyNova, strategy.PolicyProxmox} {
		for _, d := range runMirror(t, strategy.Config{Policy: pol}, restart, mirrorTrace(10*sec, 64*MiB, 30*MiB, 8*MiB), false) {
			assert.NotEqual(t, strategy.MirrorWriteBlocking, d.Action, pol)
		}
	}

	// After the restart the remaining jumps back to the whole disk: with a
	// progress timeout shorter than the time since the old minimum, no
	// abort for lack of progress while the new copy shrinks it.
	cfg := strategy.Config{Auto: strategy.AutoConfig{ProgressTimeout: 4 * sec}}
	trace := mirrorTrace(3*sec, 64*MiB, 30*MiB, 8*MiB)
	n := len(trace)
	trace = append(trace, mirrorTrace(6*sec, 256*MiB, 0, 32*MiB)...)
	for i := n; i < len(trace); i++ {
		trace[i].Elapsed += 3*sec + 200*ms
	}
	ds = runMirror(t, cfg, restart, trace, false)
	require.Equal(t, []strategy.Action{strategy.MirrorWriteBlocking}, actions(ds), "no abort after the restart")
}
