package qemulab

import (
	"fmt"
	"path/filepath"

	"github.com/qmigrate/qmigrate/internal/guest/sweep"
)

// SweepGuest is the boot-sector sweep guest (package sweep) with a spin
// count setting its dirty rate. Run it with at least 101 MiB of RAM
// (DefaultMemMiB is 150).
type SweepGuest struct {
	Spin uint32
}

// NewSweepGuest returns a sweep guest tuned to dirty about rate bytes per
// second under TCG (see sweep.SpinForRate).
func NewSweepGuest(rate float64) SweepGuest { return SweepGuest{Spin: sweep.SpinForRate(rate)} }

// Args writes the boot disk into dir and returns its drive arguments.
func (g SweepGuest) Args(dir string) ([]string, error) {
	p := filepath.Join(dir, "sweep.img")
	if err := sweep.WriteDisk(p, g.Spin); err != nil {
		return nil, err
	}
	return sweep.DriveArgs(p, "sweep0"), nil
}

func (g SweepGuest) String() string {
	return fmt.Sprintf("sweep(spin=%d, ~%.3g B/s)", g.Spin, sweep.RateForSpin(g.Spin))
}
