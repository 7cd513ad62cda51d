package integration

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/qmigrate/qmigrate/blockmirror"
	"github.com/qmigrate/qmigrate/engine"
	"github.com/qmigrate/qmigrate/internal/qemulab"
	"github.com/qmigrate/qmigrate/qmp"
	"github.com/qmigrate/qmigrate/transport"
)

// TestTLS migrates over QEMU's own TLS between real QEMUs: x509
// certificates and a pre-shared key, the disk mirror's NBD connection too,
// and the handshakes that must fail (another host name, another CA) or
// never start (credentials a QEMU cannot load), each leaving the guest
// intact where it runs and no credentials object behind on either QEMU.
func TestTLS(t *testing.T) {
	q := qemulab.RequireQEMU(t)
	t.Run("X509OverTCP", func(t *testing.T) { testTLSX509TCP(t, q) })
	t.Run("PSKOverUnixMultifd", func(t *testing.T) { testTLSPSK(t, q) })
	t.Run("StorageOverTLS", func(t *testing.T) { testTLSStorage(t, q) })
	t.Run("WrongHostname", func(t *testing.T) {
		testTLSHandshakeFails(t, q, "Certificate does not match the hostname", func(dir string) *transport.TLS {
			return &transport.TLS{Dir: dir, Hostname: "wrong.example"}
		})
	})
	t.Run("OtherCA", func(t *testing.T) {
		testTLSHandshakeFails(t, q, "", func(dir string) *transport.TLS {
			other := filepath.Join(t.TempDir(), "other")
			require.NoError(t, qemulab.WriteX509Creds(other, "127.0.0.1"))
			return &transport.TLS{SourceDir: dir, DestinationDir: other}
		})
	})
	t.Run("MissingCredentials", func(t *testing.T) { testTLSMissing(t, q) })
	t.Run("AuthzAllows", func(t *testing.T) { testTLSAuthzAllows(t, q) })
	t.Run("AuthzDenies", func(t *testing.T) {
		testTLSHandshakeFails(t, q, "destination QEMU's log", func(dir string) *transport.TLS {
			return &transport.TLS{Dir: dir, Authz: "qmigrate-test-authz"}
		}, "*CN=somebody-else*")
	})
}

// addAuthz creates on inst an authz-list that allows only the client
// certificates whose distinguished name matches glob.
func addAuthz(t *testing.T, inst *qemulab.Instance, glob string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	require.NoError(t, inst.QMP.Execute(ctx, "object-add", map[string]any{
		"qom-type": "authz-list", "id": "qmigrate-test-authz", "policy": "deny",
		"rules": []map[string]any{{"match": glob, "policy": "allow", "format": "glob"}},
	}, nil))
}

// The destination's authorization object allows the source's client
// certificate (by its common name): the migration completes, and the
// destination's tls-authz is put back.
func testTLSAuthzAllows(t *testing.T, q *qemulab.QEMU) {
	dir := x509Dir(t, "127.0.0.1")
	var dstInst *qemulab.Instance
	migrateTLS(t, q, "", func(_, dst *qemulab.Instance, cfg *engine.Config) {
		dstInst = dst
		addAuthz(t, dst, "*CN="+qemulab.X509ClientCN+"*")
		cfg.URI = "tcp:127.0.0.1:0"
		cfg.TLS = &transport.TLS{Dir: dir, Authz: "qmigrate-test-authz"}
	})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	p, err := dstInst.QMP.QueryMigrateParameters(ctx)
	require.NoError(t, err)
	assert.Equal(t, "", *p.TLSAuthz, "tls-authz put back")
}

// x509Dir writes certificates for hosts into a new folder.
func x509Dir(t *testing.T, hosts ...string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pki")
	require.NoError(t, qemulab.WriteX509Creds(dir, hosts...))
	return dir
}

// tlsSeen records, when the migration reaches converge, whether both
// sides' tls-creds named a credentials object of the expected type.
type tlsSeen struct {
	creds [2]string
	types [2]string
}

func (s *tlsSeen) observe(t *testing.T, src, dst *qemulab.Instance) func(engine.Event) {
	return func(ev engine.Event) {
		if ev.Kind != engine.EventPhase || ev.Phase != engine.PhaseConverge {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		for i, inst := range []*qemulab.Instance{src, dst} {
			p, err := inst.QMP.QueryMigrateParameters(ctx)
			if assert.NoError(t, err) && p.TLSCreds != nil {
				s.creds[i] = *p.TLSCreds
			}
			for _, o := range qomObjects(t, ctx, inst) {
				if o.Name == s.creds[i] {
					s.types[i] = strings.TrimSuffix(strings.TrimPrefix(o.Type, "child<"), ">")
				}
			}
		}
	}
}

type qomProperty struct {
	Name string `json:"name"`
	Type string `json:"type"`
}

func qomObjects(t *testing.T, ctx context.Context, inst *qemulab.Instance) []qomProperty {
	t.Helper()
	var props []qomProperty
	require.NoError(t, inst.QMP.Execute(ctx, "qom-list", map[string]string{"path": "/objects"}, &props))
	return props
}

// assertNoTLSLeft checks a live QEMU holds no credentials object of
// qmigrate's and has tls-creds empty again.
func assertNoTLSLeft(t *testing.T, side string, inst *qemulab.Instance) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, o := range qomObjects(t, ctx, inst) {
		assert.False(t, strings.HasPrefix(o.Name, "qmigrate-tls-"), "%s: credentials object %s (%s) left", side, o.Name, o.Type)
	}
	p, err := inst.QMP.QueryMigrateParameters(ctx)
	require.NoError(t, err)
	require.NotNil(t, p.TLSCreds)
	assert.Equal(t, "", *p.TLSCreds, "%s: tls-creds cleared", side)
}

// migrateTLS runs one migration of a converging sweep guest with cfg
// adjusted by adjust, and checks it completed over TLS with the guest intact
// on the destination and nothing left on either side.
func migrateTLS(t *testing.T, q *qemulab.QEMU, uuid string, adjust func(src, dst *qemulab.Instance, cfg *engine.Config)) *engine.Result {
	t.Helper()
	src, dst := enginePair(t, q, 50e6, true, uuid)
	cfg := engineConfig(t, src, dst, "unix:"+filepath.Join(dst.Dir(), "mig.sock"))
	adjust(src, dst, &cfg)
	var seen tlsSeen
	cfg.Observer = seen.observe(t, src, dst)
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	res, err := engine.Migrate(ctx, cfg)
	require.NoError(t, err)
	t.Logf("completed over %s with TLS (%s): total %v, downtime %v, %d MiB", cfg.URI, seen.types[0], res.Total, res.Downtime, res.TransferredBytes>>20)
	assert.Empty(t, res.UndoErrors)
	kind := cfg.TLS.Kind
	if kind == "" {
		kind = transport.TLSX509
	}
	want := "tls-creds-" + string(kind)
	assert.Equal(t, [2]string{want, want}, seen.types, "both sides migrated with credentials objects (tls-creds %v)", seen.creds)
	_, err = qemulab.CheckSweep(ctx, src.QMP, dst.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err, "destination guest intact")
	assertNoTLSLeft(t, "source", src)
	assertNoTLSLeft(t, "destination", dst)
	return res
}

func testTLSX509TCP(t *testing.T, q *qemulab.QEMU) {
	dir := x509Dir(t, "127.0.0.1")
	migrateTLS(t, q, "", func(_, _ *qemulab.Instance, cfg *engine.Config) {
		cfg.URI = "tcp:127.0.0.1:0" // the certificate's IP: no host name to give
		cfg.TLS = &transport.TLS{Kind: transport.TLSX509, Dir: dir}
	})
}

func testTLSPSK(t *testing.T, q *qemulab.QEMU) {
	dir := filepath.Join(t.TempDir(), "psk")
	require.NoError(t, qemulab.WritePSKCreds(dir, "mig"))
	migrateTLS(t, q, "5a3c8f00-1c2d-4e5f-8a9b-0c1d2e3f4a5b", func(_, _ *qemulab.Instance, cfg *engine.Config) {
		cfg.MultifdChannels = 2
		cfg.TLS = &transport.TLS{Kind: transport.TLSPSK, Dir: dir, Username: "mig"}
	})
}

// The boot disk is mirrored over an NBD connection under the same
// credentials (x509 over unix sockets, with a host name): the destination's
// copy, zeroed first, ends up identical to the source's.
func testTLSStorage(t *testing.T, q *qemulab.QEMU) {
	dir := x509Dir(t, "dst.qmigrate.test")
	var srcImg, dstImg string
	migrateTLS(t, q, "", func(src, dst *qemulab.Instance, cfg *engine.Config) {
		srcImg, dstImg = filepath.Join(src.Dir(), "sweep.img"), filepath.Join(dst.Dir(), "sweep.img")
		st, err := os.Stat(dstImg)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(dstImg, make([]byte, st.Size()), 0o644), "zero the destination's image")
		cfg.Storage = &blockmirror.Config{Disks: []string{"sweep0"}}
		cfg.TLS = &transport.TLS{Dir: dir, Hostname: "dst.qmigrate.test"}
	})
	require.NotEmpty(t, q.Img, "qemu-img (qemulab.FindQEMU) to compare the images")
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, q.Img, "compare", "-U", "-q", srcImg, dstImg).CombinedOutput()
	assert.NoError(t, err, "images differ: %s", out)
}

// A handshake that fails is a failed migration: QEMU's reason in the
// error, the guest still running intact on the source, the credentials
// gone from the source (and from the destination, where it is still up).
func testTLSHandshakeFails(t *testing.T, q *qemulab.QEMU, reason string, tls func(dir string) *transport.TLS, authz ...string) {
	src, dst := enginePair(t, q, 50e6, true, "")
	for _, glob := range authz {
		addAuthz(t, dst, glob)
	}
	cfg := engineConfig(t, src, dst, "tcp:127.0.0.1:0")
	cfg.TLS = tls(x509Dir(t, "127.0.0.1"))
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	res, err := engine.Migrate(ctx, cfg)
	require.Error(t, err)
	t.Logf("%s in %v: %v; undone %q; undo errors %q", res.Status, res.Total, err, res.Undone, res.UndoErrors)
	assert.ErrorIs(t, err, engine.ErrMigrationFailed)
	assert.NotErrorIs(t, err, engine.ErrBadInput, "the credentials loaded: the handshake failed")
	assert.Equal(t, engine.StatusFailed, res.Status)
	assert.False(t, res.StateUnknown)
	if reason != "" {
		assert.Contains(t, err.Error(), reason, "QEMU's reason")
	}
	sourceIntact(t, src)
	assertNoTLSLeft(t, "source", src)
	if !dst.Exited() {
		assertNoTLSLeft(t, "destination", dst)
	}
}

// Credentials a QEMU cannot load are bad input found in prepare: QEMU's
// text names the missing file, and nothing is left changed.
func testTLSMissing(t *testing.T, q *qemulab.QEMU) {
	src, dst := enginePair(t, q, 50e6, true, "")
	cfg := engineConfig(t, src, dst, "tcp:127.0.0.1:0")
	missing := filepath.Join(t.TempDir(), "no-such-pki")
	cfg.TLS = &transport.TLS{Dir: missing}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	before, err := src.QMP.QueryMigrateParameters(ctx)
	require.NoError(t, err)
	res, err := engine.Migrate(ctx, cfg)
	require.Error(t, err)
	t.Logf("%s in %v: %v; undone %q", res.Status, res.Total, err, res.Undone)
	assert.ErrorIs(t, err, engine.ErrBadInput)
	assert.Contains(t, err.Error(), "Unable to access credentials "+missing+"/ca-cert.pem")
	assert.Empty(t, res.UndoErrors)
	st, err := src.QMP.QueryStatus(ctx)
	require.NoError(t, err)
	assert.Equal(t, "running", st.Status, "guest runs on the source")
	info, err := src.QMP.QueryMigrate(ctx)
	require.NoError(t, err)
	assert.Equal(t, qmp.StatusNone, info.Status, "no migration was started")
	_, err = qemulab.CheckSweep(ctx, nil, src.QMP, qemulab.SweepCheckOptions{})
	require.NoError(t, err, "source guest intact")
	assertNoTLSLeft(t, "source", src)
	assertNoTLSLeft(t, "destination", dst)
	after, err := src.QMP.QueryMigrateParameters(ctx)
	require.NoError(t, err)
	assert.Equal(t, *before.MaxBandwidth, *after.MaxBandwidth, "parameters untouched")
	st, err = dst.QMP.QueryStatus(ctx)
	require.NoError(t, err)
	assert.Equal(t, "inmigrate", st.Status, "the destination still waits, reusable")
}
