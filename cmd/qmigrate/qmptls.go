package main

import (
	"flag"
	"fmt"
	"path/filepath"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/qmp"
)

// qmpOptions are how the CLI reaches the QMP monitors: --qmp-tls-x509 DIR
// speaks TLS to them with client certificates; --insecure-qmp accepts plain
// tcp to a monitor on another host, refused otherwise (whoever reaches a
// plain QMP port controls the VM, and through it its host's files).
type qmpOptions struct {
	tlsDir   string
	insecure bool
}

func (o *qmpOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&o.tlsDir, "qmp-tls-x509", "", "speak TLS to the QMP monitors with the client credentials in `DIR` (QEMU's layout: ca-cert.pem, client-cert.pem, client-key.pem); the monitors run with -object tls-creds-x509,...,endpoint=server and -chardev socket,...,tls-creds=ID")
	fs.BoolVar(&o.insecure, "insecure-qmp", false, "accept plain tcp QMP to a monitor that is not on this host (refused without it: whoever reaches the port controls the VM)")
}

// endpoint builds the engine's endpoint for a monitor at a given with
// flagName, refusing plain tcp to another host without --insecure-qmp.
func (o *qmpOptions) endpoint(flagName, given string, a qmp.Address) (engine.Endpoint, error) {
	ep := engine.Endpoint{Address: a, InsecureTCP: o.insecure}
	if o.tlsDir != "" {
		if !filepath.IsAbs(o.tlsDir) {
			return ep, fmt.Errorf("--qmp-tls-x509 %s: want an absolute folder", o.tlsDir)
		}
		cfg, err := qmp.LoadTLSDir(o.tlsDir)
		if err != nil {
			return ep, &inputError{flag: "--qmp-tls-x509", address: o.tlsDir, err: err}
		}
		ep.TLS = cfg
		return ep, nil
	}
	if !a.Loopback() && !o.insecure {
		return ep, fmt.Errorf("%s %s: plain QMP over tcp to another host hands the VM to whoever reaches the port: give --qmp-tls-x509 DIR, or --insecure-qmp to accept that", flagName, given)
	}
	return ep, nil
}
