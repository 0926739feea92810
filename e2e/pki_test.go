package e2e

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// testCA is a certificate authority made for one test run.
type testCA struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func newTestCA(t testing.TB, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key}
}

// issue returns a certificate for pub with the given DNS and URI names.
func (ca *testCA) issue(t testing.TB, pub crypto.PublicKey, usage x509.ExtKeyUsage, dns []string, uris ...string) *x509.Certificate {
	t.Helper()
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "e2e"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		DNSNames:     dns,
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	if len(dns) > 0 {
		tmpl.Subject.CommonName = dns[0]
	}
	for _, u := range uris {
		pu, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func (ca *testCA) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// writeCert writes certificates as PEM to dir/name and returns the path.
func writeCert(t testing.TB, dir, name string, certs ...*x509.Certificate) string {
	t.Helper()
	var b []byte
	for _, c := range certs {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// writeKey writes a private key as PKCS #8 PEM to dir/name, mode 0600.
func writeKey(t testing.TB, dir, name string, key crypto.Signer) string {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// linkPKI is the mutual-TLS PKI of the edge–keyserver link, as files.
type linkPKI struct {
	ca                    *testCA
	caFile                string
	serverCert, serverKey string
	edgeCert, edgeKey     string
	serverName            string
}

func newLinkPKI(t testing.TB) *linkPKI {
	t.Helper()
	return newLinkPKIIn(t, t.TempDir())
}

// newLinkPKIIn is newLinkPKI with its files in dir, for a fixture that
// outlives the test that makes it.
func newLinkPKIIn(t testing.TB, dir string) *linkPKI {
	t.Helper()
	ca := newTestCA(t, "e2e link CA")
	p := &linkPKI{ca: ca, caFile: writeCert(t, dir, "ca.pem", ca.cert), serverName: "keyserver.e2e.internal"}
	skey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p.serverCert = writeCert(t, dir, "keyserver.pem", ca.issue(t, skey.Public(), x509.ExtKeyUsageServerAuth, []string{p.serverName}))
	p.serverKey = writeKey(t, dir, "keyserver.key", skey)
	ekey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p.edgeCert = writeCert(t, dir, "edge.pem", ca.issue(t, ekey.Public(), x509.ExtKeyUsageClientAuth, []string{"edge.e2e.internal"}, "spiffe://e2e.internal/edge/1"))
	p.edgeKey = writeKey(t, dir, "edge.key", ekey)
	return p
}
