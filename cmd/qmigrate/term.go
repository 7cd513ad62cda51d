package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
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

// liveView is the display on a terminal: live lines kept at the bottom by
// mpb (one per migration; evacuate adds one per migration plus a fleet
// line), redrawn at a steady rate to the terminal's current width, and
// permanent lines (decisions, notes) printed above them.
type liveView struct {
	p       *mpb.Progress
	refresh chan any
	stop    chan struct{}
	ticking chan struct{}
	closed  bool
}

// shownView is the live view on the terminal now, if any: notes written
// on stderr meanwhile (the signal handler's) go above its lines.
var shownView atomic.Pointer[liveView]

// stderrNotes wraps stderr for notes written while a live view may be on
// the terminal. Written to a terminal directly, such a note would land under
// the live lines, and their next redraw (cursor up, erase below) would wipe
// it and leave a stale live line above it; through the view it is printed
// above them. It keeps f's Fd, so terminalWidth still sees a terminal.
func stderrNotes(f *os.File) io.Writer {
	if _, ok := terminalWidth(f); !ok {
		return f // not a terminal: no live lines there
	}
	return noteWriter{f}
}

type noteWriter struct{ *os.File }

func (n noteWriter) Write(p []byte) (int, error) {
	if v := shownView.Load(); v != nil {
		if _, err := v.p.Write(p); err == nil {
			return len(p), nil
		}
		// The view closed meanwhile: the terminal is the file's again.
	}
	return n.File.Write(p)
}

// liveRefresh is how often the live lines are redrawn.
const liveRefresh = 120 * time.Millisecond

// newLiveView draws on w. width > 0 fixes the width (w is no terminal, as
// in tests); otherwise mpb reads the terminal's width before each redraw, so
// a resized window gets lines that fit it.
func newLiveView(w io.Writer, width int) *liveView {
	v := &liveView{refresh: make(chan any), stop: make(chan struct{}), ticking: make(chan struct{})}
	// Manual refresh driven by our own ticker: close can then force a
	// last redraw (of the lines written above) before the view ends, which
	// mpb's own ticker cannot.
	v.p = mpb.New(mpb.WithOutput(w), mpb.WithManualRefresh(v.refresh), mpb.ContainerOptional(mpb.WithWidth(width), width > 0))
	if width <= 0 {
		shownView.Store(v) // on the terminal
	}
	go func() {
		defer close(v.ticking)
		t := time.NewTicker(liveRefresh)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				select {
				case v.refresh <- struct{}{}:
				case <-v.stop:
					return
				}
			case <-v.stop:
				return
			}
		}
	}()
	return v
}

// println prints a permanent line above the live lines (at the next
// redraw).
func (v *liveView) println(s string) {
	if v.closed {
		return
	}
	_, _ = v.p.Write([]byte(s + "\n"))
}

// close removes the live lines (their bars must have been ended), prints
// what was written above them and stops drawing: w is the caller's again.
func (v *liveView) close() {
	if v.closed {
		return
	}
	v.closed = true
	shownView.CompareAndSwap(v, nil)
	v.p.Wait() // the ticker keeps redrawing until the ended bars are gone
	close(v.stop)
	<-v.ticking
}

// liveState is what one migration's live line shows.
type liveState struct {
	name      string // "" for migrate's single line
	phase     engine.Phase
	elapsed   time.Duration
	stats     *engine.Stats
	disk      *blockmirror.Progress // the latest disk progress
	decisions int
	ready     map[string]bool // the disks said ready
}

// progress is the bar's done and total: RAM sent of sent+remaining, or
// before RAM moves the disk mirror's; ok is false before either is known.
func (s *liveState) progress() (done, total uint64, ok bool) {
	switch {
	case s.stats != nil:
		return s.stats.TransferredBytes, s.stats.TransferredBytes + s.stats.RemainingBytes, true
	case s.disk != nil:
		return s.disk.Done, s.disk.Total, true
	}
	return 0, 0, false
}

// head is the text before the bar: name and phase.
func (s *liveState) head() string {
	if s.name != "" {
		return fmt.Sprintf("%s  %-10s", s.name, s.phase)
	}
	return fmt.Sprintf("%-10s", s.phase)
}

// tail is the text after the bar: percent, rate, remaining, expected
// downtime, pass, throttle, disks, decisions, elapsed, in at most room
// columns (room <= 0: no limit). When they do not all fit, the least
// useful go first (disks, pass, throttle, downtime...), so the bar keeps
// its width and what is left reads whole rather than cut.
func (s *liveState) tail(room int) string {
	type field struct {
		text string
		drop int // the higher, the sooner it goes
	}
	var fs []field
	add := func(drop int, format string, args ...any) { fs = append(fs, field{fmt.Sprintf(format, args...), drop}) }
	if done, total, ok := s.progress(); ok {
		pct := 0.0
		if total > 0 {
			pct = 100 * float64(min(done, total)) / float64(total)
		}
		add(0, "%3.0f%%", pct)
	}
	switch {
	case s.stats == nil && s.disk != nil:
		d := s.disk
		add(5, "disk %s", d.Node)
		add(1, "%s", formatRate(d.Rate))
		add(1, "rem %s", formatBytes(d.Total-min(d.Done, d.Total)))
	case s.stats != nil:
		st := s.stats
		add(1, "%s", formatRate(st.Throughput))
		add(1, "rem %s", formatBytes(st.RemainingBytes))
		add(4, "downtime ~%s", formatDuration(st.ExpectedDowntime))
		add(7, "pass %d", st.Iteration)
		if st.ThrottlePercent > 0 {
			add(3, "throttle %d%%", st.ThrottlePercent)
		}
		if st.StorageTotal > 0 && st.StorageRemaining > 0 {
			add(6, "disks rem %s", formatBytes(st.StorageRemaining))
		}
	}
	switch s.decisions {
	case 0:
	case 1:
		add(2, "1 decision")
	default:
		add(2, "%d decisions", s.decisions)
	}
	add(2, "%s", formatDuration(s.elapsed.Truncate(100*time.Millisecond)))
	join := func() string {
		parts := make([]string, len(fs))
		for i, f := range fs {
			parts[i] = f.text
		}
		return strings.Join(parts, "  ")
	}
	line := join()
	for room > 0 && len(line) > room && len(fs) > 1 {
		worst := 0
		for i, f := range fs {
			if f.drop >= fs[worst].drop {
				worst = i
			}
		}
		fs = append(fs[:worst], fs[worst+1:]...)
		line = join()
	}
	return line
}

// liveLine is one migration's live line: head, bar, tail.
type liveLine struct {
	bar *mpb.Bar
	mu  sync.Mutex // the state is also read by mpb's goroutine
	st  liveState
}

// barWidth is the bar's width, brackets included, when the terminal has room.
const barWidth = 22

// addLine adds a live line for the migration called name ("" for one
// migration alone).
func (v *liveView) addLine(name string) *liveLine {
	l := &liveLine{st: liveState{name: name}}
	filler := mpb.BarStyle().Lbound("[").Filler("=").Tip(">").Padding(" ").Rbound("]").Build()
	l.bar, _ = v.p.Add(0, mpb.BarFillerFunc(func(w io.Writer, stat decor.Statistics) error {
		l.mu.Lock()
		_, _, ok := l.st.progress()
		l.mu.Unlock()
		if !ok {
			return nil // nothing to measure yet: no empty bar
		}
		return filler.Fill(w, stat)
	}), mpb.BarWidth(barWidth),
		mpb.PrependDecorators(decor.Any(func(decor.Statistics) string {
			l.mu.Lock()
			defer l.mu.Unlock()
			return l.st.head()
		})),
		mpb.AppendDecorators(decor.Any(func(st decor.Statistics) string {
			l.mu.Lock()
			defer l.mu.Unlock()
			// The bar and the spaces mpb puts around it come out of the
			// room left after the head.
			return l.st.tail(st.AvailableWidth - barWidth - 2)
		})))
	return l
}

// apply records one event; it returns the permanent line the event prints
// above the live lines, if any.
func (s *liveState) apply(ev engine.Event) (above string) {
	s.elapsed = ev.Elapsed
	switch ev.Kind {
	case engine.EventPhase:
		s.phase = ev.Phase
		if ev.Phase == engine.PhaseRollback {
			above = formatElapsed(ev.Elapsed) + " rolling back"
		}
	case engine.EventStats:
		if ev.Stats != nil {
			s.stats = ev.Stats
		}
	case engine.EventDecision:
		if ev.Decision != nil {
			s.decisions++
			above = formatElapsed(ev.Elapsed) + " " + describeDecision(*ev.Decision, ev.DecisionErr, false)
		}
	case engine.EventLimits:
		if ev.Limits != nil {
			above = formatElapsed(ev.Elapsed) + " " + describeLimits(ev.Limits)
		}
	case engine.EventDisk:
		if p := ev.Disk; p != nil {
			s.disk = p
			// One line when a disk becomes ready, not one per poll while
			// it stays so.
			if p.Ready != s.ready[p.Node] {
				if s.ready == nil {
					s.ready = make(map[string]bool)
				}
				s.ready[p.Node] = p.Ready
				if p.Ready {
					above = formatElapsed(ev.Elapsed) + " " + describeDisk(p)
				}
			}
		}
	}
	return above
}

// update applies one event to the line; it returns the permanent line the
// event prints above the live lines, if any.
func (l *liveLine) update(ev engine.Event) (above string) {
	l.mu.Lock()
	above = l.st.apply(ev)
	done, total, ok := l.st.progress()
	l.mu.Unlock()
	if ok {
		// The bar ends when the line is removed, never when it fills: the
		// total grows as the guest dirties pages, and the disks' bar is
		// followed by RAM's.
		if done >= total {
			total = done + 1
		}
		l.bar.SetTotal(int64(total), false)
		l.bar.SetCurrent(int64(done))
	}
	return above
}

// remove ends the line: it leaves the screen at the next redraw.
func (l *liveLine) remove() { l.bar.Abort(true) }

// termRenderer shows one migration on a terminal: a live line (phase, bar,
// percent, rate, remaining, expected downtime, pass, throttle, decisions,
// elapsed) with decisions and notes printed above it, then the summary.
type termRenderer struct {
	w      io.Writer
	width  int  // the width when it is fixed (tests)
	resize bool // follow the terminal's width instead
	view   *liveView
	line   *liveLine
	seen   bool // any event arrived: the migration got under way
}

func (r *termRenderer) ensureView() *liveView {
	if r.view == nil {
		width := r.width
		if r.resize {
			width = 0
		}
		r.view = newLiveView(r.w, width)
	}
	return r.view
}

func (r *termRenderer) Event(ev engine.Event) {
	if ev.Kind == engine.EventResult {
		return
	}
	r.seen = true
	v := r.ensureView()
	if r.line == nil {
		r.line = v.addLine("")
	}
	if above := r.line.update(ev); above != "" {
		v.println(above)
	}
}

func (r *termRenderer) Message(s string) { r.ensureView().println(s) }

func (r *termRenderer) Result(res *engine.Result, demo *demoVerdict) {
	if r.line != nil {
		r.line.remove()
	}
	if r.view != nil {
		r.view.close()
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
	case engine.EventLimits:
		if ev.Limits != nil {
			fmt.Fprintf(r.w, "%s %s\n", at, describeLimits(ev.Limits))
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
