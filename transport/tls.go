package transport

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
)

// ErrBadTLS: a TLS configuration that cannot work (see TLS.Validate).
var ErrBadTLS = errors.New("bad TLS configuration")

// TLSKind is the kind of credentials QEMU's TLS uses.
type TLSKind string

// TLS credential kinds.
const (
	// TLSX509 is certificates (QEMU's tls-creds-x509): the source checks
	// the destination's certificate against the CA and the host name, and
	// the destination asks for the source's client certificate.
	TLSX509 TLSKind = "x509"
	// TLSPSK is a pre-shared key (QEMU's tls-creds-psk): both sides hold
	// the same keys.psk, and the source presents a user name from it.
	TLSPSK TLSKind = "psk"
)

// Default values of TLS.
const (
	// DefaultTLSUsername is the PSK identity the source presents when
	// TLS.Username is empty (QEMU's own default).
	DefaultTLSUsername = "qemu"
)

// TLS encrypts the migration stream with QEMU's own TLS (and, in a storage
// migration, the NBD connections of the mirrors). The engine creates a
// credentials object on each QEMU (object-add tls-creds-x509 or
// tls-creds-psk: the server end on the destination, the client end on the
// source), points the migration parameter tls-creds at it, and removes both
// again when it is done, whatever the outcome. QEMU reads the files when the
// object is created, on its own host: a missing or unreadable file, or a
// certificate that fails QEMU's sanity checks, is reported before anything
// else changes.
//
// The folders hold the files QEMU expects there:
//   - x509: ca-cert.pem on both hosts; server-cert.pem and server-key.pem
//     on the destination; client-cert.pem and client-key.pem on the source
//     (the destination asks for a client certificate: mutual TLS, as
//     libvirt does by default).
//   - psk: keys.psk on both hosts, lines of "username:hexkey".
type TLS struct {
	// Kind is TLSX509 ("" means x509) or TLSPSK.
	Kind TLSKind
	// Dir is the credentials folder, the same absolute path on both hosts
	// (libvirt's /etc/pki/qemu layout). SourceDir and DestinationDir, when
	// set, replace it for one side.
	Dir                       string
	SourceDir, DestinationDir string
	// Hostname is the name the destination's certificate must carry (x509;
	// the source's tls-hostname). "" means the host of a tcp: URI; a unix:
	// or fd: channel has no host, so x509 needs it set there.
	Hostname string
	// Username is the identity the source presents with a pre-shared key
	// (psk only; "" = DefaultTLSUsername).
	Username string
	// Authz is the id of an authorization object (authz-simple,
	// authz-list...) that the caller created on the destination QEMU: the
	// destination then accepts only a client whose certificate's
	// distinguished name (x509) or user name (psk) it allows (the
	// destination's tls-authz). "" accepts any client the credentials
	// accept.
	Authz string
}

// Endpoints of a credentials object.
const (
	tlsServer = "server"
	tlsClient = "client"
)

// kind is the effective kind.
func (t TLS) kind() TLSKind {
	if t.Kind == "" {
		return TLSX509
	}
	return t.Kind
}

// SourceFolder and DestinationFolder are the credentials folders each QEMU
// reads.
func (t TLS) SourceFolder() string      { return orStr(t.SourceDir, t.Dir) }
func (t TLS) DestinationFolder() string { return orStr(t.DestinationDir, t.Dir) }

// Validate checks the configuration for a migration over ch without
// touching any QEMU, and refuses what cannot work: an unknown Kind, no
// folder or a relative one (each QEMU would resolve it in its own working
// directory), x509 over a unix: or fd: channel without the Hostname the
// destination's certificate carries, a Username with x509, a Hostname with
// psk. Errors wrap ErrBadTLS and name the field.
func (t TLS) Validate(ch Channel) error {
	bad := func(field, format string, args ...any) error {
		return fmt.Errorf("transport: TLS.%s: %s: %w", field, fmt.Sprintf(format, args...), ErrBadTLS)
	}
	k := t.kind()
	if k != TLSX509 && k != TLSPSK {
		return bad("Kind", "%q: want %q or %q", t.Kind, TLSX509, TLSPSK)
	}
	for _, f := range []struct{ name, dir string }{
		{"SourceDir", t.SourceFolder()}, {"DestinationDir", t.DestinationFolder()},
	} {
		if f.dir == "" {
			return bad("Dir", "no credentials folder for the %s (set Dir, or %s)",
				strings.ToLower(strings.TrimSuffix(f.name, "Dir")), f.name)
		}
		if !filepath.IsAbs(f.dir) {
			// Each QEMU would resolve it in its own working directory.
			return bad(f.name, "%q is not an absolute path", f.dir)
		}
	}
	if strings.ContainsAny(t.Hostname, " \t\n,") {
		return bad("Hostname", "%q is not a host name", t.Hostname)
	}
	switch k {
	case TLSX509:
		if t.Username != "" {
			return bad("Username", "a user name goes with a pre-shared key (psk), not with x509 certificates")
		}
		if t.Hostname == "" && ch.Scheme != TCP {
			return bad("Hostname", "a %s: channel has no host name to check the destination's certificate against: set the name its certificate carries", ch.Scheme)
		}
	case TLSPSK:
		if t.Hostname != "" {
			return bad("Hostname", "a host name is checked against x509 certificates, not with a pre-shared key (psk)")
		}
		if strings.ContainsAny(t.Username, ": \t\n") {
			return bad("Username", "%q: a keys.psk user name has no colon or blank", t.Username)
		}
	}
	return nil
}

// SourceObject and DestinationObject are the object-add arguments of the
// credentials object with that id on each side: the client end on the
// source, the server end on the destination.
func (t TLS) SourceObject(id string) map[string]any {
	return t.object(id, tlsClient, t.SourceFolder())
}

func (t TLS) DestinationObject(id string) map[string]any {
	return t.object(id, tlsServer, t.DestinationFolder())
}

func (t TLS) object(id, endpoint, dir string) map[string]any {
	o := map[string]any{"id": id, "dir": dir, "endpoint": endpoint}
	switch t.kind() {
	case TLSPSK:
		o["qom-type"] = "tls-creds-psk"
		if endpoint == tlsClient {
			o["username"] = orStr(t.Username, DefaultTLSUsername)
		}
	default:
		o["qom-type"] = "tls-creds-x509"
		// The server asks for the client's certificate; the client always
		// checks the server's.
		o["verify-peer"] = true
	}
	return o
}

func orStr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
