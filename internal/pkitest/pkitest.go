// Package pkitest is an in-memory public-key infrastructure for tests only:
// a certificate authority that lives in memory, leaf and intermediate
// certificates issued with names, client or server use, a CA flag and a
// validity window, PEM encoding, the mTLS files of a keyserver and an edge
// written to a [testing.TB.TempDir], and one real TLS handshake over
// loopback TCP to exercise them.
//
// Only _test.go files import it. Every function that can fail takes a
// [testing.TB] and ends the test with t.Fatal, so callers need no error
// checks. Nothing here is fit for production: keys are generated in
// memory, written to files unencrypted, and the CAs trust nothing else.
package pkitest

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// timeout bounds each step of [Handshake].
const timeout = 10 * time.Second

// Keys generated once per test binary: RSA keys are slow to make, and
// tests that share one lose nothing.
var (
	rsaKey = sync.OnceValue(func() *rsa.PrivateKey {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			panic(err)
		}
		return k
	})
	p256Key = sync.OnceValue(func() *ecdsa.PrivateKey { return MustECDSA(elliptic.P256()) })
	p384Key = sync.OnceValue(func() *ecdsa.PrivateKey { return MustECDSA(elliptic.P384()) })
	p521Key = sync.OnceValue(func() *ecdsa.PrivateKey { return MustECDSA(elliptic.P521()) })
	edKey   = sync.OnceValue(func() ed25519.PrivateKey {
		_, k, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			panic(err)
		}
		return k
	})
)

// RSAKey returns the test binary's 2048-bit RSA key, made on first use.
func RSAKey() *rsa.PrivateKey { return rsaKey() }

// P256Key returns the test binary's ECDSA P-256 key, made on first use.
func P256Key() *ecdsa.PrivateKey { return p256Key() }

// P384Key returns the test binary's ECDSA P-384 key, made on first use.
func P384Key() *ecdsa.PrivateKey { return p384Key() }

// P521Key returns the test binary's ECDSA P-521 key, made on first use.
func P521Key() *ecdsa.PrivateKey { return p521Key() }

// Ed25519Key returns the test binary's Ed25519 key, made on first use.
func Ed25519Key() ed25519.PrivateKey { return edKey() }

// MustECDSA returns a new ECDSA key on curve c. It panics if the system's
// random source fails, which leaves a test nothing to do.
func MustECDSA(c elliptic.Curve) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		panic(err)
	}
	return k
}

// CA is an in-memory certificate authority with a P-256 key. Its fields are
// set by [NewCA] and must not be changed; Issue is safe for concurrent use.
type CA struct {
	Cert *x509.Certificate // the self-signed CA certificate
	Key  crypto.Signer     // the key that signs what the CA issues
	Pool *x509.CertPool    // a pool holding Cert alone, for RootCAs or ClientCAs
}

// NewCA returns a new self-signed CA whose subject's common name is name,
// valid from an hour ago for a day, allowed to sign certificates and CRLs.
// Its serial number is 1.
func NewCA(t testing.TB, name string) *CA {
	t.Helper()
	key := MustECDSA(elliptic.P256())
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &CA{Cert: cert, Key: key, Pool: pool}
}

// LeafOptions describe a certificate for [CA.Issue] to make. The zero value
// asks for a server certificate with no names, valid from an hour ago for
// a day.
type LeafOptions struct {
	Names     []string  // DNS names
	Client    bool      // client auth rather than server auth
	CA        bool      // an intermediate CA, which may sign certificates only
	NotBefore time.Time // zero means an hour ago
	NotAfter  time.Time // zero means a day from now
}

// serial numbers the certificates CAs issue, across all CAs of the test
// binary, from 2 up (every CA's own certificate is 1).
var serial atomic.Int64

// Issue returns a certificate for pub signed by ca, as o describes, with
// the common name "test leaf". A leaf may sign (digital signature), and an
// RSA leaf may also be used for RSA key exchange (key encipherment).
func (ca *CA) Issue(t testing.TB, pub crypto.PublicKey, o LeafOptions) *x509.Certificate {
	t.Helper()
	sn := serial.Add(1) + 1
	if o.NotBefore.IsZero() {
		o.NotBefore = time.Now().Add(-time.Hour)
	}
	if o.NotAfter.IsZero() {
		o.NotAfter = time.Now().Add(24 * time.Hour)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(sn),
		Subject:      pkix.Name{CommonName: "test leaf"},
		DNSNames:     o.Names,
		NotBefore:    o.NotBefore,
		NotAfter:     o.NotAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if _, ok := pub.(*rsa.PublicKey); ok {
		tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
	}
	if o.Client {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	if o.CA {
		tmpl.KeyUsage, tmpl.ExtKeyUsage = x509.KeyUsageCertSign, nil
		tmpl.BasicConstraintsValid, tmpl.IsCA = true, true
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// CertPEM returns certs as consecutive PEM CERTIFICATE blocks, in order.
func CertPEM(certs ...*x509.Certificate) []byte {
	var b bytes.Buffer
	for _, c := range certs {
		pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return b.Bytes()
}

// KeyPEM returns key as an unencrypted PKCS #8 PEM PRIVATE KEY block.
func KeyPEM(t testing.TB, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// WriteFile writes the concatenation of data to dir/name with mode 0600
// and returns its path.
func WriteFile(t testing.TB, dir, name string, data ...[]byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, bytes.Join(data, nil), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// MTLS holds the files of a keyserver's and an edge's mutual TLS, all
// issued by one CA, which tests may also use to issue other certificates.
// The fields are paths in Dir, a [testing.TB.TempDir].
type MTLS struct {
	CA                    *CA
	Dir                   string // the folder holding the files
	CAFile                string // the CA certificate, PEM
	ServerCert, ServerKey string // the keyserver's certificate (server auth) and key, PEM
	ClientCert, ClientKey string // the edge's certificate (client auth) and key, PEM
}

// NewMTLS makes a CA named "Test CA", a P-256 server certificate for
// serverName and a P-256 client certificate for clientName, and writes
// them to ca.pem, server.pem, server.key, client.pem and client.key in a
// new temporary folder.
func NewMTLS(t testing.TB, serverName, clientName string) *MTLS {
	t.Helper()
	dir := t.TempDir()
	ca := NewCA(t, "Test CA")
	sk, ck := MustECDSA(elliptic.P256()), MustECDSA(elliptic.P256())
	return &MTLS{
		CA:         ca,
		Dir:        dir,
		CAFile:     WriteFile(t, dir, "ca.pem", CertPEM(ca.Cert)),
		ServerCert: WriteFile(t, dir, "server.pem", CertPEM(ca.Issue(t, sk.Public(), LeafOptions{Names: []string{serverName}}))),
		ServerKey:  WriteFile(t, dir, "server.key", KeyPEM(t, sk)),
		ClientCert: WriteFile(t, dir, "client.pem", CertPEM(ca.Issue(t, ck.Public(), LeafOptions{Client: true, Names: []string{clientName}}))),
		ClientKey:  WriteFile(t, dir, "client.key", KeyPEM(t, ck)),
	}
}

// HandshakeResult is what [Handshake] saw.
type HandshakeResult struct {
	State     tls.ConnectionState // the client's
	ClientErr error               // from the client's dial, handshake or read
	ServerErr error               // from the server's handshake or write
	Elapsed   time.Duration       // from the client's dial to the end of its read
}

// Handshake performs one TLS handshake over loopback TCP between a
// crypto/tls client with cc and a server with sc, then the server sends a
// line the client reads (which also delivers TLS 1.3 session tickets).
// serverCtx, if not nil, is the server's handshake context. Each end gives
// up after ten seconds; the listener is closed before Handshake returns.
func Handshake(t *testing.T, sc, cc *tls.Config, serverCtx context.Context) HandshakeResult {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if serverCtx == nil {
		serverCtx = t.Context()
	}
	serverErr := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			serverErr <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(timeout))
		tc := tls.Server(c, sc)
		if err := tc.HandshakeContext(serverCtx); err != nil {
			serverErr <- err
			return
		}
		_, err = tc.Write([]byte("hello\n"))
		serverErr <- err
	}()

	start := time.Now()
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: timeout}, Config: cc}
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	var r HandshakeResult
	conn, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	if err == nil {
		tc := conn.(*tls.Conn)
		tc.SetDeadline(time.Now().Add(timeout))
		buf := make([]byte, 6)
		if _, err = tc.Read(buf); err == nil && string(buf) != "hello\n" {
			t.Errorf("client read %q, want %q", buf, "hello\n")
		}
		r.State = tc.ConnectionState()
		conn.Close()
	}
	r.ClientErr = err
	r.Elapsed = time.Since(start)
	select {
	case r.ServerErr = <-serverErr:
	case <-time.After(timeout):
		t.Fatal("the TLS server did not finish its handshake")
	}
	return r
}
