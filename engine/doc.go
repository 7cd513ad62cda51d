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
//     ConnectTimeout, also the first answers, and by what is left of the
//     Budget when that ends sooner); check the destination waits
//     in run state "inmigrate" with no incoming migration started
//     (-incoming defer), the source runs (a paused source is accepted: the
//     destination is then left paused), both have the same RAM size
//     (query-memory-size-summary) and machine type (qom-get /machine type;
//     skipped when a QEMU does not answer it), the same -uuid when multifd
//     is on; check every needed capability exists (query-migrate-capabilities
//     lists those a QEMU has; query-migrate-parameters tells which
//     parameters it has). These queries are in flight together, both sides
//     at once. Any failure so far wraps ErrBadInput: nothing has changed on
//     either QEMU. No schema is read for a migration without storage: what
//     the engine needs comes from those small queries, and the argument
//     forms of migrate-incoming and migrate from trying them (start).
//     With storage both schemas (query-qmp-schema) are probed in the same
//     wave, the storage preflight runs on them (still bad input). Then, with
//     Config.TLS, the credentials objects are added on both sides
//     (object-add tls-creds-x509 or tls-creds-psk, one id, the client end on
//     the source, the server end on the destination; QEMU reads the files
//     then, so credentials it cannot load are bad input, and the rollback
//     removes the other side's object); blockmirror.Start (its NBD server
//     and client nodes use the same credentials); then the capabilities and
//     parameters (tls-creds, tls-hostname and tls-authz among them) are set
//     on both sides and read back (sets, then read-backs, in flight
//     together).
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
//     query-migrate), migrate on the source. Each is sent in the newest form
//     first ("channels", and exit-on-error for migrate-incoming); where a
//     QEMU refuses one of its arguments with QAPI's exact error ("Parameter
//     'uri' is missing" from a QEMU without "channels", "Parameter
//     'exit-on-error' is unexpected"), the command did not run and is
//     retried in the older form ("uri", no exit-on-error); any other error
//     is the command's own failure. Source and destination are tried
//     separately (they may be different versions). With storage the
//     schemas give the forms at once.
//   - converge: poll query-migrate (and, storage only, the mirrors'
//     progress: the disk backlog left since READY) every PollInterval, woken
//     early by MIGRATION and MIGRATION_PASS events; each sample goes to the
//     strategy, each decision is applied and its outcome fed back (a
//     MirrorWriteBlocking here too, through blockmirror's SetWriteBlocking,
//     when the backlog would not drain within the downtime at switchover).
//     When the strategy's Setup asks for it (auto does), the guest's own
//     dirty rate is measured once as the converge phase begins, with
//     calc-dirty-rate in page-sampling mode on the source (200 ms; 1 s
//     where QEMU refuses calc-time-unit, before 8.2), read back with
//     query-dirty-rate on the following polls and passed in every later
//     sample (Sample.GuestDirtyRate, Stats.GuestDirtyRate). A QEMU that
//     lacks or refuses it only means no measurement.
//   - switchover: entered when the source stops (STOP, pre-switchover,
//     device or postcopy), at the latest when it reports completed (a poll
//     that waited out the stop-and-copy). In pre-switchover (storage) the mirrors are
//     finished, then migrate-continue.
//   - complete: the source says completed; the destination must report its
//     incoming migration completed; storage clean-up; cont on the
//     destination when the guest was running on the source and the
//     destination did not start by itself (-S, late-block-activate or a
//     PauseSource decision); the TLS parameters put back and the
//     credentials objects deleted on both sides (a failure there is noted
//     in UndoErrors: the migration still completed).
//   - rollback: on any failure before the switchover point of no return the
//     undo stack runs in reverse: stop on the destination (on a destination
//     still in inmigrate it only turns off its autostart, so one that
//     completes its incoming migration after all stays paused),
//     migrate_cancel and a wait for the source to settle, a look at both
//     sides (below), cont of a source left paused or in postmigrate,
//     blockmirror Abort, capabilities and parameters restored, TLS
//     credentials objects deleted. It always runs
//     with a context of its own, 30 s in all (the caller's may have ended,
//     and a cancel arriving meanwhile must not cut it short), each step
//     bounded by 15 s and each command by 5 s (see "A QEMU that stops
//     answering"). Once postcopy started there is no rollback:
//     the engine never sends migrate_cancel in postcopy; a cancel of the
//     caller's context is then ignored and the migration finishes (the guest
//     already runs on the destination), and a failure is reported wrapping
//     ErrPostcopyFailed. A lost link in postcopy is recovered
//     (recover.go: migrate-pause, migrate-recover, migrate resume, retried
//     within Config.RecoveryTimeout, each step an EventRecovery); a QEMU
//     gone in postcopy ends with ErrGuestLost or ErrPagesLost
//     (Result.Lost), both QEMUs left as they are; docs/faults.md has the
//     whole fault matrix. Likewise the complete phase, entered once the source
//     completed, finishes (bounded by 60 s) whatever the caller's context.
//     When a cancel or abort loses the race with QEMU's completion (the
//     source reports completed after migrate_cancel), the rollback stops and
//     the engine finishes the migration instead: the Result is "completed"
//     and UndoErrors says the cancel came too late. A migrate_cancel sent
//     during the stop-and-copy is carried out by QEMU only once the device
//     state is written, so the destination may complete its incoming
//     migration while the source reports cancelled: where the source then
//     stopped for good (not running, though the guest ran before), the
//     guest's latest state is on the destination and the migration is
//     finished the same way ("completed"); where the source runs again, the
//     guest stays there and the completed destination is kept paused (or
//     stopped, should it have started by itself), noted in UndoErrors.
//     Likewise when the destination fails after the source completed (it
//     went away, failed loading the end of the stream, or cannot be
//     resumed) and the guest never ran there: the destination is stopped
//     and the source resumed (Result "failed"). Whatever the ending, the
//     guest runs exactly where the Result says: on the destination when
//     "completed", on the source otherwise (unless it was paused before).
//
// # A QEMU that stops answering
//
// Every QMP command after prepare's first answers (which ConnectTimeout
// bounds) has a deadline, so a QEMU whose monitor answers nothing (its
// process stopped with SIGSTOP, its main loop stuck) cannot hold Migrate:
//
//   - Before the switchover, with Strategy.Limits.Budget, a command is
//     given what is left of the budget plus PollInterval (the grace of the
//     budget's safety net; PollInterval when the budget is already spent):
//     one left unanswered ends the migration with ErrAborted, like the
//     safety net, the *Error naming the side and the command ("the source
//     QEMU's monitor did not answer query-migrate within the budget"). This
//     covers the start phase (getfd, migrate-incoming, migrate, the mirror
//     polls of waitMirrors), the converge loop (query-migrate, the mirrors'
//     progress, calc-dirty-rate and query-dirty-rate, every decision
//     applied) and the capabilities and parameters set in prepare. A command
//     waiting while the source reports STOP (the stop-and-copy began) stops
//     being bounded by the budget.
//   - Always, a command is given Config.UnresponsiveTimeout (30 s): one left
//     unanswered ends the migration with ErrUnresponsive, the *Error naming
//     the side and the command.
//   - From the switchover on (the source stopped for the stop-and-copy:
//     STOP, status device or pre-switchover; paused by a PauseSource
//     decision; postcopy asked for; the source completed) the engine
//     finishes rather than aborts: the budget no longer applies, neither
//     to commands nor to the safety net, and the strategy is no longer
//     consulted. QEMU's migration thread holds the big lock while it
//     writes the device state, so its monitor may take seconds to answer
//     then; only UnresponsiveTimeout bounds it. When it fires nothing is
//     rolled back (never a migrate_cancel into a stop-and-copy or postcopy
//     the engine cannot see): the error says the migration's state is
//     unknown, Result.StateUnknown is set, and Status is "failed" (never
//     "completed"). migrate-start-postcopy and the pause's stop count as
//     sent once written: left unanswered they may still be carried out.
//   - In the rollback each command is given 5 s (2 s on a side that already
//     let one go unanswered). A side that leaves a rollback command
//     unanswered is sent nothing more: its remaining steps are listed in
//     UndoErrors ("not attempted", "not sent"), never skipped silently.
//     When that side is the source, its migration cannot be cancelled with
//     migrate_cancel: the destination is held (stop) and the migration
//     stream is cut on the destination's side with yank of its migration
//     instance, so the destination's incoming migration fails and it exits
//     (as after a cancel), and the source's migration fails as soon as the
//     source runs again (QEMU keeps, or resumes, the guest there): Result
//     "failed", the guest on the source. The source's capabilities and
//     parameters are then left as the migration set them (UndoErrors says
//     so). A destination that already completed its incoming migration
//     means the source completed: the migration is finished instead.
//
// A command that timed out was written to the socket: its QEMU may still
// carry it out when it answers again; its late answer is dropped.
//
// # Destination after a failure
//
// Where the destination takes exit-on-error (9.1+) the engine sends it as
// true, QEMU's default, so on every version the destination QEMU exits when
// its incoming migration fails. A
// destination whose migration never connected stays in inmigrate with its
// listener (its autostart turned off by the rollback's stop); it cannot be
// reused for another incoming migration and is left to its owner, as are its
// capabilities. The engine removes a unix migration
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
// concurrent commands (checks, sets, read-backs), all small replies. It does
// not read query-qmp-schema without storage: that reply is about 230 KB, and
// a busy TCG QEMU spends 50-120 ms of its main loop producing it, answering
// nothing else meanwhile, so even a schema request left running in the
// background would hold up migrate-incoming. Trying the newest argument form
// costs nothing on a QEMU that takes it, and one small refused command per
// missing argument on an older one (7.2: two for migrate-incoming, one for
// migrate). A storage migration reads both schemas in its first wave (its
// preflight needs them; mirroring takes far longer). The engine's time
// against a minimal raw-QMP driver on the same migration, whole call and
// from the start phase on, is measured by BenchmarkEngineVsRaw in
// integration.
//
// # Contracts
//
// Result is never nil (an invalid config gives Status "failed" and an
// error wrapping ErrInvalidConfig); the error is nil iff Result.Status is
// "completed". Errors of a migration that started are *Error values naming
// the phase, the side and the operation, wrapping QEMU's own text
// (*qmp.Error) or the cause. Observer events arrive in order on the engine
// goroutine; the result event is last. Clients passed in Endpoint.Client are
// never closed. No QMP command of the engine's own waits unbounded
// (storage excepts blockmirror's Start and Finish, which the engine does
// not bound as a whole: creating targets and draining mirrors take their
// time): with a Budget, Migrate returns within the budget plus PollInterval plus the rollback (a few
// seconds when a QEMU stopped answering) unless the switchover began, and
// a QEMU that answers nothing ends the migration after UnresponsiveTimeout
// (ErrUnresponsive). The guest runs where Result.Status says ("completed":
// on the destination; otherwise on the source, unless it was paused
// before) except when Result.StateUnknown is set or the error wraps
// ErrPostcopyFailed.
package engine
