// Package engine live-migrates a running QEMU guest from a source QEMU to a
// destination QEMU by speaking QMP to both. It is the only place in qmigrate
// that sequences I/O; what to do at each moment is the strategy's, how the
// stream and the disks travel are transport's and blockmirror's.
//
// # Use
//
// Migrate(ctx, cfg) runs a migration to its end. Start(ctx, cfg) returns a
// Job once the migration runs, to watch (Progress, Subscribe), steer
// (SetBandwidth, SetMaxDowntime, SetBudget, StartPostcopy, ForceComplete,
// Abort) and wait for (Wait, Done). Adopt(ctx, cfg) takes over a migration
// another process left between the same two QEMUs (after a crash or an
// upgrade of the manager). Config is a plain struct with documented zero
// values; Validate refuses what cannot work before any QEMU is touched.
//
// # Stages
//
// One goroutine per job owns the migration's state. Where the migration
// stands is one value, its stage (stage.go holds the diagram, the
// transition table and what each stage permits); the Phase events are the
// coarse view of it:
//
//	prepare    connect, check both sides (run states, then package preflight: machine, RAM, CPU, devices,
//	           disks, blockers; every failure at once), write the journal, TLS objects, disk mirrors,
//	           capabilities and parameters
//	start      mirrors READY, migrate-incoming, migrate
//	converge   poll query-migrate; the strategy decides (downtime, throttle, postcopy, pause, abort)
//	switchover the stop-and-copy, pre-switchover (mirrors finished), or postcopy
//	complete   the destination finished: cont, clean-up
//	rollback   the undo stack, in reverse: the guest stays on (or goes back to) the source
//
// # Guarantees
//
//   - Before the switchover, a failure or a cancel rolls back: the guest
//     runs on the source, and what the migration changed on either QEMU is
//     set back or removed (Result.Undone, Result.Rollback). From the
//     switchover on the engine finishes rather than aborts; once postcopy
//     began there is no way back and a cancel is ignored. A link lost in
//     postcopy is recovered (recover.go: migrate-pause, migrate-recover,
//     migrate with resume, retried within Config.RecoveryTimeout, each step
//     an EventRecovery; a destination whose in-band monitor is blocked,
//     its main thread waiting for a page, is followed by its MIGRATION
//     events and recovered out of band); a QEMU gone in postcopy ends with ErrGuestLost or
//     ErrPagesLost (Result.Lost), both QEMUs left as they are.
//     docs/faults.md has the whole fault matrix.
//   - The guest runs exactly where the Result says: on the destination when
//     "completed", on the source otherwise, except when Result.StateUnknown
//     is set or the error wraps ErrPostcopyFailed.
//   - No command waits unbounded: the budget bounds commands before the
//     switchover, UnresponsiveTimeout always, the rollback has bounds of
//     its own (bounds.go says how).
//   - Errors are *Error values naming the phase, the side, the operation and
//     (for refusals of prepare) the Check; QEMU's own text is carried
//     through. The sentinels (ErrBadInput, ErrCancelled, ErrAborted,
//     ErrMigrationFailed, ErrDestinationGone, ErrUnresponsive, ...) are
//     matched with errors.Is.
//   - Observer events arrive in order on the job's goroutine, the result
//     event last; subscribers (Job.Subscribe) get the same, never blocking
//     the job. Clients passed in Endpoint.Client are never closed.
//
// # When nobody comes back
//
// A manager may die mid-migration. QEMU carries on alone:
//
//   - pre-copy: the migration goes on at the bandwidth and downtime limit in
//     force and completes by itself once it converges (the destination then
//     waits paused where it was started with -S: nobody resumes it); one
//     that does not converge goes on forever, the guest running on the
//     source. Not safe: with auto-converge the guest stays throttled at the
//     last throttle decided, and QEMU may raise it at each pass up to
//     max-cpu-throttle (up to 99 %): the guest crawls until someone comes;
//   - pre-switchover (disk mirrors): the guest stays paused on the source
//     until migrate-continue. Not safe: the guest is down;
//   - postcopy: finishes by itself unless the link breaks (both sides then
//     wait in postcopy-paused, the guest stalled on the destination);
//   - completed: safe (the guest runs on the destination, or waits there
//     paused after -S).
//
// Adopt (`qmigrate adopt`) ends each of these: it finishes the migration or
// rolls it back, and sets back what the first process changed from the
// journal it left on each QEMU (journal.go): capabilities (auto-converge off
// again, so no throttle), parameters (throttle, bandwidth, downtime limit,
// TLS), TLS objects, NBD exports and mirror jobs. A manager that keeps jobs
// across its own restarts runs Adopt for each pair it was migrating when it
// starts.
//
// # Where things are
//
//	job.go        Start, Migrate, Job: the handle, its requests and subscriptions
//	stage.go      the stages, their transitions and permissions
//	prepare.go    connect, inspect, check, configure (capabilities and parameters)
//	journal.go    what prepare found, kept on each QEMU for Adopt
//	tls.go        TLS credentials objects and parameters
//	start.go      mirrors, fd passing, migrate-incoming, migrate
//	converge.go   the polling loop, events, samples
//	decide.go     a decision applied to QEMU, and the job's levers
//	switchover.go pre-switchover: mirrors finished, migrate-continue
//	complete.go   the end on the destination, the downtime measured
//	rollback.go   the undo steps of a started migration, a late cancel, the rescue
//	recover.go    postcopy that survives link loss: detection, pause, recovery
//	adopt.go      Adopt: reading both QEMUs, rebuilding the undo stack
//	bounds.go     how long each command may wait
//	dirtyrate.go  the guest's own dirty rate (calc-dirty-rate)
package engine
