package qemulab

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// File names QEMU's tls-creds-x509 object reads from its dir, and the file
// its tls-creds-psk object reads.
const (
	X509CACertFile     = "ca-cert.pem"
	X509ServerCertFile = "server-cert.pem"
	X509ServerKeyFile  = "server-key.pem"
	X509ClientCertFile = "client-cert.pem"
	X509ClientKeyFile  = "client-key.pem"
	PSKFile            = "keys.psk"
)

// X509ClientCN is the common name of the client certificate WriteX509Creds
// writes (the identity a tls-authz object on the server would match).
const X509ClientCN = "qmigrate-client"

// x509Validity is how long the certificates of WriteX509Creds stay valid;
// they start an hour in the past to tolerate clock skew.
const x509Validity = 30 * 24 * time.Hour

// WriteX509Creds creates a fresh certificate authority and writes, in dir
// (created with mode 0700 when missing), the files of a QEMU tls-creds-x509
// object for both endpoints: ca-cert.pem, server-cert.pem, server-key.pem,
// client-cert.pem and client-key.pem. Keys are ECDSA P-256 (SEC1 "EC PRIVATE
// KEY" PEM, mode 0600); certificates are mode 0644.
//
// The server certificate names every host as a subject alternative name (an
// IP literal, brackets allowed, as an IP SAN; anything else as a DNS SAN) and
// has the first host as its common name; it is for ServerAuth. The client
// certificate has the common name X509ClientCN and is for ClientAuth. The
// certificates pass the sanity checks QEMU runs at object-add (CA with
// critical BasicConstraints CA:true and KeyUsage CertSign; leaves with
// KeyUsage DigitalSignature|KeyEncipherment), are valid from an hour ago for
// 30 days, and chain to the CA only: calling WriteX509Creds on two folders
// yields two independent authorities, handy for negative tests.
//
// At least one host is required.
func WriteX509Creds(dir string, hosts ...string) error {
	if len(hosts) == 0 {
		return errors.New("qemulab: x509 creds: no hosts")
	}
	var dnsNames []string
	var ips []net.IP
	for _, h := range hosts {
		if h == "" {
			return errors.New("qemulab: x509 creds: empty host")
		}
		if ip := net.ParseIP(strings.TrimSuffix(strings.TrimPrefix(h, "["), "]")); ip != nil {
			ips = append(ips, ip)
		} else {
			dnsNames = append(dnsNames, h)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("qemulab: x509 creds: %w", err)
	}
	now := time.Now()
	notBefore, notAfter := now.Add(-time.Hour), now.Add(x509Validity)

	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("qemulab: x509 creds: %w", err)
	}
	caTmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "qmigrate test CA", Organization: []string{"qmigrate"}},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		IsCA:                  true,
		BasicConstraintsValid: true, // marshalled critical
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, caCert, err := signCert(caTmpl, nil, caKey.Public(), caKey)
	if err != nil {
		return fmt.Errorf("qemulab: x509 creds: CA: %w", err)
	}
	if err := writePEM(filepath.Join(dir, X509CACertFile), "CERTIFICATE", caDER, 0o644); err != nil {
		return err
	}

	leaves := []struct {
		certFile, keyFile string
		tmpl              *x509.Certificate
	}{
		{X509ServerCertFile, X509ServerKeyFile, &x509.Certificate{
			Subject:     pkix.Name{CommonName: hosts[0], Organization: []string{"qmigrate"}},
			DNSNames:    dnsNames,
			IPAddresses: ips,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		}},
		{X509ClientCertFile, X509ClientKeyFile, &x509.Certificate{
			Subject:     pkix.Name{CommonName: X509ClientCN, Organization: []string{"qmigrate"}},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}},
	}
	for _, l := range leaves {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return fmt.Errorf("qemulab: x509 creds: %w", err)
		}
		l.tmpl.NotBefore, l.tmpl.NotAfter = notBefore, notAfter
		l.tmpl.BasicConstraintsValid = true // CA:false
		// Go marks KeyUsage critical; GnuTLS then wants both bits.
		l.tmpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
		der, _, err := signCert(l.tmpl, caCert, key.Public(), caKey)
		if err != nil {
			return fmt.Errorf("qemulab: x509 creds: %s: %w", l.certFile, err)
		}
		keyDER, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			return fmt.Errorf("qemulab: x509 creds: %s: %w", l.keyFile, err)
		}
		if err := writePEM(filepath.Join(dir, l.keyFile), "EC PRIVATE KEY", keyDER, 0o600); err != nil {
			return err
		}
		if err := writePEM(filepath.Join(dir, l.certFile), "CERTIFICATE", der, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// signCert gives tmpl a random serial number and signs it with signer, as
// a self-signed certificate when parent is nil.
func signCert(tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) ([]byte, *x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, err
	}
	tmpl.SerialNumber = serial.Add(serial, big.NewInt(1)) // positive, non-zero
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	return der, cert, nil
}

// WritePSKCreds writes, in dir (created with mode 0700 when missing), the
// keys.psk file of a QEMU tls-creds-psk object: one line "username:hexkey"
// with a fresh random 32-byte key in lower-case hex, mode 0600. Both ends of a
// PSK session need the same file: copy it, or point both objects at one dir.
// The username must be non-empty and free of ':' and line breaks; QEMU's
// client endpoint defaults to "qemu".
func WritePSKCreds(dir, username string) error {
	if username == "" || strings.ContainsAny(username, ":\r\n") {
		return fmt.Errorf("qemulab: psk creds: invalid username %q", username)
	}
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return fmt.Errorf("qemulab: psk creds: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("qemulab: psk creds: %w", err)
	}
	line := username + ":" + hex.EncodeToString(key) + "\n"
	return writeFileMode(filepath.Join(dir, PSKFile), []byte(line), 0o600)
}

func writePEM(path, blockType string, der []byte, mode os.FileMode) error {
	return writeFileMode(path, pem.EncodeToMemory(&pem.Block{Type: blockType, Bytes: der}), mode)
}

// writeFileMode writes data to path and sets mode even when the file existed.
func writeFileMode(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return fmt.Errorf("qemulab: %w", err)
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return fmt.Errorf("qemulab: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("qemulab: write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("qemulab: write %s: %w", path, err)
	}
	return nil
}
