// Package blockmirror migrates non-shared disks alongside a live migration:
// an NBD export per disk on the destination, a blockdev-mirror job per disk on
// the source, and the mirrors ended in the pre-switchover window so that the
// destination images match the RAM and device state exactly (the sequence
// libvirt uses; qemu-protocol.md 2.7).
//
// # Lifecycle
//
// The caller (the engine) owns both QMP connections and the migration
// itself. Config is what the user chose (disks, NBD address, copy mode,
// speed); Env is what the caller supplies (both QEMUs and their probed
// features, the migration channel's address, TLS credentials, logger).
//
//  1. Start, before migrate-incoming and migrate: preflight, exports on the
//     destination, one mirror per disk on the source.
//  2. WaitReady, until every mirror is READY; only then does RAM migration
//     start. A mirror that does not converge is switched to write-blocking
//     (SetWriteBlocking, QEMU 8.2+) or, before 8.2, restarted in that mode
//     (RestartWriteBlocking, a full re-copy, mirror phase only).
//  3. Finish, in the pre-switchover window (source capability
//     pause-before-switchover): every mirror completed, the destination
//     images now hold the source's content with the guest stopped.
//  4. The caller runs migrate-continue and waits for completion.
//  5. Cleanup removes the NBD nodes, exports and server; the caller then
//     runs cont on the destination.
//
// On any failure before switchover the caller runs Abort instead of 3-5: it
// removes everything Start made and leaves the guest running on the source
// disks. FindLeftovers and RemoveLeftovers do the same for what a process
// that died left behind (every node and id it creates starts with
// OwnPrefix).
//
// # Contracts
//
//   - Nothing changes on either QEMU before the preflight passed (errors
//     wrap ErrPreflight), and a failing Start undoes itself.
//   - Read-only and shared disks are never mirrored; the source disks are
//     never detached.
//   - Queries decide, events only wake: a job that vanishes without an
//     event is a failure.
//   - A Session's methods serialise and start no goroutine; contexts bound
//     every wait.
//   - Errors wrap sentinels (ErrPreflight, ErrMirrorFailed with a *JobError,
//     ErrNotReady, ErrUnsupported, ErrDestinationGone, ErrSourceGone,
//     ErrState) and keep QEMU's own *qmp.Error.
//
// # Where things are
//
//   - config.go: Config, Env, QEMU, the sentinels and JobError.
//   - select.go: the preflight: which disks, which destination node, sync
//     mode.
//   - addr.go: the NBD server's address (checked, or derived from the
//     migration channel's) and the export names.
//   - session.go: Session and its lifecycle (Start to Cleanup, Abort),
//     progress sampling and waits.
//   - leftovers.go: OwnPrefix, FindLeftovers, RemoveLeftovers.
package blockmirror
