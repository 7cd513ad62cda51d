package blockmirror

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
)

// nbdAddr is a parsed NBD server address.
type nbdAddr struct {
	unix string // socket path, or
	host string // tcp host
	port int    // tcp port
}

func (a nbdAddr) String() string {
	if a.unix != "" {
		return "unix:" + a.unix
	}
	return "tcp:" + net.JoinHostPort(a.host, strconv.Itoa(a.port))
}

// server is the legacy SocketAddress for nbd-server-start.
func (a nbdAddr) server() any {
	if a.unix != "" {
		return map[string]any{"type": "unix", "data": map[string]any{"path": a.unix}}
	}
	return map[string]any{"type": "inet", "data": map[string]any{"host": a.host, "port": strconv.Itoa(a.port)}}
}

// client is the flat SocketAddress for the nbd block driver.
func (a nbdAddr) client() map[string]any {
	if a.unix != "" {
		return map[string]any{"type": "unix", "path": a.unix}
	}
	return map[string]any{"type": "inet", "host": a.host, "port": strconv.Itoa(a.port)}
}

// local reports whether the address can only be on the caller's own host
// (unix socket or loopback), which means both QEMUs share a host.
func (a nbdAddr) local() bool {
	if a.unix != "" {
		return true
	}
	if a.host == "localhost" {
		return true
	}
	ip := net.ParseIP(a.host)
	return ip != nil && ip.IsLoopback()
}

func parseNBDAddress(s string) (nbdAddr, error) {
	switch {
	case strings.HasPrefix(s, "unix:"):
		p := strings.TrimPrefix(s, "unix:")
		if p == "" {
			return nbdAddr{}, fmt.Errorf("%w: NBD address %q: empty path", ErrPreflight, s)
		}
		if !filepath.IsAbs(p) {
			// QEMU would resolve it in its own working directory.
			return nbdAddr{}, fmt.Errorf("%w: NBD address %q: socket path is not absolute", ErrPreflight, s)
		}
		return nbdAddr{unix: p}, nil
	case strings.HasPrefix(s, "tcp:"):
		host, port, err := net.SplitHostPort(strings.TrimPrefix(s, "tcp:"))
		if err != nil {
			return nbdAddr{}, fmt.Errorf("%w: NBD address %q: %w", ErrPreflight, s, err)
		}
		n, err := strconv.Atoi(port)
		if err != nil || n < 0 || n > 65535 {
			return nbdAddr{}, fmt.Errorf("%w: NBD address %q: bad port", ErrPreflight, s)
		}
		if n == 0 {
			// nbd-server-start does not report the port it would pick.
			return nbdAddr{}, fmt.Errorf("%w: NBD address %q: port 0: give the port the destination's NBD server should listen on (or leave NBDAddress empty to derive one)", ErrPreflight, s)
		}
		if host == "" {
			return nbdAddr{}, fmt.Errorf("%w: NBD address %q: empty host", ErrPreflight, s)
		}
		return nbdAddr{host: host, port: n}, nil
	}
	return nbdAddr{}, fmt.Errorf("%w: NBD address %q: want unix:/path or tcp:host:port", ErrPreflight, s)
}

// nbdPortTries is how many ports deriveNBDAddress's callers try after the
// migration port when the NBD port is derived.
const nbdPortTries = 16

// deriveNBDAddress picks the NBD server address from the migration URI when
// the caller gave none. For tcp the port is the first candidate; the caller
// tries the next ones while the port is in use.
func deriveNBDAddress(migrationURI, token string) (nbdAddr, error) {
	switch {
	case strings.HasPrefix(migrationURI, "tcp:"):
		host, port, err := net.SplitHostPort(strings.TrimPrefix(migrationURI, "tcp:"))
		if err != nil {
			return nbdAddr{}, fmt.Errorf("%w: migration URI %q: %w", ErrPreflight, migrationURI, err)
		}
		// tcp:host:port may carry options (",ipv4"); drop them.
		if i := strings.IndexByte(port, ','); i >= 0 {
			port = port[:i]
		}
		n, err := strconv.Atoi(port)
		if err != nil {
			return nbdAddr{}, fmt.Errorf("%w: migration URI %q: bad port", ErrPreflight, migrationURI)
		}
		if n == 0 || n >= 65535-nbdPortTries {
			n = 49152 // IANA dynamic range; libvirt's default NBD range starts here too
		} else {
			n++
		}
		return nbdAddr{host: host, port: n}, nil
	case strings.HasPrefix(migrationURI, "unix:"):
		p := strings.TrimPrefix(migrationURI, "unix:")
		if p == "" {
			return nbdAddr{}, fmt.Errorf("%w: migration URI %q: empty path", ErrPreflight, migrationURI)
		}
		return nbdAddr{unix: filepath.Join(filepath.Dir(p), "qmigrate-nbd-"+token+".sock")}, nil
	}
	return nbdAddr{}, fmt.Errorf("%w: cannot derive an NBD address from migration URI %q: set Config.NBDAddress", ErrPreflight, migrationURI)
}

// randomHex returns n random bytes as hex, from crypto/rand.
func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b)
}
