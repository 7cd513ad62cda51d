package integration

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/testbed"
)

// TestEngineStorage migrates the sweep guest together with its (non-shared)
// boot disk: the engine mirrors it over NBD, finishes the mirror in the
// pre-switchover window and cleans up; on a cancel it aborts the mirror and
// leaves nothing behind on the source.
func TestEngineStorage(t *testing.T) {
	q := testbed.RequireQEMU(t)
	t.Run("Completes", func(t *testing.T) { testEngineStorage(t, q, false) })
	t.Run("CancelRollsBack", func(t *testing.T) { testEngineStorage(t, q, true) })
}

func testEngineStorage(t *testing.T, q *testbed.QEMU, cancelIt bool) {
	src, dst := enginePair(t, q, 500e6, true, "")
	cfg := engineConfig(t, src, dst, "unix:"+filepath.Join(dst.Dir(), "mig.sock"))
	cfg.Storage = &blockmirror.Config{Disks: []string{"sweep0"}}
	var phases []engine.Phase
	disks := 0
	cfg.Observer = func(e engine.Event) {
		switch e.Kind {
		case engine.EventPhase:
			phases = append(phases, e.Phase)
		case engine.EventDisk:
			disks++
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	mctx := ctx
	if cancelIt {
		cfg.Bandwidth = 20e6 // never converges: the cancel lands in converge
		var c context.CancelFunc
		mctx, c = context.WithCancel(ctx)
		time.AfterFunc(2*time.Second, c)
	}
	res, err := engine.Migrate(mctx, cfg)
	t.Logf("%s in %v: %v; phases %v; %d disk events; undone %q; undo errors %q",
		res.Status, res.Total, err, phases, disks, res.Undone, res.UndoErrors)
	assert.Positive(t, disks)
	assertNoMirrorLeft(t, ctx, src)
	if cancelIt {
		require.ErrorIs(t, err, engine.ErrCancelled)
		assert.Empty(t, res.UndoErrors)
		assert.Contains(t, strings.Join(res.Undone, "\n"), "mirrors aborted")
		sourceIntact(t, src)
		return
	}
	require.NoError(t, err)
	assert.Contains(t, phases, engine.PhaseSwitchover)
	exps, err := dst.QMP.QueryBlockExports(ctx)
	require.NoError(t, err)
	assert.Empty(t, exps, "destination exports removed")
	_, err = testbed.CheckSweep(ctx, src.QMP, dst.QMP, testbed.SweepCheckOptions{})
	require.NoError(t, err, "destination guest intact")
	img := os.Getenv("QMIGRATE_QEMU_IMG")
	if img == "" {
		img = "qemu-img"
	}
	out, err := exec.CommandContext(ctx, img, "compare", "-U", "-q",
		filepath.Join(src.Dir(), "sweep.img"), filepath.Join(dst.Dir(), "sweep.img")).CombinedOutput()
	assert.NoError(t, err, "images differ: %s", out)
}

// assertNoMirrorLeft checks the source has no block job and no NBD node.
func assertNoMirrorLeft(t *testing.T, ctx context.Context, src *testbed.Instance) {
	t.Helper()
	jobs, err := src.QMP.QueryBlockJobs(ctx)
	require.NoError(t, err)
	assert.Empty(t, jobs, "source block jobs")
	nodes, err := src.QMP.QueryNamedBlockNodes(ctx)
	require.NoError(t, err)
	for _, n := range nodes {
		assert.NotEqual(t, "nbd", n.Driver, "source NBD node %s left", n.NodeName)
	}
}
