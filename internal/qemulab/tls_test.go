package qemulab

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	blk, rest := pem.Decode(b)
	require.NotNil(t, blk, path)
	require.Equal(t, "CERTIFICATE", blk.Type)
	require.Empty(t, rest)
	c, err := x509.ParseCertificate(blk.Bytes)
	require.NoError(t, err)
	return c
}

func TestTLSWriteX509Creds(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "creds") // created by WriteX509Creds
	hosts := []string{"qmigrate.test", "127.0.0.1", "[::1]", "dst.example"}
	require.NoError(t, WriteX509Creds(dir, hosts...))

	for _, f := range []string{X509ServerKeyFile, X509ClientKeyFile} {
		st, err := os.Stat(filepath.Join(dir, f))
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o600), st.Mode().Perm(), f)
	}
	for _, pair := range [][2]string{{X509ServerCertFile, X509ServerKeyFile}, {X509ClientCertFile, X509ClientKeyFile}} {
		_, err := tls.LoadX509KeyPair(filepath.Join(dir, pair[0]), filepath.Join(dir, pair[1]))
		require.NoError(t, err, "key pair %v", pair)
	}

	ca := readCert(t, filepath.Join(dir, X509CACertFile))
	assert.True(t, ca.IsCA)
	assert.True(t, ca.BasicConstraintsValid)
	assert.NotZero(t, ca.KeyUsage&x509.KeyUsageCertSign)
	roots := x509.NewCertPool()
	roots.AddCert(ca)

	srv := readCert(t, filepath.Join(dir, X509ServerCertFile))
	assert.Equal(t, "qmigrate.test", srv.Subject.CommonName)
	assert.False(t, srv.IsCA)
	assert.Equal(t, x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment, srv.KeyUsage)
	assert.Equal(t, []string{"qmigrate.test", "dst.example"}, srv.DNSNames)
	assert.Len(t, srv.IPAddresses, 2)
	assert.True(t, srv.NotBefore.Before(time.Now().Add(-30*time.Minute)))
	assert.True(t, srv.NotAfter.After(time.Now().Add(24*time.Hour)))
	for _, h := range []string{"qmigrate.test", "127.0.0.1", "::1", "dst.example"} {
		_, err := srv.Verify(x509.VerifyOptions{DNSName: h, Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
		assert.NoError(t, err, "server cert for %s", h)
	}
	_, err := srv.Verify(x509.VerifyOptions{DNSName: "wrong.example", Roots: roots})
	assert.Error(t, err, "server cert must not match another name")
	_, err = srv.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	assert.Error(t, err, "server cert is not for client auth")

	cli := readCert(t, filepath.Join(dir, X509ClientCertFile))
	assert.Equal(t, X509ClientCN, cli.Subject.CommonName)
	assert.Equal(t, x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment, cli.KeyUsage)
	_, err = cli.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	assert.NoError(t, err)

	// A second call makes an independent CA.
	other := t.TempDir()
	require.NoError(t, WriteX509Creds(other, "127.0.0.1"))
	otherRoots := x509.NewCertPool()
	otherRoots.AddCert(readCert(t, filepath.Join(other, X509CACertFile)))
	_, err = srv.Verify(x509.VerifyOptions{DNSName: "127.0.0.1", Roots: otherRoots})
	assert.Error(t, err)

	assert.Error(t, WriteX509Creds(t.TempDir()))
}

func TestTLSWritePSKCreds(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, WritePSKCreds(dir, "qemu"))
	p := filepath.Join(dir, PSKFile)
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	assert.Regexp(t, regexp.MustCompile(`\Aqemu:[0-9a-f]{64}\n\z`), string(b))
	st, err := os.Stat(p)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())

	// Rewriting makes a new key and keeps the mode.
	require.NoError(t, os.Chmod(p, 0o644))
	require.NoError(t, WritePSKCreds(dir, "qemu"))
	b2, err := os.ReadFile(p)
	require.NoError(t, err)
	assert.NotEqual(t, b, b2)
	st, err = os.Stat(p)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())

	for _, bad := range []string{"", "a:b", "a\nb"} {
		assert.Error(t, WritePSKCreds(dir, bad), "%q", bad)
	}
}
