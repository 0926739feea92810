package tlscore

import (
	"crypto/elliptic"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"net"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyless-tls/keyless/internal/pkitest"
)

// TestCertStorePartialLoad checks that, without RequireAll, a broken file
// or one whose key the keyserver lacks is skipped with an error naming it
// and counted, while the rest is served, at the first load and at reloads.
func TestCertStorePartialLoad(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	logger, logs := newTestLogger()
	s, err := NewCertStore(CertStoreConfig{Client: env.client, Logger: logger, Metrics: m, Default: "p256.pem"})
	if err != nil {
		t.Fatal(err)
	}
	unknownKey := pkitest.MustECDSA(elliptic.P256())
	pkitest.WriteFile(t, env.dir, "missing.pem", pkitest.CertPEM(env.pki.CA.Issue(t, unknownKey.Public(), pkitest.LeafOptions{Names: []string{"missing.example.com"}})))
	pkitest.WriteFile(t, env.dir, "broken.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("junk")}))
	if err := s.Load(t.Context(), env.dir); err != nil {
		t.Fatalf("Load() = %v, want the two bad files skipped", err)
	}
	if s.Loaded() != len(envCerts) {
		t.Errorf("Loaded() = %d, want %d", s.Loaded(), len(envCerts))
	}
	for _, f := range []string{"missing.pem", "broken.pem"} {
		if !strings.Contains(logs.String(), filepath.Join(env.dir, f)) {
			t.Errorf("the log does not name %s:\n%s", f, logs)
		}
	}
	for reason, want := range map[string]float64{"missing_key": 1, "invalid": 1} {
		if v, _ := metricValue(t, reg, "keyless_edge_certificates_not_served", map[string]string{"reason": reason}); v != want {
			t.Errorf("certificates_not_served{reason=%q} = %v, want %v", reason, v, want)
		}
	}
	if _, err := s.GetCertificate(&tls.ClientHelloInfo{ServerName: "rsa.example.com"}); err != nil {
		t.Errorf("GetCertificate(rsa.example.com) = %v", err)
	}
	// An unknown name gets the default, not the skipped certificate.
	c, err := s.GetCertificate(&tls.ClientHelloInfo{ServerName: "missing.example.com"})
	if err != nil || !c.Leaf.Equal(env.leaves["p256.pem"]) {
		t.Errorf("GetCertificate(missing.example.com) = %v, want the default certificate", err)
	}

	// A reload after the broken file is fixed serves it and clears the
	// count; one after the default's own file breaks keeps the rest.
	pkitest.WriteFile(t, env.dir, "broken.pem", pkitest.CertPEM(env.pki.CA.Issue(t, pkitest.P256Key().Public(), pkitest.LeafOptions{Names: []string{"fixed.example.com"}})))
	pkitest.WriteFile(t, env.dir, "p256.pem", []byte("truncated"))
	if err := s.Load(t.Context(), env.dir); err != nil {
		t.Fatalf("reload = %v", err)
	}
	if _, err := s.GetCertificate(&tls.ClientHelloInfo{ServerName: "fixed.example.com"}); err != nil {
		t.Errorf("GetCertificate(fixed.example.com) after reload = %v", err)
	}
	if _, err := s.GetCertificate(&tls.ClientHelloInfo{ServerName: "p256.example.com"}); err == nil {
		t.Error("GetCertificate(p256.example.com) served the broken file's old certificate")
	}
	var unknown *UnrecognizedNameError
	if _, err := s.GetCertificate(&tls.ClientHelloInfo{ServerName: "other.example.org"}); !errors.As(err, &unknown) {
		t.Errorf("GetCertificate(other.example.org) without the default = %v, want an *UnrecognizedNameError", err)
	}
	if !strings.Contains(logs.String(), "the default certificate is not served") {
		t.Errorf("no error says the default certificate is not served:\n%s", logs)
	}
	if v, _ := metricValue(t, reg, "keyless_edge_certificates_not_served", map[string]string{"reason": "invalid"}); v != 1 {
		t.Errorf("certificates_not_served{reason=invalid} = %v after reload, want 1 (p256.pem)", v)
	}
}

// TestCertStoreNothingUsable checks that a directory whose every
// certificate is skipped is still an error, naming the files, and that a
// private key in the directory is refused even without RequireAll.
func TestCertStoreNothingUsable(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	s, err := NewCertStore(CertStoreConfig{Client: env.client})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	pkitest.WriteFile(t, dir, "a.pem", []byte("junk"))
	pkitest.WriteFile(t, dir, "b.pem", pkitest.CertPEM(env.pki.CA.Issue(t, pkitest.MustECDSA(elliptic.P256()).Public(), pkitest.LeafOptions{Names: []string{"b.example.com"}})))
	err = s.Load(t.Context(), dir)
	if err == nil {
		t.Fatal("Load() of a directory with no usable certificate succeeded")
	}
	for _, w := range []string{"no certificate to serve", "a.pem", "b.pem", "holds no key"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("Load() = %v, want it to contain %q", err, w)
		}
	}

	dir = t.TempDir()
	pkitest.WriteFile(t, dir, "good.pem", readFile(t, filepath.Join(env.dir, "p256.pem")))
	pkitest.WriteFile(t, dir, "bad.pem", readFile(t, filepath.Join(env.dir, "rsa.pem")), pkitest.KeyPEM(t, pkitest.MustECDSA(elliptic.P256())))
	if err := s.Load(t.Context(), dir); err == nil || !strings.Contains(err.Error(), "holds a private key") {
		t.Errorf("Load() of a directory with a private key = %v, want it refused", err)
	}
}

// TestUnrecognizedNameAlert checks that a client asking for a name no
// certificate covers, with no default certificate, gets the
// unrecognized_name alert, in TLS 1.2 and 1.3.
func TestUnrecognizedNameAlert(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	sc := env.serverConfig(t)
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		t.Run(tls.VersionName(v), func(t *testing.T) {
			r := pkitest.Handshake(t, sc, env.clientConfig("unknown.example.org", v, v), nil)
			// The client reports a received alert as a *net.OpError
			// whose Err is crypto/tls's unexported alert type.
			var op *net.OpError
			if !errors.As(r.ClientErr, &op) || op.Op != "remote error" || reflect.ValueOf(op.Err).Kind() != reflect.Uint8 || reflect.ValueOf(op.Err).Uint() != 112 {
				t.Errorf("client error = %v, want alert 112 (unrecognized_name)", r.ClientErr)
			}
			if r.ServerErr == nil {
				t.Error("the server's handshake succeeded")
			}
		})
	}
}
