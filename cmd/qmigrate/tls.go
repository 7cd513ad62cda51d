package main

import (
	"errors"
	"flag"
	"fmt"
	"path/filepath"

	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/transport"
)

// tlsOptions are the --tls-* flags of "qmigrate migrate".
type tlsOptions struct {
	x509, psk, pskUser, hostname, authz string
}

func (o *tlsOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&o.x509, "tls-x509", "", "encrypt the migration stream (and the disks' NBD connections) with QEMU's TLS, using the x509 certificates in `DIR`, the same absolute path on both hosts: ca-cert.pem on both, server-cert.pem and server-key.pem for the destination, client-cert.pem and client-key.pem for the source (the destination checks the source's certificate)")
	fs.StringVar(&o.psk, "tls-psk", "", "encrypt the migration stream (and the disks' NBD connections) with QEMU's TLS and a pre-shared key: `DIR`/keys.psk on both hosts, the same absolute path, lines of username:hexkey")
	fs.StringVar(&o.pskUser, "tls-psk-user", "", "the user `NAME` of keys.psk the source presents with --tls-psk (default "+transport.DefaultTLSUsername+")")
	fs.StringVar(&o.hostname, "tls-hostname", "", "the host `NAME` the destination's certificate must carry, with --tls-x509 (default: the host of a tcp: --uri; needed with a unix: --uri)")
	fs.StringVar(&o.authz, "tls-authz", "", "`ID` of an authorization object (authz-simple, authz-list...) created on the destination QEMU that must allow the source: its certificate's distinguished name, or its --tls-psk-user")
}

// config checks the flags against each other, the channel ch (--uri, as
// given in uri) and the NBD server's address nbd (zero without --nbd), and
// returns the engine's TLS configuration (nil without TLS).
func (o *tlsOptions) config(uri string, ch transport.Channel, nbd qmp.Address) (*transport.TLS, error) {
	switch {
	case o.x509 != "" && o.psk != "":
		return nil, errors.New("--tls-x509 and --tls-psk exclude each other: choose certificates or a pre-shared key")
	case o.x509 == "" && o.psk == "":
		for _, f := range []struct{ name, v string }{{"--tls-psk-user", o.pskUser}, {"--tls-hostname", o.hostname}, {"--tls-authz", o.authz}} {
			if f.v != "" {
				return nil, fmt.Errorf("%s needs --tls-x509 or --tls-psk", f.name)
			}
		}
		return nil, nil
	case o.pskUser != "" && o.psk == "":
		return nil, errors.New("--tls-psk-user goes with --tls-psk, not --tls-x509")
	case o.hostname != "" && o.x509 == "":
		return nil, errors.New("--tls-hostname goes with --tls-x509: a pre-shared key (--tls-psk) checks no host name")
	}
	t := &transport.TLS{Kind: transport.TLSX509, Dir: o.x509, Hostname: o.hostname, Username: o.pskUser, Authz: o.authz}
	flagName := "--tls-x509"
	if o.psk != "" {
		t.Kind, t.Dir, flagName = transport.TLSPSK, o.psk, "--tls-psk"
	}
	if !filepath.IsAbs(t.Dir) {
		return nil, fmt.Errorf("%s %q: not an absolute path (each QEMU reads the folder on its own host)", flagName, t.Dir)
	}
	if t.Kind == transport.TLSX509 && t.Hostname == "" {
		if ch.Scheme != transport.TCP {
			return nil, fmt.Errorf("--tls-x509 with --uri %s needs --tls-hostname: the name the destination's certificate carries (a unix socket has no host name to check it against)", uri)
		}
		if nbd.Network == qmp.Unix {
			return nil, fmt.Errorf("--tls-x509 with --nbd %s needs --tls-hostname: the name the destination's certificate carries (a unix socket has no host name to check it against)", nbd)
		}
	}
	if err := t.Validate(ch); err != nil {
		return nil, err
	}
	return t, nil
}

// describe is " with TLS (...)" for the opening message, "" without TLS.
func (o *tlsOptions) describe() string {
	switch {
	case o.x509 != "":
		return " with TLS (x509 certificates in " + o.x509 + ")"
	case o.psk != "":
		return " with TLS (pre-shared key in " + o.psk + ")"
	}
	return ""
}
