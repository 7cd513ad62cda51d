// Package transport describes the channel a migration stream takes between
// two QEMUs, and QEMU's TLS over it: values and the QMP arguments they give.
// The engine sends the commands.
//
// # Lifecycle
//
// Parse the migration URI once into a Channel ("unix:/path", "tcp:host:port"
// or "fd:"; every other scheme is refused with ErrUnsupportedScheme). Give
// each QEMU its arguments from it: IncomingArgs for migrate-incoming on the
// destination, then, for a tcp port 0, WithPort with the destination's
// query-migrate, then MigrateArgs for migrate on the source. The arguments
// come in a Form: start from Newest and, when QEMU refuses an argument,
// retry with Form.Fallback (or take FormOf a probed schema). A TLS
// configuration is checked with TLS.Validate before any QEMU is touched,
// and gives the object-add arguments of both ends.
//
// # Contracts
//
//   - No QEMU and no state: the functions compute arguments and checks from
//     values the caller read (CheckUUIDs takes the uuids the caller queried).
//     The only system calls are RemoveSocket (a unix socket file a
//     destination left behind) and Socketpair (an fd: channel's sockets).
//   - Forms are found by trying, not from version numbers; a command QEMU
//     refused for an argument changed nothing on QEMU.
//   - Errors are typed: *URIError (ErrBadURI, ErrUnsupportedScheme),
//     ErrUUIDMismatch, ErrNoListenAddress, ErrBadTLS.
//
// # Where things are
//
//   - transport.go: Channel, Parse, Form (Newest, FormOf, Fallback), the
//     migrate-incoming and migrate arguments, WithPort, RemoveSocket,
//     Socketpair, Multifd and CheckUUIDs.
//   - tls.go: TLS (x509 or psk, folders, host name, authz), Validate, the
//     credentials objects.
package transport
