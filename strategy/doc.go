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
//	setup := m.Setup()                    // apply BEFORE migrate starts
//	for !m.Done() {
//	    d := m.Step(sample)               // every poll (~200 ms) and on MIGRATION_PASS
//	    if d.Action != strategy.Wait {
//	        m.Applied(d, apply(d))        // report the outcome before the next Step
//	    }
//	}
//
// A Machine serves one migration and is not safe for concurrent use: the
// engine's owner goroutine calls Step and Applied in turn.
//
// The engine MUST apply Setup before starting the migration:
// migrate-set-parameters downtime-limit (when non-zero) and the throttle
// parameters (when non-nil); the auto-converge capability when AutoConverge;
// postcopy-ram (on both sides) when Postcopy. Setup already obeys the Limits.
//
// The engine MUST apply every non-wait Decision and report it with Applied:
//
//   - SetDowntime: migrate-set-parameters downtime-limit = DowntimeLimit.
//   - SetThrottle: migrate-set-parameters cpu-throttle-initial, -increment,
//     max-cpu-throttle, cpu-throttle-tailslow, and throttle-trigger-threshold
//     when non-zero. The values are always within QEMU's ranges (initial and
//     increment 1..99, initial ≤ max ≤ 99). QEMU applies a throttle only at
//     its next auto-converge trigger; the Machine watches
//     Sample.ThrottlePercent for it.
//   - StartPostcopy: migrate-start-postcopy.
//   - PauseSource: stop on the source (the migration then finishes as
//     stop-and-copy); later samples carry SourcePaused.
//   - Abort: migrate_cancel and roll back; the guest keeps running on the
//     source. Done is true from then on.
//   - MirrorWriteBlocking: switch every disk mirror to write-blocking copy
//     mode (block-job-change), or, without it and only in the mirror phase,
//     restart them in that mode (Storage.CanRestart: a full re-copy).
//
// # Storage and the mirror phase
//
// With a storage migration the engine calls SetStorage before Setup (disks
// mirrored; CanSwitch when the source QEMU has block-job-change, 8.2+;
// CanRestart when, without it, the engine can restart the mirrors in
// write-blocking mode; WriteBlocking when the user starts the mirrors in
// write-blocking mode).
// While it waits for the mirrors to be READY, before RAM migration starts, it
// Steps samples with Mirroring set, Status "", the RAM fields zero and
// StorageRemaining/StorageTotal filled; after that, the usual query-migrate
// samples (which still carry the storage fields). Elapsed counts from the
// start of the whole migration (the engine's Migrate call), so the Budget
// includes the time spent mirroring. In the mirror phase a Decision is only
// Wait, MirrorWriteBlocking or Abort, and the budget's finishing decision is
// always Abort (there is no RAM migration to finish).
//
// Applied(d, err) with err != nil marks that lever failed: it is not tried
// again, and the policy moves on (a failed postcopy or pause re-arms the
// budget). The Machine otherwise assumes a decision took effect when it was
// returned.
//
// # Contracts (fuzzed)
//
//   - A DowntimeLimit is never above Limits.MaxDowntime (300 ms when zero),
//     in Setup or in a Decision.
//   - StartPostcopy only with Limits.AllowPostcopy, PauseSource only with
//     Limits.AllowPause, SetThrottle and Setup.AutoConverge never with
//     Limits.NoThrottle.
//   - A terminal status (completed, failed, cancelled) or an Abort decision
//     makes Done true; Step then only returns Wait.
//   - In a postcopy status (postcopy-active, -paused, -recover, ...) Step only
//     returns Wait: cancelling postcopy would lose the guest, so the Machine
//     never aborts it, whatever the budget. The same holds from the moment a
//     StartPostcopy decision is returned (unless Applied reports it failed):
//     QEMU may switch at any moment after migrate-start-postcopy.
//   - With Limits.Budget > 0, the first sample whose Elapsed reaches the
//     budget gets a finishing decision (Abort, or StartPostcopy or
//     PauseSource when the policy prefers and the user permits them) unless
//     a postcopy or pause is already under way.
//   - MirrorWriteBlocking at most once (even when Applied reports it
//     failed), only while storage is migrating and not yet switched over (a
//     Mirroring sample, or a sample with Status "active" and no postcopy or
//     pause under way), only when SetStorage declared disks that CanSwitch
//     (or CanRestart, and then only in a Mirroring sample: a restart is
//     never decided after READY, once RAM migration runs) and do not
//     already start WriteBlocking, and never with Limits.NoWriteBlocking.
//     The presets never decide it.
//   - No panic on any Sample: NaN, infinite or negative rates count as 0,
//     absurd sizes saturate, and Elapsed going backwards is ignored (the
//     largest Elapsed seen is "now"). Decision.At is the sample's Elapsed.
//   - Unknown statuses are non-terminal: timeouts and the budget keep
//     running in setup, pre-switchover, device and the like; auto judges
//     convergence only in "active".
//
// # Policies
//
// auto (the default) predicts. It reads the saw-tooth of RemainingBytes per
// iteration (dirty-sync-count): the peak of each iteration is the dirty set
// QEMU found at that bitmap sync, so single samples on the falling edge never
// fool it. With q = dirty rate / throughput (EWMA) and r = per-iteration ratio
// of the peaks, it judges at every new iteration, from the second on:
//
//   - converging: the next peak fits throughput × downtime limit, or the
//     passes shrink geometrically (by q, or r when the rate is unknown) to
//     the threshold soon enough (below) and within the budget: do nothing.
//   - too slow: converging, but the prediction exceeds AutoConfig.SlowPasses
//     (3) full RAM passes (TotalBytes / throughput; only once the dirty rate
//     is measured, the ratio of a few peaks being too noisy) or
//     MaxConvergeTime (60 s), or exceeds one full RAM pass with q at least
//     SlowRatio (0.8), where the passes shrink so little that a prediction
//     ∝ 1/(1-q) hangs on the dirty rate's noise: use a lever, but never
//     abort for that alone. A
//     guest dirtying at 0.95 × the link converges, but over dozens of passes.
//     The first converging prediction after a lever is checked too: still
//     running two iterations and twice the predicted time (at least
//     SettleTime) later, the migration is too slow (the rates fooled the
//     prediction, typically on a plateau, below).
//   - stuck: q ≥ FlatRatio (0.97), or flat peaks (r ≥ 0.97), or the
//     prediction exceeds the budget.
//
// auto's downtime limits are at most the user's maximum less a headroom
// (and at least half the maximum): QEMU's measured downtime exceeds its
// downtime-limit by what its estimate leaves out (tens of milliseconds,
// whatever the limit). The headroom is learned per QEMU version
// (Machine.SetQEMU, which the engine calls before Setup) from the
// benchmark's completions (LearnHeadroom: 69 ms on 7.2, 62 ms on 10.0), or
// set by AutoConfig.Headroom; the reasons say how much and why.
//
// Every Decision has a Summary in words (what, and why in one clause) apart
// from the Reason's arithmetic; an Abort carries a Remedy: what would have
// finished the migration, from auto's model (see Remedy).
//
// auto starts with a 100 ms downtime limit (AutoConfig.InitialDowntime, at
// most the user's maximum). When not converging, levers go in order of guest
// impact: (1) raise the downtime limit to the typical peak (median of
// the last three) / throughput × 1.25, if that fits the user's maximum; (2) a CPU throttle, preceded by the
// downtime limit raised to the maximum (the throttled passes then need to
// shrink less), with p = 1 - k × throughput / true dirty
// rate, k = TargetRatio (0.5), where the true rate is the measured one over
// the run fraction the current throttle leaves (at least the guest's own
// rate when it was measured, below: QEMU's counts a page once per sync
// period, a whole pass long), and, when the measurement is
// saturated (flat peaks, or q within [0.97, 1.5): the working set is
// re-dirtied every pass so QEMU's rate is only a lower bound), the guest's
// own rate measured apart from the migration (Sample.GuestDirtyRate, asked
// for by Setup.MeasureDirtyRate: the engine's calc-dirty-rate at the start)
// when there is one, else a guess of SaturationFactor (2) × the
// throughput, and at least that lower bound. The measurement counts distinct
// pages, so one that covered 85% or more of the typical peak (the working
// set) within its period (Sample.GuestDirtyPeriod: 1 s on QEMU 7.2) is a
// lower bound too, taken as SaturationFactor × the measured rate. When that
// true rate is at least the throughput (q ≥ 1), p is at least what makes the
// next pass, which sends the typical peak, leave no more than a switchover
// at the maximum downtime sends (with Margin): run fraction x / q, x =
// throughput × maximum downtime / (typical peak × Margin). For such a guest
// one heavy pass is both the fastest and the cheapest throttle: n passes
// shrinking by r (r^n = x) cost the guest (1 - r/q)(1 - x)/(1 - r) passes'
// worth of run time, which grows with r when q ≥ 1 (below the link, lighter
// and more passes lose less, and the k rule applies; docs/benchmarks.md
// has the measurements). An escalation at least halves the guest's
// remaining run time. On a plateau (the typical peak within
// SaturationFactor × throughput × the maximum downtime while the measured
// rate is below the throughput, or a failed prediction) the measured rate is
// taken as it is, and p is at least 1 - run × throughput × maximum downtime /
// (typical peak × Margin): QEMU syncs as soon as a pass falls to its
// threshold, so each peak is that threshold plus what the guest dirtied
// meanwhile, and cutting the guest's run time in that ratio brings it under.
// (3) postcopy, directly instead of a throttle above PostcopyThrottle (25%)
// when permitted: it finishes in about one pass of the working set; (4)
// pause. After a lever shows in the samples it gets SettleIterations (2)
// iterations before auto escalates, one when the first iteration under a
// throttle still measures the dirty rate at the throughput. Pause and abort are only taken on a confirmed verdict (three
// iteration peaks, or a measured dirty rate at the throughput). When no
// permitted lever is left and the migration is stuck, auto aborts then,
// rather than waiting for the budget. It also aborts
// after ProgressTimeout (30 s) with neither transferred bytes growing nor
// remaining bytes reaching a new low (a dead link). At the budget it starts
// postcopy, else pauses, else aborts.
//
// In the mirror phase auto fits a least-squares line to StorageRemaining over
// the last AutoConfig.MirrorWindow (3 s). Remaining not shrinking (by less
// than 64 KiB/s), or READY
// predicted beyond the budget, is stuck; READY beyond MaxConvergeTime is too
// slow. Either way auto switches the mirrors to write-blocking when it can
// (once, with the numbers in the reason) and measures afresh. On a source
// without block-job-change (QEMU 7.2) with Storage.CanRestart the same
// decision restarts the mirrors in write-blocking mode: they copy the disks
// again from the start (the price), and the trend and the progress timeout
// begin afresh; the budget still bounds the whole. When it cannot
// (write-blocking from the start already, refused by NoWriteBlocking, no
// switch nor restart possible, or it failed) a stuck mirror that stays stuck
// for another window is aborted, since it would never get READY; a slow one
// is left to converge. A restart is a mirror-phase lever only: after READY
// (the RAM phase) the backlog rule below needs the live switch.
//
// After READY, in the RAM phase, every guest write dirties the mirrors again
// and what they have not copied (StorageRemaining, the backlog) is copied at
// switchover with the guest stopped, on top of the RAM downtime. auto fits a
// line to the backlog over the last MirrorWindow (from the first RAM sample,
// and afresh after a switch) and takes as the mirrors' rate the largest
// least-squares slope of the bytes they copied (StorageTotal −
// StorageRemaining) over any window, mirror phase included. The backlog
// fits when draining it at that rate takes no longer than the user's
// maximum downtime minus the downtime limit in force (at least a quarter of
// the maximum); a backlog under 1 MiB always fits. Growing by 64 KiB/s or
// more, it is judged as it will be at the RAM switchover: after the
// predicted RAM convergence time (at least one window, at most
// MaxConvergeTime). When it does not fit, auto switches the mirrors to
// write-blocking on an "active" sample, once, when it can (with the numbers
// in the reason). Either way a RAM migration whose next switchover fits, or
// that converges, is not reported as such while the backlog does not fit:
// the wait reason names the backlog and, without a switch left, says the
// switchover will drain it (auto never aborts or escalates a RAM lever for
// the disks alone).
//
// auto's Setup holds QEMU's own auto-converge ramp back: the capability is
// on (unless NoThrottle) with cpu-throttle-initial = increment = max = 1%, so
// QEMU throttles by at most 1% until auto sets a computed throttle
// (initial = max = p, increment = p - current).
//
// The presets reproduce the anchors (notes/policies.md), with every time
// taken from their Config fields so tests can shrink them:
//
//   - qemu: QEMU alone. No lever, never aborts unless the user sets a Budget
//     or a ProgressTimeout.
//   - kubevirt: KubeVirt's legacy monitor. Progress: RemainingBytes lower than
//     the previous sample; abort when none for 150 s. Completion budget:
//     150 s × (RAM + storage) in decimal GB rounded up; past it, with postcopy
//     allowed, postcopy; else with pause allowed, pause and double the
//     budget; else abort. Downtime left at QEMU's 300 ms; auto-converge
//     (QEMU's ramp) only with KubeVirtConfig.AllowAutoConverge.
//   - nova: Nova's downtime ramp, steps+1 values int(base + offset×i) ms
//     (50 → 500 ms in 10 steps), step i once elapsed exceeds i × 75 s ×
//     data GB, data GB = max(RAM GiB, 2) + max(storage GiB, 2) when storage
//     is migrated; the completion timeout 800 s × data GB then aborts, or with
//     force_complete starts postcopy (if allowed) or pauses (if allowed).
//     Nova truncates these times to whole seconds; below one second (shrunk
//     test configurations) they are kept to the millisecond. Auto-converge
//     (QEMU's ramp) only with NovaConfig.PermitAutoConverge and no postcopy.
//   - proxmox: qemu-server's loop. Downtime starts at 100 ms; a cumulative
//     counter grows on every poll where remaining grew or is 0; when it
//     exceeds 5, the downtime doubles and the counter resets. Polls are
//     Proxmox's 1 s period (faster samples are not counted). Auto-converge is
//     on with QEMU's default ramp (20% + 10%). No timeout.
//
// The presets have no storage lever, like their anchors: they wait in the
// mirror phase and never decide MirrorWriteBlocking; the Machine still aborts
// there when a user Budget runs out, or after a user ProgressTimeout without
// the disk bytes left reaching a new low. (Their own completion timeouts count
// from their first RAM sample's Elapsed, which includes the mirror phase.)
//
// Where the Limits are stricter than the anchor, the Limits win, and the
// presets then differ from the real thing: a downtime value above
// MaxDowntime is capped (Nova's ramp stops at 300 ms by default, Proxmox's
// doubling too), a lever the user did not permit is replaced by an abort
// (Nova's force_complete pause, KubeVirt's workload disruption), throttling
// is off with NoThrottle (Proxmox's auto-converge), and a user Budget or
// ProgressTimeout aborts every preset.
package strategy
