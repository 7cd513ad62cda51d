// Package blockmirror migrates non-shared disks alongside a live migration:
// an NBD export per disk on the destination, a blockdev-mirror job per disk on
// the source, and the mirrors ended in the pre-switchover window so that the
// destination images match the RAM and device state exactly (the sequence
// libvirt uses; qemu-protocol.md 2.7).
//
// # Lifecycle
//
// The caller (the engine) owns both QMP connections and the migration itself.
// Start takes what the user chose (Config: the disks, the NBD address, copy
// mode, speed) apart from what the caller supplies (Env: both QEMUs with their
// probed features, the migration channel's address, the TLS credentials the
// caller created on both, the logger):
//
//  1. Start, before migrate-incoming / migrate. It runs the preflight
//     (errors wrap ErrPreflight and nothing has been changed), then on the
//     destination nbd-server-start and one writable block-export-add per disk
//     under an unguessable export name (128 bits from crypto/rand), then on
//     the source one NBD client node (blockdev-add driver=nbd) and one
//     blockdev-mirror per disk (sync=full, or top when the destination node
//     already has a backing chain of the same depth and base name). If a step
//     fails, Start undoes what it did before it returns.
//  2. WaitReady, until every mirror is READY (the initial copy is done and
//     guest writes are mirrored). Only then should RAM migration start.
//     Progress can be sampled at any time; SetWriteBlocking switches a mirror
//     that does not converge to write-blocking (QEMU 8.2+). Without
//     block-job-change (before 8.2) SetWriteBlocking returns ErrUnsupported
//     and RestartWriteBlocking is the way there: each mirror not yet
//     write-blocking is force-cancelled, waited for until its job is gone,
//     and started again on the same NBD client node and destination export
//     with the same sync mode, copy-mode write-blocking and a new job id
//     (Progress and WaitReady follow the new job; the cancellation of the old
//     one is no failure). The price is a full re-copy: the new job copies
//     the disk from the start (sync=full the whole disk) and is not READY
//     until it is done, so it is meant for the mirror phase, before READY.
//  3. Finish, in the pre-switchover window (source capability
//     pause-before-switchover): a soft block-job-cancel of every mirror, then
//     BLOCK_JOB_COMPLETED without error for each. The destination images now
//     hold exactly the source's content with the guest stopped.
//  4. The caller runs migrate-continue and waits for completion.
//  5. Cleanup: the source NBD nodes are deleted, then the destination exports
//     (waiting until they are gone) and its NBD server. The caller then runs
//     cont on the destination (capability late-block-activate keeps the
//     destination from activating its images earlier).
//
// On any failure before switchover the caller runs Abort instead of 3-5:
// mirrors are force-cancelled and waited for (a mirror stuck on a destination
// that no longer answers has its NBD connection yanked after a few seconds),
// NBD nodes deleted, exports and NBD server removed on the destination if its
// connection is alive, and nodes CreateTargets added deleted. The source disks
// are never detached, so the guest keeps running on them. Abort is idempotent
// and a Start afterwards begins from scratch.
//
// # Contracts
//
//   - Selection: Config.Disks by node name, device name or qdev; empty means
//     every writable disk with a medium that is not in Config.Shared.
//     Read-only and shared disks are never mirrored; naming one in Disks is a
//     preflight error.
//   - Destination: for each disk a writable node of the same virtual size,
//     found by the same qdev/device (its root node) or the same node name; with
//     CreateTargets a missing one is created with blockdev-create (raw or
//     qcow2) and added under the source's node name (the caller adds the
//     device). Source and destination may not use the same image file when the
//     NBD address shows both QEMUs are on one host (unix socket or loopback).
//   - NBD address: Config.NBDAddress, or derived from Env.Migration (the
//     migration channel's address, a qmp.Address): tcp uses the same host and
//     the next free port after the migration port (49152 when it is 0), unix
//     a socket beside the migration socket; an fd: migration has no address
//     to derive from and needs Config.NBDAddress.
//   - Events hint, queries decide: job state comes from BLOCK_JOB_* events and
//     query-block-jobs; a job that vanishes without an event is a failure.
//   - The Session's methods serialise on a mutex (a WaitReady or Finish in
//     progress holds it: cancel its context before calling Abort from another
//     goroutine); none starts a goroutine.
//     Contexts bound every wait; Start's own undo runs with a fresh 30 s bound
//     even when the caller's context has ended.
//   - Errors wrap sentinels (ErrPreflight, ErrMirrorFailed with a *JobError,
//     ErrNotReady, ErrUnsupported, ErrDestinationGone, ErrSourceGone,
//     ErrState) and keep QEMU's own *qmp.Error.
package blockmirror
