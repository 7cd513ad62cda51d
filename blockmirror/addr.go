package blockmirror

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"path/filepath"
	"strconv"

	"github.com/qmigrate/qmigrate/qmp"
)

// checkNBDAddress checks what an NBD server address needs beyond parsing: an
// absolute unix path (QEMU would resolve a relative one in its own working
// directory), a tcp host and a port (nbd-server-start does not report the
// port it would pick).
func checkNBDAddress(a qmp.Address) error {
	switch a.Network {
	case qmp.Unix:
		if a.Path == "" {
			return fmt.Errorf("%w: NBD address %q: empty path", ErrPreflight, a)
		}
		if !filepath.IsAbs(a.Path) {
			return fmt.Errorf("%w: NBD address %q: socket path is not absolute", ErrPreflight, a)
		}
		return nil
	case qmp.TCP:
		n, err := strconv.ParseUint(a.Port, 10, 16)
		if err != nil {
			return fmt.Errorf("%w: NBD address %q: bad port", ErrPreflight, a)
		}
		if n == 0 {
			return fmt.Errorf("%w: NBD address %q: port 0: give the port the destination's NBD server should listen on (or leave NBDAddress empty to derive one)", ErrPreflight, a)
		}
		if a.Host == "" {
			return fmt.Errorf("%w: NBD address %q: empty host", ErrPreflight, a)
		}
		return nil
	}
	return fmt.Errorf("%w: NBD address %q: want unix:/path or tcp:host:port", ErrPreflight, a)
}

// local reports whether a can only be on the caller's own host (unix socket
// or loopback), which means both QEMUs share a host.
func local(a qmp.Address) bool {
	if a.Network == qmp.Unix || a.Host == "localhost" {
		return true
	}
	ip := net.ParseIP(a.Host)
	return ip != nil && ip.IsLoopback()
}

// nbdPortTries is how many ports deriveNBDAddress's callers try after the
// migration port when the NBD port is derived.
const nbdPortTries = 16

// deriveNBDAddress picks the NBD server address from the migration
// channel's address when the caller gave none. For tcp the port is the first
// candidate; the caller tries the next ones while the port is in use.
func deriveNBDAddress(mig qmp.Address, token string) (qmp.Address, error) {
	switch mig.Network {
	case qmp.TCP:
		if mig.Host == "" {
			return qmp.Address{}, fmt.Errorf("%w: migration address %q: empty host", ErrPreflight, mig)
		}
		n, err := strconv.Atoi(mig.Port)
		if err != nil {
			return qmp.Address{}, fmt.Errorf("%w: migration address %q: bad port", ErrPreflight, mig)
		}
		if n == 0 || n >= 65535-nbdPortTries {
			n = 49152 // IANA dynamic range; libvirt's default NBD range starts here too
		} else {
			n++
		}
		return qmp.TCPAddress(mig.Host, strconv.Itoa(n)), nil
	case qmp.Unix:
		if mig.Path == "" {
			return qmp.Address{}, fmt.Errorf("%w: migration address %q: empty path", ErrPreflight, mig)
		}
		return qmp.UnixAddress(filepath.Join(filepath.Dir(mig.Path), "qmigrate-nbd-"+token+".sock")), nil
	}
	return qmp.Address{}, fmt.Errorf("%w: cannot derive an NBD address from a migration channel without a socket address (fd:): set Config.NBDAddress", ErrPreflight)
}

// nextPort is a tcp address with the next port.
func nextPort(a qmp.Address) qmp.Address {
	n, _ := strconv.Atoi(a.Port)
	a.Port = strconv.Itoa(n + 1)
	return a
}

// randomHex returns n random bytes as hex, from crypto/rand.
func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b)
}
