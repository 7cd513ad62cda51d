package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/engine"
)

// terminalWidth reports whether w is a terminal and, if so, its width in
// columns (80 when the terminal does not say). TERM=dumb counts as no
// terminal: the live line needs \r and an erase-line escape.
func terminalWidth(w io.Writer) (int, bool) {
	f, ok := w.(interface{ Fd() uintptr })
	if !ok || os.Getenv("TERM") == "dumb" {
		return 0, false
	}
	fd := int(f.Fd())
	if _, err := unix.IoctlGetTermios(fd, unix.TCGETS); err != nil {
		return 0, false
	}
	ws, err := unix.IoctlGetWinsize(fd, unix.TIOCGWINSZ)
	if err != nil || ws.Col == 0 {
		return 80, true
	}
	return int(ws.Col), true
}

// eraseLine returns the cursor to the start of the line and clears it.
const eraseLine = "\r\x1b[K"

// termRenderer keeps one live status line at the bottom of the terminal,
// redrawn with \r, and prints decisions and notes as lines above it.
type termRenderer struct {
	w       io.Writer
	width   int
	resize  bool // re-read the width before each redraw (w is a terminal)
	phase   engine.Phase
	elapsed time.Duration
	stats   *engine.Stats
	disk    *blockmirror.Progress // the latest disk progress
	shown   bool                  // the live line is on screen
	seen    bool                  // any event arrived: the migration got under way
}

// progressBar draws [=====>    ] for done/total in width cells (brackets included).
func progressBar(done, total uint64, width int) string {
	inner := width - 2
	if inner < 1 {
		return ""
	}
	filled := 0
	if total > 0 {
		filled = int(float64(inner) * float64(done) / float64(total))
	}
	filled = min(max(filled, 0), inner)
	var b strings.Builder
	b.WriteByte('[')
	b.WriteString(strings.Repeat("=", filled))
	if filled < inner {
		if filled > 0 {
			b.WriteByte('>')
			filled++
		}
		b.WriteString(strings.Repeat(" ", inner-filled))
	}
	b.WriteByte(']')
	return b.String()
}

// statusLine is the live line: phase, bar, percent, rate, remaining,
// expected downtime, pass, throttle, elapsed. Cut to width-1 columns so the
// terminal never wraps it.
func statusLine(phase engine.Phase, elapsed time.Duration, s *engine.Stats, disk *blockmirror.Progress, width int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%-10s ", phase)
	switch {
	case s == nil && disk != nil:
		// Before RAM moves: the disk mirrors' progress.
		pct := 0.0
		if disk.Total > 0 {
			pct = 100 * float64(disk.Done) / float64(disk.Total)
		}
		fmt.Fprintf(&b, "%s %3.0f%%  disk %s  %s  rem %s", progressBar(disk.Done, disk.Total, 22), pct,
			disk.Node, formatRate(disk.Rate), formatBytes(disk.Total-min(disk.Done, disk.Total)))
	case s != nil:
		done := s.TransferredBytes
		total := s.TransferredBytes + s.RemainingBytes
		pct := 0.0
		if total > 0 {
			pct = 100 * float64(done) / float64(total)
		}
		b.WriteString(progressBar(done, total, 22))
		fmt.Fprintf(&b, " %3.0f%%  %s  rem %s  downtime ~%s  pass %d  throttle %d%%",
			pct, formatRate(s.Throughput), formatBytes(s.RemainingBytes),
			formatDuration(s.ExpectedDowntime), s.Iteration, s.ThrottlePercent)
		if s.StorageTotal > 0 {
			fmt.Fprintf(&b, "  disks rem %s", formatBytes(s.StorageRemaining))
		}
	}
	fmt.Fprintf(&b, "  %s", formatDuration(elapsed.Truncate(100*time.Millisecond)))
	line := b.String()
	if width > 1 && len(line) > width-1 {
		line = line[:width-1]
	}
	return line
}

func (r *termRenderer) redraw() {
	if r.resize {
		// Follow a resized window: a line longer than the terminal would
		// wrap and \r could no longer erase it.
		if w, ok := terminalWidth(r.w); ok {
			r.width = w
		}
	}
	fmt.Fprint(r.w, eraseLine+statusLine(r.phase, r.elapsed, r.stats, r.disk, r.width))
	r.shown = true
}

// above prints a permanent line above the live line.
func (r *termRenderer) above(line string) {
	if r.shown {
		fmt.Fprint(r.w, eraseLine)
	}
	fmt.Fprintln(r.w, line)
	r.shown = false
}

func (r *termRenderer) Event(ev engine.Event) {
	r.elapsed, r.seen = ev.Elapsed, true
	switch ev.Kind {
	case engine.EventPhase:
		r.phase = ev.Phase
		if ev.Phase == engine.PhaseRollback {
			r.above(formatElapsed(ev.Elapsed) + " rolling back")
		}
	case engine.EventStats:
		r.stats = ev.Stats
	case engine.EventDecision:
		if ev.Decision != nil {
			r.above(formatElapsed(ev.Elapsed) + " " + describeDecision(*ev.Decision, ev.DecisionErr, false))
		}
	case engine.EventDisk:
		r.disk = ev.Disk
		if ev.Disk != nil && ev.Disk.Ready {
			r.above(formatElapsed(ev.Elapsed) + " " + describeDisk(ev.Disk))
		}
	case engine.EventResult:
		return
	}
	r.redraw()
}

func (r *termRenderer) Message(s string) { r.above(s) }

func (r *termRenderer) Result(res *engine.Result, demo *demoVerdict) {
	if r.shown {
		fmt.Fprint(r.w, eraseLine)
		r.shown = false
	}
	if !r.seen && demo == nil {
		return // nothing started: the error on stderr says it all
	}
	for _, l := range summary(res, demo) {
		fmt.Fprintln(r.w, l)
	}
}

// plainRenderer writes log lines: one per phase, decision and disk change, one
// per statsEvery of stats (and on every status change), and the summary.
type plainRenderer struct {
	w          io.Writer
	verbose    bool // -v: each decision's arithmetic under its words
	lastStats  time.Duration
	lastStatus string
	statsSeen  bool
	diskReady  map[string]bool
	seen       bool // any event arrived: the migration got under way
}

// statsEvery is how often the plain output prints a stats line.
const statsEvery = 2 * time.Second

func (r *plainRenderer) Event(ev engine.Event) {
	r.seen = true
	at := formatElapsed(ev.Elapsed)
	switch ev.Kind {
	case engine.EventPhase:
		fmt.Fprintf(r.w, "%s phase %s\n", at, ev.Phase)
	case engine.EventStats:
		s := ev.Stats
		if s == nil {
			return
		}
		if r.statsSeen && s.Status == r.lastStatus && ev.Elapsed-r.lastStats < statsEvery {
			return
		}
		r.statsSeen, r.lastStats, r.lastStatus = true, ev.Elapsed, s.Status
		fmt.Fprintf(r.w, "%s %s\n", at, describeStats(s))
	case engine.EventDecision:
		if ev.Decision != nil {
			fmt.Fprintf(r.w, "%s %s\n", at, describeDecision(*ev.Decision, ev.DecisionErr, r.verbose))
		}
	case engine.EventDisk:
		p := ev.Disk
		if p == nil {
			return
		}
		if r.diskReady == nil {
			r.diskReady = make(map[string]bool)
		}
		if seen, ok := r.diskReady[p.Node]; ok && seen == p.Ready {
			return
		}
		r.diskReady[p.Node] = p.Ready
		fmt.Fprintf(r.w, "%s %s\n", at, describeDisk(p))
	}
}

func (r *plainRenderer) Message(s string) { fmt.Fprintln(r.w, s) }

func (r *plainRenderer) Result(res *engine.Result, demo *demoVerdict) {
	if !r.seen && demo == nil {
		return // nothing started: the error on stderr says it all
	}
	for _, l := range summary(res, demo) {
		fmt.Fprintln(r.w, l)
	}
}
