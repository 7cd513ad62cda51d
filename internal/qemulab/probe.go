package qemulab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/qmigrate/qmigrate/internal/guest/sweep"
)

// ErrAccelUnusable means a probe found that an accelerator does not run a
// guest here (for example KVM without vmx, where Linux hangs at boot).
var ErrAccelUnusable = errors.New("qemulab: accelerator unusable for this guest")

// ProbeAccel starts cfg (whose Accel and CPU name what to probe, e.g. "kvm"
// and "host"), waits up to timeout for ready to succeed, and always stops the
// QEMU again. A nil error proves the accelerator runs that guest; use it for
// that guest only. Default to TCG everywhere else.
func (q *QEMU) ProbeAccel(ctx context.Context, cfg Config, timeout time.Duration, ready func(context.Context, *Instance) error) error {
	if cfg.Accel == "kvm" {
		f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrAccelUnusable, err)
		}
		_ = f.Close()
	}
	if cfg.Name == "" {
		cfg.Name = "probe"
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	inst, err := q.Start(ctx, cfg)
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrAccelUnusable, cfg.Accel, err)
	}
	defer inst.Close()
	if err := ready(ctx, inst); err != nil {
		return fmt.Errorf("%w: %s with %s: %w", ErrAccelUnusable, cfg.Accel, cfg.Guest, err)
	}
	return nil
}

// ProbeKVMSweep reports whether the sweep guest completes a pass under KVM
// (-accel kvm -cpu qemu64: "-cpu host" and "max" abort on this project's
// machines, whose CPUs lack vmx) within 4 s.
func (q *QEMU) ProbeKVMSweep(ctx context.Context) error {
	cfg := Config{Name: "probe-kvm", Accel: "kvm", CPU: "qemu64", Guest: SweepGuest{}}
	return q.ProbeAccel(ctx, cfg, 4*time.Second, func(ctx context.Context, inst *Instance) error {
		_, err := inst.WaitSerial(ctx, func(b []byte) (bool, error) {
			k := bytes.IndexByte(b, sweep.StartChar)
			return k >= 0 && bytes.IndexByte(b[k:], sweep.PassChar) >= 0, nil
		})
		return err
	})
}
