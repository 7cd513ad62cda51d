package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/fleet"
	"github.com/qmigrate/qmigrate/strategy"
)

// The evacuation's terminal display: a live line per running migration and
// the fleet line, decisions and outcomes above them with the migration's
// name, the summary last.
func TestFleetTermDraws(t *testing.T) {
	var out bytes.Buffer
	f := newFleetTerm(&out, 120, 3)
	stats := func(name string, at time.Duration, rem uint64) fleet.Event {
		return fleet.Event{Name: name, Kind: fleet.EventEngine, Engine: engine.Event{Kind: engine.EventStats, Elapsed: at,
			Stats: &engine.Stats{Status: "active", Iteration: 1, TransferredBytes: 100 << 20, RemainingBytes: rem, TotalBytes: 150 << 20, Throughput: 50 << 20}}}
	}
	f.Event(fleet.Event{Name: "vm1", Kind: fleet.EventStart, Attempt: 1, Bandwidth: 32 << 20})
	f.Event(fleet.Event{Name: "vm2", Kind: fleet.EventStart, Attempt: 1, Bandwidth: 32 << 20})
	f.Event(stats("vm1", time.Second, 50<<20))
	f.Event(stats("vm2", time.Second, 60<<20))
	assert.Equal(t, "fleet  0/3 done  2 running  1 queued  0 failed  100 MiB/s", f.summary())
	redraw(f.v)
	d := strategy.Decision{Action: strategy.SetDowntime, DowntimeLimit: 500 * time.Millisecond, Summary: "downtime limit 500ms: the guest is busy"}
	f.Event(fleet.Event{Name: "vm2", Kind: fleet.EventEngine, Engine: engine.Event{Kind: engine.EventDecision, Elapsed: 2 * time.Second, Decision: &d}})
	f.Event(fleet.Event{Name: "vm1", Kind: fleet.EventEnd, Result: &fleet.Result{Name: "vm1", Outcome: fleet.Completed, Time: 3 * time.Second}})
	assert.Equal(t, "fleet  1/3 done  1 running  1 queued  0 failed  50.0 MiB/s", f.summary())
	f.Event(fleet.Event{Name: "vm2", Kind: fleet.EventEnd, Result: &fleet.Result{Name: "vm2", Outcome: fleet.RolledBack}})
	f.Report(&fleet.Report{Summary: fleet.Summary{Completed: 1, RolledBack: 1, NotStarted: 1}})
	s := out.String()
	assert.Contains(t, s, "/3 done", "the fleet line was drawn")
	assert.Contains(t, s, "vm2: [    2.0s] downtime limit 500ms")
	assert.Contains(t, s, "vm1: completed in 3s")
	assert.Contains(t, s, "vm2: rolled back: the guest runs on the source")
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	require.NotEmpty(t, lines)
	assert.Contains(t, lines[len(lines)-1], "fleet: 1 completed, 1 rolled back, 0 failed, 0 unknown, 1 not started", "the summary last")
}

// redraw asks the view for a frame now (mpb draws it on its own goroutine:
// what it shows is checked after close, when every frame is out).
func redraw(v *liveView) { v.refresh <- struct{}{} }
