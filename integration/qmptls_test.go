package integration

import (
	"context"
	"crypto/x509"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/guest/sweep"
	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/qmp"
)

// freePorts returns n distinct tcp ports on 127.0.0.1 that nobody listened
// on a moment ago and that no earlier call in this test process returned.
// The ports are picked before something binds them later (a QEMU): the n
// listeners stay open until all n are picked (closed one at a time, the
// kernel may hand the same port out twice), and a port handed out before
// is skipped (its QEMU may still bind it, or already did).
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	portsMu.Lock()
	defer portsMu.Unlock()
	var ports []int
	for tries := 0; len(ports) < n; tries++ {
		require.Less(t, tries, 100, "no free port on 127.0.0.1")
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		defer ln.Close()
		p := ln.Addr().(*net.TCPAddr).Port
		if !portsGiven[p] {
			portsGiven[p] = true
			ports = append(ports, p)
		}
	}
	return ports
}

var (
	portsMu    sync.Mutex
	portsGiven = map[int]bool{} // every port freePorts returned
)

// freePort is one port of freePorts.
func freePort(t testing.TB) int {
	t.Helper()
	return freePorts(t, 1)[0]
}

// tlsMonitorArgs give a QEMU a second QMP monitor on 127.0.0.1:port that
// speaks TLS with the server credentials in dir and requires a client
// certificate its CA signed (verify-peer).
func tlsMonitorArgs(dir string, port int) []string {
	return []string{
		"-object", "tls-creds-x509,id=qmptls,dir=" + dir + ",endpoint=server,verify-peer=on",
		"-chardev", fmt.Sprintf("socket,id=qmptlsmon,host=127.0.0.1,port=%d,server=on,wait=off,tls-creds=qmptls", port),
		"-mon", "chardev=qmptlsmon,mode=control",
	}
}

// TestQMPOverTLS: QEMU monitors with TLS (QEMU's socket chardev with
// tls-creds): the right CA and client certificate connect, and a migration
// driven through two such monitors completes with the guest intact; another
// CA and a missing client certificate fail with the TLS error.
func TestQMPOverTLS(t *testing.T) {
	q := qemulab.RequireQEMU(t)
	creds, other := t.TempDir(), t.TempDir()
	require.NoError(t, qemulab.WriteX509Creds(creds, "127.0.0.1"))
	require.NoError(t, qemulab.WriteX509Creds(other, "127.0.0.1"))
	ports := freePorts(t, 2)
	sp, dp := ports[0], ports[1]
	guest := qemulab.NewSweepGuest(20e6)
	src := qemulab.StartT(t, q, qemulab.Config{Name: "src", Guest: guest, Args: tlsMonitorArgs(creds, sp)})
	dst := qemulab.StartT(t, q, qemulab.Config{Name: "dst", Guest: guest, Incoming: true, Args: tlsMonitorArgs(creds, dp)})
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	_, err := src.CountSerial(ctx, sweep.StartChar, sweep.PassChar, 1)
	require.NoError(t, err)
	addr := func(port int) qmp.Address { return qmp.TCPAddress("127.0.0.1", strconv.Itoa(port)) }

	good, err := qmp.LoadTLSDir(creds)
	require.NoError(t, err)
	t.Run("AnotherCA", func(t *testing.T) {
		bad, err := qmp.LoadTLSDir(other)
		require.NoError(t, err)
		_, err = qmp.DialAddress(ctx, addr(sp), qmp.WithTLS(bad))
		require.ErrorIs(t, err, qmp.ErrTLS)
		var ua x509.UnknownAuthorityError
		assert.ErrorAs(t, err, &ua, "names the unknown authority: %v", err)
	})
	t.Run("NoClientCertificate", func(t *testing.T) {
		noCert := good.Clone()
		noCert.Certificates = nil
		c, err := qmp.DialAddress(ctx, addr(sp), qmp.WithTLS(noCert))
		if err == nil {
			c.Close()
		}
		require.ErrorIs(t, err, qmp.ErrTLS, "a monitor with verify-peer refuses a client without a certificate")
		t.Logf("refused: %v", err)
	})
	t.Run("PlainTCPGetsNoGreeting", func(t *testing.T) {
		// The monitor waits for a TLS ClientHello: no greeting comes.
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		c, err := qmp.DialAddress(pctx, addr(sp))
		if err == nil {
			c.Close()
		}
		require.Error(t, err, "a TLS monitor does not speak plain QMP")
	})
	t.Run("MigrationThroughTLSMonitors", func(t *testing.T) {
		cfg := engine.Config{
			Source:      engine.Endpoint{Address: addr(sp), TLS: good},
			Destination: engine.Endpoint{Address: addr(dp), TLS: good},
			URI:         "unix:" + filepath.Join(dst.Dir(), "mig.sock"),
			Logger:      testLogger(t),
		}
		res, err := engine.Migrate(ctx, cfg)
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		_, err = qemulab.CheckSweep(ctx, src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
		require.NoError(t, err, "destination guest intact")
	})
}
