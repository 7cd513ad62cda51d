package qmp

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// MaxUnixPath is the longest unix socket path the kernel takes (sun_path is
// 108 bytes, the terminating NUL included).
const MaxUnixPath = 107

// Networks of an Address.
const (
	Unix = "unix"
	TCP  = "tcp"
)

// Address is a stream socket address, written "unix:PATH" or
// "tcp:HOST:PORT" ("tcp:[::1]:PORT" for IPv6): a QMP monitor, a migration
// channel's listener, an NBD server. It is a value: parse it once with
// ParseAddress (or build it with UnixAddress, TCPAddress) and pass it on.
// The zero Address is "no address".
type Address struct {
	Network string // Unix or TCP; "" for the zero Address
	Path    string // Unix: the socket path
	Host    string // TCP: host name or IP, without IPv6 brackets ("" = this machine)
	Port    string // TCP: decimal port; "0" lets a listener pick one
}

// UnixAddress is the address of the unix socket at path.
func UnixAddress(path string) Address { return Address{Network: Unix, Path: path} }

// TCPAddress is the address of a TCP host and port.
func TCPAddress(host, port string) Address { return Address{Network: TCP, Host: host, Port: port} }

// AddressError is an address that does not parse, or that does not fit the
// use it was given for. It wraps ErrBadAddress.
type AddressError struct {
	Address string // as given
	Reason  string // what is wrong, e.g. `port "0": want a number from 1 to 65535`
	// BadPort: the port is what is wrong (not a number from 0 to 65535,
	// or 0 where a port is needed); Port is the port as given.
	BadPort bool
	Port    string
	// Err is the parser's own error where one said what is wrong (a
	// tcp address that net.SplitHostPort refused), nil otherwise.
	Err error
}

func (e *AddressError) Error() string {
	return fmt.Sprintf("qmp: address %q: %s: %v", e.Address, e.Reason, ErrBadAddress)
}

// Unwrap returns ErrBadAddress.
func (e *AddressError) Unwrap() error { return ErrBadAddress }

// ParseAddress reads "unix:PATH" or "tcp:HOST:PORT". It checks the syntax
// every use shares: a unix path that is not empty and fits in a socket
// address (MaxUnixPath bytes; an abstract "@name" is not bounded here), a
// port that is a number from 0 to 65535 (0: a listener picks it). The rules
// of one use are checked where the address is used (Dialable; transport and
// blockmirror have their own). Every error is an *AddressError.
func ParseAddress(s string) (Address, error) {
	bad := func(why string) error { return &AddressError{Address: s, Reason: why} }
	switch {
	case strings.HasPrefix(s, "unix:"):
		path := strings.TrimPrefix(s, "unix:")
		if path == "" {
			return Address{}, bad("empty socket path")
		}
		if len(path) > MaxUnixPath && !strings.HasPrefix(path, "@") {
			return Address{}, bad(fmt.Sprintf("socket path is %d bytes, longer than the %d a unix socket takes", len(path), MaxUnixPath))
		}
		return UnixAddress(path), nil
	case strings.HasPrefix(s, "tcp:"):
		host, port, err := net.SplitHostPort(strings.TrimPrefix(s, "tcp:"))
		if err != nil {
			why := err.Error()
			var ae *net.AddrError
			if errors.As(err, &ae) {
				why = ae.Err
			}
			return Address{}, &AddressError{Address: s, Reason: "want tcp:host:port: " + why, Err: err}
		}
		n, err := strconv.ParseUint(port, 10, 16)
		if err != nil {
			return Address{}, &AddressError{Address: s, Reason: fmt.Sprintf("port %q: want a number from 0 to 65535", port), BadPort: true, Port: port}
		}
		return TCPAddress(host, strconv.FormatUint(n, 10)), nil
	}
	return Address{}, bad("want unix:/path or tcp:host:port")
}

// Dialable reports whether a client can connect to a: a parsed address
// with a port (1 to 65535). The error is an *AddressError.
func (a Address) Dialable() error {
	switch a.Network {
	case Unix:
		return nil
	case TCP:
		if a.Port == "0" {
			return &AddressError{Address: a.String(), Reason: `port "0": want a number from 1 to 65535`, BadPort: true, Port: a.Port}
		}
		return nil
	}
	return &AddressError{Address: a.String(), Reason: "want unix:/path or tcp:host:port"}
}

// IsZero reports whether a is the zero Address.
func (a Address) IsZero() bool { return a == Address{} }

// String is the text form ParseAddress reads: "unix:/p", "tcp:h:p",
// "tcp:[v6]:p"; "" for the zero Address.
func (a Address) String() string {
	switch a.Network {
	case Unix:
		return "unix:" + a.Path
	case TCP:
		return "tcp:" + net.JoinHostPort(a.Host, a.Port)
	}
	return ""
}

// dialTarget is the network and address net.Dial takes.
func (a Address) dialTarget() (network, addr string) {
	if a.Network == Unix {
		return Unix, a.Path
	}
	return TCP, net.JoinHostPort(a.Host, a.Port)
}

// SocketAddress is a as QMP's flat SocketAddress (migration channels, the
// nbd block driver's "server").
func (a Address) SocketAddress() SocketAddress {
	if a.Network == Unix {
		return SocketAddress{Type: "unix", Path: a.Path}
	}
	return SocketAddress{Type: "inet", Host: a.Host, Port: a.Port}
}

// legacy is a as QMP's legacy SocketAddress ({"type", "data": {...}}),
// which nbd-server-start takes.
func (a Address) legacy() map[string]any {
	if a.Network == Unix {
		return map[string]any{"type": "unix", "data": map[string]any{"path": a.Path}}
	}
	return map[string]any{"type": "inet", "data": map[string]any{"host": a.Host, "port": a.Port}}
}

// SameSocket reports whether a and b name the same socket: equal, or unix
// paths that are the same once cleaned or lead to the same file (a symbolic
// link, a hard link). A QEMU monitor serves one client at a time, so a
// second connection to the same socket would wait for a greeting that never
// comes. TCP addresses are compared as written (no name resolution).
func SameSocket(a, b Address) bool {
	if a == b {
		return true
	}
	if a.Network != Unix || b.Network != Unix {
		return false
	}
	if filepath.Clean(a.Path) == filepath.Clean(b.Path) {
		return true
	}
	fa, errA := os.Stat(a.Path)
	fb, errB := os.Stat(b.Path)
	return errA == nil && errB == nil && os.SameFile(fa, fb)
}

// Loopback reports whether a reaches only this host: a unix socket, or a
// tcp address on localhost or a loopback IP. QMP over plain tcp to any
// other address hands the VM (and its host's files) to whoever reaches the
// port: use TLS there (WithTLS).
func (a Address) Loopback() bool {
	if a.Network == Unix {
		return true
	}
	if a.Host == "localhost" {
		return true
	}
	ip := net.ParseIP(a.Host)
	return ip != nil && ip.IsLoopback()
}
