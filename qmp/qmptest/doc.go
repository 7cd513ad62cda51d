// Package qmptest is a fake QEMU monitor for tests, in the style of
// net/http/httptest: it speaks QMP well enough to drive the real qmp.Client
// (greeting, capabilities negotiation with oob, ids echoed, events, error
// classes) and lets a test script every reply.
//
// Lifecycle: NewServer, then Handle the commands the code under test sends,
// then connect with Client (net.Pipe, works inside testing/synctest bubbles),
// Conn (a raw client end) or ListenUnix (a real socket for code that dials).
// Close the server when done; it closes every connection and waits for its own
// goroutines.
//
// Contracts:
//   - Each connection sends the greeting first (unless WithoutGreeting or
//     WithGreeting), then answers commands. Before qmp_capabilities every other
//     command gets CommandNotFound, as in QEMU; a second qmp_capabilities too.
//   - Handlers may be called concurrently and may call Emit, Handle and any
//     other Server method. By default each command runs in its own goroutine,
//     so a blocked handler delays only its own reply and later commands are
//     answered first (out-of-order replies). WithSerial runs in-band commands
//     one at a time in arrival order, as QEMU does, while exec-oob overtakes.
//   - What a handler returns decides the wire: a value is the "return", a
//     *qmp.Error is an error reply with its class, ErrNoReply sends nothing,
//     ErrCloseConn drops the connection mid-command, Raw writes any line
//     (garbage included) in place of the reply. SendRaw writes a line at any
//     moment; CloseConns simulates QEMU exiting.
//   - Sending never blocks a handler or Emit: every connection has an unbounded
//     queue drained by its own writer goroutine, so events and replies keep
//     their order per connection.
//   - Args wraps a handler with QEMU's argument check (CheckArgs): declare a
//     command's arguments as QEMU's schema does ("uri", "*channels") and an
//     undeclared argument is refused with "Parameter 'NAME' is unexpected", a
//     missing mandatory one with "Parameter 'NAME' is missing", before the
//     handler runs, as QEMU 7.2 to 10.x do (checked against captures in
//     testdata/qmp). Without it a handler sees whatever arguments come.
//   - Calls records every command (not the handshake) in arrival order;
//     WaitCall blocks until the n-th call of a command has arrived, so a test
//     can act on it without sleeping (it works inside synctest bubbles).
package qmptest
