package qemutest

import (
	"encoding/json"
	"time"

	"github.com/qmigrate/qmigrate/internal/rammodel"
	"github.com/qmigrate/qmigrate/qmp"
)

// The RAM migration. From migrate on, a goroutine steps it every
// Options.Tick on the real clock (or testing/synctest's virtual one) until
// the migration ends, skipping the steps while the source is frozen:
//
//   - setup: fails with Options.FailWith, a TLS mismatch, or a destination
//     that does not listen at the migrate address (it then exits); else
//     active, pass 1.
//   - active: internal/rammodel's pre-copy, the model strategy's end-to-end
//     tests run on too, against a link of Throughput bytes/s (capped by
//     max-bandwidth; 0 while the destination is frozen) and a guest
//     dirtying DirtyRate bytes/s of the whole RAM while the source runs.
//     Each bitmap sync is a MIGRATION_PASS: when what is left drops to
//     downtime-limit at the link's rate (or empties), and with
//     auto-converge every 5 s. dirty-pages-rate is measured over ≥ 1 s
//     periods, and auto-converge throttles at the second period dirtying
//     more than throttle-trigger-threshold % of what was sent. A sync
//     that leaves at most the threshold stops the source (STOP) for the
//     pre-switchover (with pause-before-switchover, until migrate-continue)
//     or device, whose final sync is one more pass.
//   - device, postcopy-active: the rest is sent; completed (the source in
//     postmigrate, downtime measured from the stop) and the destination
//     completes its incoming migration, or the Options.LateCancel and
//     DstFailsLoad endings.
//   - migrate-start-postcopy: at the next step the source stops, one more
//     pass, the destination runs (after Options.DstDeviceLoad).
//   - cancelling: cancelled, the source resumed if it was running, the
//     destination exits; a destination gone (KillDst) fails the migration.
//
// calc-dirty-rate measures DirtyRate, at most the whole RAM per period.

// ramModel is the state of the RAM migration (Pair.mu).
type ramModel struct {
	m             *rammodel.Model // from the end of setup
	started       time.Time
	stopAt        time.Time
	downtime      time.Duration
	runningAtStop bool
	stop, done    chan struct{} // the stepping goroutine's

	dirtyCalcs   []json.RawMessage // calc-dirty-rate arguments received
	dirtyQueries int               // query-dirty-rate since the last calc-dirty-rate
	dirtyPeriod  time.Duration     // the last calc-dirty-rate's period
}

// SetDirtyRate changes the source's dirty rate.
func (p *Pair) SetDirtyRate(r float64) { p.mu.Lock(); p.opt.DirtyRate = r; p.mu.Unlock() }

// SetThroughput changes the link's throughput (0 stalls the migration).
func (p *Pair) SetThroughput(r float64) {
	p.mu.Lock()
	p.opt.Throughput, p.opt.PostcopyRate = r, r
	p.mu.Unlock()
}

// DirtyRateCalcs returns the arguments of every calc-dirty-rate received.
func (p *Pair) DirtyRateCalcs() []json.RawMessage {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]json.RawMessage(nil), p.ram.dirtyCalcs...)
}

// startRAM resets the model for a new migration and starts stepping it.
func (p *Pair) startRAM() {
	r := &p.ram
	r.started = time.Now()
	r.m = nil
	r.stopAt = time.Time{}
	r.stop, r.done = make(chan struct{}), make(chan struct{})
	go p.runRAM(r.stop, r.done)
}

// stopRAM stops the stepping goroutine, if any, and waits for it.
func (p *Pair) stopRAM() {
	p.mu.Lock()
	stop, done := p.ram.stop, p.ram.done
	p.ram.stop = nil
	p.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
}

func (p *Pair) runRAM(stop, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(p.opt.Tick)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		if p.isFrozen(Source) {
			continue // a stopped source does nothing
		}
		p.mu.Lock()
		end := p.step(p.opt.Tick)
		p.mu.Unlock()
		if end {
			return
		}
	}
}

// rate is the link's throughput now.
func (p *Pair) rate() float64 {
	if p.isFrozen(Destination) || p.pc.blackHole {
		return 0 // a stopped destination reads nothing; a black hole passes nothing
	}
	r, limit := p.opt.Throughput, "max-bandwidth"
	if p.mig.status.Postcopy() {
		// QEMU switches the rate limit to max-postcopy-bandwidth (0:
		// unlimited) when postcopy starts.
		r, limit = p.opt.PostcopyRate, "max-postcopy-bandwidth"
	}
	if bw := float64(p.Src.param(limit)); bw > 0 && bw < r {
		r = bw
	}
	return r
}

// env is the world around the migration thread now: the link, and the
// guest's dirty rate while its vCPUs run.
func (p *Pair) env() rammodel.Env {
	e := rammodel.Env{Link: p.rate()}
	if p.Src.run == "running" {
		e.Dirty = p.opt.DirtyRate
	}
	return e
}

// params are the source's migration parameters as the model reads them.
func (p *Pair) params() rammodel.Params {
	src := p.Src
	return rammodel.Params{
		DowntimeLimit: time.Duration(src.param("downtime-limit")) * time.Millisecond,
		AutoConverge:  src.caps["auto-converge"],
		Throttle: rammodel.Throttle{
			Initial:          int(src.param("cpu-throttle-initial")),
			Increment:        int(src.param("cpu-throttle-increment")),
			Max:              int(src.param("max-cpu-throttle")),
			TriggerThreshold: int(src.param("throttle-trigger-threshold")),
		},
	}
}

// srcInfo is the source's query-migrate.
func (p *Pair) srcInfo() map[string]any {
	out := map[string]any{}
	if len(p.opt.Blockers) > 0 {
		out["blocked-reasons"] = p.opt.Blockers
	}
	r, status := &p.ram, p.mig.status
	if status == qmp.StatusNone {
		return out
	}
	out["status"] = status
	m := r.m
	if m == nil { // setup: nothing sent, no pass yet
		m = &rammodel.Model{Remaining: float64(p.opt.RAM)}
	}
	rem := uint64(m.Remaining)
	out["ram"] = map[string]any{
		"transferred": uint64(m.Sent), "remaining": rem, "total": p.opt.RAM,
		"dirty-pages-rate": uint64(m.DirtyRate / 4096), "page-size": 4096,
		"mbps": p.rate() * 8 / 1e6, "dirty-sync-count": m.Iteration,
	}
	out["total-time"] = time.Since(r.started).Milliseconds()
	if status == qmp.StatusActive && p.rate() > 0 {
		out["expected-downtime"] = m.ExpectedDowntime(p.rate()).Milliseconds()
	}
	if m.Throttle > 0 {
		out["cpu-throttle-percentage"] = m.Throttle
	}
	if status == qmp.StatusCompleted {
		out["downtime"] = r.downtime.Milliseconds()
	}
	if status == qmp.StatusFailed {
		out["error-desc"] = p.mig.errDesc
	}
	return out
}

// pass is a dirty bitmap sync's MIGRATION_PASS.
func (p *Pair) pass() {
	if p.Src.caps["events"] {
		p.Src.Emit("MIGRATION_PASS", map[string]any{"pass": p.ram.m.Iteration})
	}
}

// switchover stops the source (QEMU's migration_completion).
func (p *Pair) switchover() {
	src := p.Src
	p.ram.runningAtStop = src.run == "running"
	if src.run == "running" {
		src.run = "finish-migrate"
		src.Emit("STOP", nil)
	} else if src.run == "paused" {
		src.run = "finish-migrate"
	}
	if p.ram.stopAt.IsZero() {
		p.ram.stopAt = time.Now()
	}
}

// fail ends the migration with desc, resuming a source stopped for it.
func (p *Pair) fail(desc string) bool {
	src := p.Src
	p.mig.errDesc = desc
	p.setStatus(qmp.StatusFailed)
	if src.run == "finish-migrate" && p.ram.runningAtStop {
		src.run = "running"
		src.Emit("RESUME", nil)
	}
	return true
}

// step advances the migration by dt; true ends it.
func (p *Pair) step(dt time.Duration) bool {
	src, m := p.Src, &p.mig
	switch m.status {
	case qmp.StatusCancelling:
		p.setStatus(qmp.StatusCancelled)
		if src.run == "finish-migrate" {
			if p.ram.runningAtStop {
				src.run = "running"
				src.Emit("RESUME", nil)
			} else {
				src.run = "postmigrate"
			}
		}
		p.dstExit()
		return true
	case qmp.StatusSetup:
		return p.stepSetup()
	}
	if m.status.Terminal() || p.pc.srcDead {
		return true
	}
	if p.stepPostcopyFault() {
		return false
	}
	if m.dstDead && m.status.Postcopy() {
		// QEMU pauses postcopy on a stream error, whatever its cause.
		p.pausePostcopy(true, false)
		return false
	}
	if m.dstDead {
		return p.fail("Unable to write to socket: Broken pipe")
	}
	if p.pc.reset {
		p.pc.reset = false
		p.dstExit()
		return p.fail("Unable to write to socket: Connection reset by peer")
	}
	switch {
	case m.status == qmp.StatusPreSwitchover:
		if m.continued {
			p.device()
		}
		return false
	case m.status == qmp.StatusDevice || m.status.Postcopy():
		p.stepDeviceLoad(dt)
		return p.stepFinal(dt)
	}
	return p.stepActive(dt)
}

func (p *Pair) stepSetup() bool {
	m := &p.mig
	if p.opt.FailWith != "" {
		return p.fail(p.opt.FailWith)
	}
	if desc := p.tlsMismatch(); desc != "" {
		p.dstExit()
		return p.fail(desc)
	}
	if m.errDesc != "" {
		p.dstExit()
		return p.fail(m.errDesc)
	}
	p.ram.m = rammodel.New(p.opt.RAM, 0, p.params())
	p.setStatus(qmp.StatusActive)
	p.setDstStatus(qmp.StatusActive)
	p.pass()
	return false
}

// device is the stop-and-copy (status device) with its final sync.
func (p *Pair) device() {
	p.setStatus(qmp.StatusDevice)
	p.ram.m.FinalSync()
	p.pass()
}

// stepFinal sends the rest with the source stopped (device) or the
// destination running (postcopy), then ends the migration.
func (p *Pair) stepFinal(dt time.Duration) bool {
	src, r, m := p.Src, &p.ram, &p.mig
	if r.m.Step(dt, p.env()) != rammodel.Finished {
		return false
	}
	if !m.status.Postcopy() {
		r.downtime = time.Since(r.stopAt)
	} else {
		r.downtime = 0
	}
	if m.lateCancel && p.opt.LateCancel != LateCancelCompletes {
		p.setStatus(qmp.StatusCancelled)
		if p.opt.LateCancel == LateCancelResumes && r.runningAtStop {
			src.run = "running"
			src.Emit("RESUME", nil)
		} else {
			src.run = "postmigrate"
		}
		if p.opt.LateCancel == LateCancelPostmigrateDstFails {
			p.dstExit()
		} else {
			p.dstComplete()
		}
		return true
	}
	src.run = "postmigrate"
	p.setStatus(qmp.StatusCompleted)
	if p.pc.loading != nil {
		// Every page arrived: the load waits for nothing more.
		p.deviceLoaded()
		p.dstRuns()
	}
	if p.opt.DstFailsLoad {
		p.dstExit()
		return true
	}
	if p.opt.DstNeverCompletes {
		return true
	}
	p.dstComplete()
	return true
}

// stepActive is one step of the pre-copy.
func (p *Pair) stepActive(dt time.Duration) bool {
	r, m := &p.ram, &p.mig
	if m.wantPost {
		m.wantPost = false
		r.m.RequestPostcopy()
	}
	r.m.Params = p.params()
	switch r.m.Step(dt, p.env()) {
	case rammodel.Synced:
		p.pass()
	case rammodel.Converged:
		p.pass()
		p.switchover()
		if p.Src.caps["pause-before-switchover"] {
			p.setStatus(qmp.StatusPreSwitchover)
			return false
		}
		p.device()
	case rammodel.PostcopyStarted:
		p.switchover()
		p.pass()
		p.setStatus(qmp.StatusPostcopyActive)
		if p.pc.killAtStart {
			p.pc.killAtStart, p.pc.startFails = false, true
			p.mig.dstDead = true
			go p.Dst.CloseConns()
			return false
		}
		p.setDstStatus(qmp.StatusPostcopyActive)
		p.startDeviceLoad()
	}
	return false
}

// calcDirtyRate (page sampling) measures the source's DirtyRate, counting
// distinct pages as QEMU does: at most the whole RAM (the model's working
// set) within the period; "calc-time-unit" from 8.2.
func (p *Pair) calcDirtyRate(args json.RawMessage) (any, error) {
	var a struct {
		CalcTime int    `json:"calc-time"`
		Unit     string `json:"calc-time-unit"`
	}
	if err := json.Unmarshal(args, &a); err != nil || a.CalcTime <= 0 {
		return nil, errGeneric("Invalid calc-time")
	}
	r := &p.ram
	r.dirtyCalcs = append(r.dirtyCalcs, args)
	r.dirtyQueries = 0
	r.dirtyPeriod = time.Duration(a.CalcTime) * time.Second
	if a.Unit == "millisecond" {
		r.dirtyPeriod = time.Duration(a.CalcTime) * time.Millisecond
	}
	return nil, nil
}

// queryDirtyRate reads "unstarted" until the measuring thread runs (the
// first query here), then "measuring" (the second), then "measured", as in
// QEMU.
func (p *Pair) queryDirtyRate(json.RawMessage) (any, error) {
	r := &p.ram
	r.dirtyQueries++
	if len(r.dirtyCalcs) == 0 || r.dirtyQueries <= 2 {
		st := "unstarted"
		if len(r.dirtyCalcs) > 0 && r.dirtyQueries == 2 {
			st = "measuring"
		}
		return map[string]any{"status": st, "calc-time": 0, "sample-pages": 0, "mode": "page-sampling", "start-time": 0}, nil
	}
	rate := min(p.opt.DirtyRate, float64(p.opt.RAM)/r.dirtyPeriod.Seconds())
	return map[string]any{"status": "measured", "dirty-rate": int64(rate / (1 << 20)),
		"calc-time": 1, "sample-pages": 4096, "mode": "page-sampling", "start-time": 1}, nil
}

// calcDirtyRateMembers are calc-dirty-rate's arguments: "calc-time-unit"
// from 8.2.
func calcDirtyRateMembers(v [3]int) []string {
	m := []string{"calc-time", "*sample-pages", "*mode"}
	if hasChannels(v) {
		m = append(m, "*calc-time-unit")
	}
	return m
}
