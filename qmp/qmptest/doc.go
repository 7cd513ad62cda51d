// Package qmptest is a fake QEMU monitor for tests, in the style of
// net/http/httptest: it speaks QMP well enough to drive the real qmp.Client
// (greeting, capabilities negotiation with oob, ids echoed, events, error
// classes) and lets a test script every reply.
//
// # Lifecycle
//
// NewServer, then Handle the commands the code under test sends, then
// connect with Client (net.Pipe: it works inside testing/synctest bubbles),
// Conn (a raw client end), ServeConn (a connection the test accepted) or
// ListenUnix (a real socket for code that dials). Close the server when
// done: it closes every connection and waits for its own goroutines.
//
// # Contracts
//
//   - A HandlerFunc's result decides the wire: a value, a *qmp.Error, no
//     reply (ErrNoReply), a dropped connection (ErrCloseConn) or any raw
//     line (Raw). Handlers may call any Server method.
//   - By default each command runs in its own goroutine (replies out of
//     order); WithSerial runs in-band commands one at a time as QEMU does;
//     SetInBandGate holds in-band commands (not exec-oob) as a blocked main
//     thread holds QEMU's.
//   - Sending never blocks a handler or Emit; events and replies keep their
//     order per connection.
//   - Args declares a command's arguments as QEMU's schema does and refuses
//     others with QEMU's own texts; without it a handler sees whatever comes.
//   - Tests wait on the server, never on the clock: WaitCall returns when
//     the n-th call of a command arrived; Calls and CallsOf list them.
//
// # Where things are
//
//   - server.go: Server, its options, HandlerFunc and the helpers Return,
//     Fail, Delay; the per-connection reader and writer.
//   - args.go: Args and CheckArgs, QEMU's argument check.
//   - captured.go: CapturedError and MatchError, to compare the fake's
//     errors with those captured from real QEMU (testdata/qmp).
package qmptest
