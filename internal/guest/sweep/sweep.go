package sweep

import (
	_ "embed"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
)

// Layout of the guest and its image.
const (
	// RangeStart is the guest-physical address of the first swept page.
	RangeStart = 1 << 20
	// RangeEnd is the end (exclusive) of the swept range.
	RangeEnd = 100 << 20
	// PageSize is the sweep stride.
	PageSize = 4096
	// Pages is the number of pages in one pass (25344).
	Pages = (RangeEnd - RangeStart) / PageSize
	// RangeSize is the size of a pmemsave dump of the range.
	RangeSize = RangeEnd - RangeStart

	// ImageSize is the size of the boot sector.
	ImageSize = 512
	// SpinOffset is the offset in the image of the little-endian uint32
	// busy-wait count executed after each page (0 = unthrottled).
	SpinOffset = 0x1fa
	// DiskSize is the size WriteDisk pads the image to: SeaBIOS does not boot
	// a disk much smaller than this.
	DiskSize = 1 << 20

	// StartChar is written once to COM1 when the sweep starts; PassChar after
	// each full pass.
	StartChar = 'A'
	PassChar  = 'B'
)

// image is the prebuilt boot sector (testdata/guests/sweep/build.sh writes it).
// A string so that nobody can modify it.
//
//go:embed sweep.img
var image string

// Image returns a copy of the boot sector with the spin count patched in.
func Image(spin uint32) []byte {
	b := []byte(image)
	binary.LittleEndian.PutUint32(b[SpinOffset:], spin)
	return b
}

// WriteDisk writes a raw disk image to path: the boot sector with spin
// patched in, zero-padded (sparsely) to DiskSize.
func WriteDisk(path string, spin uint32) (err error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("sweep: write disk: %w", err)
	}
	defer func() {
		if cerr := f.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("sweep: write disk: %w", cerr)
		}
	}()
	if _, err := f.Write(Image(spin)); err != nil {
		return fmt.Errorf("sweep: write disk: %w", err)
	}
	if err := f.Truncate(DiskSize); err != nil {
		return fmt.Errorf("sweep: write disk: %w", err)
	}
	return nil
}

// DriveArgs are the QEMU arguments that boot the disk at path on machine q35
// (both QEMU 7.2 and 10.0). id names the drive and device.
func DriveArgs(path, id string) []string {
	return []string{
		"-drive", fmt.Sprintf("if=none,id=%s,file=%s,format=raw", id, path),
		"-device", fmt.Sprintf("virtio-blk-pci,drive=%s,id=%s-dev,bootindex=0", id, id),
	}
}

// Calibration of the spin count under TCG (-accel tcg -cpu max, q35, 150M)
// on the project's 2-core machines, measured from the 'B' rate (passes per
// second × Pages × PageSize; integration test TestTestbedSweepCalibration)
// in two runs with other TCG guests sharing the cores (load 8-18):
//
//	spin     QEMU 7.2.22        QEMU 10.0.2
//	0        38-44 GB/s         15-53 GB/s
//	100      4.9-8.7 GB/s       4.5-8.0 GB/s
//	1000     550-690 MB/s       620 MB/s-1.1 GB/s
//	10000    70-100 MB/s        35 MB/s
//
// The model below (UnthrottledRate, SpinNanos per iteration) is within about
// a factor of two of those; TCG speed varies with QEMU version and load, so
// tests must not depend on the rate being exact.
const (
	// UnthrottledRate is the dirty rate with spin 0, in bytes per second.
	UnthrottledRate = 40e9
	// SpinNanos is the cost of one spin iteration, in nanoseconds.
	SpinNanos = 5.0
)

// RateForSpin estimates the dirty rate in bytes per second for a spin count.
func RateForSpin(spin uint32) float64 {
	perPage := PageSize/UnthrottledRate*1e9 + float64(spin)*SpinNanos // ns per page
	return PageSize / perPage * 1e9
}

// SpinForRate returns the spin count that approximately gives rate bytes per
// second of dirtied pages (0 for rates at or above UnthrottledRate).
func SpinForRate(rate float64) uint32 {
	if rate <= 0 {
		return math.MaxUint32
	}
	perPage := PageSize/rate*1e9 - PageSize/UnthrottledRate*1e9
	if perPage <= 0 {
		return 0
	}
	spin := perPage / SpinNanos
	if spin >= math.MaxUint32 {
		return math.MaxUint32
	}
	return uint32(spin)
}

// ErrShortDump means the memory given to Check does not cover the range.
var ErrShortDump = errors.New("sweep: dump shorter than the swept range")

// BadPagesError reports a broken invariant: the first offending page and how
// many pages are bad in total.
type BadPagesError struct {
	Bad      int    // number of bad pages
	Page     int    // index of the first bad page
	Addr     uint64 // its guest-physical address
	Got      byte   // its first byte
	Expected byte   // the value of the run it is in
	HitEdge  bool   // whether the -1 step had been seen before it
}

func (e *BadPagesError) Error() string {
	return fmt.Sprintf("sweep: %d bad page(s); first at page %d (guest address %#x): byte %#02x after a run of %#02x (edge seen: %v)",
		e.Bad, e.Page, e.Addr, e.Got, e.Expected, e.HitEdge)
}

// Check verifies the sweep invariant over mem, a dump of guest memory
// [RangeStart, RangeEnd) taken with the guest stopped: reading b[i] =
// mem[i*PageSize] for i in [0, Pages), let last = b[0]; for i = 1.. if
// b[i] != last, it is accepted once if b[i]+1 == last (mod 256) (the edge of
// the sweep), otherwise the page is bad; last = b[i] in every case. This is
// QEMU's check_guests_ram. It returns the number of bad pages and, when there
// are any, a *BadPagesError describing the first.
func Check(mem []byte) (bad int, err error) {
	if len(mem) < (Pages-1)*PageSize+1 {
		return 0, fmt.Errorf("%w: %d bytes, want %d", ErrShortDump, len(mem), RangeSize)
	}
	var first *BadPagesError
	last := mem[0]
	hitEdge := false
	for i := 1; i < Pages; i++ {
		b := mem[i*PageSize]
		if b != last {
			if b+1 == last && !hitEdge {
				hitEdge = true
			} else {
				bad++
				if first == nil {
					first = &BadPagesError{Page: i, Addr: RangeStart + uint64(i)*PageSize, Got: b, Expected: last, HitEdge: hitEdge}
				}
			}
		}
		last = b
	}
	if bad > 0 {
		first.Bad = bad
		return bad, first
	}
	return 0, nil
}

// FirstBytes extracts b[i] = mem[i*PageSize] for the pages mem covers.
func FirstBytes(mem []byte) []byte {
	n := min((len(mem)+PageSize-1)/PageSize, Pages)
	out := make([]byte, n)
	for i := range out {
		out[i] = mem[i*PageSize]
	}
	return out
}
