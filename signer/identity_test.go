package signer

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// testIdentity is the identity of the edge that tests use by default; the
// default test policy lets it use every key for everything but SHA-1.
const testIdentity = "spiffe://test.example/edge/1"

// testPolicyYAML is the default test policy.
const testPolicyYAML = `
rules:
  - name: test-all
    identities: [spiffe://test.example/edge/1]
    keys: ["*"]
    operations: [sign, decrypt]
    schemes: [default]
`

func mustPolicy(tb testing.TB, doc string) *Policy {
	tb.Helper()
	p, err := ParsePolicy("test.yaml", []byte(doc))
	if err != nil {
		tb.Fatalf("ParsePolicy() = %v", err)
	}
	return p
}

func testPolicy(tb testing.TB) *Policy {
	tb.Helper()
	return mustPolicy(tb, testPolicyYAML)
}

// testPKI is a CA with the keyserver's certificate, made once per test
// binary; clientCert issues edge certificates.
type testPKI struct {
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
	pool   *x509.CertPool
	server tls.Certificate
	serial atomic.Int64
}

var thePKI = sync.OnceValue(func() *testPKI {
	key := testECDSAKey(elliptic.P256())
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "signer test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		panic(err)
	}
	ca, _ := x509.ParseCertificate(der)
	p := &testPKI{ca: ca, caKey: key, pool: x509.NewCertPool()}
	p.pool.AddCert(ca)
	p.serial.Store(1)
	p.server = p.issue(x509.ExtKeyUsageServerAuth, "keyserver.test")
	return p
})

// issue returns a certificate and key for names: those with "://" become
// URI SANs, the others DNS SANs.
func (p *testPKI) issue(usage x509.ExtKeyUsage, names ...string) tls.Certificate {
	key := testECDSAKey(elliptic.P256())
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(p.serial.Add(1)),
		Subject:      pkix.Name{CommonName: "signer test leaf"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
	}
	for _, n := range names {
		// A name with "://" is a URI SAN, any other a DNS SAN, unless a
		// "uri:" or "dns:" prefix says otherwise.
		uri := strings.Contains(n, "://")
		if v, ok := strings.CutPrefix(n, "uri:"); ok {
			n, uri = v, true
		} else if v, ok := strings.CutPrefix(n, "dns:"); ok {
			n, uri = v, false
		}
		if !uri {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
			continue
		}
		u, err := url.Parse(n)
		if err != nil {
			panic(err)
		}
		tmpl.URIs = append(tmpl.URIs, u)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, key.Public(), p.caKey)
	if err != nil {
		panic(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

func (p *testPKI) serverTLS() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    p.pool,
		Certificates: []tls.Certificate{p.server},
	}
}

func (p *testPKI) clientTLS(names ...string) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		ServerName:   "keyserver.test",
		RootCAs:      p.pool,
		Certificates: []tls.Certificate{p.issue(x509.ExtKeyUsageClientAuth, names...)},
	}
}

// edgeLeaves caches edgeContext's certificates by their names, so that a
// context with a short deadline is not spent issuing one.
var edgeLeaves sync.Map

// edgeContext returns ctx as a handler sees it for a request from an edge
// whose verified certificate has the given names, for calling handlers
// directly.
func edgeContext(ctx context.Context, names ...string) context.Context {
	key := strings.Join(names, "\x00")
	v, ok := edgeLeaves.Load(key)
	if !ok {
		v, _ = edgeLeaves.LoadOrStore(key, thePKI().issue(x509.ExtKeyUsageClientAuth, names...).Leaf)
	}
	leaf := v.(*x509.Certificate)
	return peer.NewContext(ctx, &peer.Peer{
		Addr: &net.TCPAddr{IP: net.IPv4(192, 0, 2, 7), Port: 40000},
		AuthInfo: credentials.TLSInfo{State: tls.ConnectionState{
			PeerCertificates: []*x509.Certificate{leaf},
			VerifiedChains:   [][]*x509.Certificate{{leaf, thePKI().ca}},
		}},
	})
}

func TestCertificateNames(t *testing.T) {
	leaf := thePKI().issue(x509.ExtKeyUsageClientAuth, "Edge-1.Example.COM.", "spiffe://example.com/edge/1", "b.example.com").Leaf
	got := strings.Join(CertificateNames(leaf), " ")
	if want := "spiffe://example.com/edge/1 edge-1.example.com b.example.com"; got != want {
		t.Errorf("CertificateNames() = %q, want %q (URIs first, DNS names normalized)", got, want)
	}
	// A name of one type never passes for an identity of the other: a DNS
	// SAN shaped like a URI, and a URI SAN without scheme and host, are not
	// names at all.
	leaf = thePKI().issue(x509.ExtKeyUsageClientAuth, "dns:SPIFFE://example.com/edge/1", "uri:edge-1.example.com", "edge-2.example.com").Leaf
	if len(leaf.DNSNames) != 2 || len(leaf.URIs) != 1 {
		t.Fatalf("test certificate has DNS names %q and URIs %v", leaf.DNSNames, leaf.URIs)
	}
	if got, want := strings.Join(CertificateNames(leaf), " "), "edge-2.example.com"; got != want {
		t.Errorf("CertificateNames() = %q, want %q", got, want)
	}
	// URIs: scheme and host in lower case (RFC 3986 makes them
	// case-insensitive), the rest exactly as written.
	leaf = thePKI().issue(x509.ExtKeyUsageClientAuth, "spiffe://Example.COM/Edge/1", "https://User@EDGE.example:8443/A%2Fb?Q=1#F").Leaf
	if got, want := strings.Join(CertificateNames(leaf), " "), "spiffe://example.com/Edge/1 https://User@edge.example:8443/A%2Fb?Q=1#F"; got != want {
		t.Errorf("CertificateNames() = %q, want %q", got, want)
	}
	if CertificateNames(nil) != nil {
		t.Error("CertificateNames(nil) is not nil")
	}
}

func TestIdentify(t *testing.T) {
	p := mustPolicy(t, `
groups:
  eu: [edge-eu-2.example.com, spiffe://example.com/edge/eu-1]
rules:
  - name: eu
    identities: [group:eu, SPIFFE://Example.COM/edge/Mixed]
    keys: ["*"]
    operations: [sign]
    schemes: [default]
`)
	tests := []struct {
		names []string
		want  string
	}{
		{[]string{"spiffe://example.com/edge/eu-1", "edge-eu-2.example.com"}, "spiffe://example.com/edge/eu-1"},
		{[]string{"spiffe://example.com/edge/other", "edge-eu-2.example.com"}, "edge-eu-2.example.com"},
		{[]string{"spiffe://example.com/edge/EU-1"}, ""},   // a URI's path is exact
		{[]string{"spiffe://example.com/edge/eu-1/"}, ""},  // no normalization of the path
		{[]string{"spiffe://example.com/edge/%65u-1"}, ""}, // nor percent-decoding
		{[]string{"spiffe://example.com:443/edge/eu-1"}, ""},
		{[]string{"spiffe://example.com/edge/Mixed"}, "spiffe://example.com/edge/Mixed"},
		{[]string{"edge-eu-3.example.com"}, ""},
		{nil, ""},
	}
	for _, tt := range tests {
		got, ok := p.Identify(tt.names)
		if got != tt.want || ok != (tt.want != "") {
			t.Errorf("Identify(%q) = %q, %t, want %q", tt.names, got, ok, tt.want)
		}
	}
	if got := strings.Join(p.Identities(), " "); got != "edge-eu-2.example.com spiffe://example.com/edge/Mixed spiffe://example.com/edge/eu-1" {
		t.Errorf("Identities() = %q", got)
	}
}

func TestCheckPeer(t *testing.T) {
	svc, err := NewService(Config{Keys: newTestMemoryStore(t), Policy: testPolicy(t)})
	if err != nil {
		t.Fatal(err)
	}
	pki := thePKI()
	if err := svc.CheckPeer(pki.issue(x509.ExtKeyUsageClientAuth, "other.example", testIdentity).Leaf); err != nil {
		t.Errorf("CheckPeer(listed) = %v", err)
	}
	err = svc.CheckPeer(pki.issue(x509.ExtKeyUsageClientAuth, "stranger.example", "spiffe://test.example/edge/2").Leaf)
	if err == nil || !strings.Contains(err.Error(), "stranger.example") || !strings.Contains(err.Error(), "spiffe://test.example/edge/2") {
		t.Errorf("CheckPeer(unlisted) = %v, want an error naming the presented names", err)
	}
	if err := svc.CheckPeer(pki.issue(x509.ExtKeyUsageClientAuth).Leaf); err == nil || !strings.Contains(err.Error(), "no DNS or URI name") {
		t.Errorf("CheckPeer(no names) = %v", err)
	}
}

// TestURIIdentityCase: a URI identity's scheme and host match in any case,
// written in the policy or in the certificate, and its path only exactly:
// what CheckPeer admits in the handshake, the handlers admit too.
func TestURIIdentityCase(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t), Policy: mustPolicy(t, strings.Replace(testPolicyYAML,
		"["+testIdentity+"]", "[SPIFFE://Test.EXAMPLE/edge/1, spiffe://test.example/edge/Upper]", 1))})
	tests := []struct {
		name string
		want bool
	}{
		{"spiffe://test.example/edge/1", true},
		{"spiffe://TEST.example/edge/1", true},
		{"spiffe://test.example/edge/Upper", true},
		{"spiffe://test.example/edge/upper", false},
		{"spiffe://test.example/Edge/1", false},
		{"spiffe://test.example/edge/%31", false},
	}
	for _, tt := range tests {
		leaf := thePKI().issue(x509.ExtKeyUsageClientAuth, tt.name).Leaf
		if err := ts.svc.CheckPeer(leaf); (err == nil) != tt.want {
			t.Errorf("CheckPeer(%s) = %v, want allowed %t", tt.name, err, tt.want)
		}
		if !tt.want {
			continue
		}
		resp, err := ts.dial(t, tt.name).Sign(testContext(t, 0), p256SignRequest(t))
		if err != nil {
			t.Errorf("Sign() as %s = %v", tt.name, err)
			continue
		}
		checkP256Result(t, &keylessv1.OperationResult{Result: &keylessv1.OperationResult_Sign{Sign: resp}})
	}
}

// TestIdentifyConnectionCache checks the per-connection identity cache: a
// request is identified under the policy in force, never under the one
// whose result was cached, and under its own certificate.
func TestIdentifyConnectionCache(t *testing.T) {
	const other = "spiffe://test.example/edge/2"
	polA := testPolicy(t)
	polB := mustPolicy(t, strings.Replace(testPolicyYAML, testIdentity, other, 1))
	cache := &connIdentity{}
	ctxA := context.WithValue(edgeContext(t.Context(), testIdentity), connIdentityKey{}, cache)
	ctxOther := context.WithValue(edgeContext(t.Context(), other), connIdentityKey{}, cache)
	tests := []struct {
		name    string
		ctx     context.Context
		pol     *Policy
		wantID  string
		wantErr bool
	}{
		{"listed", ctxA, polA, testIdentity, false},
		{"listed again (cached)", ctxA, polA, testIdentity, false},
		{"after a reload that removes it", ctxA, polB, testIdentity, true},
		{"removed, again (cached)", ctxA, polB, testIdentity, true},
		{"after a reload that lists it again", ctxA, polA, testIdentity, false},
		{"another certificate on the cache", ctxOther, polA, other, true},
		{"that certificate, listed", ctxOther, polB, other, false},
		{"the first certificate again", ctxA, polB, testIdentity, true},
	}
	for _, tt := range tests {
		c := &call{op: OpSign}
		id, err := identify(tt.ctx, tt.pol, c)
		var perr *PermissionError
		if gotErr := errors.As(err, &perr); gotErr != tt.wantErr || (err != nil && !gotErr) {
			t.Fatalf("%s: identify() = %q, %v; want error %v", tt.name, id, err, tt.wantErr)
		}
		if c.identity != tt.wantID || (!tt.wantErr && id != tt.wantID) {
			t.Errorf("%s: identify() = %q, call identity %q; want %q", tt.name, id, c.identity, tt.wantID)
		}
		if c.edgeAddress != "192.0.2.7:40000" {
			t.Errorf("%s: edge address %q", tt.name, c.edgeAddress)
		}
		if r := cache.last.Load(); r == nil || r.pol != tt.pol {
			t.Errorf("%s: cached result %+v, want one for the policy used", tt.name, r)
		}
	}
}
