package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/qmigrate/qmigrate/internal/guest/sweep"
	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/qmp"
)

// The sweep guest's progress, read from outside while it runs: its serial
// port counts whole passes ('B' after each), and the first bytes of its pages
// say how far the current pass got (pages [0, edge) already hold the next
// value). Together they give a fractional pass count, so a guest's speed can
// be measured over a few seconds even when a pass takes longer than that.

// readPage returns the first byte of page i of the swept range, through
// HMP xp (reading guest memory does not stop the guest).
func readPage(ctx context.Context, c *qmp.Client, i int) (byte, error) {
	out, err := c.HumanMonitorCommand(ctx, fmt.Sprintf("xp /1xb %#x", sweep.RangeStart+uint64(i)*sweep.PageSize))
	if err != nil {
		return 0, err
	}
	return parseXP(out)
}

// parseXP parses HMP's "0000000000100000: 0x01" reply.
func parseXP(out string) (byte, error) {
	k := strings.LastIndex(out, ":")
	if k < 0 {
		return 0, fmt.Errorf("xp: unexpected reply %q", out)
	}
	v, err := strconv.ParseUint(strings.TrimSpace(out[k+1:]), 0, 8)
	if err != nil {
		return 0, fmt.Errorf("xp: unexpected reply %q: %w", out, err)
	}
	return byte(v), nil
}

// resolvePasses returns the whole number of completed passes n with
// n ≡ low (mod 256) nearest to est (the count from the serial ports).
func resolvePasses(low byte, est int) int {
	d := int(int8(low - byte(est))) // in [-128, 127]
	return max(est+d, 0)
}

// guestProgress returns the guest's position in passes (whole passes plus
// the fraction of the current one) and when it was read. est is the number
// of whole passes the serial ports show.
func guestProgress(ctx context.Context, c *qmp.Client, est int) (float64, time.Time, error) {
	var lastErr error
	for range 4 {
		t0 := time.Now()
		first, err := readPage(ctx, c, 0)
		if err != nil {
			return 0, time.Time{}, err
		}
		last, err := readPage(ctx, c, sweep.Pages-1)
		if err != nil {
			return 0, time.Time{}, err
		}
		var edge int
		switch {
		case first == last: // at a pass boundary
		case first == last+1:
			lo, hi := 0, sweep.Pages-1 // page lo holds first, page hi holds last
			for hi-lo > 1 {
				mid := (lo + hi) / 2
				b, err := readPage(ctx, c, mid)
				if err != nil {
					return 0, time.Time{}, err
				}
				if b == first {
					lo = mid
				} else {
					hi = mid
				}
			}
			edge = hi
		default: // the guest wrapped a pass between the two reads: again
			lastErr = fmt.Errorf("guest progress: page 0 = %d, last page = %d", first, last)
			continue
		}
		at := t0.Add(time.Since(t0) / 2)
		return float64(resolvePasses(last, est)) + float64(edge)/sweep.Pages, at, nil
	}
	return 0, time.Time{}, lastErr
}

// serialPasses counts the 'B's a guest wrote on inst's serial port (after
// the start mark 'A' when sawStart, i.e. on the QEMU that booted it).
func serialPasses(inst *qemulab.Instance, sawStart bool) int {
	b, err := inst.Serial()
	if err != nil {
		return 0
	}
	if sawStart {
		return qemulab.CountAfter(b, sweep.StartChar, sweep.PassChar)
	}
	return qemulab.CountAfter(b, 0, sweep.PassChar)
}
