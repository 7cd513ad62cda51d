package qmp_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/qmp"
)

// qemuBinary finds QEMU: $QMIGRATE_QEMU, else qemu-system-x86_64 on PATH.
// $QMIGRATE_QEMU_FIRMWARE is its -L folder (may be empty). Without QEMU the
// test is skipped, unless $CI is set: then it fails.
func qemuBinary(tb testing.TB) (bin string, firmware []string) {
	tb.Helper()
	bin = os.Getenv("QMIGRATE_QEMU")
	if bin == "" {
		bin = "qemu-system-x86_64"
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		if os.Getenv("CI") != "" {
			tb.Fatalf("QEMU not found (%v); CI needs it", err)
		}
		tb.Skipf("QEMU not found: %v", err)
	}
	if fw := os.Getenv("QMIGRATE_QEMU_FIRMWARE"); fw != "" {
		firmware = []string{"-L", fw, "-L", "/usr/share/seabios"}
	}
	return path, firmware
}

// startQEMU starts a paused TCG guest with one QMP unix socket per name and
// returns the socket paths. The process and sockets are removed when the test
// ends.
func startQEMU(tb testing.TB, monitors ...string) []string {
	tb.Helper()
	bin, fw := qemuBinary(tb)
	if len(monitors) == 0 {
		monitors = []string{"qmp"}
	}
	dir := tb.TempDir()
	args := append([]string{"-M", "q35", "-accel", "tcg", "-cpu", "max", "-m", "64",
		"-nodefaults", "-display", "none", "-S"}, fw...)
	var socks []string
	for _, m := range monitors {
		p := filepath.Join(dir, m+".sock")
		socks = append(socks, p)
		args = append(args, "-qmp", "unix:"+p+",server=on,wait=off")
	}
	cmd := exec.Command(bin, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	require.NoError(tb, cmd.Start())
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	tb.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		for _, s := range socks {
			_ = os.Remove(s)
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for _, s := range socks {
		for {
			if _, err := os.Stat(s); err == nil {
				break
			}
			select {
			case <-exited:
				tb.Fatalf("QEMU exited: %s", stderr.String())
			case <-time.After(10 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				tb.Fatalf("QEMU socket %s did not appear", s)
			}
		}
	}
	return socks
}

// dialQEMU connects to a QMP socket of startQEMU's. QEMU creates the socket
// file when it binds it and listens a moment later: a connect in between is
// refused, so a refusal is retried until the deadline.
func dialQEMU(tb testing.TB, sock string, opts ...qmp.Option) *qmp.Client {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		c, err := qmp.Dial(ctx, "unix", sock, opts...)
		if err == nil {
			tb.Cleanup(func() { c.Close() })
			return c
		}
		if !errors.Is(err, syscall.ECONNREFUSED) || ctx.Err() != nil {
			require.NoError(tb, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestQEMUHandshake(t *testing.T) {
	c := dialQEMU(t, startQEMU(t)[0])
	ctx := ctxT(t)
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
	c := dialQEMU(t, startQEMU(t)[0])
	ctx := ctxT(t)
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
	c := dialQEMU(t, startQEMU(t)[0])
	ctx := ctxT(t)
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
	c := dialQEMU(t, startQEMU(t)[0])
	ctx := ctxT(t)
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
	c := dialQEMU(t, startQEMU(t)[0])
	ctx := ctxT(t)
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
	c := dialQEMU(t, startQEMU(t)[0])
	ctx := ctxT(t)
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
	c := dialQEMU(t, startQEMU(t)[0])
	ctx := ctxT(t)
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
	socks := startQEMU(b, "client", "raw")
	c := dialQEMU(b, socks[0])
	rc := dialRaw(b, socks[1])
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
	c := dialQEMU(t, startQEMU(t)[0])
	ctx := ctxT(t)
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
