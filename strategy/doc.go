// Package strategy is the switchover brain of qmigrate: a pure, deterministic
// state machine in the style of etcd-raft's RawNode. Samples go in, decisions
// come out; time is passed in as data (Sample.Elapsed). There is no clock, no
// I/O and no goroutine, and the same inputs always give the same decisions.
// It imports the standard library only.
//
// # Driving a Machine
//
//	m, err := strategy.New(cfg)          // cfg.Validate() names a bad field
//	m.SetStorage(storage)                 // storage migrations only, before Setup
//	m.SetQEMU(major, minor)               // auto's downtime headroom, before Setup
//	setup := m.Setup()                    // apply BEFORE migrate starts
//	for !m.Done() {
//	    d := m.Step(sample)               // every poll (~200 ms) and on MIGRATION_PASS
//	    if d.Action != strategy.Wait {
//	        m.Applied(d, apply(d))        // report the outcome before the next Step
//	    }
//	}
//
// A Machine serves one migration and is not safe for concurrent use: the
// engine's owner goroutine calls Step and Applied in turn. The engine MUST
// apply Setup before the migration starts, and apply every non-wait Decision
// and report it with Applied; each Action says which QMP commands it means.
// With a storage migration the mirror phase comes first (see Storage).
// Every Decision has a Summary in words and its arithmetic in Reason; an
// Abort carries a Remedy (what would have finished the migration).
//
// # Invariants (fuzzed)
//
//   - A DowntimeLimit is never above Limits.MaxDowntime (300 ms when zero),
//     in Setup or in a Decision.
//   - StartPostcopy only with Limits.AllowPostcopy, PauseSource only with
//     Limits.AllowPause, SetThrottle and Setup.AutoConverge never with
//     Limits.NoThrottle, MirrorWriteBlocking never with
//     Limits.NoWriteBlocking.
//   - A terminal status (completed, failed, cancelled) or an Abort makes
//     Done true; Step then only returns Wait.
//   - Postcopy is never aborted: in a postcopy status, and from the moment a
//     StartPostcopy is returned (unless Applied reports it failed), Step only
//     returns Wait, whatever the budget.
//   - With Limits.Budget > 0, the first sample whose Elapsed reaches it gets
//     a finishing decision (Abort, or StartPostcopy or PauseSource when the
//     policy prefers and the user permits them), unless one is under way.
//   - MirrorWriteBlocking at most once, only while disks migrate and before
//     the switchover, only where the source can (Storage.CanSwitch, or
//     CanRestart in the mirror phase only) and the mirrors do not already
//     start write-blocking. The presets never decide it.
//   - No panic on any Sample: NaN, infinite or negative rates count as 0,
//     absurd sizes saturate, and Elapsed going backwards is ignored (the
//     largest Elapsed seen is "now"). Decision.At is the sample's Elapsed.
//   - Unknown statuses are non-terminal: timeouts and the budget keep
//     running in them; auto judges convergence only in "active".
//
// # Policies
//
// Config.Policy picks one; docs/strategy.md has each in full, with every
// default (all are Config fields, so tests can shrink the times).
//
//   - auto (the default) predicts. From the peaks of RemainingBytes per
//     iteration and the dirty rate over the throughput it judges each new
//     iteration converging, too slow or stuck, and uses levers in order of
//     guest impact: a higher downtime limit, a computed CPU throttle (from
//     the guest's own dirty rate where QEMU's saturates), postcopy, pause;
//     it aborts when nothing permitted is left, after 30 s without
//     progress, or at the budget. Its downtime limits keep a headroom below
//     the user's maximum, learned per QEMU version (LearnHeadroom). With
//     disks it switches (or on 7.2 restarts) mirrors that do not get READY,
//     or whose backlog after READY would not fit the downtime, to
//     write-blocking.
//
// The presets reproduce their anchors (notes/policies.md):
//
//   - qemu: QEMU alone. Its downtime limit is the user's maximum (300 ms
//     when none), no lever, never aborts unless the user sets a Budget or a
//     ProgressTimeout.
//   - kubevirt: KubeVirt's legacy monitor. Abort after 150 s without
//     RemainingBytes going down; past a completion budget of 150 s per
//     decimal GB of RAM and storage, postcopy, else pause (and double the
//     budget), else abort.
//   - nova: Nova's downtime ramp (50 to 500 ms in 10 steps, step i after
//     i × 75 s per GB of data) and its completion timeout (800 s per GB:
//     abort, or with force_complete postcopy or pause).
//   - proxmox: qemu-server's loop. Downtime starts at 100 ms and doubles
//     when more than 5 polls (1 s apart) saw remaining grow or reach 0;
//     QEMU's own auto-converge ramp; no timeout.
//
// The presets have no storage lever; where the Limits are stricter than
// the anchor, the Limits win (a capped downtime, an abort in place of a lever
// the user did not permit, no throttle with NoThrottle).
//
// # Where things are
//
//   - strategy.go: the data: Action, Sample, Storage, Decision, Remedy,
//     Limits, Setup.
//   - config.go: Config, the presets' and auto's tunables, Validate.
//   - machine.go: Machine (New, Setup, Step, Applied, SetLimits) and the
//     guard that enforces the Limits whatever a policy decided.
//   - auto.go: auto in the RAM phase; mirror.go: auto in the mirror phase;
//     backlog.go: the disk backlog after READY; headroom.go: the learned
//     downtime headroom (LearnHeadroom, SetQEMU).
//   - presets.go: qemu, kubevirt, nova, proxmox, and the stall detector.
//
// A new policy is a type with the methods of the policy interface
// (machine.go; mirrorPolicy too for a storage lever) in a file of its own,
// with its name in Policies, Config.Validate and New.
package strategy
