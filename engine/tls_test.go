package engine_test

import (
	"context"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/qemutest"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/transport"
)

// tlsSnapshot is what each side had while the migration converged.
type tlsSnapshot struct {
	objects [2]map[string]map[string]any
	params  [2]map[string]any
}

// snapshotAtConverge records both sides' objects and TLS parameters when
// the converge phase begins.
func snapshotAtConverge(p *qemutest.Pair, cfg *engine.Config) *tlsSnapshot {
	s := &tlsSnapshot{}
	cfg.Observer = func(ev engine.Event) {
		if ev.Kind == engine.EventPhase && ev.Phase == engine.PhaseConverge {
			for _, i := range []qemutest.Side{qemutest.Source, qemutest.Destination} {
				s.objects[i] = credentials(p.Objects(i))
				s.params[i] = map[string]any{}
				for _, k := range []string{"tls-creds", "tls-hostname", "tls-authz"} {
					s.params[i][k] = p.Param(i, k)
				}
			}
		}
	}
	return s
}

// onlyObject returns the one object of a side and its id.
func onlyObject(t *testing.T, objs map[string]map[string]any) (string, map[string]any) {
	t.Helper()
	require.Len(t, objs, 1, "one credentials object")
	for id, o := range objs {
		return id, o
	}
	return "", nil
}

func assertNoTLSLeft(t *testing.T, p *qemutest.Pair) {
	t.Helper()
	for _, side := range []qemutest.Side{qemutest.Source, qemutest.Destination} {
		assert.Empty(t, p.Objects(side), "%s: no credentials object left", side)
		assert.Equal(t, "", p.Param(side, "tls-creds"), "%s: tls-creds back to empty", side)
	}
}

func TestTLSX509Completes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{DirtyRate: 20 << 20})
		cfg.TLS = &transport.TLS{Dir: "/etc/pki/qemu", Hostname: "dst.example", Authz: "auth0"}
		s := snapshotAtConverge(p, &cfg)
		res, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		assert.Equal(t, engine.StatusCompleted, res.Status)
		assert.Empty(t, res.UndoErrors)

		sid, so := onlyObject(t, s.objects[0])
		did, do := onlyObject(t, s.objects[1])
		assert.Equal(t, sid, did, "the same id on both sides")
		assert.True(t, strings.HasPrefix(sid, "qmigrate-tls-"), sid)
		assert.Equal(t, map[string]any{"qom-type": "tls-creds-x509", "id": sid, "dir": "/etc/pki/qemu", "endpoint": "client", "verify-peer": true}, so)
		assert.Equal(t, map[string]any{"qom-type": "tls-creds-x509", "id": did, "dir": "/etc/pki/qemu", "endpoint": "server", "verify-peer": true}, do)
		assert.Equal(t, map[string]any{"tls-creds": sid, "tls-hostname": "dst.example", "tls-authz": ""}, s.params[0])
		assert.Equal(t, map[string]any{"tls-creds": did, "tls-hostname": "", "tls-authz": "auth0"}, s.params[1])
		assert.Equal(t, "", p.Param(qemutest.Destination, "tls-authz"), "authorization restored")

		assertNoTLSLeft(t, p)
		assert.Equal(t, "", p.Param(qemutest.Source, "tls-hostname"))
		assert.Equal(t, "", p.Param(qemutest.Destination, "tls-authz"))
	})
}

func TestTLSPSKPerSideFolders(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{})
		cfg.URI = "tcp:127.0.0.1:0"
		cfg.TLS = &transport.TLS{Kind: transport.TLSPSK, SourceDir: "/src/psk", DestinationDir: "/dst/psk", Username: "mig"}
		s := snapshotAtConverge(p, &cfg)
		_, err := engine.Migrate(t.Context(), cfg)
		require.NoError(t, err)
		_, so := onlyObject(t, s.objects[0])
		_, do := onlyObject(t, s.objects[1])
		assert.Equal(t, "tls-creds-psk", so["qom-type"])
		assert.Equal(t, "/src/psk", so["dir"])
		assert.Equal(t, "mig", so["username"])
		assert.Equal(t, "client", so["endpoint"])
		assert.Equal(t, "/dst/psk", do["dir"])
		assert.Equal(t, "server", do["endpoint"])
		assert.NotContains(t, do, "username", "the server reads every identity of keys.psk")
		assertNoTLSLeft(t, p)
	})
}

// A QEMU that refuses its credentials (QEMU reads the files at object-add)
// is bad input: the other side's object is removed, and nothing else was
// changed on either side.
func TestTLSRefusedCredentials(t *testing.T) {
	const refusal = "Unable to access credentials /etc/pki/qemu/server-cert.pem: No such file or directory"
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{RefuseObject: refusal, RefuseObjectSide: qemutest.Destination})
		cfg.TLS = &transport.TLS{Dir: "/etc/pki/qemu", Hostname: "dst.example"}
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		assert.ErrorIs(t, err, engine.ErrBadInput)
		assert.Equal(t, engine.StatusFailed, res.Status)
		var ee *engine.Error
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, engine.SideDestination, ee.Side)
		assert.Equal(t, engine.CheckTLS, ee.Check)
		assert.ErrorIs(t, err, &qmp.Error{Command: "object-add", Desc: refusal}, "QEMU's own error is kept")
		// The folder is named only in the message, for the person who has
		// to look into it.
		assert.Contains(t, err.Error(), "/etc/pki/qemu", "the folder")
		assert.Empty(t, res.UndoErrors)
		var did []string
		for _, s := range res.Rollback {
			assert.NoError(t, s.Err, s.Name)
			if s.Did != "" {
				did = append(did, s.Name)
			}
		}
		assert.Equal(t, []string{"source: remove TLS credentials", "destination: remove journal", "source: remove journal"}, did,
			"the source's credentials, then both journals")
		assertNoTLSLeft(t, p)
		assert.Equal(t, uint64(134217728), p.Param(qemutest.Source, "max-bandwidth"), "parameters untouched")
	})
}

// A migration that fails after the start rolls the TLS set-up back with
// the rest.
func TestTLSRolledBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{FailWith: "Certificate does not match the hostname dst.example"})
		cfg.TLS = &transport.TLS{Dir: "/etc/pki/qemu", Hostname: "dst.example"}
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		assert.ErrorIs(t, err, engine.ErrMigrationFailed)
		// QEMU's error-desc, carried through in the message: the engine
		// keeps no typed copy of it.
		assert.Contains(t, err.Error(), "Certificate does not match the hostname")
		assert.Equal(t, "running", p.SrcRunState())
		assert.Empty(t, p.Objects(qemutest.Source), "source: no credentials object left")
		assert.Equal(t, "", p.Param(qemutest.Source, "tls-creds"))
		assert.Equal(t, "", p.Param(qemutest.Source, "tls-hostname"))
		creds := rollbackStep(t, res, "source: remove TLS credentials")
		assert.NoError(t, creds.Err)
		assert.NotEmpty(t, creds.Did)
	})
}

// Without Config.TLS a tls-creds left set by an earlier run is cleared for
// the migration (QEMU would try TLS with it), and put back by a rollback.
func TestLeftoverTLSCredsCleared(t *testing.T) {
	for _, fail := range []bool{false, true} {
		t.Run(map[bool]string{false: "completed", true: "rolled back"}[fail], func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				opt := qemutest.Options{}
				if fail {
					opt.FailWith = "boom"
				}
				p, cfg := pair(t, opt)
				c, err := p.Src.Client(t.Context())
				require.NoError(t, err)
				defer c.Close()
				require.NoError(t, c.MigrateSetParameters(context.Background(), qmp.MigrationParameters{TLSCreds: qmp.Ptr("old")}))
				_, err = engine.Migrate(t.Context(), cfg)
				if fail {
					require.Error(t, err)
					assert.Equal(t, "old", p.Param(qemutest.Source, "tls-creds"), "restored by the rollback")
					return
				}
				require.NoError(t, err)
				assert.Equal(t, "", p.Param(qemutest.Source, "tls-creds"))
			})
		})
	}
}

func TestTLSConfigRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		uri  string
		tls  transport.TLS
		st   string // Storage.NBDAddress
		want string
	}{
		{"no folder", "tcp:127.0.0.1:0", transport.TLS{}, "", "TLS.Dir"},
		{"relative folder", "tcp:127.0.0.1:0", transport.TLS{Dir: "pki"}, "", "not an absolute path"},
		{"x509 over unix without a host name", "unix:/tmp/m.sock", transport.TLS{Dir: "/pki"}, "", "TLS.Hostname"},
		{"x509 over fd without a host name", "fd:", transport.TLS{Dir: "/pki"}, "", "TLS.Hostname"},
		{"unknown kind", "tcp:h:1", transport.TLS{Kind: "gpg", Dir: "/pki"}, "", "TLS.Kind"},
		{"psk with a host name", "tcp:h:1", transport.TLS{Kind: transport.TLSPSK, Dir: "/pki", Hostname: "h"}, "", "TLS.Hostname"},
		{"x509 with a user name", "tcp:h:1", transport.TLS{Dir: "/pki", Username: "u"}, "", "TLS.Username"},
		{"unix NBD without a host name", "tcp:h:1", transport.TLS{Dir: "/pki"}, "/tmp/nbd.sock", "NBD server"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := engine.Config{
				Source:      engine.Endpoint{Address: qmp.UnixAddress("/tmp/a.qmp")},
				Destination: engine.Endpoint{Address: qmp.UnixAddress("/tmp/b.qmp")},
				URI:         tc.uri,
				TLS:         &tc.tls,
			}
			if tc.st != "" {
				cfg.Storage = &blockmirror.Config{NBDAddress: qmp.UnixAddress(tc.st)}
			}
			err := cfg.Validate()
			require.Error(t, err)
			assert.ErrorIs(t, err, engine.ErrInvalidConfig)
			assert.ErrorIs(t, err, transport.ErrBadTLS)
			// Validate names the field in its message, for the person who
			// wrote the config; there is no typed field to check instead.
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

// A TLS migration cut by the destination before anything was sent gets a
// hint where its reason is; the same error without TLS does not.
func TestTLSFailureHint(t *testing.T) {
	for _, withTLS := range []bool{true, false} {
		synctest.Test(t, func(t *testing.T) {
			_, cfg := pair(t, qemutest.Options{FailWith: "Cannot write to TLS channel: Input/output error"})
			if withTLS {
				cfg.TLS = &transport.TLS{Dir: "/etc/pki/qemu", Hostname: "dst.example"}
			}
			_, err := engine.Migrate(t.Context(), cfg)
			require.ErrorIs(t, err, engine.ErrMigrationFailed)
			// The hint is a sentence for the person reading the error:
			// its text is the contract.
			if withTLS {
				assert.Contains(t, err.Error(), "the destination QEMU's log")
			} else {
				assert.NotContains(t, err.Error(), "TLS:")
			}
		})
	}
}

// A destination that dies mid-migration took its credentials with it: the
// rollback removes the source's, and reports no failure for the other.
func TestTLSDestinationDies(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p, cfg := pair(t, qemutest.Options{Throughput: 100 << 20, DirtyRate: 400 << 20})
		cfg.TLS = &transport.TLS{Dir: "/etc/pki/qemu", Hostname: "dst.example"}
		cfg.Strategy.Limits.NoThrottle = true
		time.AfterFunc(2*time.Second, p.KillDst)
		res, err := engine.Migrate(t.Context(), cfg)
		require.Error(t, err)
		assert.Equal(t, "running", p.SrcRunState())
		assert.Empty(t, p.Objects(qemutest.Source), "source: credentials removed")
		assert.Equal(t, "", p.Param(qemutest.Source, "tls-creds"))
		for _, side := range []engine.Side{engine.SideSource, engine.SideDestination} {
			s := rollbackStep(t, res, string(side)+": remove TLS credentials")
			assert.NoError(t, s.Err, "no TLS undo failure, even for a QEMU that is gone")
		}
	})
}

// credentials drops the journal (journal.go) from a side's objects.
func credentials(objs map[string]map[string]any) map[string]map[string]any {
	out := map[string]map[string]any{}
	for id, o := range objs {
		if !strings.HasPrefix(id, "qmigrate-journal-") {
			out[id] = o
		}
	}
	return out
}
