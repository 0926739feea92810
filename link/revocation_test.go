package link

import (
	"context"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"math/big"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/keyless-tls/keyless/internal/pkitest"
)

// crlServer is a gRPC health server behind a keyserver's credentials, on
// loopback TCP.
type crlServer struct {
	pki    *pkitest.MTLS
	creds  *MTLSCredentials
	addr   string
	logs   *syncBuffer
	mu     sync.Mutex
	closed map[string]int // reason -> connections closed
}

func newCRLServer(t *testing.T) *crlServer {
	t.Helper()
	s := &crlServer{pki: pkitest.NewMTLS(t, keyserverName, edgeIdentity), logs: &syncBuffer{}, closed: map[string]int{}}
	var err error
	if s.creds, err = LoadMTLSCredentials(s.pki.ServerCert, s.pki.ServerKey, s.pki.CAFile); err != nil {
		t.Fatal(err)
	}
	obs := HandshakeObserver{Closed: func(reason string) { s.mu.Lock(); s.closed[reason]++; s.mu.Unlock() }}
	srv := grpc.NewServer(grpc.Creds(s.creds.ServerCredentials(nil, hclog.New(&hclog.LoggerOptions{Output: s.logs}), obs)))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = ln.Addr().String()
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return s
}

func (s *crlServer) closedFor(reason string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed[reason]
}

// client issues a client certificate valid until notAfter (zero: a day)
// and returns its leaf and a connection with it.
func (s *crlServer) client(t *testing.T, notAfter time.Time) (*x509.Certificate, *grpc.ClientConn) {
	t.Helper()
	k := pkitest.MustECDSA(elliptic.P256())
	leaf := s.pki.CA.Issue(t, k.Public(), pkitest.LeafOptions{Client: true, Names: []string{edgeIdentity}, NotAfter: notAfter})
	dir := t.TempDir()
	cfg, err := ClientMTLSConfig(pkitest.WriteFile(t, dir, "c.pem", pkitest.CertPEM(leaf)), pkitest.WriteFile(t, dir, "c.key", pkitest.KeyPEM(t, k)), s.pki.CAFile, keyserverName)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("passthrough:///"+s.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return leaf, conn
}

func check(t *testing.T, conn *grpc.ClientConn) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), defaultTestTimeout)
	defer cancel()
	_, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	return err
}

// writeCRL writes a PEM CRL of ca revoking the serials of certs.
func writeCRL(t *testing.T, ca *pkitest.CA, nextUpdate time.Time, der bool, certs ...*x509.Certificate) string {
	t.Helper()
	tmpl := &x509.RevocationList{Number: big.NewInt(time.Now().UnixNano()), ThisUpdate: time.Now().Add(-time.Hour), NextUpdate: nextUpdate}
	for _, c := range certs {
		tmpl.RevokedCertificateEntries = append(tmpl.RevokedCertificateEntries, x509.RevocationListEntry{SerialNumber: c.SerialNumber, RevocationTime: time.Now()})
	}
	b, err := x509.CreateRevocationList(rand.Reader, tmpl, ca.Cert, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	if der {
		return pkitest.WriteFile(t, t.TempDir(), "crl.der", b)
	}
	return pkitest.WriteFile(t, t.TempDir(), "crl.pem", pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: b}))
}

// waitFor polls cond until it holds or the test's timeout passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(defaultTestTimeout); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// TestClientCRL checks that a CRL refuses a revoked edge in the handshake
// and closes its established connections at once, without touching other
// edges, and that a CRL that is not the client CA's is refused.
func TestClientCRL(t *testing.T) {
	s := newCRLServer(t)
	a, connA := s.client(t, time.Time{})
	b, connB := s.client(t, time.Time{})
	for _, c := range []*grpc.ClientConn{connA, connB} {
		if err := check(t, c); err != nil {
			t.Fatalf("Check() before any CRL = %v", err)
		}
	}

	crl := writeCRL(t, s.pki.CA, time.Now().Add(24*time.Hour), false, a)
	if err := s.creds.SetClientCRLs(crl); err != nil {
		t.Fatalf("SetClientCRLs() = %v", err)
	}
	if !s.creds.Revoked(a) || s.creds.Revoked(b) {
		t.Errorf("Revoked(a), Revoked(b) = %t, %t, want true, false", s.creds.Revoked(a), s.creds.Revoked(b))
	}
	waitFor(t, "the revoked connection to close", func() bool { return s.closedFor("revoked") == 1 })
	if err := check(t, connA); status.Code(err) != codes.Unavailable {
		t.Errorf("Check() of the revoked edge = %v, want Unavailable", err)
	}
	if err := check(t, connB); err != nil {
		t.Errorf("Check() of the other edge = %v", err)
	}
	// The client reconnects after a backoff; its handshake is refused.
	waitFor(t, "the refusal to be logged", func() bool {
		check(t, connA)
		return strings.Contains(s.logs.String(), ErrRevoked.Error())
	})

	// Broken CRLs are refused and the previous one stays.
	other := pkitest.NewCA(t, "Other CA")
	for name, file := range map[string]string{
		"another CA's": writeCRL(t, other, time.Now().Add(time.Hour), false, b),
		"not a CRL":    pkitest.WriteFile(t, t.TempDir(), "x.pem", pkitest.CertPEM(b)),
		"garbage":      pkitest.WriteFile(t, t.TempDir(), "x.der", []byte("garbage")),
		"missing":      t.TempDir() + "/none.pem",
	} {
		if err := s.creds.SetClientCRLs(file); err == nil || !strings.Contains(err.Error(), "CRL") {
			t.Errorf("SetClientCRLs(%s) = %v, want an error naming the CRL", name, err)
		}
	}
	if !s.creds.Revoked(a) || s.creds.Revoked(b) {
		t.Error("a refused CRL changed what is revoked")
	}

	// Reload reads the files again: a DER CRL that now revokes b too, and
	// has expired, which is reported but used.
	expired := writeCRL(t, s.pki.CA, time.Now().Add(-time.Minute), true, a, b)
	if err := s.creds.SetClientCRLs(crl, expired); err != nil {
		t.Fatalf("SetClientCRLs(PEM, expired DER) = %v", err)
	}
	waitFor(t, "the second revoked connection to close", func() bool { return s.closedFor("revoked") == 2 })
	if got := s.creds.ExpiredClientCRLs(time.Now()); len(got) != 1 || got[0] != expired {
		t.Errorf("ExpiredClientCRLs() = %v, want [%s]", got, expired)
	}
	if err := s.creds.Reload(); err != nil {
		t.Fatalf("Reload() = %v", err)
	}
	if !s.creds.Revoked(b) {
		t.Error("Reload() dropped the CRLs")
	}
}

// TestConnectionEndsWithCertificate checks that an established connection
// is closed when its client certificate expires.
func TestConnectionEndsWithCertificate(t *testing.T) {
	s := newCRLServer(t)
	_, conn := s.client(t, time.Now().Add(1500*time.Millisecond))
	if err := check(t, conn); err != nil {
		t.Fatalf("Check() before expiry = %v", err)
	}
	waitFor(t, "the expired connection to close", func() bool { return s.closedFor("expired") == 1 })
	if err := check(t, conn); status.Code(err) != codes.Unavailable {
		t.Errorf("Check() after expiry = %v, want Unavailable", err)
	}
}
