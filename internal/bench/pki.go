package bench

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"
)

// ca is a certificate authority made for one bench run.
type ca struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func newCA(name string) (*ca, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(7 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("bench: CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &ca{cert: cert, key: key}, nil
}

// issue returns a certificate for pub with the DNS and URI names given.
func (c *ca) issue(pub crypto.PublicKey, usage x509.ExtKeyUsage, dns []string, uris ...string) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "keyless-bench"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(7 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		DNSNames:     dns,
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	if _, ok := pub.(*rsa.PublicKey); ok {
		tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
	}
	if len(dns) > 0 {
		tmpl.Subject.CommonName = dns[0]
	}
	for _, u := range uris {
		pu, err := url.Parse(u)
		if err != nil {
			return nil, err
		}
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, pub, c.key)
	if err != nil {
		return nil, fmt.Errorf("bench: issue certificate for %v: %w", dns, err)
	}
	return x509.ParseCertificate(der)
}

// writeCerts writes certificates as PEM to path.
func writeCerts(path string, certs ...*x509.Certificate) error {
	var b []byte
	for _, c := range certs {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return os.WriteFile(path, b, 0o644)
}

// writeKey writes a private key as PKCS #8 PEM to path, mode 0600.
func writeKey(path string, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
}

// readPublicKey reads a PEM "PUBLIC KEY" (as keyserver keys export prints).
func readPublicKey(data []byte) (crypto.PublicKey, error) {
	for rest := data; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			return nil, errors.New("bench: no PUBLIC KEY PEM block")
		}
		if b.Type == "PUBLIC KEY" {
			return x509.ParsePKIXPublicKey(b.Bytes)
		}
	}
}

// linkPKI is the mutual-TLS PKI of the edge–keyserver link, as files. The
// bench's keyops client and its edges share one client certificate.
type linkPKI struct {
	caFile                string
	serverCert, serverKey string
	clientCert, clientKey string
	serverName            string
	clientIdentity        string // the URI name of the client certificate
	ca                    *ca    // issues more client certificates (fleet.go)
}

const (
	linkServerName     = "keyserver.bench.internal"
	linkClientDNS      = "edge.bench.internal"
	linkClientIdentity = "spiffe://bench.internal/edge"
)

func newLinkPKI(dir string) (*linkPKI, error) {
	c, err := newCA("keyless-bench link CA")
	if err != nil {
		return nil, err
	}
	p := &linkPKI{
		caFile:         filepath.Join(dir, "link-ca.pem"),
		serverCert:     filepath.Join(dir, "keyserver.pem"),
		serverKey:      filepath.Join(dir, "keyserver.key"),
		clientCert:     filepath.Join(dir, "edge.pem"),
		clientKey:      filepath.Join(dir, "edge.key"),
		serverName:     linkServerName,
		clientIdentity: linkClientIdentity,
		ca:             c,
	}
	if err := writeCerts(p.caFile, c.cert); err != nil {
		return nil, err
	}
	for _, e := range []struct {
		cert, key string
		usage     x509.ExtKeyUsage
		dns       []string
		uris      []string
	}{
		{p.serverCert, p.serverKey, x509.ExtKeyUsageServerAuth, []string{linkServerName}, nil},
		{p.clientCert, p.clientKey, x509.ExtKeyUsageClientAuth, []string{linkClientDNS}, []string{linkClientIdentity}},
	} {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		cert, err := c.issue(key.Public(), e.usage, e.dns, e.uris...)
		if err != nil {
			return nil, err
		}
		if err := writeCerts(e.cert, cert); err != nil {
			return nil, err
		}
		if err := writeKey(e.key, key); err != nil {
			return nil, err
		}
	}
	return p, nil
}
