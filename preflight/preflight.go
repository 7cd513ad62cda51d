package preflight

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/qmigrate/qmigrate/qmp"
)

// Name names a check. The names are stable: the CLI prints them and the JSON
// lines carry them.
type Name string

// The checks, in the order Run reports them.
const (
	RunState            Name = "run-state"
	MachineType         Name = "machine-type"
	RAMSize             Name = "ram-size"
	CPUModel            Name = "cpu-model"
	CPUFeatures         Name = "cpu-features"
	VCPUTopology        Name = "vcpu-topology"
	Devices             Name = "devices"
	PCIAddresses        Name = "pci-addresses"
	BlockDevices        Name = "block-devices"
	MigrationBlockers   Name = "migration-blockers"
	PostcopyDevices     Name = "postcopy-devices"
	PostcopyUserfaultfd Name = "postcopy-userfaultfd"
)

// Names lists every check in the order Run reports them.
func Names() []Name {
	return []Name{RunState, MachineType, RAMSize, CPUModel, CPUFeatures, VCPUTopology, Devices,
		PCIAddresses, BlockDevices, MigrationBlockers, PostcopyDevices, PostcopyUserfaultfd}
}

// Status is the outcome of one check.
type Status string

const (
	// Pass: nothing stands in the way (or the check does not apply; the
	// detail says so).
	Pass Status = "pass"
	// Warn: the migration can run, but something may go wrong or could not
	// be checked; the detail says what.
	Warn Status = "warn"
	// Fail: the migration cannot run (or would hand the guest a different
	// machine); the detail names every difference.
	Fail Status = "fail"
)

// Result is the outcome of one check.
type Result struct {
	Check  Name   `json:"check"`
	Status Status `json:"result"`
	Detail string `json:"detail"`
}

// Postcopy is what the caller permits of postcopy.
type Postcopy int

const (
	// PostcopyOff: postcopy is not permitted; its checks pass untested.
	PostcopyOff Postcopy = iota
	// PostcopyAllowed: postcopy may be used. What forbids it is a warning
	// and Report.Postcopy is false: the migration runs without it.
	PostcopyAllowed
	// PostcopyRequired: the caller demands postcopy; what forbids it fails.
	PostcopyRequired
)

// Storage says which disks a storage migration copies. Options.Storage nil
// means no disk is copied: every disk must be on storage both hosts share.
type Storage struct {
	// Disks are the disks to copy, by device name, qdev id/path or node
	// name; empty copies every writable disk that is not in Shared.
	Disks []string
	// Shared are disks on shared storage (never copied).
	Shared []string
}

// Options tune Run.
type Options struct {
	// Postcopy is what is permitted of postcopy (default off).
	Postcopy Postcopy
	// Storage selects the disks copied (nil: none, all storage is shared).
	Storage *Storage
	// DestinationPID is the destination QEMU's process id when it runs on
	// this host (PeerPID reads it from a unix-socket connection), for the
	// userfaultfd check; 0 when unknown (a remote destination).
	DestinationPID int
	// Skip lists checks not to run (a caller that checks them itself).
	Skip []Name
}

// Report is what Run found.
type Report struct {
	// Results holds one result per check run, in the order of Names.
	Results []Result `json:"results"`
	// Postcopy is true when postcopy was permitted and nothing seen forbids
	// it. A caller that permitted postcopy and finds it false runs the
	// migration without postcopy (a Warn result says why).
	Postcopy bool `json:"postcopy"`
}

// OK reports whether the migration can run: no check failed.
func (r *Report) OK() bool { return len(r.Failed()) == 0 }

// Failed returns the failed checks.
func (r *Report) Failed() []Result {
	var out []Result
	for _, res := range r.Results {
		if res.Status == Fail {
			out = append(out, res)
		}
	}
	return out
}

// Result returns the result of one check, and false when it did not run.
func (r *Report) Result(n Name) (Result, bool) {
	i := slices.IndexFunc(r.Results, func(res Result) bool { return res.Check == n })
	if i < 0 {
		return Result{}, false
	}
	return r.Results[i], true
}

// Err returns nil when the migration can run, otherwise an *Error with every
// failed check.
func (r *Report) Err() error {
	f := r.Failed()
	if len(f) == 0 {
		return nil
	}
	return &Error{Failed: f}
}

// ErrFailed is matched (errors.Is) by every *Error.
var ErrFailed = errors.New("preflight: the migration cannot run")

// Error lists the checks that failed.
type Error struct {
	Failed []Result
}

// Error gives one line per failed check: "check-name: detail".
func (e *Error) Error() string {
	lines := make([]string, len(e.Failed))
	for i, f := range e.Failed {
		lines[i] = string(f.Check) + ": " + f.Detail
	}
	return strings.Join(lines, "\n")
}

// Is makes errors.Is(err, ErrFailed) true.
func (e *Error) Is(target error) bool { return target == ErrFailed }

// Checks names the failed checks.
func (e *Error) Checks() []Name {
	out := make([]Name, len(e.Failed))
	for i, f := range e.Failed {
		out[i] = f.Check
	}
	return out
}

// SideError is a QEMU that could not be read at all (its connection failed
// or closed, or ctx ended): Run returns it instead of a report.
type SideError struct {
	Side string // "source" or "destination"
	Op   string // the QMP command
	Err  error
}

func (e *SideError) Error() string { return fmt.Sprintf("preflight: %s: %s: %v", e.Side, e.Op, e.Err) }

func (e *SideError) Unwrap() error { return e.Err }

// Run reads both QEMUs (concurrently, read-only) and runs every check not
// in opts.Skip. The error is nil, or a *SideError when a QEMU could not be
// read at all (closed connection, ctx ended); a check that fails is in the
// report, not in the error (Report.Err gives it as an error).
func Run(ctx context.Context, src, dst *qmp.Client, opts Options) (*Report, error) {
	if src == nil || dst == nil {
		return nil, errors.New("preflight: Run needs both clients")
	}
	skip := func(n Name) bool { return slices.Contains(opts.Skip, n) }
	var (
		sf, df     *facts
		serr, derr error
		wg         sync.WaitGroup
	)
	wg.Go(func() { df, derr = gather(ctx, dst, "destination", opts, skip) })
	sf, serr = gather(ctx, src, "source", opts, skip)
	wg.Wait()
	if err := errors.Join(serr, derr); err != nil {
		return nil, err
	}
	c := &comparison{ctx: ctx, src: sf, dst: df, opts: opts, srcC: src, dstC: dst, postcopyOK: true}
	rep := &Report{}
	for _, n := range Names() {
		if skip(n) {
			continue
		}
		res, err := c.run(n)
		if err != nil {
			return nil, err
		}
		rep.Results = append(rep.Results, res)
	}
	rep.Postcopy = opts.Postcopy != PostcopyOff && c.postcopyOK
	return rep, nil
}

// comparison holds what both sides told and runs the checks on it.
type comparison struct {
	ctx        context.Context
	src, dst   *facts
	srcC, dstC *qmp.Client
	opts       Options
	postcopyOK bool // cleared by a postcopy check that finds postcopy impossible
}

func (c *comparison) run(n Name) (Result, error) {
	var (
		st     Status
		detail string
		err    error
	)
	switch n {
	case RunState:
		st, detail = c.runState()
	case MachineType:
		st, detail, err = c.machineType()
	case RAMSize:
		st, detail = c.ramSize()
	case CPUModel:
		st, detail = c.cpuModel()
	case CPUFeatures:
		st, detail, err = c.cpuFeatures()
	case VCPUTopology:
		st, detail = c.vcpuTopology()
	case Devices:
		st, detail = c.devices()
	case PCIAddresses:
		st, detail = c.pciAddresses()
	case BlockDevices:
		st, detail = c.blockDevices()
	case MigrationBlockers:
		st, detail = c.migrationBlockers()
	case PostcopyDevices:
		st, detail = c.postcopyDevices()
	case PostcopyUserfaultfd:
		st, detail = c.postcopyUserfaultfd()
	default:
		return Result{}, fmt.Errorf("preflight: unknown check %q", n)
	}
	return Result{Check: n, Status: st, Detail: detail}, err
}
