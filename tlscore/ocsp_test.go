package tlscore

import (
	"crypto"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/crypto/ocsp"

	"github.com/keyless-tls/keyless/internal/pkitest"
)

// ocspLeaf issues a certificate for the P-256 test key naming responder
// as its OCSP responder.
func ocspLeaf(t *testing.T, ca *pkitest.CA, name, responder string) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		OCSPServer:   []string{responder},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pkitest.P256Key().Public(), ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// ocspResponse returns a response about leaf signed by signer (with
// signerCert embedded unless it is the issuer).
func ocspResponse(t *testing.T, issuer, signerCert *x509.Certificate, signer crypto.Signer, leaf *x509.Certificate, status int, thisUpdate, nextUpdate time.Time) []byte {
	t.Helper()
	tmpl := ocsp.Response{Status: status, SerialNumber: leaf.SerialNumber, ThisUpdate: thisUpdate, NextUpdate: nextUpdate}
	if status == ocsp.Revoked {
		tmpl.RevokedAt = thisUpdate.Add(-time.Hour)
	}
	if signerCert != issuer {
		tmpl.Certificate = signerCert
	}
	der, err := ocsp.CreateResponse(issuer, signerCert, tmpl, signer)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestVerifyOCSP(t *testing.T) {
	ca := pkitest.NewCA(t, "OCSP CA")
	other := pkitest.NewCA(t, "Other CA")
	leaf := ocspLeaf(t, ca, "ocsp.example.com", "http://127.0.0.1:1/")
	otherLeaf := ocspLeaf(t, ca, "other.example.com", "http://127.0.0.1:1/")
	now := time.Now()
	delegate := func(eku []x509.ExtKeyUsage, notAfter time.Time) (*x509.Certificate, crypto.Signer) {
		key := pkitest.MustECDSA(elliptic.P256())
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(now.UnixNano()), Subject: pkix.Name{CommonName: "responder"},
			NotBefore: now.Add(-time.Hour), NotAfter: notAfter, ExtKeyUsage: eku, KeyUsage: x509.KeyUsageDigitalSignature}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := x509.ParseCertificate(der)
		return c, key
	}
	goodDelegate, goodKey := delegate([]x509.ExtKeyUsage{x509.ExtKeyUsageOCSPSigning}, now.Add(time.Hour))
	plainDelegate, plainKey := delegate([]x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, now.Add(time.Hour))
	expiredDelegate, expiredKey := delegate([]x509.ExtKeyUsage{x509.ExtKeyUsageOCSPSigning}, now.Add(-time.Minute))
	hour := time.Hour

	tests := []struct {
		name    string
		der     []byte
		wantErr string // "" for success
	}{
		{"issuer", ocspResponse(t, ca.Cert, ca.Cert, ca.Key, leaf, ocsp.Good, now.Add(-hour), now.Add(hour)), ""},
		{"authorised-responder", ocspResponse(t, ca.Cert, goodDelegate, goodKey, leaf, ocsp.Good, now.Add(-hour), now.Add(hour)), ""},
		{"revoked-verifies", ocspResponse(t, ca.Cert, ca.Cert, ca.Key, leaf, ocsp.Revoked, now.Add(-hour), now.Add(hour)), ""},
		{"other-ca", ocspResponse(t, other.Cert, other.Cert, other.Key, leaf, ocsp.Good, now.Add(-hour), now.Add(hour)), "bad OCSP signature"},
		{"responder-not-authorised", ocspResponse(t, ca.Cert, plainDelegate, plainKey, leaf, ocsp.Good, now.Add(-hour), now.Add(hour)), "did not authorise"},
		{"responder-expired", ocspResponse(t, ca.Cert, expiredDelegate, expiredKey, leaf, ocsp.Good, now.Add(-hour), now.Add(hour)), "not valid now"},
		{"other-serial", ocspResponse(t, ca.Cert, ca.Cert, ca.Key, otherLeaf, ocsp.Good, now.Add(-hour), now.Add(hour)), "no response matching"},
		{"expired", ocspResponse(t, ca.Cert, ca.Cert, ca.Key, leaf, ocsp.Good, now.Add(-2*hour), now.Add(-hour)), "expired"},
		{"no-next-update", ocspResponse(t, ca.Cert, ca.Cert, ca.Key, leaf, ocsp.Good, now.Add(-hour), time.Time{}), "no nextUpdate"},
		{"future", ocspResponse(t, ca.Cert, ca.Cert, ca.Key, leaf, ocsp.Good, now.Add(hour), now.Add(2*hour)), "in the future"},
		{"garbage", []byte("not DER"), "invalid OCSP response"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := verifyOCSP(tt.der, leaf, ca.Cert, now)
			if tt.wantErr == "" {
				if err != nil {
					t.Errorf("verifyOCSP() = %v, want success", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("verifyOCSP() = %v, want an error containing %q", err, tt.wantErr)
			}
		})
	}
}

// fakeResponder is an OCSP responder whose answer the test sets.
type fakeResponder struct {
	t        *testing.T
	mu       sync.Mutex
	answer   func(*ocsp.Request) []byte // nil: HTTP 503
	requests int
}

func (f *fakeResponder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	req, err := ocsp.ParseRequest(body)
	f.mu.Lock()
	f.requests++
	answer := f.answer
	f.mu.Unlock()
	if err != nil || answer == nil {
		http.Error(w, "unavailable", http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "application/ocsp-response")
	w.Write(answer(req))
}

func (f *fakeResponder) set(answer func(*ocsp.Request) []byte) {
	f.mu.Lock()
	f.answer = answer
	f.mu.Unlock()
}

func (f *fakeResponder) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.requests
}

// staple returns the OCSP response stapled for name, or nil.
func staple(t *testing.T, s *CertStore, name string) []byte {
	t.Helper()
	c, err := s.GetCertificate(&tls.ClientHelloInfo{ServerName: name})
	if err != nil {
		t.Fatal(err)
	}
	return c.OCSPStaple
}

// waitFor polls cond until it holds or the test's timeout passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(defaultTestTimeout); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting until %s", what)
}

// TestOCSPStapling checks the life of a stapled response: fetched and
// stapled, refreshed, kept while the responder fails, dropped when revoked,
// and its age exported.
func TestOCSPStapling(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	resp := &fakeResponder{t: t}
	srv := httptest.NewServer(resp)
	t.Cleanup(srv.Close)
	ca := env.pki.CA
	leaf := ocspLeaf(t, ca, "ocsp.example.com", srv.URL)
	pkitest.WriteFile(t, env.dir, "ocsp.pem", pkitest.CertPEM(leaf, ca.Cert))

	var (
		mu         sync.Mutex
		status     = ocsp.Good
		thisUpdate time.Time
	)
	resp.set(func(req *ocsp.Request) []byte {
		mu.Lock()
		defer mu.Unlock()
		if req.SerialNumber.Cmp(leaf.SerialNumber) != 0 {
			t.Errorf("request for serial %v, want %v", req.SerialNumber, leaf.SerialNumber)
		}
		thisUpdate = time.Now().Add(-time.Minute).Truncate(time.Second)
		// Half its validity is already past: refreshed after minRefresh.
		return ocspResponse(t, ca.Cert, ca.Cert, ca.Key, leaf, status, thisUpdate, thisUpdate.Add(90*time.Second))
	})

	reg := prometheus.NewRegistry()
	logger, logs := newTestLogger()
	s := env.newStore(t, CertStoreConfig{Logger: logger, Metrics: NewMetrics(reg),
		OCSP: &OCSPConfig{RetryInterval: 20 * time.Millisecond, MaxRetryInterval: 20 * time.Millisecond}})
	s.ocsp.minRefresh = 20 * time.Millisecond
	if got := staple(t, s, "ocsp.example.com"); got != nil {
		t.Fatal("a response is stapled before any was fetched")
	}
	if got := staple(t, s, "p256.example.com"); got != nil {
		t.Fatal("a response is stapled for a certificate without a responder")
	}
	done := make(chan struct{})
	go func() { s.RunOCSP(t.Context()); close(done) }()
	t.Cleanup(func() { <-done })

	waitFor(t, "a response is stapled", func() bool { return staple(t, s, "ocsp.example.com") != nil })
	r, err := ocsp.ParseResponseForCert(staple(t, s, "ocsp.example.com"), leaf, ca.Cert)
	if err != nil || r.Status != ocsp.Good {
		t.Fatalf("stapled response: %v, status %v; want a good one that verifies", err, r)
	}
	if v, ok := metricValue(t, reg, "keyless_edge_ocsp_response_age_seconds", map[string]string{"name": "ocsp.example.com"}); !ok || v < 59 || v > 120 {
		t.Errorf("ocsp_response_age_seconds = %v (present %v), want about 60", v, ok)
	}
	// Refreshed: later responses replace it.
	n := resp.count()
	waitFor(t, "the response is refreshed", func() bool { return resp.count() >= n+2 })

	// The responder fails: the last good response stays stapled.
	resp.set(nil)
	n = resp.count()
	waitFor(t, "a failed fetch", func() bool { return resp.count() >= n+2 })
	if staple(t, s, "ocsp.example.com") == nil {
		t.Error("the last good response was dropped while the responder fails")
	}
	if !strings.Contains(logs.String(), "the last good response stays stapled") {
		t.Errorf("no warning about the failed fetch:\n%s", logs)
	}

	// Revoked: nothing is stapled, and the log says so loudly.
	mu.Lock()
	status = ocsp.Revoked
	mu.Unlock()
	resp.set(func(req *ocsp.Request) []byte {
		now := time.Now().Truncate(time.Second)
		return ocspResponse(t, ca.Cert, ca.Cert, ca.Key, leaf, ocsp.Revoked, now.Add(-time.Minute), now.Add(time.Hour))
	})
	waitFor(t, "the revoked certificate's staple is dropped", func() bool { return staple(t, s, "ocsp.example.com") == nil })
	// The staple is dropped just before the error is logged.
	waitFor(t, "an error about the revocation", func() bool { return strings.Contains(logs.String(), "[ERROR] ocsp: CERTIFICATE REVOKED") })
	if _, ok := metricValue(t, reg, "keyless_edge_ocsp_response_age_seconds", map[string]string{"name": "ocsp.example.com"}); ok {
		t.Error("ocsp_response_age_seconds still reported with nothing stapled")
	}
	if v, _ := metricValue(t, reg, "keyless_edge_ocsp_fetches_total", map[string]string{"result": "revoked"}); v < 1 {
		t.Errorf("ocsp_fetches_total{result=revoked} = %v, want at least 1", v)
	}
}

// TestOCSPFile checks a pre-fetched NAME.ocsp file: stapled if it
// verifies, refused if it is for another CA, and served in a handshake.
func TestOCSPFile(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	ca := env.pki.CA
	// No responder reachable: only the file can provide a response.
	leaf := ocspLeaf(t, ca, "file.example.com", "http://127.0.0.1:1/")
	pkitest.WriteFile(t, env.dir, "file.pem", pkitest.CertPEM(leaf, ca.Cert))
	now := time.Now()
	other := pkitest.NewCA(t, "Other CA")
	pkitest.WriteFile(t, env.dir, "file.ocsp", ocspResponse(t, other.Cert, other.Cert, other.Key, leaf, ocsp.Good, now.Add(-time.Hour), now.Add(time.Hour)))
	logger, logs := newTestLogger()
	s := env.newStore(t, CertStoreConfig{Logger: logger, OCSP: &OCSPConfig{}})
	if staple(t, s, "file.example.com") != nil {
		t.Error("a response signed by another CA is stapled")
	}
	if !strings.Contains(logs.String(), "OCSP response rejected") {
		t.Errorf("no error about the rejected file:\n%s", logs)
	}

	good := ocspResponse(t, ca.Cert, ca.Cert, ca.Key, leaf, ocsp.Good, now.Add(-time.Hour), now.Add(time.Hour))
	pkitest.WriteFile(t, env.dir, "file.ocsp", good)
	if err := s.Load(t.Context(), env.dir); err != nil {
		t.Fatal(err)
	}
	if got := staple(t, s, "file.example.com"); string(got) != string(good) {
		t.Fatal("the verified response of file.ocsp is not stapled after a reload")
	}
	sc, err := NewServerTLSConfig(ServerConfig{Certificates: s})
	if err != nil {
		t.Fatal(err)
	}
	r := pkitest.Handshake(t, sc, env.clientConfig("file.example.com", tls.VersionTLS13, tls.VersionTLS13), nil)
	if r.ClientErr != nil {
		t.Fatal(r.ClientErr)
	}
	if string(r.State.OCSPResponse) != string(good) {
		t.Error("the client did not receive the stapled response")
	}
}
