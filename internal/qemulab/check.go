package qemulab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/internal/guest/sweep"
	"github.com/qmigrate/qmigrate/qmp"
)

// IntegrityError is a failed integrity check of a migrated guest. Err says
// what failed; errors.As finds a *sweep.BadPagesError in it for stale pages.
type IntegrityError struct {
	Guest string // "sweep", "linux"
	Step  string // which check failed
	Err   error
}

func (e *IntegrityError) Error() string {
	return fmt.Sprintf("qemulab: %s guest integrity: %s: %v", e.Guest, e.Step, e.Err)
}

func (e *IntegrityError) Unwrap() error { return e.Err }

// ErrNotAdvancing means the destination guest did not make progress.
var ErrNotAdvancing = errors.New("guest memory did not change")

// SweepCheckOptions tune CheckSweep.
type SweepCheckOptions struct {
	// Dir is where the memory dumps go (QEMU writes them). Default: a fresh
	// temporary folder, removed afterwards.
	Dir string
	// RunTimeout bounds the wait for proof that the destination guest runs
	// (its memory changes between two dumps). Default 30 s.
	RunTimeout time.Duration
	// SkipRunning skips that proof (for a destination that is already stopped).
	SkipRunning bool
	// Corrupt, when set, may alter the final dump before it is checked
	// (negative controls).
	Corrupt func(mem []byte)
	// Logf, when set, receives progress notes.
	Logf func(format string, args ...any)
}

// SweepReport describes a destination that passed CheckSweep.
type SweepReport struct {
	Edge  int  // index of the first page of the older run (0: no edge)
	Value byte // first byte of page 0
	// RunningAfter is how long it took to see the destination's memory change.
	RunningAfter time.Duration
}

// CheckSweep checks a sweep guest after a migration from src to dst:
//  1. the source is in runstate postmigrate (skipped when src is nil);
//  2. the destination runs and its guest makes progress: two dumps of the
//     swept range differ (unless SkipRunning);
//  3. the destination is stopped, and stays stopped;
//  4. a pmemsave of [1 MiB, 100 MiB) satisfies sweep.Check.
//
// Failures are *IntegrityError; stale pages wrap *sweep.BadPagesError naming
// the first bad page. The destination is left stopped.
func CheckSweep(ctx context.Context, src, dst *qmp.Client, opts SweepCheckOptions) (*SweepReport, error) {
	fail := func(step string, err error) (*SweepReport, error) {
		return nil, &IntegrityError{Guest: "sweep", Step: step, Err: err}
	}
	dir := opts.Dir
	if dir == "" {
		d, err := os.MkdirTemp("", "qm-check-")
		if err != nil {
			return fail("temp dir", err)
		}
		defer os.RemoveAll(d)
		dir = d
	}
	if src != nil {
		st, err := src.QueryStatus(ctx)
		if err != nil {
			return fail("source status", err)
		}
		if st.Status != "postmigrate" {
			return fail("source status", fmt.Errorf("source is %q, want postmigrate", st.Status))
		}
	}
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	rep := &SweepReport{}
	if !opts.SkipRunning {
		d, err := waitSweepRunning(ctx, dst, dir, opts.RunTimeout, logf)
		if err != nil {
			return fail("destination running", err)
		}
		rep.RunningAfter = d
	}
	if err := dst.Stop(ctx); err != nil {
		return fail("stop destination", err)
	}
	st, err := dst.QueryStatus(ctx)
	if err != nil {
		return fail("destination status", err)
	}
	if st.Running {
		return fail("destination status", fmt.Errorf("destination still running (%s) after stop", st.Status))
	}
	mem, err := DumpSweep(ctx, dst, filepath.Join(dir, "sweep.mem"))
	if err != nil {
		return fail("pmemsave", err)
	}
	if opts.Corrupt != nil {
		opts.Corrupt(mem)
	}
	if _, err := sweep.Check(mem); err != nil {
		return fail("memory", err)
	}
	rep.Value = mem[0]
	for i := 1; i < sweep.Pages; i++ {
		if mem[i*sweep.PageSize] != mem[0] {
			rep.Edge = i
			break
		}
	}
	return rep, nil
}

// waitSweepRunning waits until the destination reports running and its
// guest makes progress. The cheap proof is the sweep's page pointer (EDI,
// read with HMP "info registers") moving inside the swept range; when the
// registers cannot be read, two dumps of the swept range must differ.
func waitSweepRunning(ctx context.Context, dst *qmp.Client, dir string, timeout time.Duration, logf func(string, ...any)) (time.Duration, error) {
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	path := filepath.Join(dir, "sweep-running.mem")
	var first []byte
	var firstEDI uint32
	useDumps := false
	status := ""
	for {
		st, err := dst.QueryStatus(ctx)
		if err != nil {
			return 0, err
		}
		status = st.Status
		if st.Running && !useDumps {
			edi, err := sweepCursor(ctx, dst)
			switch {
			case err != nil:
				logf("qemulab: check sweep: %v; falling back to memory dumps", err)
				useDumps = true
			case firstEDI == 0:
				firstEDI = edi
			case edi != firstEDI:
				logf("qemulab: check sweep: destination sweep pointer moved %#x -> %#x", firstEDI, edi)
				return time.Since(start), nil
			}
		}
		if st.Running && useDumps {
			t0 := time.Now()
			mem, err := DumpSweep(ctx, dst, path)
			if err != nil {
				return 0, err
			}
			logf("qemulab: check sweep: running destination dumped in %v", time.Since(t0).Round(time.Millisecond))
			fb := sweep.FirstBytes(mem)
			if first == nil {
				first = fb
			} else if !bytes.Equal(first, fb) {
				return time.Since(start), nil
			}
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("%w within %v (status %s): %w", ErrNotAdvancing, timeout, status, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// ErrNoCursor means the sweep's page pointer could not be read.
var ErrNoCursor = errors.New("cannot read the sweep guest's page pointer")

// sweepCursor reads EDI, the sweep's page pointer, with HMP info registers.
func sweepCursor(ctx context.Context, c *qmp.Client) (uint32, error) {
	out, err := c.HumanMonitorCommand(ctx, "info registers")
	if err != nil {
		return 0, fmt.Errorf("%w: %w", ErrNoCursor, err)
	}
	return parseCursor(out)
}

// parseCursor finds EDI in the output of info registers (32-bit format) and
// checks that it points into the swept range.
func parseCursor(out string) (uint32, error) {
	_, rest, ok := strings.Cut(out, "EDI=")
	if !ok || len(rest) < 8 {
		return 0, fmt.Errorf("%w: no EDI in %q", ErrNoCursor, out)
	}
	v, err := strconv.ParseUint(rest[:8], 16, 32)
	if err != nil {
		return 0, fmt.Errorf("%w: %w", ErrNoCursor, err)
	}
	if v < sweep.RangeStart || v > sweep.RangeEnd {
		return 0, fmt.Errorf("%w: EDI=%#x is outside the swept range (not the sweep loop?)", ErrNoCursor, v)
	}
	return uint32(v), nil
}

// DumpSweep pmemsaves the swept range [1 MiB, 100 MiB) of c's guest to path
// (which QEMU must be able to write) and returns its contents. The file is
// removed afterwards.
func DumpSweep(ctx context.Context, c *qmp.Client, path string) ([]byte, error) {
	defer os.Remove(path)
	if err := c.Pmemsave(ctx, sweep.RangeStart, sweep.RangeSize, path); err != nil {
		return nil, fmt.Errorf("qemulab: dump sweep range: %w", err)
	}
	mem, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("qemulab: dump sweep range: %w", err)
	}
	if len(mem) != sweep.RangeSize {
		return nil, fmt.Errorf("qemulab: dump sweep range: %d bytes, want %d", len(mem), sweep.RangeSize)
	}
	return mem, nil
}
