package qmp_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/qmp"
)

// tlsMonitor serves a minimal QMP monitor over TLS with the server
// credentials in dir, requiring a client certificate signed by its CA.
func tlsMonitor(t *testing.T, dir string, minor, major int) string {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "server-cert.pem"), filepath.Join(dir, "server-key.pem"))
	require.NoError(t, err)
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca-cert.pem"))
	require.NoError(t, err)
	pool := x509.NewCertPool()
	require.True(t, pool.AppendCertsFromPEM(caPEM))
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert})
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
				if _, err := fmt.Fprintf(conn, `{"QMP": {"version": {"qemu": {"micro": 2, "minor": %d, "major": %d}, "package": ""}, "capabilities": []}}`+"\r\n", minor, major); err != nil {
					return
				}
				r := bufio.NewReader(conn)
				for {
					line, err := r.ReadBytes('\n')
					if err != nil {
						return
					}
					var req struct{ ID json.RawMessage }
					if json.Unmarshal(line, &req) != nil {
						return
					}
					if _, err := conn.Write([]byte(`{"return": {}, "id": ` + string(req.ID) + "}\r\n")); err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String()
}

func TestDialTLS(t *testing.T) {
	good, other := t.TempDir(), t.TempDir()
	require.NoError(t, qemulab.WriteX509Creds(good, "127.0.0.1"))
	require.NoError(t, qemulab.WriteX509Creds(other, "127.0.0.1"))
	addr := tlsMonitor(t, good, 0, 10)
	host, port, _ := net.SplitHostPort(addr)
	a := qmp.TCPAddress(host, port)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	t.Run("right CA and client certificate", func(t *testing.T) {
		cfg, err := qmp.LoadTLSDir(good)
		require.NoError(t, err)
		c, err := qmp.DialAddress(ctx, a, qmp.WithTLS(cfg))
		require.NoError(t, err)
		assert.Equal(t, 10, c.Version().Major)
		c.Close()
	})
	t.Run("QEMU 7.2: a byte per record", func(t *testing.T) {
		h, p, _ := net.SplitHostPort(tlsMonitor(t, good, 2, 7))
		cfg, err := qmp.LoadTLSDir(good)
		require.NoError(t, err)
		c, err := qmp.DialAddress(ctx, qmp.TCPAddress(h, p), qmp.WithTLS(cfg))
		require.NoError(t, err)
		require.NoError(t, c.Execute(ctx, "query-status", nil, nil))
		c.Close()
	})
	t.Run("another CA", func(t *testing.T) {
		cfg, err := qmp.LoadTLSDir(other)
		require.NoError(t, err)
		_, err = qmp.DialAddress(ctx, a, qmp.WithTLS(cfg))
		require.ErrorIs(t, err, qmp.ErrTLS)
		var ua x509.UnknownAuthorityError
		assert.ErrorAs(t, err, &ua)
	})
	t.Run("no client certificate", func(t *testing.T) {
		cfg, err := qmp.LoadTLSDir(good)
		require.NoError(t, err)
		cfg.Certificates = nil
		c, err := qmp.DialAddress(ctx, a, qmp.WithTLS(cfg))
		if err == nil {
			// TLS 1.3: the server's refusal arrives after the client's
			// handshake ends, with the greeting read.
			c.Close()
			t.Fatal("a monitor that requires a client certificate accepted none")
		}
		assert.Error(t, err)
	})
	t.Run("missing credentials", func(t *testing.T) {
		_, err := qmp.LoadTLSDir(t.TempDir())
		require.Error(t, err)
		assert.Contains(t, err.Error(), "ca-cert.pem")
	})
	t.Run("loopback", func(t *testing.T) {
		assert.True(t, qmp.TCPAddress("127.0.0.1", "1").Loopback())
		assert.True(t, qmp.TCPAddress("::1", "1").Loopback())
		assert.True(t, qmp.TCPAddress("localhost", "1").Loopback())
		assert.True(t, qmp.UnixAddress("/run/x.qmp").Loopback())
		assert.False(t, qmp.TCPAddress("198.18.0.2", "1").Loopback())
		assert.False(t, qmp.TCPAddress("host.example", "1").Loopback())
	})
}
