package qemutest

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/qmigrate/qmigrate/qmp"
)

// Postcopy's link faults and recovery, as QEMU 7.2 to 10.x behave:
//
//   - LinkReset: the migration stream's connection is reset. In
//     postcopy-active (or a recovery in progress) both sides go to
//     postcopy-paused by themselves; in pre-copy the migration fails and
//     the destination exits.
//   - LinkBlackHole: packets are dropped without a reset: nothing moves
//     and nothing changes state (QEMU waits on TCP) until migrate-pause
//     on each side still waiting; a recovery's connection hangs too.
//   - migrate-pause (both sides): postcopy-active or postcopy-recover(-setup)
//     to postcopy-paused; on a working link the other side follows. Before
//     8.2 only postcopy-active: a side in postcopy-recover refuses it (its
//     resume handshake ends when the link carries it, or never).
//   - FailRecoverListen: the next migrate-recover cannot bind its port (as
//     7.2 once could not while the paused connection closed); it may be
//     asked again (7.1+ drops the old listener first).
//   - migrate-recover URI (destination, postcopy-paused): it listens again
//     (port 0: Port+1), postcopy-recover-setup from 9.1; a second one
//     while it listens is refused.
//   - migrate resume=true (source, postcopy-paused): postcopy-recover-setup
//     (9.1+), postcopy-recover, then postcopy-active on both sides when the
//     destination listens at that address and the link works; back to
//     postcopy-paused otherwise, or when BreakRecoveries says so.
//   - Options.DstDeviceLoad: the destination loads the device state for
//     that long of a working link after postcopy starts; its in-band
//     commands wait meanwhile (a link lost then holds them until a
//     recovery), exec-oob ones and events do not.
//   - KillDstAtPostcopyStart: the destination exits as postcopy starts,
//     before it runs the guest: the source reports postcopy-active for a
//     step, then its postcopy start fails (failed, not postcopy-paused),
//     its guest left stopped (postmigrate: 7.2, 3 of 4 kills at postcopy's
//     first sample) or resumed (resume: not seen on real QEMU).
//   - KillSrc: the source exits; a destination in postcopy goes to
//     postcopy-paused (its guest keeps running, stalled on missing pages),
//     except one before 8.0 still loading the device state (DstDeviceLoad),
//     which exits with it (7.2, a CI rehearsal); one loading a pre-copy
//     stream exits. KillDst in postcopy leaves the source in postcopy-paused.

// postcopyFaults is the link and recovery state (Pair.mu).
type postcopyFaults struct {
	reset        bool                // LinkReset pending for the next step
	blackHole    bool                // LinkBlackHole on
	srcDead      bool                // KillSrc
	recoverAddr  *qmp.SocketAddress  // migrate-recover's listener, until a source connects
	resumeAddr   qmp.SocketAddress   // where the source resumes to
	resumeTicks  int                 // steps the resume handshake has been going
	breakNext    int                 // recoveries still to break (BreakRecoveries)
	failListen   int                 // migrate-recover binds still to fail (FailRecoverListen)
	killAtStart  bool                // KillDstAtPostcopyStart armed
	startFails   bool                // postcopy's start fails at the next step
	startResumes bool                // and the source's guest runs again
	recoveries   int                 // recoveries that completed
	pauses       [2]int              // migrate-pause received, by side
	recoverCalls []qmp.SocketAddress // migrate-recover's addresses
	// The destination's device state load (Options.DstDeviceLoad): the
	// time it still needs, and the gate its in-band commands wait on
	// (non-nil while it loads; closed once loaded).
	loadLeft time.Duration
	loading  chan struct{}
}

// DstLoading reports whether the destination is still loading the device
// state in postcopy (Options.DstDeviceLoad): its in-band commands wait.
func (p *Pair) DstLoading() bool { p.mu.Lock(); defer p.mu.Unlock(); return p.pc.loading != nil }

// startDeviceLoad begins the destination's device state load as postcopy
// starts; without Options.DstDeviceLoad its guest runs at once.
func (p *Pair) startDeviceLoad() {
	if p.opt.DstDeviceLoad <= 0 {
		p.dstRuns()
		return
	}
	p.pc.loadLeft = p.opt.DstDeviceLoad
	p.pc.loading = make(chan struct{})
}

// stepDeviceLoad advances the load by dt while the link works (both
// sides in postcopy-active, no black hole, the destination not frozen).
func (p *Pair) stepDeviceLoad(dt time.Duration) {
	m := &p.mig
	if p.pc.loading == nil || m.status != qmp.StatusPostcopyActive || m.dstStatus != qmp.StatusPostcopyActive || p.rate() == 0 {
		return
	}
	p.pc.loadLeft -= dt
	if p.pc.loadLeft <= 0 {
		p.deviceLoaded()
		p.dstRuns()
	}
}

// deviceLoaded ends the load: the held in-band commands run.
func (p *Pair) deviceLoaded() {
	if p.pc.loading != nil {
		close(p.pc.loading)
		p.pc.loading = nil
	}
}

// dstRuns starts the guest on the destination (postcopy).
func (p *Pair) dstRuns() {
	if p.mig.dstDead {
		return
	}
	p.Dst.run = "running"
	p.Dst.Emit("RESUME", nil)
}

// waitDeviceLoaded is the destination's in-band gate: it waits while the
// device state loads.
func (p *Pair) waitDeviceLoaded() {
	p.mu.Lock()
	ch := p.pc.loading
	p.mu.Unlock()
	if ch != nil {
		<-ch
	}
}

// LinkReset resets the migration stream's connection.
func (p *Pair) LinkReset() { p.mu.Lock(); p.pc.reset = true; p.mu.Unlock() }

// LinkBlackHole drops every packet of the migration link (on) or stops
// dropping them (off).
func (p *Pair) LinkBlackHole(on bool) { p.mu.Lock(); p.pc.blackHole = on; p.mu.Unlock() }

// BreakRecoveries makes the next n recovery handshakes fail half-way (in
// postcopy-recover): both sides fall back to postcopy-paused.
func (p *Pair) BreakRecoveries(n int) { p.mu.Lock(); p.pc.breakNext = n; p.mu.Unlock() }

// KillDstAtPostcopyStart makes the destination exit as postcopy starts,
// before it runs the guest: the source's postcopy start fails, its guest
// left stopped (postmigrate), or running again with resume.
func (p *Pair) KillDstAtPostcopyStart(resume bool) {
	p.mu.Lock()
	p.pc.killAtStart, p.pc.startResumes = true, resume
	p.mu.Unlock()
}

// FailRecoverListen makes the next n migrate-recover commands fail to
// bind their port ("Address already in use").
func (p *Pair) FailRecoverListen(n int) { p.mu.Lock(); p.pc.failListen = n; p.mu.Unlock() }

// Recoveries counts the postcopy recoveries that completed.
func (p *Pair) Recoveries() int { p.mu.Lock(); defer p.mu.Unlock(); return p.pc.recoveries }

// Pauses counts the migrate-pause commands side received.
func (p *Pair) Pauses(s Side) int { p.mu.Lock(); defer p.mu.Unlock(); return p.pc.pauses[s] }

// RecoverAddresses returns the addresses of every migrate-recover received.
func (p *Pair) RecoverAddresses() []qmp.SocketAddress {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]qmp.SocketAddress(nil), p.pc.recoverCalls...)
}

// KillSrc makes the source QEMU exit: its connections close. A
// destination in postcopy goes to postcopy-paused; one loading a pre-copy
// stream (status active) fails at its end and exits (exit-on-error), as
// after LinkReset; one still waiting for the source to connect keeps
// listening.
func (p *Pair) KillSrc() {
	p.mu.Lock()
	p.pc.srcDead = true
	p.mu.Unlock()
	// The source's monitor goes first, as with QEMU (the process is gone
	// before the destination notices the broken stream): a destination
	// event must not reach the engine while the source still answers.
	p.Src.CloseConns()
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.mig.dstStatus.Postcopy() && p.pc.loading != nil && p.opt.DstVersion[0] < 8:
		p.dstExit()
	case p.mig.dstStatus.Postcopy() && p.mig.dstStatus != qmp.StatusPostcopyPaused:
		p.pc.recoverAddr = nil
		p.setDstStatus(qmp.StatusPostcopyPaused)
	case p.mig.dstStatus == qmp.StatusActive:
		p.dstExit()
	}
}

// SrcGone reports whether the source QEMU exited (KillSrc).
func (p *Pair) SrcGone() bool { p.mu.Lock(); defer p.mu.Unlock(); return p.pc.srcDead }

// pausesInRecover: migrate-pause works in postcopy-recover from 8.2.
func pausesInRecover(v [3]int) bool { return v[0] > 8 || v[0] == 8 && v[1] >= 2 }

// hasRecoverSetup: postcopy-recover-setup exists from 9.1.
func hasRecoverSetup(v [3]int) bool { return hasExitOnError(v) }

func (q *QEMU) installPostcopy() {
	q.handle("migrate-pause", q.migratePause)
	if q.side == Destination {
		q.handle("migrate-recover", q.p.migrateRecover)
	}
}

func (q *QEMU) migratePause(json.RawMessage) (any, error) {
	p := q.p
	st := p.mig.status
	if q.side == Destination {
		st = p.mig.dstStatus
	}
	v := p.opt.Version
	if q.side == Destination {
		v = p.opt.DstVersion
	}
	switch st {
	case qmp.StatusPostcopyActive:
	case qmp.StatusPostcopyRecover, qmp.StatusPostcopyRecoverSetup:
		if !pausesInRecover(v) {
			return nil, errGeneric("migrate-pause is currently only supported during postcopy-active state")
		}
	default:
		return nil, errGeneric("migrate-pause is currently only supported during postcopy-active or postcopy-recover state")
	}
	p.pc.pauses[q.side]++
	if q.side == Source {
		p.pausePostcopy(true, !p.pc.blackHole)
	} else {
		p.pausePostcopy(!p.pc.blackHole, true)
	}
	return nil, nil
}

// pausePostcopy puts the sides named to postcopy-paused (those in a
// postcopy state other than paused).
func (p *Pair) pausePostcopy(src, dst bool) {
	m := &p.mig
	if src && m.status.Postcopy() && m.status != qmp.StatusPostcopyPaused {
		p.pc.resumeTicks = 0
		p.setStatus(qmp.StatusPostcopyPaused)
	}
	if dst && !m.dstDead && m.dstStatus.Postcopy() && m.dstStatus != qmp.StatusPostcopyPaused {
		p.setDstStatus(qmp.StatusPostcopyPaused)
	}
	if dst {
		p.pc.recoverAddr = nil
	}
}

func (p *Pair) migrateRecover(args json.RawMessage) (any, error) {
	var a struct {
		URI string `json:"uri"`
	}
	if err := json.Unmarshal(args, &a); err != nil {
		return nil, err
	}
	m := &p.mig
	if m.dstStatus != qmp.StatusPostcopyPaused {
		return nil, errGeneric("Migrate recover can only be run when postcopy is paused.")
	}
	if p.pc.recoverAddr != nil {
		return nil, errGeneric("Migrate recovery is triggered already")
	}
	sa, err := parseChannel(a.URI, nil)
	if err != nil {
		return nil, err
	}
	if p.pc.failListen > 0 {
		p.pc.failListen--
		p.pc.recoverCalls = append(p.pc.recoverCalls, sa)
		return nil, errGeneric("Failed to find an available port: Address already in use")
	}
	if sa.Type == "inet" && sa.Port == "0" {
		sa.Port = fmt.Sprint(Port + 1)
	}
	p.pc.recoverCalls = append(p.pc.recoverCalls, sa)
	p.pc.recoverAddr = &sa
	m.sockAddr = []qmp.SocketAddress{sa}
	if hasRecoverSetup(p.opt.DstVersion) {
		p.setDstStatus(qmp.StatusPostcopyRecoverSetup)
	}
	return nil, nil
}

// resume is migrate with resume=true.
func (p *Pair) resume(sa qmp.SocketAddress) (any, error) {
	if p.mig.status != qmp.StatusPostcopyPaused {
		return nil, errGeneric("Cannot resume if there is no paused migration")
	}
	p.pc.resumeAddr = sa
	p.pc.resumeTicks = 0
	if hasRecoverSetup(p.opt.Version) {
		p.setStatus(qmp.StatusPostcopyRecoverSetup)
	} else {
		p.setStatus(qmp.StatusPostcopyRecover)
	}
	return nil, nil
}

// stepPostcopyFault handles a pending reset and the paused and
// recovering states; handled says step has nothing more to do.
func (p *Pair) stepPostcopyFault() (handled bool) {
	m, pc := &p.mig, &p.pc
	if pc.startFails {
		pc.startFails = false
		if !pc.startResumes {
			p.ram.runningAtStop = false
			p.Src.run = "postmigrate"
		}
		p.fail("")
		return true
	}
	if pc.reset && m.status.Postcopy() {
		pc.reset = false
		p.pausePostcopy(true, true)
		return true
	}
	switch m.status {
	case qmp.StatusPostcopyPaused:
		return true
	case qmp.StatusPostcopyRecoverSetup, qmp.StatusPostcopyRecover:
		p.stepResume()
		return true
	}
	return false
}

// stepResume is one step of the source's resume handshake.
func (p *Pair) stepResume() {
	m, pc := &p.mig, &p.pc
	if pc.blackHole {
		return // connecting, or waiting for the handshake's answer
	}
	if pc.recoverAddr == nil || m.dstDead || !sameAddr(*pc.recoverAddr, pc.resumeAddr) {
		m.errDesc = "Failed to connect to '" + addrString(pc.resumeAddr) + "': Connection refused"
		p.setStatus(qmp.StatusPostcopyPaused)
		return
	}
	pc.resumeTicks++
	switch pc.resumeTicks {
	case 1:
		if m.status != qmp.StatusPostcopyRecover {
			p.setStatus(qmp.StatusPostcopyRecover)
		}
		p.setDstStatus(qmp.StatusPostcopyRecover)
		return
	}
	pc.recoverAddr = nil
	if pc.breakNext > 0 {
		pc.breakNext--
		p.pausePostcopy(true, true)
		return
	}
	pc.resumeTicks = 0
	pc.recoveries++
	p.setStatus(qmp.StatusPostcopyActive)
	p.setDstStatus(qmp.StatusPostcopyActive)
}
