package integration

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/guest/linux"
	"github.com/qmigrate/qmigrate/internal/qemulab"
)

// TestEngineLinuxGuest migrates the Linux guest while it dirties a 128 MiB
// working set and checks it with its own generation stamps: the engine's
// migration completes, the destination runs, and the guest's self-check
// passes on the destination for two more passes after the switchover.
func TestEngineLinuxGuest(t *testing.T) {
	q := qemulab.RequireQEMU(t)
	if testing.Short() {
		t.Skip("boots Linux; skipped with -short")
	}
	// QEMU before 9.0 loses TCG writes from the dirty log when a RAM block
	// is a multiple of 256 KiB (the bitmap sync's fast path does not reset
	// TCG's TLB): a live-migrated Linux guest's kernel then often arrives
	// corrupt (10 of 24 on 7.2.22). qemulab gives a TCG guest there 8
	// KiB more RAM, off that path (none of 30 since; qemulab.RAMSize). On
	// 7.x the guest still dirties a small set slowly, as a margin; on newer
	// QEMU a 128 MiB set at 64 MiB/s.
	w := linux.Workload{Mode: linux.ModeMemDirty, MemBytes: 128 << 20, RateBytes: 64 << 20}
	if v, err := q.Version(t.Context()); err == nil && !v.AtLeast(8, 0) {
		w.MemBytes, w.RateBytes = 16<<20, 4<<20
	}
	actx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	kernel, initrd, err := linux.Assets(actx)
	cancel()
	if err != nil && os.Getenv("CI") == "" {
		t.Skipf("guest kernel not set up: %v", err)
	}
	require.NoError(t, err)

	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()
	args := linux.BootArgs(kernel, initrd, w)
	src := qemulab.StartT(t, q, qemulab.Config{Name: "src", MemMiB: 384, Args: args})
	dst := qemulab.StartT(t, q, qemulab.Config{Name: "dst", MemMiB: 384, Args: args, Incoming: true})
	ss := linux.NewSerial(src.SerialPath())
	_, err = ss.WaitFor(ctx, linux.Kind(linux.KindReady))
	require.NoError(t, err)
	_, err = ss.WaitFor(ctx, linux.Verdict(linux.KindCheck, "pass", 1))
	require.NoError(t, err, "source guest dirtying and checking its memory")

	res, err := engine.Migrate(ctx, engine.Config{
		Source:      engine.Endpoint{Client: src.QMP},
		Destination: engine.Endpoint{Client: dst.QMP},
		URI:         "unix:" + filepath.Join(dst.Dir(), "mig.sock"),
		Logger:      testLogger(t),
	})
	require.NoError(t, err)
	t.Logf("completed: total %v, downtime %v, transferred %d MiB, decisions %d",
		res.Total, res.Downtime, res.TransferredBytes>>20, len(res.Decisions))
	assert.LessOrEqual(t, res.Downtime, 300*time.Millisecond+100*time.Millisecond)

	// The last pass the source finished; the destination must finish two more, intact.
	last, err := ss.Latest(ctx, linux.KindCheck, "pass", 0, 200*time.Millisecond)
	require.NoError(t, err)
	st, err := src.QMP.QueryStatus(ctx)
	require.NoError(t, err)
	assert.Equal(t, "postmigrate", st.Status)
	st, err = dst.QMP.QueryStatus(ctx)
	require.NoError(t, err)
	assert.Equal(t, "running", st.Status)
	require.NoError(t, src.Quit(ctx))

	ds := linux.NewSerial(dst.SerialPath())
	l, err := ds.WaitFor(ctx, linux.Verdict(linux.KindCheck, "pass", last+2))
	require.NoError(t, err, "destination self-check")
	assert.Equal(t, "0", l.Fields["failed_passes"])
	t.Logf("destination: %s", l.Raw)
}
