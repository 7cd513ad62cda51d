// Package rammodel is the model of QEMU's RAM migration thread that both the
// fake QEMU (qemutest) and the strategy's end-to-end simulation
// (internal/ramsim) step, so that the engine's unit tests and the policies'
// end-to-end tests run on the same dynamics. It knows nothing of QMP, run
// states or strategies: a driver steps it with the time that passed and the
// world around it (Env), sets its parameters (Params), and acts on the
// Event each step returns (a MIGRATION_PASS, stopping the source, ...).
//
// Per step of dt, in pre-copy (as QEMU's ram.c and migration.c do it):
//
//   - The link sends Env.Link × dt of the dirty bitmap (Remaining).
//   - The guest dirties Env.Dirty × dt of distinct pages, scaled by
//     (1 - throttle%); the set dirtied since the last bitmap sync is capped
//     at the working set.
//   - When the bitmap drops to threshold = Link × downtime-limit (or
//     empties) the bitmap is synced: the dirtied set joins it and
//     dirty-sync-count grows; if it is then at most the threshold the
//     migration has converged (the source must stop). With auto-converge a
//     sync is also forced every 5 s (QEMU ≥ 9.2's periodic sync). A stalled
//     link (Link 0) never syncs: the migration thread is blocked writing.
//   - At a sync at least 1 s after the previous rate update the dirty rate
//     is measured (distinct bytes dirtied in the period / period) and
//     auto-converge checks dirtied > throttle-trigger-threshold % of sent:
//     the second time it throttles, first at cpu-throttle-initial, then
//     +increment up to max-cpu-throttle (migration_trigger_throttle).
//   - A postcopy request switches at the end of the step, with a sync of its
//     own (the discard bitmap's) that counts as a pass; the throttle stops.
//
// In stop-and-copy (after convergence, the source stopped: the driver calls
// FinalSync, the last pass) and in postcopy the link sends the rest; the
// step that empties it ends the migration (Finished). Drain does it at once
// for a driver that skips the time instead.
package rammodel

import (
	"math"
	"time"
)

// Phase is where the migration thread is.
type Phase int

// The phases, in order.
const (
	Precopy  Phase = iota // passes over the dirty bitmap, the guest running
	StopCopy              // converged: the source stopped, the rest going over the link
	Postcopy              // the destination runs, the rest pulled over the link
	Done                  // everything sent
)

// Event is what a step did that the driver acts on.
type Event int

// The events of a step.
const (
	None            Event = iota
	Synced                // a bitmap sync (a MIGRATION_PASS); still pre-copy
	Converged             // a bitmap sync that left at most the threshold: the source must stop (StopCopy)
	PostcopyStarted       // the postcopy switch (its sync counted as a pass)
	Finished              // the rest was sent (Done)
)

// Throttle is auto-converge's ramp: QEMU's cpu-throttle-initial,
// cpu-throttle-increment, max-cpu-throttle and throttle-trigger-threshold
// (percentages).
type Throttle struct {
	Initial, Increment, Max, TriggerThreshold int
}

// DefaultThrottle is QEMU's default ramp.
var DefaultThrottle = Throttle{Initial: 20, Increment: 10, Max: 99, TriggerThreshold: 50}

// Params are the migration parameters and capabilities the thread reads; a
// driver may change them between steps (migrate-set-parameters).
type Params struct {
	DowntimeLimit time.Duration
	AutoConverge  bool
	Throttle      Throttle
}

// Env is the world around the migration thread during a step.
type Env struct {
	Link  float64 // bytes/s the link carries now; 0 stalls the migration
	Dirty float64 // distinct bytes/s the guest dirties at full speed; 0 while its vCPUs are stopped
}

const (
	forcedSync = 5 * time.Second // cpu_throttle_dirty_sync_timer (9.2)
	rateWindow = time.Second     // migration_bitmap_sync's rate period
)

// Model is one RAM migration. The exported fields other than Params are
// its state, for drivers to read.
type Model struct {
	Params Params

	Phase     Phase
	Elapsed   time.Duration // the sum of the steps' dt
	Iteration uint64        // dirty-sync-count: 1 after the setup's sync
	Remaining float64       // the dirty bitmap, bytes (ram.remaining)
	Sent      float64       // bytes sent (ram.transferred)
	Throttle  int           // cpu-throttle-percentage
	DirtyRate float64       // bytes/s, measured at the last rate update (dirty-pages-rate × page size)
	LastDirty float64       // bytes dirtied between the last two syncs (dirty_bytes_last_sync)

	ram, ws     float64
	dirtyLog    float64 // distinct bytes dirtied since the last sync
	highCount   int     // dirty_rate_high_cnt
	lastSync    time.Duration
	lastRate    time.Duration
	dirtyPeriod float64 // bytes dirtied since the last rate update
	sentAtRate  float64
	wantPost    bool
}

// New starts a migration of ram bytes whose guest keeps re-dirtying a
// working set of workingSet bytes (0 or more than ram: all of it), just
// after the setup's first sync: the whole RAM is dirty, pass 1.
func New(ram, workingSet uint64, p Params) *Model {
	m := &Model{Params: p, Iteration: 1, Remaining: float64(ram), ram: float64(ram), ws: float64(ram)}
	if workingSet > 0 && workingSet < ram {
		m.ws = float64(workingSet)
	}
	return m
}

// WorkingSet is the most the guest can dirty between two syncs, bytes.
func (m *Model) WorkingSet() float64 { return m.ws }

// RequestPostcopy asks for the postcopy switch (migrate-start-postcopy): it
// happens at the end of the next pre-copy step.
func (m *Model) RequestPostcopy() { m.wantPost = true }

// ExpectedDowntime is QEMU's estimate of the stop-and-copy over a link of
// link bytes/s: what the last sync found dirtied, at that rate.
func (m *Model) ExpectedDowntime(link float64) time.Duration {
	return time.Duration(m.LastDirty / link * float64(time.Second))
}

// Step moves the migration dt on.
func (m *Model) Step(dt time.Duration, env Env) Event {
	m.Elapsed += dt
	sec := dt.Seconds()
	send := env.Link * sec
	switch m.Phase {
	case Done:
		return None
	case StopCopy, Postcopy:
		n := math.Min(send, m.Remaining)
		m.Remaining -= n
		m.Sent += n
		if m.Remaining > 0 || env.Link == 0 {
			return None
		}
		m.Phase, m.Throttle = Done, 0
		return Finished
	}
	m.dirtyLog = math.Min(m.ws, m.dirtyLog+env.Dirty*(1-float64(m.Throttle)/100)*sec)
	n := math.Min(send, m.Remaining)
	m.Remaining -= n
	m.Sent += n
	if m.wantPost {
		// must_precopy is ~0 for RAM: postcopy starts at once, with
		// the discard bitmap's sync (ram_postcopy_send_discard_bitmap).
		m.wantPost = false
		m.sync()
		m.Phase, m.Throttle = Postcopy, 0
		return PostcopyStarted
	}
	threshold := env.Link * m.Params.DowntimeLimit.Seconds()
	forced := m.Params.AutoConverge && m.Elapsed-m.lastSync >= forcedSync
	if env.Link == 0 || (m.Remaining > threshold && m.Remaining > 0 && !forced) {
		return None
	}
	m.sync()
	if m.Remaining <= threshold {
		m.Phase, m.Throttle = StopCopy, 0
		return Converged
	}
	return Synced
}

// FinalSync is the last bitmap sync, once the source stopped for the
// stop-and-copy (ram_save_complete, at status device): what the guest
// dirtied since the convergence joins the rest; it counts as a pass.
func (m *Model) FinalSync() {
	if m.Phase != StopCopy {
		return
	}
	m.sync()
	m.Throttle = 0 // the guest is stopped: no throttle to report
}

// Drain sends the rest of a stop-and-copy or postcopy at once over a link of
// link bytes/s and reports how long that takes, for a driver that skips
// the time rather than stepping through it.
func (m *Model) Drain(link float64) time.Duration {
	d := time.Duration(m.Remaining / link * float64(time.Second))
	m.Sent += m.Remaining
	m.Remaining = 0
	m.Elapsed += d
	m.Phase, m.Throttle = Done, 0
	return d
}

// sync is migration_bitmap_sync.
func (m *Model) sync() {
	m.Remaining = math.Min(m.ram, m.Remaining+m.dirtyLog)
	m.LastDirty = m.dirtyLog
	m.dirtyPeriod += m.dirtyLog
	m.dirtyLog = 0
	m.Iteration++
	m.lastSync = m.Elapsed
	if m.Elapsed-m.lastRate < rateWindow {
		return
	}
	// migration_trigger_throttle, then migration_update_rates.
	xfer := m.Sent - m.sentAtRate
	thr := m.Params.Throttle
	if m.Params.AutoConverge && m.dirtyPeriod > xfer*float64(thr.TriggerThreshold)/100 {
		m.highCount++
		if m.highCount >= 2 {
			m.highCount = 0
			if m.Throttle == 0 {
				m.Throttle = thr.Initial
			} else {
				m.Throttle = min(m.Throttle+thr.Increment, thr.Max)
			}
		}
	}
	m.DirtyRate = m.dirtyPeriod / (m.Elapsed - m.lastRate).Seconds()
	m.dirtyPeriod = 0
	m.sentAtRate = m.Sent
	m.lastRate = m.Elapsed
}
