package blockmirror

import (
	"context"
	"encoding/json"
	"errors"
	"regexp"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/qmp"
)

const (
	mib = 1 << 20
	uri = "unix:/run/qm/mig.sock"
)

var feat72 = &qmp.Features{Commands: map[string]bool{"yank": true}}

// env is the Env of a session between two fakes of QEMU 7.2 with the
// migration channel at mig ("fd:..." has no address).
func env(src, dst *fakeQEMU, mig string) Env {
	a, _ := qmp.ParseAddress(mig)
	return Env{Source: QEMU{Client: src.c, Features: feat72}, Destination: QEMU{Client: dst.c, Features: feat72}, Migration: a}
}

func pair(t *testing.T) (src, dst *fakeQEMU) {
	return fakes(t,
		[]qmp.BlockInfo{blk("disk0", "/src/a.raw", 64*mib, false), blk("disk1", "/src/b.raw", 32*mib, false), blk("cd0", "/iso/x.iso", 8*mib, true)},
		[]qmp.BlockInfo{blk("disk0", "/dst/a.raw", 64*mib, false), blk("disk1", "/dst/b.raw", 32*mib, false), blk("cd0", "/iso/x.iso", 8*mib, true)})
}

func nothingLeft(t *testing.T, src, dst *fakeQEMU) {
	t.Helper()
	n, j, e, s := src.state()
	assert.Zero(t, n, "source nodes")
	assert.Zero(t, j, "source jobs")
	n, j, e2, s2 := dst.state()
	assert.Zero(t, n+j+e+e2, "destination nodes/jobs/exports")
	assert.False(t, s || s2, "NBD server left")
}

func TestStartFinishCleanup(t *testing.T) {
	ctx := context.Background()
	src, dst := pair(t)
	s, err := Start(ctx, Config{}, env(src, dst, uri))
	require.NoError(t, err)

	// Read-only cd0 is skipped; disk0 and disk1 are exported and mirrored.
	assert.Equal(t, []string{"nbd-server-start", "block-export-add", "block-export-add"}, dst.commands())
	assert.Equal(t, []string{"blockdev-add", "blockdev-mirror", "blockdev-add", "blockdev-mirror"}, src.commands())
	srv := dst.args("nbd-server-start", 0)["addr"].(map[string]any)
	assert.Equal(t, "unix", srv["type"])
	sock := srv["data"].(map[string]any)["path"].(string)
	assert.Regexp(t, `^/run/qm/qmigrate-nbd-[0-9a-f]{8}\.sock$`, sock)
	names := map[string]bool{}
	for i, node := range []string{"disk0", "disk1"} {
		exp := dst.args("block-export-add", i)
		assert.Equal(t, node, exp["node-name"])
		assert.Equal(t, true, exp["writable"])
		name := exp["name"].(string)
		assert.Regexp(t, regexp.MustCompile(`^qmigrate-[0-9a-f]{32}$`), name, "unguessable export name")
		names[name] = true
		add := src.args("blockdev-add", i)
		assert.Equal(t, "nbd", add["driver"])
		assert.Equal(t, name, add["export"])
		assert.EqualValues(t, 1, add["reconnect-delay"], "a reset NBD connection is re-established (DefaultReconnectDelay)")
		assert.Equal(t, map[string]any{"type": "unix", "path": sock}, add["server"])
		m := src.args("blockdev-mirror", i)
		assert.Equal(t, node, m["device"])
		assert.Equal(t, add["node-name"], m["target"])
		assert.Equal(t, "full", m["sync"])
		assert.Nil(t, m["copy-mode"])
	}
	assert.Len(t, names, 2)

	p, err := s.Progress(ctx)
	require.NoError(t, err)
	require.Len(t, p, 2)
	assert.Equal(t, Progress{Node: "disk0", Job: p[0].Job, Total: 64 * mib, CopyMode: "background"}, p[0])
	require.ErrorIs(t, s.Cleanup(ctx), ErrState)

	src.SetMirrorProgress(64*mib, true)
	var seen [][]Progress
	require.NoError(t, s.WaitReady(ctx, func(p []Progress) { seen = append(seen, p) }))
	last := seen[len(seen)-1]
	assert.True(t, last[0].Ready && last[1].Ready)
	assert.Equal(t, uint64(32*mib), last[1].Done)

	require.NoError(t, s.Finish(ctx))
	assert.Nil(t, src.args("block-job-cancel", 0)["force"], "soft cancel")
	assert.Len(t, src.CallsOf("block-job-cancel"), 2)
	require.NoError(t, s.Finish(ctx), "Finish twice is a no-op")
	require.NoError(t, s.Cleanup(ctx))
	assert.Equal(t, []string{"blockdev-add", "blockdev-mirror", "blockdev-add", "blockdev-mirror",
		"block-job-cancel", "block-job-cancel", "blockdev-del", "blockdev-del"}, src.commands())
	assert.Equal(t, []string{"nbd-server-start", "block-export-add", "block-export-add",
		"block-export-del", "block-export-del", "nbd-server-stop"}, dst.commands())
	nothingLeft(t, src, dst)
	require.NoError(t, s.Abort(ctx), "Abort after Cleanup is a no-op")
}

func TestPreflight(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name    string
		cfg     Config
		uri     string
		src     []qmp.BlockInfo
		dst     []qmp.BlockInfo
		wantMsg string
	}{
		{name: "missing destination node", dst: []qmp.BlockInfo{blk("other", "/dst/a.raw", 64*mib, false)}, wantMsg: `destination has no node "disk0"`},
		{name: "size mismatch", dst: []qmp.BlockInfo{blk("disk0", "/dst/a.raw", 32*mib, false)}, wantMsg: "has 33554432 bytes, source has 67108864"},
		{name: "destination read-only", dst: []qmp.BlockInfo{blk("disk0", "/dst/a.raw", 64*mib, true)}, wantMsg: "read-only"},
		{name: "same image file", dst: []qmp.BlockInfo{blk("disk0", "/src/a.raw", 64*mib, false)}, wantMsg: "same image file /src/a.raw"},
		{name: "same image file on tcp loopback", uri: "tcp:127.0.0.1:4444", dst: []qmp.BlockInfo{blk("disk0", "/src/a.raw", 64*mib, false)}, wantMsg: "same image file"},
		{name: "selected and shared", cfg: Config{Disks: []string{"disk0"}, Shared: []string{"disk0"}}, wantMsg: "both selected and shared"},
		{name: "selected by qdev and shared by node", cfg: Config{Disks: []string{"/machine/peripheral/vd-disk0/virtio-backend"}, Shared: []string{"disk0"}}, wantMsg: "both selected and shared"},
		{name: "read-only selected", cfg: Config{Disks: []string{"cd0"}}, wantMsg: "read-only disks are never mirrored"},
		{name: "unknown disk", cfg: Config{Disks: []string{"nope"}}, wantMsg: `"nope" not found`},
		{name: "only read-only and shared", cfg: Config{Shared: []string{"disk0"}}, wantMsg: "no disk to mirror"},
		{name: "fd migration without NBD address", uri: "fd:mig", wantMsg: "set Config.NBDAddress"},
		{name: "relative NBD address", cfg: Config{NBDAddress: qmp.UnixAddress("nbd.sock")}, wantMsg: "not absolute"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.src == nil {
				tc.src = []qmp.BlockInfo{blk("disk0", "/src/a.raw", 64*mib, false), blk("cd0", "/iso/x.iso", 8*mib, true)}
			}
			if tc.dst == nil {
				tc.dst = []qmp.BlockInfo{blk("disk0", "/dst/a.raw", 64*mib, false)}
			}
			if tc.uri == "" {
				tc.uri = uri
			}
			src, dst := fakes(t, tc.src, tc.dst)
			s, err := Start(ctx, tc.cfg, env(src, dst, tc.uri))
			require.ErrorIs(t, err, ErrPreflight)
			assert.Nil(t, s)
			assert.Contains(t, err.Error(), tc.wantMsg)
			assert.Empty(t, src.commands(), "nothing changed on the source")
			assert.Empty(t, dst.commands(), "nothing changed on the destination")
		})
	}
}

func TestSelection(t *testing.T) {
	ctx := context.Background()
	src, dst := pair(t)
	// By device qdev, and disk1 declared shared.
	s, err := Start(ctx, Config{Disks: []string{"/machine/peripheral/vd-disk0/virtio-backend"}, Shared: []string{"disk1"}, WriteBlocking: true}, env(src, dst, uri))
	require.NoError(t, err)
	assert.Len(t, src.CallsOf("blockdev-mirror"), 1)
	assert.Equal(t, "disk0", src.args("blockdev-mirror", 0)["device"])
	assert.Equal(t, "write-blocking", src.args("blockdev-mirror", 0)["copy-mode"])
	require.NoError(t, s.Abort(ctx))
	nothingLeft(t, src, dst)
}

func TestSyncTopWithBackingChain(t *testing.T) {
	ctx := context.Background()
	b := blk("disk0", "/src/top.qcow2", 64*mib, false)
	b.Inserted.BackingFile, b.Inserted.BackingFileDepth = "/images/base.qcow2", 1
	d := blk("disk0", "/dst/top.qcow2", 64*mib, false)
	d.Inserted.BackingFile, d.Inserted.BackingFileDepth = "/other/base.qcow2", 1
	src, dst := fakes(t, []qmp.BlockInfo{b}, []qmp.BlockInfo{d})
	s, err := Start(ctx, Config{}, env(src, dst, uri))
	require.NoError(t, err)
	assert.Equal(t, "top", src.args("blockdev-mirror", 0)["sync"])
	require.NoError(t, s.Abort(ctx))

	// No backing on the destination: full.
	src2, dst2 := fakes(t, []qmp.BlockInfo{b}, []qmp.BlockInfo{blk("disk0", "/dst/top.qcow2", 64*mib, false)})
	s, err = Start(ctx, Config{}, env(src2, dst2, uri))
	require.NoError(t, err)
	assert.Equal(t, "full", src2.args("blockdev-mirror", 0)["sync"])
	require.NoError(t, s.Abort(ctx))
}

func TestStartUndoesPartialWork(t *testing.T) {
	ctx := context.Background()
	src, dst := pair(t)
	src.RefuseMirror("disk1", qerr("Permission conflicts on node 'disk1'"))
	s, err := Start(ctx, Config{}, env(src, dst, uri))
	require.Error(t, err)
	assert.Nil(t, s)
	assert.NotErrorIs(t, err, ErrPreflight)
	var qe *qmp.Error
	require.ErrorAs(t, err, &qe)
	assert.Equal(t, "Permission conflicts on node 'disk1'", qe.Desc)
	// disk0's mirror was force-cancelled, both NBD nodes deleted, exports and server gone.
	assert.Equal(t, true, src.args("block-job-cancel", 0)["force"])
	assert.Len(t, src.CallsOf("blockdev-del"), 2)
	assert.Equal(t, []string{"nbd-server-start", "block-export-add", "block-export-add",
		"block-export-del", "block-export-del", "nbd-server-stop"}, dst.commands())
	assert.Equal(t, "hard", dst.args("block-export-del", 0)["mode"])
	nothingLeft(t, src, dst)

	// A retry works.
	src.RefuseMirror("disk1", nil)
	s, err = Start(ctx, Config{}, env(src, dst, uri))
	require.NoError(t, err)
	require.NoError(t, s.Abort(ctx))
	nothingLeft(t, src, dst)
}

func TestAbortBeforeAndAfterReady(t *testing.T) {
	for _, ready := range []bool{false, true} {
		ctx := context.Background()
		src, dst := pair(t)
		s, err := Start(ctx, Config{}, env(src, dst, uri))
		require.NoError(t, err)
		src.SetMirrorProgress(8*mib, ready)
		if ready {
			require.NoError(t, s.WaitReady(ctx, nil))
		} else {
			require.ErrorIs(t, s.Finish(ctx), ErrNotReady)
			assert.Empty(t, src.CallsOf("block-job-cancel"), "Finish cancels nothing when not ready")
		}
		require.NoError(t, s.Abort(ctx))
		require.NoError(t, s.Abort(ctx))
		assert.Len(t, src.CallsOf("block-job-cancel"), 2)
		nothingLeft(t, src, dst)
		require.ErrorIs(t, s.Finish(ctx), ErrState)
		require.ErrorIs(t, s.WaitReady(ctx, nil), ErrState)
	}
}

func TestMirrorErrorEvent(t *testing.T) {
	ctx := context.Background()
	src, dst := pair(t)
	s, err := Start(ctx, Config{}, env(src, dst, uri))
	require.NoError(t, err)
	p, err := s.Progress(ctx)
	require.NoError(t, err)
	src.FailMirror(p[1].Job, "Input/output error")
	err = s.WaitReady(ctx, nil)
	require.ErrorIs(t, err, ErrMirrorFailed)
	var je *JobError
	require.ErrorAs(t, err, &je)
	assert.Equal(t, "disk1", je.Node)
	assert.Contains(t, err.Error(), "write error, action report")
	assert.Contains(t, err.Error(), "Input/output error")
	_, err = s.Progress(ctx)
	require.ErrorIs(t, err, ErrMirrorFailed)
	require.NoError(t, s.Abort(ctx))
	nothingLeft(t, src, dst)
}

func TestDestinationGone(t *testing.T) {
	ctx := context.Background()
	src, dst := pair(t)
	s, err := Start(ctx, Config{}, env(src, dst, uri))
	require.NoError(t, err)
	dst.CloseConns()
	err = s.WaitReady(ctx, nil)
	require.ErrorIs(t, err, ErrDestinationGone)
	require.NoError(t, s.Abort(ctx), "the destination part is skipped")
	n, j, _, _ := src.state()
	assert.Zero(t, n+j)
}

func TestSetWriteBlocking(t *testing.T) {
	ctx := context.Background()
	src, dst := pair(t)
	s, err := Start(ctx, Config{}, env(src, dst, uri))
	require.NoError(t, err)
	err = s.SetWriteBlocking(ctx)
	require.ErrorIs(t, err, ErrUnsupported)
	require.ErrorIs(t, err, errors.ErrUnsupported)
	assert.Empty(t, src.CallsOf("block-job-change"))

	s.srcF = &qmp.Features{BlockJobChange: true}
	require.NoError(t, s.SetWriteBlocking(ctx))
	calls := src.CallsOf("block-job-change")
	require.Len(t, calls, 2)
	a := src.args("block-job-change", 0)
	assert.Equal(t, "mirror", a["type"])
	assert.Equal(t, "write-blocking", a["copy-mode"])
	p, err := s.Progress(ctx)
	require.NoError(t, err)
	assert.Equal(t, "write-blocking", p[0].CopyMode)
	require.NoError(t, s.SetWriteBlocking(ctx))
	assert.Len(t, src.CallsOf("block-job-change"), 2, "already write-blocking")
	require.NoError(t, s.Abort(ctx))
}

func TestRestartWriteBlocking(t *testing.T) {
	ctx := context.Background()
	src, dst := pair(t)
	s, err := Start(ctx, Config{}, env(src, dst, uri))
	require.NoError(t, err)
	src.SetMirrorProgress(4*mib, false)
	p, err := s.Progress(ctx)
	require.NoError(t, err)
	require.Len(t, p, 2)
	oldJobs := []string{p[0].Job, p[1].Job}
	nbd0 := src.args("blockdev-mirror", 0)["target"]

	require.NoError(t, s.RestartWriteBlocking(ctx))
	cancels := src.CallsOf("block-job-cancel")
	require.Len(t, cancels, 2)
	for i := range 2 {
		assert.Equal(t, true, src.args("block-job-cancel", i)["force"])
		a := src.args("blockdev-mirror", 2+i)
		assert.Equal(t, "write-blocking", a["copy-mode"])
		assert.Equal(t, "full", a["sync"])
		assert.NotEqual(t, oldJobs[i], a["job-id"], "a new job id")
	}
	assert.Equal(t, nbd0, src.args("blockdev-mirror", 2)["target"], "same NBD client node")
	assert.Empty(t, src.CallsOf("blockdev-del"), "NBD client nodes kept")
	assert.Empty(t, dst.CallsOf("block-export-del"), "exports kept")
	n, j, e, _ := src.state()
	assert.Equal(t, 2, n)
	assert.Equal(t, 2, j)
	_, _, e, _ = dst.state()
	assert.Equal(t, 2, e)

	// Progress and readiness follow the new jobs; the cancellation of the
	// old ones is no failure.
	p, err = s.Progress(ctx)
	require.NoError(t, err)
	for i := range p {
		assert.NotEqual(t, oldJobs[i], p[i].Job)
		assert.Equal(t, "write-blocking", p[i].CopyMode)
		assert.Zero(t, p[i].Done, "copied again from the start")
		assert.False(t, p[i].Ready)
	}
	require.NoError(t, s.RestartWriteBlocking(ctx))
	assert.Len(t, src.CallsOf("block-job-cancel"), 2, "already write-blocking: nothing restarted")
	src.SetMirrorProgress(8*mib, true)
	require.NoError(t, s.WaitReady(ctx, nil))
	require.NoError(t, s.Finish(ctx))
	require.NoError(t, s.Cleanup(ctx))
	nothingLeft(t, src, dst)
	require.ErrorIs(t, s.RestartWriteBlocking(ctx), ErrState)
}

func TestRestartWriteBlockingFailsThenAbort(t *testing.T) {
	ctx := context.Background()
	src, dst := pair(t)
	s, err := Start(ctx, Config{}, env(src, dst, uri))
	require.NoError(t, err)
	src.RefuseMirror("disk1", qerr("Permission conflict"))
	err = s.RestartWriteBlocking(ctx)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "Permission conflict")
	require.NoError(t, s.Abort(ctx))
	nothingLeft(t, src, dst)
}

func TestNextJobID(t *testing.T) {
	assert.Equal(t, "qmigrate-mirror-ab-0-wb1", nextJobID("qmigrate-mirror-ab-0"))
	assert.Equal(t, "qmigrate-mirror-ab-0-wb2", nextJobID("qmigrate-mirror-ab-0-wb1"))
}

func TestDerivedTCPPortMovesOn(t *testing.T) {
	ctx := context.Background()
	src, dst := pair(t)
	dst.failServerStart(2)
	s, err := Start(ctx, Config{Disks: []string{"disk0"}}, env(src, dst, "tcp:198.18.0.2:4444"))
	require.NoError(t, err)
	calls := dst.CallsOf("nbd-server-start")
	require.Len(t, calls, 3)
	assert.JSONEq(t, `{"addr":{"type":"inet","data":{"host":"198.18.0.2","port":"4447"}}}`, string(calls[2].Args))
	assert.Equal(t, map[string]any{"type": "inet", "host": "198.18.0.2", "port": "4447"}, src.args("blockdev-add", 0)["server"])
	require.NoError(t, s.Abort(ctx))

	// An explicit address is not moved.
	dst.failServerStart(1)
	_, err = Start(ctx, Config{NBDAddress: qmp.TCPAddress("198.18.0.2", "10809")}, env(src, dst, uri))
	require.Error(t, err)
	nothingLeft(t, src, dst)
}

// WaitReady waits on events and polls; time is fake inside the bubble.
func TestWaitReadyTiming(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		src, dst := pair(t)
		s, err := Start(ctx, Config{}, env(src, dst, uri))
		require.NoError(t, err)
		go func() {
			for i := uint64(1); i <= 4; i++ {
				time.Sleep(time.Second)
				src.SetMirrorProgress(i*8*mib, i == 4)
			}
		}()
		start := time.Now()
		var samples []Progress
		require.NoError(t, s.WaitReady(ctx, func(p []Progress) { samples = append(samples, p[0]) }))
		assert.Equal(t, 4*time.Second, time.Since(start))
		// 8 MiB per second, sampled every pollInterval: a sample that sees a
		// step of 8 MiB rates it over one interval.
		var peak float64
		for _, p := range samples {
			peak = max(peak, p.Rate)
		}
		assert.InDelta(t, 8*mib/pollInterval.Seconds(), peak, 1)
		assert.Equal(t, uint64(32*mib), samples[len(samples)-1].Done)

		require.NoError(t, s.Abort(ctx))
		require.ErrorIs(t, s.WaitReady(ctx, nil), ErrState)
	})
}

// ReconnectDelay goes to the NBD client nodes in whole seconds, rounded
// up; negative leaves QEMU's default (no reconnection).
func TestReconnectDelay(t *testing.T) {
	for _, c := range []struct {
		d    time.Duration
		want any
	}{{0, float64(1)}, {1500 * time.Millisecond, float64(2)}, {time.Minute, float64(60)}, {-1, nil}} {
		src, dst := pair(t)
		s, err := Start(context.Background(), Config{ReconnectDelay: c.d}, env(src, dst, uri))
		require.NoError(t, err)
		assert.Equal(t, c.want, src.args("blockdev-add", 0)["reconnect-delay"], "%v", c.d)
		require.NoError(t, s.Abort(context.Background()))
	}
}

func TestValidate(t *testing.T) {
	require.NoError(t, Config{}.Validate())
	require.NoError(t, Config{ReconnectDelay: -1}.Validate())
	require.NoError(t, Config{Disks: []string{"a"}, Shared: []string{"b"}, NBDAddress: qmp.TCPAddress("::1", "10809")}.Validate())
	for _, c := range []Config{
		{Disks: []string{""}},
		{Disks: []string{"a", "a"}},
		{Disks: []string{"a"}, Shared: []string{"a"}},
		{NBDAddress: qmp.TCPAddress("", "10809")},
		{NBDAddress: qmp.UnixAddress("")},
		{NBDAddress: qmp.UnixAddress("relative.sock")},
		{NBDAddress: qmp.TCPAddress("h", "0")},
		{NBDAddress: qmp.TCPAddress("h", "65536")},
		{NBDAddress: qmp.Address{Network: "vsock"}},
		{TargetDir: "/x"},
		{CreateTargets: true, TargetDir: "rel"},
		{ReconnectDelay: time.Hour + time.Second},
	} {
		assert.ErrorIs(t, c.Validate(), ErrPreflight, "%+v", c)
	}
}

func TestDeriveNBDAddress(t *testing.T) {
	for in, want := range map[string]string{
		"tcp:198.18.0.2:4444":  "tcp:198.18.0.2:4445",
		"tcp:[fd00::2]:4444":   "tcp:[fd00::2]:4445",
		"tcp:198.18.0.2:0":     "tcp:198.18.0.2:49152",
		"unix:/run/x/mig.sock": "unix:/run/x/qmigrate-nbd-tok.sock",
	} {
		mig, err := qmp.ParseAddress(in)
		require.NoError(t, err, in)
		a, err := deriveNBDAddress(mig, "tok")
		require.NoError(t, err, in)
		assert.Equal(t, want, a.String(), in)
	}
	for _, in := range []qmp.Address{{}, qmp.TCPAddress("", "4444"), qmp.UnixAddress("")} {
		_, err := deriveNBDAddress(in, "tok")
		assert.ErrorIs(t, err, ErrPreflight, in)
	}
}

func TestWaitReadyContextDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		src, dst := pair(t)
		s, err := Start(ctx, Config{}, env(src, dst, uri))
		require.NoError(t, err)
		// Off the poll grid: a deadline that fires while a command is being
		// written leaves the qmp client's write deadline in the past (qmp bug,
		// reported), which would fail the Abort below.
		wctx, cancel := context.WithTimeout(ctx, 3*time.Second+time.Millisecond)
		defer cancel()
		start := time.Now()
		require.ErrorIs(t, s.WaitReady(wctx, nil), context.DeadlineExceeded)
		assert.Equal(t, 3*time.Second+time.Millisecond, time.Since(start))
		require.NoError(t, s.Abort(ctx))
		nothingLeft(t, src, dst)
	})
}

func TestCreateTargets(t *testing.T) {
	ctx := context.Background()
	b := blk("disk0", "/src/vm/a.qcow2", 64*mib, false)
	b.Inserted.Driver = "qcow2"
	src, dst := fakes(t, []qmp.BlockInfo{b}, nil)
	_, err := Start(ctx, Config{}, env(src, dst, uri))
	require.ErrorIs(t, err, ErrPreflight, "missing node without CreateTargets")

	s, err := Start(ctx, Config{CreateTargets: true, TargetDir: "/dst/vm"}, env(src, dst, uri))
	require.NoError(t, err)
	assert.Equal(t, []string{"blockdev-create", "job-dismiss", "blockdev-create", "job-dismiss", "blockdev-add", "blockdev-add",
		"nbd-server-start", "block-export-add"}, dst.commands())
	c := dst.args("blockdev-create", 0)["options"].(map[string]any)
	assert.Equal(t, map[string]any{"driver": "file", "filename": "/dst/vm/a.qcow2", "size": float64(64 * mib)}, c)
	c = dst.args("blockdev-create", 1)["options"].(map[string]any)
	assert.Equal(t, "qcow2", c["driver"])
	assert.Equal(t, map[string]any{"driver": "file", "filename": "/dst/vm/a.qcow2"}, c["file"], "inline file: an inactive node refuses writes")
	fmtNode := dst.args("blockdev-add", 1)
	assert.Equal(t, "disk0", fmtNode["node-name"])
	assert.Equal(t, "qcow2", fmtNode["driver"])
	assert.Equal(t, "unmap", fmtNode["discard"])
	assert.Equal(t, "disk0", dst.args("block-export-add", 0)["node-name"])
	require.NoError(t, s.Abort(ctx))
	nothingLeft(t, src, dst)

	// A failed creation job is an error and is undone.
	dst.FailCreate("Could not create '/dst/vm/a.qcow2': Permission denied")
	_, err = Start(ctx, Config{CreateTargets: true, TargetDir: "/dst/vm"}, env(src, dst, uri))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "Permission denied")
	nothingLeft(t, src, dst)
}

// With TLS credentials the NBD server and every NBD client node use them:
// the server end on the destination, the client end (and the host name the
// certificate must carry) on the source.
func TestTLSCredentials(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name, host string
	}{{"x509 with a host name", "dst.example"}, {"without a host name", ""}} {
		t.Run(tc.name, func(t *testing.T) {
			src, dst := pair(t)
			s, err := Start(ctx, Config{Disks: []string{"disk0"}}, tlsEnv(env(src, dst, uri), "creds0", tc.host))
			require.NoError(t, err)
			assert.Equal(t, "creds0", dst.args("nbd-server-start", 0)["tls-creds"])
			add := src.args("blockdev-add", 0)
			assert.Equal(t, "creds0", add["tls-creds"])
			if tc.host != "" {
				assert.Equal(t, tc.host, add["tls-hostname"])
			} else {
				assert.NotContains(t, add, "tls-hostname", "QEMU takes the tcp address's host")
			}
			require.NoError(t, s.Abort(ctx))
			nothingLeft(t, src, dst)
		})
	}
	src, dst := pair(t)
	_, err := Start(ctx, Config{}, tlsEnv(env(src, dst, uri), "", "dst.example"))
	require.ErrorIs(t, err, ErrPreflight)
	assert.Contains(t, err.Error(), "TLSHostname set without TLSCreds")
}

func tlsEnv(e Env, creds, host string) Env {
	e.TLSCreds, e.TLSHostname = creds, host
	return e
}

// A force-cancelled mirror that outlives the yank of its NBD connection
// (real QEMU over a unix socket, the destination stopped with NBD
// requests in flight: measured on 10.0) makes Abort end with an error
// that says so, naming the job, not a bare query timeout.
func TestAbortStuckMirrorSaysSo(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		src, dst := pair(t)
		s, err := Start(ctx, Config{Disks: []string{"disk0"}}, env(src, dst, uri))
		require.NoError(t, err)
		job := bmJobOf(t, s)
		src.Handle("block-job-cancel", func(json.RawMessage) (any, error) { return nil, nil }) // accepted, never ends
		src.Handle("yank", func(json.RawMessage) (any, error) { return nil, nil })
		actx, cancel := context.WithTimeout(ctx, 5*time.Second+time.Millisecond)
		defer cancel()
		err = s.Abort(actx)
		require.Error(t, err)
		t.Log(err)
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		assert.Contains(t, err.Error(), "mirrors "+job+" cancelled and their NBD connections yanked, still waiting for NBD requests in flight")
		assert.Len(t, src.CallsOf("yank"), 1)
	})
}

func bmJobOf(t *testing.T, s *Session) string {
	t.Helper()
	p, err := s.Progress(context.Background())
	require.NoError(t, err)
	require.Len(t, p, 1)
	return p[0].Job
}

// A mirror that ends between Abort's query-block-jobs and its
// block-job-cancel makes QEMU answer DeviceNotActive (measured on 10.0,
// an Abort retried as a stuck mirror ended): nothing left to cancel, not
// an error.
func TestAbortJobEndedBeforeCancel(t *testing.T) {
	ctx := context.Background()
	src, dst := pair(t)
	s, err := Start(ctx, Config{Disks: []string{"disk0"}}, env(src, dst, uri))
	require.NoError(t, err)
	job := bmJobOf(t, s)
	cancelJob := src.Handler("block-job-cancel")
	src.Handle("block-job-cancel", func(args json.RawMessage) (any, error) {
		if _, err := cancelJob(args); err != nil {
			return nil, err
		}
		return nil, &qmp.Error{Class: "DeviceNotActive", Desc: "Block job '" + job + "' not found"}
	})
	require.NoError(t, s.Abort(ctx))
	nothingLeft(t, src, dst)
}
