// Package transport describes the channel a migration stream takes between
// two QEMUs: a unix socket or a TCP address where the destination listens and
// the source connects.
//
// Parse accepts "unix:/path", "tcp:host:port" ("tcp:[::1]:port" for IPv6)
// and "fd:" (a socketpair the engine makes, one end passed to each QEMU with
// getfd; no listener at all, both monitors must be local unix sockets), and
// refuses exec:, and every other scheme, with ErrUnsupportedScheme: qmigrate
// never asks QEMU to run a command. A Channel gives the migrate-incoming and
// migrate arguments in a Form: "channels" (8.2+) or "uri", and
// migrate-incoming's "exit-on-error" (9.1+) or not. The form a QEMU takes is
// found out by trying, not from its version: send the Newest() form, and when
// QEMU refuses one of its arguments with QAPI's exact error ("Parameter 'uri'
// is missing" from a QEMU where "uri" is mandatory, "Parameter 'X' is
// unexpected"), Form.Fallback gives the older form to retry with; a refused
// command changed nothing on QEMU, and any other error is the command's real
// failure. FormOf reads the form from a probed schema instead. A tcp port 0
// lets the destination choose; Channel.WithPort takes the real port from
// the destination's query-migrate after migrate-incoming. A Unix or TCP
// Channel embeds the qmp.Address it was parsed into.
//
// Multifd needs the multifd capability and the same multifd-channels on both
// sides, and (qemu-protocol.md §3) the same -uuid on both QEMUs or none: each
// multifd channel carries the source's uuid and the destination drops a
// channel whose uuid differs from its own. CheckUUIDs turns the two QEMUs'
// uuids (qmp.Client.QueryUUID) into a clear error before anything starts.
//
// TLS describes QEMU's own TLS over any of these channels: x509
// certificates or a pre-shared key, read by each QEMU from a folder on its
// own host. Validate refuses what cannot work before any QEMU is touched (a
// relative folder, x509 over a unix: or fd: channel without the host name
// the destination's certificate carries); SourceObject and
// DestinationObject are the object-add arguments of the two ends (the
// engine creates and removes the objects and sets tls-creds).
//
// The package talks to no QEMU and holds no state: its functions compute
// arguments and checks from values the caller read (the engine sends the
// commands). Its only system calls are RemoveSocket, which deletes a unix
// socket file a destination left behind once it stopped listening, and
// Socketpair, which makes an fd: channel's pair of sockets.
package transport
