package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/qmigrate/qmigrate/internal/guest/sweep"
	"github.com/qmigrate/qmigrate/qmp"
)

// demoQEMU is one QEMU process the demo started: the sweep guest under TCG,
// QMP on a unix socket, the serial console in a file.
type demoQEMU struct {
	name       string
	qmpAddr    string // unix:/path
	serialPath string
	cmd        *exec.Cmd
	client     *qmp.Client
	exited     chan struct{} // closed when the process has been reaped
	waitErr    error         // valid after exited is closed
	stderr     *lockedBuffer
}

// lockedBuffer collects QEMU's stderr for error messages.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.buf.Len() < 64<<10 {
		b.buf.Write(p)
	}
	return len(p), nil
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(bytes.TrimSpace(b.buf.Bytes()))
}

// demoMemory is the guest RAM: the sweep covers [1 MiB, 100 MiB).
const demoMemory = "128M"

// qemuArgs are the arguments of a demo QEMU; source and destination differ
// only in their files and -incoming defer.
func qemuArgs(firmware []string, dir, name, disk string, incoming bool) []string {
	args := []string{
		"-name", "qmigrate-demo-" + name,
		"-accel", "tcg", "-cpu", "max", "-machine", "q35", "-smp", "1", "-m", demoMemory,
		"-nodefaults", "-no-user-config", "-display", "none",
		"-serial", "file:" + filepath.Join(dir, name+".serial"),
		"-qmp", "unix:" + filepath.Join(dir, name+".qmp") + ",server=on,wait=off",
	}
	args = append(args, firmware...)
	args = append(args, sweep.DriveArgs(disk, "disk0")...)
	if incoming {
		args = append(args, "-incoming", "defer")
	}
	return args
}

// startQEMU launches a demo QEMU and connects to its monitor. The process
// gets its own process group, so a Ctrl-C on the terminal reaches qmigrate
// (which rolls back and cleans up) and not QEMU, and it is killed if qmigrate
// dies.
func startQEMU(ctx context.Context, bin string, args []string, name, dir string, log *slog.Logger) (*demoQEMU, error) {
	q := &demoQEMU{
		name:       name,
		qmpAddr:    "unix:" + filepath.Join(dir, name+".qmp"),
		serialPath: filepath.Join(dir, name+".serial"),
		exited:     make(chan struct{}),
		stderr:     &lockedBuffer{},
	}
	q.cmd = exec.Command(bin, args...)
	q.cmd.Stdout = q.stderr
	q.cmd.Stderr = q.stderr
	q.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if log != nil {
		log.Debug("starting QEMU", "name", name, "cmd", q.cmd.String())
	}
	if err := q.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s QEMU: %w", name, err)
	}
	go func() {
		q.waitErr = q.cmd.Wait()
		close(q.exited)
	}()
	// QEMU creates the socket early; dial until it answers or QEMU exits.
	deadline := time.Now().Add(20 * time.Second)
	for {
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		c, err := qmp.DialAddress(dctx, q.qmpAddr)
		cancel()
		if err == nil {
			q.client = c
			return q, nil
		}
		select {
		case <-q.exited:
			return nil, fmt.Errorf("%s QEMU exited: %v: %s", name, q.waitErr, q.stderr.String())
		case <-ctx.Done():
			q.kill()
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			q.kill()
			return nil, fmt.Errorf("%s QEMU: no QMP socket after 20s: %w", name, err)
		}
	}
}

// running reports whether the process is still alive.
func (q *demoQEMU) running() bool {
	select {
	case <-q.exited:
		return false
	default:
		return true
	}
}

// serial returns what the guest wrote to its serial port so far.
func (q *demoQEMU) serial() string {
	b, _ := os.ReadFile(q.serialPath)
	return string(b)
}

// stop ends the process: QMP quit, then SIGKILL if it lingers. It is safe to
// call more than once and never uses a cancelled context.
func (q *demoQEMU) stop() {
	if q == nil {
		return
	}
	if q.client != nil && q.running() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = q.client.Quit(ctx)
		cancel()
	}
	select {
	case <-q.exited:
	case <-time.After(3 * time.Second):
		q.kill()
	}
	if q.client != nil {
		q.client.Close()
	}
}

func (q *demoQEMU) kill() {
	if q.cmd.Process != nil {
		_ = q.cmd.Process.Kill()
	}
	<-q.exited
}

// readByte reads one byte of guest memory (guest-physical addr) with pmemsave.
func (q *demoQEMU) readByte(ctx context.Context, dir string, addr uint64) (byte, error) {
	path := filepath.Join(dir, q.name+".byte")
	if err := q.client.Pmemsave(ctx, addr, 1, path); err != nil {
		return 0, err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	if len(b) != 1 {
		return 0, errors.New("pmemsave wrote no byte")
	}
	return b[0], nil
}

// checkGuest verifies the sweep guest in q from outside: its vCPU runs (the
// first swept byte changes), then, stopped, its memory holds the sweep
// invariant (no page lost or stale). The guest is left stopped.
func (q *demoQEMU) checkGuest(ctx context.Context, dir string) (string, error) {
	st, err := q.client.QueryStatus(ctx)
	if err != nil {
		return "", fmt.Errorf("query-status: %w", err)
	}
	if st.Status != "running" {
		return "", fmt.Errorf("the guest is %q, not running", st.Status)
	}
	first, err := q.readByte(ctx, dir, sweep.RangeStart)
	if err != nil {
		return "", fmt.Errorf("reading guest memory: %w", err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, err := q.readByte(ctx, dir, sweep.RangeStart)
		if err != nil {
			return "", fmt.Errorf("reading guest memory: %w", err)
		}
		if b != first {
			break
		}
		if time.Now().After(deadline) {
			return "", errors.New("the guest's vCPU made no progress in 20s")
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	if err := q.client.Stop(ctx); err != nil {
		return "", fmt.Errorf("stop: %w", err)
	}
	dump := filepath.Join(dir, q.name+".ram")
	if err := q.client.Pmemsave(ctx, sweep.RangeStart, sweep.RangeSize, dump); err != nil {
		return "", fmt.Errorf("pmemsave: %w", err)
	}
	mem, err := os.ReadFile(dump)
	_ = os.Remove(dump)
	if err != nil {
		return "", err
	}
	if _, err := sweep.Check(mem); err != nil {
		return "", err
	}
	return fmt.Sprintf("the guest runs and all %d swept pages are intact", sweep.Pages), nil
}
