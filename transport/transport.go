package transport

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/qmigrate/qmigrate/qmp"
)

// Errors; match with errors.Is.
var (
	// ErrUnsupportedScheme: the URI's scheme is not one qmigrate drives
	// (exec:, rdma:, file:, vsock:, anything unknown).
	ErrUnsupportedScheme = errors.New("unsupported migration URI scheme (want unix:/path, tcp:host:port or fd:)")
	// ErrBadURI: the URI is malformed.
	ErrBadURI = errors.New("malformed migration URI")
	// ErrUUIDMismatch: multifd with different -uuid on the two QEMUs.
	ErrUUIDMismatch = errors.New("multifd needs the same -uuid on both QEMUs (or none on both)")
	// ErrNoListenAddress: the destination did not report where it listens.
	ErrNoListenAddress = errors.New("destination reported no listening socket-address")
)

// URIError is a migration URI Parse refused: why, and ErrBadURI or
// ErrUnsupportedScheme (Unwrap).
type URIError struct {
	URI    string
	Reason string // "" when the sentinel says it all
	Err    error
}

func (e *URIError) Error() string {
	if e.Reason == "" {
		return fmt.Sprintf("transport: %q: %v", e.URI, e.Err)
	}
	return fmt.Sprintf("transport: %q: %s: %v", e.URI, e.Reason, e.Err)
}

// Unwrap returns ErrBadURI or ErrUnsupportedScheme.
func (e *URIError) Unwrap() error { return e.Err }

// Scheme is a migration transport.
type Scheme string

// Schemes qmigrate drives.
const (
	Unix Scheme = "unix"
	TCP  Scheme = "tcp"
	// FD is "fd:": the engine makes a socketpair and passes one end to each
	// QEMU with getfd (both monitors must be unix sockets on this host). No
	// listener, no socket file, no port. Not with multifd (QEMU needs
	// multi-channel URIs for it).
	FD Scheme = "fd"
)

// Channel is where the destination listens for the migration stream and the
// source connects to. It is a value; build it with Parse.
type Channel struct {
	Scheme Scheme
	// Address is the listening socket of a Unix or TCP channel (Path, or
	// Host and Port, "0" = let the destination pick); zero for FD.
	qmp.Address
	FDName string // FD: the getfd name both QEMUs know the descriptor by (set by the engine)
}

// Parse reads "unix:/path" (an absolute path that fits in a socket
// address), "tcp:host:port" ("tcp:[::1]:4444" for IPv6; port 0 lets the
// destination choose, see WithPort) or "fd:" (a socketpair the engine makes;
// "fd:NAME" for a descriptor passed by someone else is refused). Every other
// scheme, exec: included, is refused with ErrUnsupportedScheme: qmigrate
// never asks QEMU to run a command. Every error is a *URIError. A Unix or TCP
// Channel embeds the qmp.Address it was parsed into.
func Parse(uri string) (Channel, error) {
	scheme, rest, ok := strings.Cut(uri, ":")
	if !ok || scheme == "" {
		return Channel{}, &URIError{URI: uri, Err: ErrUnsupportedScheme}
	}
	bad := func(why string) error { return &URIError{URI: uri, Reason: why, Err: ErrBadURI} }
	switch Scheme(scheme) {
	case Unix, TCP:
		a, err := qmp.ParseAddress(uri)
		if err != nil {
			var ae *qmp.AddressError
			switch {
			case errors.As(err, &ae) && ae.BadPort:
				return Channel{}, bad(fmt.Sprintf("port %q: want a number from 0 (the destination picks) to 65535", ae.Port))
			case errors.As(err, &ae) && ae.Err != nil:
				return Channel{}, bad(ae.Err.Error())
			case errors.As(err, &ae):
				return Channel{}, bad(ae.Reason)
			}
			return Channel{}, bad(err.Error())
		}
		switch {
		case a.Network == qmp.Unix && strings.Contains(a.Path, ","):
			// QEMU would read options after a comma; refuse the ambiguity.
			return Channel{}, bad("comma in socket path")
		case a.Network == qmp.Unix && !strings.HasPrefix(a.Path, "/"):
			// Each QEMU would resolve it in its own working directory, and
			// the engine's clean-up in the caller's.
			return Channel{}, bad("socket path is not absolute")
		case a.Network == qmp.TCP && a.Host == "":
			return Channel{}, bad("empty host")
		}
		return Channel{Scheme: Scheme(scheme), Address: a}, nil
	case FD:
		if rest != "" {
			return Channel{}, bad(`only "fd:" (a socketpair made by qmigrate) is supported`)
		}
		return Channel{Scheme: FD}, nil
	default:
		return Channel{}, &URIError{URI: uri, Reason: fmt.Sprintf("scheme %q", scheme), Err: ErrUnsupportedScheme}
	}
}

// String is the URI form QEMU takes ("unix:/p", "tcp:h:p", "tcp:[v6]:p",
// "fd:name").
func (c Channel) String() string {
	if c.Scheme == FD {
		return "fd:" + c.FDName
	}
	return c.Address.String()
}

// NeedsPort reports whether the destination picks the port (tcp port 0), so
// the real one must be read back with WithPort before the source connects.
func (c Channel) NeedsPort() bool { return c.Scheme == TCP && c.Port == "0" }

// SocketAddress is the channel as QMP's flat SocketAddress.
func (c Channel) SocketAddress() qmp.SocketAddress {
	if c.Scheme == FD {
		return qmp.SocketAddress{Type: "fd", Str: c.FDName}
	}
	return c.Address.SocketAddress()
}

func (c Channel) channels() []qmp.MigrationChannel {
	return []qmp.MigrationChannel{{
		ChannelType: "main",
		Addr:        qmp.MigrationAddr{Transport: "socket", SocketAddress: c.SocketAddress()},
	}}
}

// Form is which arguments of migrate-incoming and migrate one QEMU takes
// beyond the oldest form ("uri" alone). It is found out by trying: send
// the newest form (Newest), and on QEMU's exact refusal of one of its
// arguments (Fallback) retry in an older form; a refused command changed
// nothing on QEMU. Where a schema was probed anyway, FormOf gives it
// directly.
type Form struct {
	// Channels: "channels" instead of "uri" (QEMU 8.2+, where "uri"
	// became optional).
	Channels bool
	// ExitOnError: migrate-incoming takes "exit-on-error" (9.1+).
	ExitOnError bool
}

// Newest is the form to try first on a QEMU nothing is known of.
func Newest() Form { return Form{Channels: true, ExitOnError: true} }

// FormOf is the form a QEMU's probed schema says it takes.
func FormOf(f *qmp.Features) Form {
	if f == nil {
		return Form{}
	}
	return Form{Channels: f.MigrateChannels, ExitOnError: f.IncomingExitOnError}
}

// Fallback returns the older form to retry with after err answered a
// command sent in form f, and true; or f and false when err is anything
// but QEMU refusing an argument of that form, which is then the command's
// real failure. The refusals are QAPI's, exactly (qmp.IsMissingArgument,
// qmp.IsUnexpectedArgument): "Parameter 'uri' is missing" (before 8.2
// "uri" is mandatory, so "channels" is unknown: what QEMU 7.2 answers the
// channels form) or "Parameter 'channels' is unexpected" drop channels;
// "Parameter 'exit-on-error' is unexpected" drops exit-on-error. Each
// fallback turns one field off, so at most two retries follow the newest
// form.
func (f Form) Fallback(err error) (Form, bool) {
	switch {
	case f.Channels && (qmp.IsMissingArgument(err, "uri") || qmp.IsUnexpectedArgument(err, "channels")):
		f.Channels = false
	case f.ExitOnError && qmp.IsUnexpectedArgument(err, "exit-on-error"):
		f.ExitOnError = false
	default:
		return f, false
	}
	return f, true
}

// IncomingArgs are the migrate-incoming arguments for this channel in form
// f: "channels" or "uri", and exit-on-error set to exitOnError where f has
// it.
func (c Channel) IncomingArgs(f Form, exitOnError bool) qmp.MigrateIncomingArgs {
	var a qmp.MigrateIncomingArgs
	if f.Channels {
		a.Channels = c.channels()
	} else {
		a.URI = c.String()
	}
	if f.ExitOnError {
		a.ExitOnError = qmp.Ptr(exitOnError)
	}
	return a
}

// MigrateArgs are the migrate arguments for this channel in form f:
// "channels" or "uri".
func (c Channel) MigrateArgs(f Form) qmp.MigrateArgs {
	if f.Channels {
		return qmp.MigrateArgs{Channels: c.channels()}
	}
	return qmp.MigrateArgs{URI: c.String()}
}

// WithPort returns the channel the source must connect to, given the
// destination's query-migrate after migrate-incoming: for a channel that
// NeedsPort, the port the destination reports in "socket-address" (the host
// stays the one the caller gave: the destination may report a wildcard
// address). Any other channel is returned unchanged.
func (c Channel) WithPort(dst *qmp.MigrationInfo) (Channel, error) {
	if !c.NeedsPort() {
		return c, nil
	}
	if dst != nil {
		for _, sa := range dst.SocketAddress {
			if sa.Type == "inet" && sa.Port != "" && sa.Port != "0" {
				c.Port = sa.Port
				return c, nil
			}
		}
	}
	return c, fmt.Errorf("transport: %s: %w", c, ErrNoListenAddress)
}

// RemoveSocket removes a unix channel's socket file that a destination left
// behind (QEMU unlinks a stale path before it binds but does not remove its
// listening socket when it stops listening). Only a socket is removed; a
// missing file is fine. TCP channels are a no-op.
func RemoveSocket(c Channel) error {
	if c.Scheme != Unix {
		return nil
	}
	fi, err := os.Lstat(c.Path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("transport: %w", err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return nil
	}
	if err := os.Remove(c.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("transport: %w", err)
	}
	return nil
}

// Socketpair makes the connected pair of stream sockets for an FD channel:
// one end for the destination, one for the source. The caller passes them
// with qmp.Client.Getfd and closes its copies right after.
func Socketpair() (dst, src int, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, -1, fmt.Errorf("transport: socketpair: %w", err)
	}
	return fds[0], fds[1], nil
}

// Multifd is the multifd-channels parameter a multifd migration sets on both
// sides (the caller turns the multifd capability on); Channels 0 is no
// multifd.
type Multifd struct {
	Channels int
}

// Parameters sets multifd-channels when multifd is on.
func (m Multifd) Parameters(p *qmp.MigrationParameters) {
	if m.Channels > 0 {
		p.MultifdChannels = qmp.Ptr(m.Channels)
	}
}

// CheckUUIDs enforces the multifd uuid rule (qemu-protocol.md §3): every
// multifd channel carries the source's -uuid and the destination drops a
// channel whose uuid differs from its own, so both sides must have the same
// uuid or none at all. srcUUID and dstUUID are what the caller read with
// qmp.Client.QueryUUID; the error, before anything starts, wraps
// ErrUUIDMismatch.
func CheckUUIDs(srcUUID, dstUUID string) error {
	if srcUUID == dstUUID {
		return nil
	}
	show := func(s string) string {
		if s == "" {
			return "none"
		}
		return s
	}
	return fmt.Errorf("transport: source uuid %s, destination uuid %s: %w", show(srcUUID), show(dstUUID), ErrUUIDMismatch)
}
