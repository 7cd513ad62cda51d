package qemulab

import (
	"context"
	"errors"
	"fmt"

	"github.com/qmigrate/qmigrate/internal/guest/linux"
)

// LinuxGuest is the Linux test guest (package internal/guest/linux): the
// cloud kernel with the repository's /init, running Workload. Kernel and
// Initrd come from linux.Assets. Give it at least Workload.MemBytes + 128 MiB
// of RAM.
type LinuxGuest struct {
	Kernel, Initrd string
	Workload       linux.Workload
	// Disk, when set, is attached as a virtio disk (/dev/vda in the guest).
	Disk string
}

// Args returns the kernel boot arguments and the disk.
func (g LinuxGuest) Args(string) ([]string, error) {
	args := linux.BootArgs(g.Kernel, g.Initrd, g.Workload)
	if g.Disk != "" {
		args = append(args, "-drive", "file="+g.Disk+",format=raw,if=virtio")
	}
	return args, nil
}

func (g LinuxGuest) String() string { return "linux(" + g.Workload.Cmdline() + ")" }

// ErrGuestFailed is wrapped by errors for a guest that reported damage.
var ErrGuestFailed = errors.New("guest reported a failure")

// WaitLinuxReady waits for the guest's READY line on inst's serial.
func WaitLinuxReady(ctx context.Context, inst *Instance) (linux.Line, error) {
	return waitLinux(ctx, inst, func(l linux.Line) bool { return l.Kind == linux.KindReady })
}

func waitLinux(ctx context.Context, inst *Instance, match func(linux.Line) bool) (linux.Line, error) {
	var got linux.Line
	_, err := inst.WaitSerialLine(ctx, func(s string) (bool, error) {
		l, ok := linux.ParseLine(s)
		if !ok {
			return false, nil
		}
		if l.Failed() {
			return false, fmt.Errorf("%w: %s: %s", ErrGuestFailed, inst.Name, l.Raw)
		}
		if match(l) {
			got = l
			return true, nil
		}
		return false, nil
	})
	return got, err
}

// LinuxDiskSeq returns the highest record sequence number the diskwrite
// guest has reported (DISK lines) on inst's serial so far (0 when none).
func LinuxDiskSeq(inst *Instance) (uint64, error) {
	return maxField(inst, linux.KindDisk, "seq")
}

// CheckLinuxDisk checks a diskwrite Linux guest (started with a periodic
// verification, Workload.VerifyEvery) on the destination after a migration:
// it waits for a "DISKVERIFY OK" whose last record is at least minSeq (e.g.
// LinuxDiskSeq of the source), so every record written before the migration
// was found intact on the destination's disk. A DISKVERIFY FAIL or ERROR
// line fails. The error is an *IntegrityError.
func CheckLinuxDisk(ctx context.Context, dst *Instance, minSeq uint64) (linux.Line, error) {
	l, err := waitLinux(ctx, dst, func(l linux.Line) bool {
		last, ok := l.Uint("last")
		return l.Kind == linux.KindDiskVerify && l.OK() && ok && last >= minSeq
	})
	if err != nil {
		return l, &IntegrityError{Guest: "linux", Step: "disk log verification on the destination", Err: err}
	}
	return l, nil
}

// LinuxPass returns the highest pass number the memdirty guest has reported
// on inst's serial so far (0 when none).
func LinuxPass(inst *Instance) (uint64, error) {
	return maxField(inst, "", "pass")
}

// maxField is the largest numeric field key over the guest's lines of kind
// (any kind when empty).
func maxField(inst *Instance, kind, key string) (uint64, error) {
	b, err := inst.Serial()
	if err != nil {
		return 0, err
	}
	var max uint64
	for _, line := range splitLines(b) {
		if l, ok := linux.ParseLine(line); ok && (kind == "" || l.Kind == kind) {
			if p, ok := l.Uint(key); ok && p > max {
				max = p
			}
		}
	}
	return max, nil
}

// CheckLinux checks a memdirty Linux guest on the destination after a
// migration: the first pass number the destination reports bounds the pass
// that was in progress at switchover, so a "CHECK OK pass=N" with N beyond it
// (and beyond minPass, e.g. LinuxPass of the source) proves a full pass
// over every page ran after the migration and found no stale page. Any CHECK
// FAIL or ERROR line, or an OK verdict counting earlier failed passes, fails.
// The error is an *IntegrityError.
func CheckLinux(ctx context.Context, dst *Instance, minPass uint64) (linux.Line, error) {
	var first uint64
	seen := false
	l, err := waitLinux(ctx, dst, func(l linux.Line) bool {
		p, ok := l.Uint("pass")
		if !ok {
			return false
		}
		if !seen {
			first, seen = p, true
		}
		if l.Kind != linux.KindCheck || !l.OK() {
			return false
		}
		return p > first && p > minPass
	})
	if err != nil {
		return l, &IntegrityError{Guest: "linux", Step: "self-check on the destination", Err: err}
	}
	if fp, ok := l.Uint("failed_passes"); ok && fp > 0 {
		return l, &IntegrityError{Guest: "linux", Step: "self-check on the destination",
			Err: fmt.Errorf("%w: %s", ErrGuestFailed, l.Raw)}
	}
	return l, nil
}

func splitLines(b []byte) []string {
	var out []string
	start := 0
	for i, c := range b {
		if c == '\n' {
			out = append(out, string(b[start:i]))
			start = i + 1
		}
	}
	if start < len(b) {
		out = append(out, string(b[start:]))
	}
	return out
}
