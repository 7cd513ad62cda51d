package integration

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/strategy"
)

// Race trial parameters: a converging migration (the sweep guest dirties
// about 50 MB/s, the link carries 100 MB/s) with a downtime limit of 1 s,
// so that QEMU switches over with much left to send: the stop-and-copy,
// unthrottled, then lasts long enough for cancels to land around it.
const (
	raceRate      = 50e6
	raceBandwidth = 100e6
	raceDowntime  = 1000 // ms
	raceTrials    = 8
)

// TestEngineCancelRace cancels the caller's context of converging
// migrations at moments spread around their completion, so that
// migrate_cancel lands before the stop-and-copy, during it (QEMU carries it
// out only once the device state is written) and after completion. One
// uncancelled run calibrates the moments. Whatever each trial's ending, the
// guest must run exactly where the Result says, with its memory intact
// there (the sweep invariant), and the other side must not run it.
func TestEngineCancelRace(t *testing.T) {
	q := qemulab.RequireQEMU(t)
	var stopAt, doneAt time.Duration
	t.Run("Calibrate", func(t *testing.T) {
		src, dst := enginePair(t, q, raceRate, true, "")
		cfg := raceConfig(t, src, dst)
		cfg.Observer = func(e engine.Event) {
			if e.Kind == engine.EventPhase && e.Phase == engine.PhaseSwitchover && stopAt == 0 {
				stopAt = e.Elapsed
			}
		}
		res, err := engine.Migrate(tbTimeout(t, 60*time.Second), cfg)
		require.NoError(t, err)
		doneAt = res.Total
		t.Logf("uncancelled: source stopped at %v, done at %v (downtime %v)", stopAt.Round(time.Millisecond),
			doneAt.Round(time.Millisecond), res.Downtime.Round(time.Millisecond))
		require.Positive(t, stopAt, "the source stopped for the stop-and-copy")
	})
	if t.Failed() {
		return
	}
	// From before the source stops to just after the call returned: the
	// stop-and-copy itself (unthrottled) lasts only tens of ms, and runs
	// differ by about as much, so the trials are packed around it.
	first, last := stopAt-150*time.Millisecond, doneAt+30*time.Millisecond
	first = max(first, 200*time.Millisecond)
	endings := map[string]int{}
	for i := range raceTrials {
		at := first + (last-first)*time.Duration(i)/time.Duration(raceTrials-1)
		t.Run(fmt.Sprintf("CancelAt%dms", at.Milliseconds()), func(t *testing.T) {
			endings[raceTrial(t, q, at)]++
		})
	}
	t.Logf("endings of %d trials: %v", raceTrials, endings)
}

// raceConfig is the engine config of a race trial: the qemu policy sets the
// downtime limit to the maximum (1 s) and decides nothing, so the
// completion moment depends on the guest and the link only. (Before every
// policy set the limit explicitly, this test set it on the source itself
// and the policy left it; the policy now overwrites any such value.)
func raceConfig(t *testing.T, src, dst *qemulab.Instance) engine.Config {
	cfg := engineConfig(t, src, dst, "unix:"+filepath.Join(dst.Dir(), "mig.sock"))
	cfg.Bandwidth = raceBandwidth
	cfg.Strategy.Policy = strategy.PolicyQEMU
	cfg.Strategy.Limits.MaxDowntime = raceDowntime * time.Millisecond
	return cfg
}

// raceTrial runs one migration cancelled at the given moment, checks where
// the guest is, and names the ending.
func raceTrial(t *testing.T, q *qemulab.QEMU, at time.Duration) string {
	src, dst := enginePair(t, q, raceRate, true, "")
	cfg := raceConfig(t, src, dst)
	var stopAt time.Duration
	cfg.Observer = func(e engine.Event) {
		if e.Kind == engine.EventPhase && e.Phase == engine.PhaseSwitchover && stopAt == 0 {
			stopAt = e.Elapsed
		}
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	timer := time.AfterFunc(at, cancel)
	defer timer.Stop()
	res, err := engine.Migrate(ctx, cfg)
	require.NotNil(t, res)
	t.Logf("cancel at %v (source stopped at %v): %s in %v: %v; undone %q; undo errors %q", at.Round(time.Millisecond),
		stopAt.Round(time.Millisecond), res.Status, res.Total.Round(time.Millisecond), err, res.Undone, res.UndoErrors)
	cctx := tbTimeout(t, 60*time.Second)
	ending := res.Status
	switch res.Status {
	case engine.StatusCompleted:
		require.NoError(t, err)
		if len(res.UndoErrors) > 0 {
			ending += " (cancel too late)"
		}
		// The source is in postmigrate, the destination runs the guest,
		// memory intact.
		_, cerr := qemulab.CheckSweep(cctx, src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
		require.NoError(t, cerr, "the guest runs intact on the destination, not on the source")
	case engine.StatusCancelled:
		require.ErrorIs(t, err, engine.ErrCancelled)
		if strings.Contains(strings.Join(res.UndoErrors, "\n"), "destination: completed") {
			ending += " (destination completed too, kept stopped)"
		}
		// The destination does not run the guest: it exited (or is
		// exiting), or it is stopped.
		if !dst.Exited() {
			if st, serr := dst.QMP.QueryStatus(cctx); serr == nil {
				assert.False(t, st.Running, "the destination does not run the guest (run state %s)", st.Status)
			}
		}
		// The source runs the guest, memory intact.
		sourceIntact(t, src)
	default:
		t.Fatalf("unexpected result %s: %v", res.Status, err)
	}
	return ending
}
