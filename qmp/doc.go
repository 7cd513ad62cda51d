// Package qmp is qmigrate's own client for the QEMU Machine Protocol (QMP).
//
// # Lifecycle
//
// Dial (or DialAddress with an Address, or NewClient over a net.Conn you already have) reads
// QEMU's greeting, checks it, keeps the version and negotiates capabilities,
// enabling out-of-band execution ("oob") when QEMU offers it. The context
// bounds the whole handshake: a QEMU that never greets fails the call when the
// context ends, and the connection is closed. A returned Client is ready;
// it lives until Close, or until the connection dies, whichever comes first.
// Done is closed at that moment and Err says why. A Client is not reused
// after that: dial again.
//
// # Contracts
//
// One reader goroutine per connection reads lines of any length (the
// query-qmp-schema reply is about 200 KB; replies of many megabytes work)
// and routes each message: replies to their caller, events to subscriptions.
//
// Commands: Execute sends a command with a fresh "id" and waits for the
// reply carrying that id. It is safe for concurrent use; any number of
// commands may be in flight at once and replies may come in any order. The
// context covers only the wait: when it ends, Execute returns the context's
// error, and the reply that comes later is dropped by id. The connection
// stays usable. (A write that cannot finish before the context ends closes
// the connection, since a half-written command would corrupt the stream.)
// ExecuteOOB sends "exec-oob" for the commands QEMU allows out of band
// (migrate-pause, migrate-recover); the typed helpers use it when oob was
// negotiated.
//
// Typed helpers carry the QMP command's name (QueryMigrate, BlockdevMirror,
// MigrateSetCapabilities, ...). Their wire types never fail on values a newer
// QEMU adds: unknown statuses, capabilities and fields decode as they are or
// are ignored. Sizes are bytes and rates bytes per second. The times QEMU
// reports (MigrationInfo's total, expected and actual downtime, ...) are
// time.Duration, converted from its milliseconds; MigrationParameters, read
// and sent back as they are, keep QEMU's units: DowntimeLimit is
// milliseconds (DowntimeLimitDuration and MillisOf convert).
//
// Addresses: an Address is a unix socket path or a tcp host and port, parsed
// once from "unix:/path" or "tcp:host:port" by ParseAddress and passed on as
// a value (a QMP monitor for DialAddress, a migration channel in transport,
// an NBD server in blockmirror). SameSocket says whether two addresses name
// the same socket (a monitor serves one client at a time).
//
// Events: Subscribe (or SubscribeNames) registers a filter by event name and
// optionally by a predicate such as ForDevice (block jobs, job status,
// exports). Subscribe before sending the command that causes the event, and no
// event is missed: the reader delivers events and replies in wire order. Fan-out
// never blocks the reader: each subscription has a bounded buffer, and an event
// that does not fit is dropped and counted (Subscription.Dropped). Poll
// QueryMigrate or QueryBlockJobs for the truth; events are wake-ups. Every
// subscription's channel is closed when the connection ends.
//
// Errors: an error reply from QEMU is a *Error that keeps QMP's error class
// (GenericError, CommandNotFound, DeviceNotActive, ...), QEMU's description
// verbatim and the command name; match it with errors.As, with errors.Is
// against a partial *Error (errors.Is(err, &qmp.Error{Class: "CommandNotFound"})),
// or with IsCommandNotFound. Failures that are not replies (context ended,
// connection gone, undecodable reply) are *CommandError wrapping the cause.
// When the connection dies every waiting call fails at once with an error
// wrapping ErrClosed and the cause (io.EOF, a *ProtocolError for garbage on
// the wire, ...). Errors are never matched by their text.
//
// File descriptors: over a unix socket, ExecuteWithFile, Getfd and AddFd pass
// a descriptor with SCM_RIGHTS in the same write as the command. The caller
// keeps its own copy and closes it; QEMU holds a duplicate until closefd,
// remove-fd, or until a command such as migrate "fd:name" consumes it. Other
// connections fail with ErrNoFDPassing.
//
// Feature probe: ProbeFeatures reads query-qmp-schema and reports which
// migration capabilities, parameters and statuses the QEMU in front of you
// has, whether migrate takes "channels", whether migrate-incoming takes
// "exit-on-error" and whether block-job-change exists. Choose commands from
// it, never from version numbers. FeaturesFromSchema does the same for a
// schema you already have. The schema is expensive for QEMU to produce
// (tens of ms of its main loop); where a few facts suffice, ask for them
// exactly instead: QueryMigrateCapabilities lists every capability,
// QueryMigrateParameters every parameter, and an argument QEMU does not
// know is refused before the command runs, with an error that
// IsUnexpectedArgument (or, for a mandatory argument left out,
// IsMissingArgument) recognises, so a command can be tried in its newest
// form and retried in an older one.
//
// Logging: WithLogger receives the wire transcript at debug level, with the
// values of secret-bearing keys (password, secret, data, key, iv, ...)
// redacted. A nil logger discards.
//
// The client keeps no package-level mutable state. For tests, package
// qmp/qmptest provides a fake QEMU that drives the real client over net.Pipe.
package qmp
