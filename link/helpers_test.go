package link

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
	"strings"
	"sync"
	"testing"
	"time"
)

// keyserverName and edgeIdentity are the names of the test PKI's keyserver
// and edge certificates.
const (
	keyserverName = "keyserver.test"
	edgeIdentity  = "edge.test"
)

const defaultTestTimeout = 10 * time.Second

// Test keys, generated once per test binary.
var (
	testRSAKey = sync.OnceValue(func() *rsa.PrivateKey {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			panic(err)
		}
		return k
	})
	testP256Key = sync.OnceValue(func() *ecdsa.PrivateKey { return mustECDSA(elliptic.P256()) })
	testP384Key = sync.OnceValue(func() *ecdsa.PrivateKey { return mustECDSA(elliptic.P384()) })
	testP521Key = sync.OnceValue(func() *ecdsa.PrivateKey { return mustECDSA(elliptic.P521()) })
	testEdKey   = sync.OnceValue(func() ed25519.PrivateKey {
		_, k, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			panic(err)
		}
		return k
	})
)

func mustECDSA(c elliptic.Curve) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		panic(err)
	}
	return k
}

// testCA is an in-memory certificate authority.
type testCA struct {
	cert *x509.Certificate
	key  crypto.Signer
	pool *x509.CertPool
}

func newTestCA(t testing.TB, name string) *testCA {
	t.Helper()
	key := mustECDSA(elliptic.P256())
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
	return &testCA{cert: cert, key: key, pool: pool}
}

// leafOptions describe a certificate to issue.
type leafOptions struct {
	names     []string
	client    bool // client auth rather than server auth
	ca        bool // an intermediate CA
	notBefore time.Time
	notAfter  time.Time
}

var serial struct {
	sync.Mutex
	n int64
}

func (ca *testCA) issue(t testing.TB, pub crypto.PublicKey, o leafOptions) *x509.Certificate {
	t.Helper()
	serial.Lock()
	serial.n++
	sn := serial.n + 1
	serial.Unlock()
	if o.notBefore.IsZero() {
		o.notBefore = time.Now().Add(-time.Hour)
	}
	if o.notAfter.IsZero() {
		o.notAfter = time.Now().Add(24 * time.Hour)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(sn),
		Subject:      pkix.Name{CommonName: "test leaf"},
		DNSNames:     o.names,
		NotBefore:    o.notBefore,
		NotAfter:     o.notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if _, ok := pub.(*rsa.PublicKey); ok {
		tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
	}
	if o.client {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	if o.ca {
		tmpl.KeyUsage, tmpl.ExtKeyUsage = x509.KeyUsageCertSign, nil
		tmpl.BasicConstraintsValid, tmpl.IsCA = true, true
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

func certPEM(certs ...*x509.Certificate) []byte {
	var b bytes.Buffer
	for _, c := range certs {
		pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return b.Bytes()
}

func keyPEM(t testing.TB, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func writeFile(t testing.TB, dir, name string, data ...[]byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, bytes.Join(data, nil), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// testPKI holds the mTLS files of a keyserver and an edge, all from one CA,
// which also issues the edge's web certificates.
type testPKI struct {
	ca                                     *testCA
	serverCert, serverKey                  string
	clientCert, clientKey, caFile, fileDir string
}

func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	dir := t.TempDir()
	ca := newTestCA(t, "Test CA")
	sk, ck := mustECDSA(elliptic.P256()), mustECDSA(elliptic.P256())
	return &testPKI{
		ca:         ca,
		fileDir:    dir,
		caFile:     writeFile(t, dir, "ca.pem", certPEM(ca.cert)),
		serverCert: writeFile(t, dir, "server.pem", certPEM(ca.issue(t, sk.Public(), leafOptions{names: []string{keyserverName}}))),
		serverKey:  writeFile(t, dir, "server.key", keyPEM(t, sk)),
		clientCert: writeFile(t, dir, "client.pem", certPEM(ca.issue(t, ck.Public(), leafOptions{client: true, names: []string{edgeIdentity}}))),
		clientKey:  writeFile(t, dir, "client.key", keyPEM(t, ck)),
	}
}

// handshakeResult is what runHandshake saw.
type handshakeResult struct {
	state     tls.ConnectionState // the client's
	clientErr error
	serverErr error
	elapsed   time.Duration
}

// runHandshake performs one TLS handshake over loopback TCP between a
// crypto/tls client with cc and a server with sc, then the server sends a
// line the client reads (which also delivers TLS 1.3 session tickets).
// serverCtx, if not nil, is the server's handshake context.
func runHandshake(t *testing.T, sc, cc *tls.Config, serverCtx context.Context) handshakeResult {
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
		c.SetDeadline(time.Now().Add(defaultTestTimeout))
		tc := tls.Server(c, sc)
		if err := tc.HandshakeContext(serverCtx); err != nil {
			serverErr <- err
			return
		}
		_, err = tc.Write([]byte("hello\n"))
		serverErr <- err
	}()

	start := time.Now()
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: defaultTestTimeout}, Config: cc}
	ctx, cancel := context.WithTimeout(t.Context(), defaultTestTimeout)
	defer cancel()
	var r handshakeResult
	conn, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	if err == nil {
		tc := conn.(*tls.Conn)
		tc.SetDeadline(time.Now().Add(defaultTestTimeout))
		buf := make([]byte, 6)
		if _, err = tc.Read(buf); err == nil && string(buf) != "hello\n" {
			t.Errorf("client read %q, want %q", buf, "hello\n")
		}
		r.state = tc.ConnectionState()
		conn.Close()
	}
	r.clientErr = err
	r.elapsed = time.Since(start)
	select {
	case r.serverErr = <-serverErr:
	case <-time.After(defaultTestTimeout):
		t.Fatal("the TLS server did not finish its handshake")
	}
	return r
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
