// Package qmp is qmigrate's own client for the QEMU Machine Protocol (QMP):
// one connection to one QEMU monitor, its commands as typed Go calls, its
// events as subscriptions.
//
// # Lifecycle
//
// Dial, DialAddress (with an Address) or NewClient (over a net.Conn you
// already have) runs the handshake and returns a ready Client. It lives until
// Close or until the connection dies; then Done is closed, Err says why, and
// every waiting call fails wrapping ErrClosed. Dial again for a new one.
// Closed gives a Client for a QEMU that cannot be reached.
//
// # Contracts
//
//   - Concurrency: a Client is safe for concurrent use; commands may be in
//     flight together and replies come in any order. A context bounds only
//     its call's wait (see Client.Execute).
//   - Events: Subscribe before sending the command that causes the event and
//     none is missed; fan-out never blocks the reader (a full subscription
//     drops and counts). Events are wake-ups, queries are the truth.
//   - Wire types never fail on what a newer QEMU adds: unknown statuses,
//     capabilities and fields decode as they are or are ignored. Sizes are
//     bytes, rates bytes per second. The times QEMU reports in MigrationInfo
//     are time.Duration; MigrationParameters keep QEMU's units
//     (DowntimeLimit is milliseconds: DowntimeLimitDuration, MillisOf).
//   - Errors are typed, never matched by text: *Error is QEMU's error reply
//     (class, description verbatim, command; errors.Is against a partial
//     *Error, IsCommandNotFound, IsUnexpectedArgument, IsMissingArgument),
//     *CommandError a failure that is not a reply, *ProtocolError garbage on
//     the wire, ErrClosed a connection gone.
//   - Features are probed, never inferred from version numbers: ask exactly
//     (QueryMigrateCapabilities, QueryMigrateParameters, or a command tried
//     in its newest form and retried on IsUnexpectedArgument), or read the
//     schema once (ProbeFeatures, costly for QEMU).
//   - The package keeps no package-level mutable state. WithLogger gets the
//     wire transcript at debug level, secrets redacted.
//
// # Where things are
//
//   - client.go: Dial, NewClient, Client, Execute, ExecuteOOB,
//     ExecuteWithFile, options, the reader goroutine.
//   - address.go: Address (unix path or tcp host and port), ParseAddress,
//     SameSocket.
//   - errors.go: Error, CommandError, ProtocolError, the sentinels.
//   - events.go: Event, EventFilter, ForDevice, Subscription.
//   - migration.go: query-migrate, migrate, migrate-incoming, capabilities,
//     parameters, postcopy, dirty-rate measurement.
//   - block.go: block devices and nodes, blockdev-mirror and block jobs, NBD
//     server and block exports.
//   - commands.go: run state, version, uuid, schema, file descriptors
//     (Getfd, AddFd), objects, human-monitor-command.
//   - features.go: Features, ProbeFeatures, FeaturesFromSchema.
//   - qom.go: qom-list and qom-get.
//   - log.go: the wire transcript and its redaction.
//
// A new QMP command goes, as a typed method named after it, in the file of
// its family. Package qmp/qmptest is a fake QEMU that drives the real
// client over net.Pipe, for tests.
package qmp
