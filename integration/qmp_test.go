package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/qmp"
)

// These tests prove package qmp against a real QEMU: a paused TCG machine
// without a guest (qemulab.Config.Paused, 64 MiB).

// qmpQEMU starts a paused QEMU without a guest and returns its QMP client
// (connected by the harness); more names the QMP sockets it also gets
// (Instance.QMPSocketOf).
func qmpQEMU(tb testing.TB, more ...string) (*qmp.Client, *qemulab.Instance) {
	tb.Helper()
	q := qemulab.RequireQEMU(tb)
	inst := qemulab.StartT(tb, q, qemulab.Config{Name: "qmp", MemMiB: 64, Paused: true, QMPSockets: more})
	return inst.QMP, inst
}

func qmpCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestQEMUHandshake(t *testing.T) {
	c, _ := qmpQEMU(t)
	ctx := qmpCtx(t)
	assert.True(t, c.OOB(), "QEMU offers oob on a unix QMP socket")
	assert.Contains(t, c.GreetingCapabilities(), "oob")
	v, err := c.QueryVersion(ctx)
	require.NoError(t, err)
	assert.Equal(t, c.Version().Major, v.QEMU.Major)
	assert.Equal(t, c.Version().Minor, v.QEMU.Minor)
	assert.Equal(t, c.Version().Package, v.Package)
	assert.True(t, c.Version().AtLeast(7, 2))
	st, err := c.QueryStatus(ctx)
	require.NoError(t, err)
	assert.Equal(t, qmp.StatusInfo{Status: "prelaunch"}, *st)
}

func TestQEMULargeSchemaReply(t *testing.T) {
	c, _ := qmpQEMU(t)
	ctx := qmpCtx(t)
	var raw json.RawMessage
	require.NoError(t, c.Execute(ctx, "query-qmp-schema", nil, &raw))
	assert.Greater(t, len(raw), 150_000, "one reply line far beyond 64 KiB")
	f, err := c.ProbeFeatures(ctx)
	require.NoError(t, err)
	assert.True(t, f.HasCommand("migrate"))
	assert.True(t, f.HasCapability("postcopy-ram"))
	assert.Equal(t, c.Version(), f.Version)
	assert.Equal(t, c.Version().AtLeast(8, 2), f.MigrateChannels)
	assert.Equal(t, c.Version().AtLeast(9, 1), f.IncomingExitOnError)
	assert.Equal(t, c.Version().AtLeast(8, 2), f.BlockJobChange)
}

func TestQEMUStopContEvents(t *testing.T) {
	c, _ := qmpQEMU(t)
	ctx := qmpCtx(t)
	sub := c.SubscribeNames("STOP", "RESUME")
	defer sub.Close()
	next := func() qmp.Event {
		select {
		case ev := <-sub.C:
			return ev
		case <-ctx.Done():
			t.Fatal("no event")
			return qmp.Event{}
		}
	}
	require.NoError(t, c.Cont(ctx))
	ev := next()
	assert.Equal(t, "RESUME", ev.Name)
	assert.WithinDuration(t, time.Now(), ev.Time, time.Minute, "QEMU's timestamp")
	require.NoError(t, c.Stop(ctx))
	assert.Equal(t, "STOP", next().Name)
	st, err := c.QueryStatus(ctx)
	require.NoError(t, err)
	assert.Equal(t, "paused", st.Status)
	require.NoError(t, c.Cont(ctx))
	assert.Equal(t, "RESUME", next().Name)
	assert.Zero(t, sub.Dropped())
}

func TestQEMUFDPassing(t *testing.T) {
	c, _ := qmpQEMU(t)
	ctx := qmpCtx(t)
	r, w, err := os.Pipe()
	require.NoError(t, err)
	defer r.Close()
	require.NoError(t, c.Getfd(ctx, "pipe0", int(w.Fd())))
	require.NoError(t, w.Close())

	// QEMU holds the only write end now: a read waits instead of seeing EOF.
	require.NoError(t, r.SetReadDeadline(time.Now().Add(200*time.Millisecond)))
	_, err = r.Read(make([]byte, 1))
	assert.ErrorIs(t, err, os.ErrDeadlineExceeded)

	require.NoError(t, c.Closefd(ctx, "pipe0"))
	// Now nobody holds a write end.
	require.NoError(t, r.SetReadDeadline(time.Now().Add(10*time.Second)))
	_, err = r.Read(make([]byte, 1))
	assert.ErrorIs(t, err, io.EOF)

	err = c.Closefd(ctx, "pipe0")
	var qe *qmp.Error
	require.ErrorAs(t, err, &qe)
	assert.Equal(t, "GenericError", qe.Class)
	assert.Equal(t, "closefd", qe.Command)
	assert.Contains(t, qe.Desc, "pipe0")

	// add-fd / remove-fd.
	r2, w2, err := os.Pipe()
	require.NoError(t, err)
	defer r2.Close()
	defer w2.Close()
	info, err := c.AddFd(ctx, int(w2.Fd()), -1, "test pipe")
	require.NoError(t, err)
	assert.GreaterOrEqual(t, info.Fd, 0)
	require.NoError(t, c.RemoveFd(ctx, info.FdsetID, -1))
	assert.NoError(t, c.Err())
}

func TestQEMUErrorClasses(t *testing.T) {
	c, _ := qmpQEMU(t)
	ctx := qmpCtx(t)
	err := c.Execute(ctx, "no-such-command", nil, nil)
	assert.True(t, qmp.IsCommandNotFound(err))
	assert.ErrorIs(t, err, &qmp.Error{Class: "CommandNotFound", Command: "no-such-command"})

	err = c.BlockJobCancel(ctx, "nojob", false)
	assert.ErrorIs(t, err, &qmp.Error{Class: "DeviceNotActive"})

	err = c.Execute(ctx, "query-status", map[string]any{"bogus": 1}, nil)
	var qe *qmp.Error
	require.ErrorAs(t, err, &qe)
	assert.Equal(t, "GenericError", qe.Class)
	assert.NoError(t, c.Err(), "errors do not hurt the connection")
}

func TestQEMUConcurrentCommands(t *testing.T) {
	c, _ := qmpQEMU(t)
	ctx := qmpCtx(t)
	var wg sync.WaitGroup
	for i := range 32 {
		wg.Go(func() {
			if i%2 == 0 {
				st, err := c.QueryStatus(ctx)
				if assert.NoError(t, err) {
					assert.Equal(t, "prelaunch", st.Status)
				}
			} else {
				info, err := c.QueryMigrate(ctx)
				if assert.NoError(t, err) {
					assert.Equal(t, qmp.StatusNone, info.Status)
				}
			}
		})
	}
	wg.Wait()
}

func TestQEMUQuit(t *testing.T) {
	c, _ := qmpQEMU(t)
	ctx := qmpCtx(t)
	require.NoError(t, c.Quit(ctx))
	select {
	case <-c.Done():
	case <-ctx.Done():
		t.Fatal("connection not closed after quit")
	}
	assert.ErrorIs(t, c.Err(), qmp.ErrClosed)
	_, err := c.QueryStatus(ctx)
	assert.ErrorIs(t, err, qmp.ErrClosed)
}

// rawConn is a bare QMP connection: greeting read, capabilities negotiated,
// then one write and one line read per round trip.
type rawConn struct {
	conn net.Conn
	r    *bufio.Reader
	buf  []byte
	id   int
}

func dialRaw(tb testing.TB, sock string) *rawConn {
	tb.Helper()
	conn, err := net.Dial("unix", sock)
	require.NoError(tb, err)
	tb.Cleanup(func() { conn.Close() })
	rc := &rawConn{conn: conn, r: bufio.NewReader(conn)}
	_, err = rc.r.ReadSlice('\n') // greeting
	require.NoError(tb, err)
	_, err = conn.Write([]byte(`{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":"0"}` + "\n"))
	require.NoError(tb, err)
	_, err = rc.r.ReadSlice('\n')
	require.NoError(tb, err)
	return rc
}

func (rc *rawConn) queryStatus() error {
	rc.id++
	rc.buf = fmt.Appendf(rc.buf[:0], `{"execute":"query-status","id":"%d"}`+"\n", rc.id)
	if _, err := rc.conn.Write(rc.buf); err != nil {
		return err
	}
	line, err := rc.r.ReadSlice('\n')
	if err != nil {
		return err
	}
	if !bytes.Contains(line, []byte(`"return"`)) {
		return fmt.Errorf("unexpected reply %s", line)
	}
	return nil
}

// BenchmarkQueryStatus measures query-status round trips against a real
// QEMU: through the client (Client), as a bare write-then-read loop on a
// second QMP connection to the same QEMU (RawWriteRead), and both alternating
// in one loop (Interleaved), which reports the ratio client/raw and is the
// fair figure on a busy machine.
func BenchmarkQueryStatus(b *testing.B) {
	c, inst := qmpQEMU(b, "raw")
	rc := dialRaw(b, inst.QMPSocketOf("raw"))
	ctx := context.Background()
	b.Run("Client", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := c.QueryStatus(ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("RawWriteRead", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if err := rc.queryStatus(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Interleaved", func(b *testing.B) {
		var client, raw time.Duration
		for b.Loop() {
			t0 := time.Now()
			if _, err := c.QueryStatus(ctx); err != nil {
				b.Fatal(err)
			}
			t1 := time.Now()
			if err := rc.queryStatus(); err != nil {
				b.Fatal(err)
			}
			client += t1.Sub(t0)
			raw += time.Since(t1)
		}
		b.ReportMetric(float64(client.Nanoseconds())/float64(b.N), "client-ns/op")
		b.ReportMetric(float64(raw.Nanoseconds())/float64(b.N), "raw-ns/op")
		b.ReportMetric(float64(client)/float64(raw), "client/raw")
	})
}

// exec-oob reaches QEMU and its reply is matched by id like any other.
func TestQEMUExecOOB(t *testing.T) {
	c, _ := qmpQEMU(t)
	ctx := qmpCtx(t)
	require.True(t, c.OOB())
	err := c.MigratePause(ctx) // out of band; no postcopy is running
	var qe *qmp.Error
	require.ErrorAs(t, err, &qe)
	assert.Equal(t, "GenericError", qe.Class)
	assert.Equal(t, "migrate-pause", qe.Command)
	assert.Contains(t, qe.Desc, "postcopy")
	// An in-band-only command sent out of band is refused by QEMU.
	err = c.ExecuteOOB(ctx, "query-status", nil, nil)
	require.ErrorAs(t, err, &qe)
	assert.Equal(t, "GenericError", qe.Class)
	st, err := c.QueryStatus(ctx)
	require.NoError(t, err)
	assert.Equal(t, "prelaunch", st.Status)
}
