package qmp

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
)

// ErrTLS is wrapped by a failed TLS handshake with a monitor: a certificate
// the other side does not trust, a missing or refused client certificate,
// a host name the certificate does not carry.
var ErrTLS = errors.New("qmp: TLS handshake with the monitor failed")

// WithTLS makes Dial and DialAddress speak TLS to the monitor (QEMU's
// socket chardev with tls-creds: -chardev socket,...,tls-creds=ID). An
// empty ServerName is the dialled host.
func WithTLS(cfg *tls.Config) Option { return func(o *options) { o.tls = cfg } }

// LoadTLSDir reads a client's x509 credentials in QEMU's layout from dir:
// ca-cert.pem (the CA that signed the monitor's certificate),
// client-cert.pem and client-key.pem (ours, which a monitor with
// verify-peer checks). An error names the file.
func LoadTLSDir(dir string) (*tls.Config, error) {
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca-cert.pem"))
	if err != nil {
		return nil, fmt.Errorf("qmp: TLS credentials: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("qmp: TLS credentials: %s holds no PEM certificate", filepath.Join(dir, "ca-cert.pem"))
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "client-cert.pem"), filepath.Join(dir, "client-key.pem"))
	if err != nil {
		return nil, fmt.Errorf("qmp: TLS credentials in %s: %w", dir, err)
	}
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}

// tlsClient runs the TLS handshake over conn towards host.
func tlsClient(ctx context.Context, conn net.Conn, cfg *tls.Config, host string) (net.Conn, error) {
	c := cfg.Clone()
	if c.ServerName == "" {
		c.ServerName = host
	}
	tc := tls.Client(conn, c)
	if err := tc.HandshakeContext(ctx); err != nil {
		conn.Close()
		return nil, fmt.Errorf("%w: %w", ErrTLS, err)
	}
	return tc, nil
}
