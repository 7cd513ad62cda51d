package transport

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestTLSValidate(t *testing.T) {
	tcp, _ := Parse("tcp:10.0.0.2:0")
	unix, _ := Parse("unix:/run/m.sock")
	fd, _ := Parse("fd:")
	ok := []struct {
		name string
		t    TLS
		ch   Channel
	}{
		{"x509 over tcp takes the URI's host", TLS{Dir: "/etc/pki/qemu"}, tcp},
		{"x509 over unix with a host name", TLS{Kind: TLSX509, Dir: "/p", Hostname: "dst.example"}, unix},
		{"x509 over fd with a host name", TLS{Dir: "/p", Hostname: "dst.example"}, fd},
		{"psk over unix", TLS{Kind: TLSPSK, Dir: "/p", Username: "mig"}, unix},
		{"a folder per side", TLS{SourceDir: "/s", DestinationDir: "/d"}, tcp},
		{"authz", TLS{Dir: "/p", Authz: "auth0"}, tcp},
	}
	for _, tc := range ok {
		assert.NoError(t, tc.t.Validate(tc.ch), tc.name)
	}
	bad := []struct {
		name string
		t    TLS
		ch   Channel
		want string
	}{
		{"no folder", TLS{}, tcp, "TLS.Dir"},
		{"no destination folder", TLS{SourceDir: "/s"}, tcp, "destination"},
		{"relative", TLS{Dir: "pki"}, tcp, "not an absolute path"},
		{"relative source folder", TLS{Dir: "/p", SourceDir: "s"}, tcp, "TLS.SourceDir"},
		{"unknown kind", TLS{Kind: "gpg", Dir: "/p"}, tcp, "TLS.Kind"},
		{"x509 over unix", TLS{Dir: "/p"}, unix, "a unix: channel has no host name"},
		{"x509 with a user", TLS{Dir: "/p", Username: "u"}, tcp, "TLS.Username"},
		{"psk with a host", TLS{Kind: TLSPSK, Dir: "/p", Hostname: "h"}, tcp, "TLS.Hostname"},
		{"psk user with a colon", TLS{Kind: TLSPSK, Dir: "/p", Username: "a:b"}, tcp, "TLS.Username"},
		{"host with a comma", TLS{Dir: "/p", Hostname: "a,b"}, tcp, "TLS.Hostname"},
	}
	for _, tc := range bad {
		err := tc.t.Validate(tc.ch)
		require.ErrorIs(t, err, ErrBadTLS, tc.name)
		assert.Contains(t, err.Error(), tc.want, tc.name)
	}
}

func TestTLSObjects(t *testing.T) {
	x := TLS{SourceDir: "/s", DestinationDir: "/d"}
	assert.Equal(t, map[string]any{"qom-type": "tls-creds-x509", "id": "c", "dir": "/s", "endpoint": "client", "verify-peer": true}, x.SourceObject("c"))
	assert.Equal(t, map[string]any{"qom-type": "tls-creds-x509", "id": "c", "dir": "/d", "endpoint": "server", "verify-peer": true}, x.DestinationObject("c"))
	p := TLS{Kind: TLSPSK, Dir: "/p"}
	assert.Equal(t, map[string]any{"qom-type": "tls-creds-psk", "id": "c", "dir": "/p", "endpoint": "client", "username": DefaultTLSUsername}, p.SourceObject("c"))
	// QEMU refuses a username on the server end: it reads every identity of keys.psk.
	assert.Equal(t, map[string]any{"qom-type": "tls-creds-psk", "id": "c", "dir": "/p", "endpoint": "server"}, p.DestinationObject("c"))
}
