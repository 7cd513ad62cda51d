package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/qmigrate/qmigrate/engine"
)

// syncBuffer is a bytes.Buffer safe for the signal goroutine and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestSignalContextFirstCancelsLaterOnesOnlyReport(t *testing.T) {
	var stderr syncBuffer
	ctx, stop := signalContext(context.Background(), &stderr)
	defer stop()

	require.NoError(t, syscall.Kill(syscall.Getpid(), syscall.SIGINT))
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("SIGINT did not cancel the context")
	}
	assert.Contains(t, stderr.String(), "cancelling; rolling back")

	require.NoError(t, syscall.Kill(syscall.Getpid(), syscall.SIGTERM))
	require.Eventually(t, func() bool {
		return bytes.Contains([]byte(stderr.String()), []byte("still rolling back"))
	}, 5*time.Second, 10*time.Millisecond)
}

func TestSignalContextStopCancels(t *testing.T) {
	ctx, stop := signalContext(context.Background(), &syncBuffer{})
	require.NoError(t, ctx.Err())
	stop()
	assert.Error(t, ctx.Err())
}

// openPTY opens a pseudo-terminal: the master to read what was written, the
// slave as the terminal qmigrate writes to.
func openPTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("no pseudo-terminal: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	require.NoError(t, unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0))
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	require.NoError(t, err)
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return m, s
}

// On a terminal the signal's note first clears the line: the live progress
// line and the echoed ^C are there.
func TestSignalNoteClearsTheLiveLineOnATerminal(t *testing.T) {
	t.Setenv("TERM", "xterm") // TERM=dumb would count as no terminal
	master, slave := openPTY(t)
	ctx, stop := signalContext(context.Background(), slave)
	defer stop()
	require.NoError(t, syscall.Kill(syscall.Getpid(), syscall.SIGTERM))
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("SIGTERM did not cancel the context")
	}
	require.NoError(t, master.SetReadDeadline(time.Now().Add(5*time.Second)))
	var got []byte
	buf := make([]byte, 512)
	for !bytes.Contains(got, []byte("cancelling")) {
		n, err := master.Read(buf)
		require.NoError(t, err, "read %q", got)
		got = append(got, buf[:n]...)
	}
	assert.True(t, bytes.HasPrefix(got, []byte(eraseLine+"qmigrate: terminated: cancelling")), "%q", got)
}

// The live line on a terminal, unless debug logs (-v) go to stderr: they
// would be written into it, so plain lines then.
func TestRendererOnATerminal(t *testing.T) {
	t.Setenv("TERM", "xterm")
	_, slave := openPTY(t)
	assert.IsType(t, &termRenderer{}, newRenderer(false, false, slave, slave))
	assert.IsType(t, &plainRenderer{}, newRenderer(false, true, slave, slave))
	assert.IsType(t, &jsonRenderer{}, newRenderer(true, false, slave, slave))
	assert.IsType(t, &plainRenderer{}, newRenderer(false, false, &bytes.Buffer{}, slave))
}

// A note written on stderr while the live line is on the terminal (the
// signal handler's) goes through the view, above the live line, instead of
// under it where the next redraw would wipe it.
func TestNotesGoAboveTheLiveLine(t *testing.T) {
	t.Setenv("TERM", "xterm")
	master, slave := openPTY(t)
	notes := stderrNotes(slave)
	require.IsType(t, noteWriter{}, notes)
	r := &termRenderer{w: slave, resize: true}
	r.Event(engine.Event{Kind: engine.EventPhase, Phase: engine.PhaseConverge})
	require.Same(t, r.view, shownView.Load())
	_, err := notes.Write([]byte("qmigrate: interrupt: cancelling\n"))
	require.NoError(t, err)
	r.Result(resultOf(nil, cancelledErr()), nil)
	assert.Nil(t, shownView.Load(), "the view is gone: notes go to the terminal again")

	require.NoError(t, master.SetReadDeadline(time.Now().Add(5*time.Second)))
	var got []byte
	buf := make([]byte, 4096)
	for !bytes.Contains(got, []byte("cancelled after")) {
		n, err := master.Read(buf)
		require.NoError(t, err, "read %q", got)
		got = append(got, buf[:n]...)
	}
	note := bytes.Index(got, []byte("qmigrate: interrupt: cancelling"))
	require.GreaterOrEqual(t, note, 0, "%q", got)
	assert.Less(t, note, bytes.Index(got, []byte("cancelled after")))
	// Not a terminal: stderr as it is.
	f, err := os.CreateTemp(t.TempDir(), "stderr")
	require.NoError(t, err)
	defer f.Close()
	assert.Same(t, f, stderrNotes(f))
}
