package main

import (
	"fmt"
	"io"
	"sync"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/fleet"
)

// fleetTerm shows an evacuation on a terminal: one live line per running
// migration (name, phase, bar, rate, remaining, decisions: the live line of
// migrate), a fleet line under them (completed, running, queued, failed,
// the aggregate rate), and every decision, retry and outcome printed above,
// prefixed with the migration's name.
type fleetTerm struct {
	w     io.Writer
	v     *liveView
	total int

	mu      sync.Mutex
	lines   map[string]*liveLine
	rates   map[string]float64 // the latest throughput of each running migration
	done    int                // completed
	failed  int                // ended otherwise
	fleetLn *mpb.Bar
}

func newFleetTerm(w io.Writer, width, total int) *fleetTerm {
	f := &fleetTerm{w: w, v: newLiveView(w, width), total: total, lines: map[string]*liveLine{}, rates: map[string]float64{}}
	f.fleetLn, _ = f.v.p.Add(0, mpb.NopStyle().Build(), mpb.BarPriority(1<<30), // the fleet line stays last
		mpb.PrependDecorators(decor.Any(func(decor.Statistics) string { return f.summary() })))
	return f
}

// summary is the fleet line.
func (f *fleetTerm) summary() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var rate float64
	for _, r := range f.rates {
		rate += r
	}
	running := len(f.lines)
	queued := max(f.total-f.done-f.failed-running, 0)
	return fmt.Sprintf("fleet  %d/%d done  %d running  %d queued  %d failed  %s", f.done, f.total, running, queued, f.failed, formatRate(rate))
}

func (f *fleetTerm) Event(ev fleet.Event) {
	f.mu.Lock()
	l := f.lines[ev.Name]
	if l == nil && (ev.Kind == fleet.EventStart || ev.Kind == fleet.EventEngine) {
		l = f.v.addLine(ev.Name)
		f.lines[ev.Name] = l
	}
	f.mu.Unlock()
	switch ev.Kind {
	case fleet.EventEngine:
		e := ev.Engine
		if e.Kind == engine.EventStats && e.Stats != nil {
			f.mu.Lock()
			f.rates[ev.Name] = e.Stats.Throughput
			f.mu.Unlock()
		}
		if above := l.update(e); above != "" {
			f.v.println(ev.Name + ": " + above)
		}
	case fleet.EventRetry:
		f.v.println(fmt.Sprintf("%s: attempt %d failed (%v): retrying on a new destination", ev.Name, ev.Attempt, ev.Err))
	case fleet.EventEnd:
		f.mu.Lock()
		if l := f.lines[ev.Name]; l != nil {
			l.remove()
			delete(f.lines, ev.Name)
		}
		delete(f.rates, ev.Name)
		if ev.Result != nil && ev.Result.Outcome == fleet.Completed {
			f.done++
		} else {
			f.failed++
		}
		f.mu.Unlock()
		if ev.Result != nil {
			f.v.println(ev.Name + ": " + outcomeText(ev.Result))
		}
	}
}

func (f *fleetTerm) Report(rep *fleet.Report) {
	f.mu.Lock()
	for name, l := range f.lines {
		l.remove()
		delete(f.lines, name)
	}
	f.mu.Unlock()
	f.fleetLn.Abort(true)
	f.v.close()
	fmt.Fprintln(f.w, fleetSummary(rep))
}
