// Package engine live-migrates a running QEMU guest from a source QEMU to a
// destination QEMU by speaking QMP to both. It is the only place in qmigrate
// that sequences I/O.
//
// # Lifecycle
//
// Migrate runs one migration to its end on the caller's goroutine, which owns
// all state; nothing keeps running after it returns. The phases are:
//
//   - prepare: connect both monitors (concurrently, each bounded by
//     ConnectTimeout, also the first answers) and start probing both
//     schemas (query-qmp-schema) in the background; check the destination
//     waits in run state "inmigrate" with no incoming migration started
//     (-incoming defer), the source runs (a paused source is accepted: the
//     destination is then left paused), both have the same RAM size
//     (query-memory-size-summary) and machine type (qom-get /machine type;
//     skipped when a QEMU does not answer it), the same -uuid when multifd
//     is on; check every needed capability exists (query-migrate-capabilities
//     lists those a QEMU has). These queries are in flight together, both
//     sides at once. Any failure so far wraps ErrBadInput: nothing has
//     changed on either QEMU. Then (storage only) the schemas are awaited,
//     the storage preflight runs (still bad input) and blockmirror.Start;
//     the capabilities and parameters are set on both sides and read back
//     (sets, then read-backs, in flight together); last the schemas are
//     awaited (a failure there rolls back what was set).
//   - start: wait for the mirrors to be READY (storage only: every poll is
//     a strategy sample of the mirror phase, Sample.Mirroring, and its
//     decisions are applied: MirrorWriteBlocking through
//     blockmirror's SetWriteBlocking where the source has block-job-change,
//     otherwise through RestartWriteBlocking (the mirrors cancelled and
//     started again write-blocking: a full re-copy; the strategy is told
//     Storage.CanRestart and decides it only here, before READY, and the
//     engine refuses it after), Abort by rolling back; the budget
//     counts from the start of Migrate, mirroring included), subscribe to
//     events, (fd: only) pass a socketpair's ends with getfd, migrate-incoming
//     on the destination (tcp port 0 is resolved from the destination's
//     query-migrate), migrate on the source. The "channels" argument is used
//     where the QEMU has it, "uri" elsewhere.
//   - converge: poll query-migrate (and, storage only, the mirrors'
//     progress: the disk backlog left since READY) every PollInterval, woken
//     early by MIGRATION and MIGRATION_PASS events; each sample goes to the
//     strategy, each decision is applied and its outcome fed back (a
//     MirrorWriteBlocking here too, through blockmirror's SetWriteBlocking,
//     when the backlog would not drain within the downtime at switchover).
//   - switchover: entered when the source stops (STOP, pre-switchover,
//     device or postcopy). In pre-switchover (storage) the mirrors are
//     finished, then migrate-continue.
//   - complete: the source says completed; the destination must report its
//     incoming migration completed; storage clean-up; cont on the
//     destination when the guest was running on the source and the
//     destination did not start by itself (-S, late-block-activate or a
//     PauseSource decision).
//   - rollback: on any failure before the switchover point of no return the
//     undo stack runs in reverse: migrate_cancel and a wait for the source to
//     settle, cont of a source left paused, blockmirror Abort, capabilities
//     and parameters restored. It runs with a fresh context (30 s) when the
//     caller's context has ended. Once postcopy started there is no rollback:
//     the engine never sends migrate_cancel in postcopy; a cancel of the
//     caller's context is then ignored and the migration finishes (the guest
//     already runs on the destination), and a failure is reported wrapping
//     ErrPostcopyFailed. Likewise the complete phase, entered once the source
//     completed, finishes (bounded by 60 s) whatever the caller's context.
//     When a cancel or abort loses the race with QEMU's completion (the
//     source reports completed after migrate_cancel), the rollback stops and
//     the engine finishes the migration instead: the Result is "completed"
//     and UndoErrors says the cancel came too late.
//
// # Destination after a failure
//
// Where the destination knows exit-on-error (9.1+) the engine sends it as
// true, QEMU's default, so on every version the destination QEMU exits when
// its incoming migration fails. A
// destination whose migration never connected stays in inmigrate with its
// listener; it cannot be reused for another incoming migration and is left to
// its owner, as are its capabilities. The engine removes a unix migration
// socket file once the destination no longer listens on it (it waits up to
// 2 s for the destination to exit after a rollback). It holds no listeners of
// its own; with "fd:" its socketpair copies are closed as soon as QEMU has
// them, and fds a QEMU did not consume are closed (closefd) on rollback.
//
// # Downtime
//
// Result.Downtime is the larger of QEMU's own "downtime" (source query-migrate
// after completion) and the wall time from the source's STOP event to the
// destination's RESUME (QEMU's event timestamps; the engine's cont when it had
// to resume the destination). With PauseSource it includes the whole
// stop-and-copy, which is what the guest saw.
//
// # Cost
//
// prepare makes about a dozen QMP round trips per side, in three waves of
// concurrent commands (checks, sets, read-backs), while both sides'
// query-qmp-schema (about 200 KB; 0.05-0.5 s on a busy TCG host) runs in
// the background. The schema reply is needed only for the arguments of
// migrate-incoming and migrate (and the storage preflight), so it bounds
// prepare only when it is slower than the rest. From the start phase on,
// the engine adds no measurable time to QEMU's own migration
// (BenchmarkEngineVsRaw in integration, which also gives the whole-call
// figures).
//
// # Contracts
//
// Result is non-nil once Config.Validate passed; the error is nil iff
// Result.Status is "completed". Errors are *Error values naming the phase,
// the side and the operation, wrapping QEMU's own text (*qmp.Error) or the
// cause. Observer events arrive in order on the engine goroutine; the result
// event is last. Clients passed in Endpoint.Client are never closed.
package engine
