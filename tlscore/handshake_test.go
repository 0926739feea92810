package tlscore

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/internal/pkitest"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// Shorthands for the wire algorithms the handshakes should use.
const (
	algPSS256    = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA256
	algPKCS1256  = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256
	algECDSA256  = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA256
	algECDSA384  = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA384
	algECDSA512  = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA512
	algEd25519   = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ED25519
	noSignature  = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_UNSPECIFIED
	legacyName   = "legacy.example.com"
	rsaKexSuite  = tls.TLS_RSA_WITH_AES_128_GCM_SHA256
	rsaKexSuite2 = tls.TLS_RSA_WITH_AES_256_GCM_SHA384
)

func TestHandshake(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	sc := env.serverConfig(t, legacyName, "*.legacy-wild.example.com")

	tests := []struct {
		name         string
		serverName   string
		min, max     uint16
		suites       []uint16 // client's TLS 1.2 suites; nil for the default
		wantErr      bool
		wantVersion  uint16
		wantSuite    uint16 // 0: any
		wantAlg      keylessv1.SignatureAlgorithm
		wantDecrypts int
		wantKey      any // the leaf's public key type
	}{
		{name: "TLS13/RSA-PSS", serverName: "rsa.example.com", min: tls.VersionTLS13, wantVersion: tls.VersionTLS13, wantAlg: algPSS256, wantKey: &rsa.PublicKey{}},
		{name: "TLS13/ECDSA-P256", serverName: "p256.example.com", min: tls.VersionTLS13, wantVersion: tls.VersionTLS13, wantAlg: algECDSA256, wantKey: &ecdsa.PublicKey{}},
		{name: "TLS13/ECDSA-P384", serverName: "p384.example.com", min: tls.VersionTLS13, wantVersion: tls.VersionTLS13, wantAlg: algECDSA384, wantKey: &ecdsa.PublicKey{}},
		{name: "TLS13/Ed25519", serverName: "ed25519.example.com", min: tls.VersionTLS13, wantVersion: tls.VersionTLS13, wantAlg: algEd25519, wantKey: ed25519.PublicKey{}},
		{name: "TLS13/wildcard", serverName: "x.wild.example.com", min: tls.VersionTLS13, wantVersion: tls.VersionTLS13, wantAlg: algECDSA256, wantKey: &ecdsa.PublicKey{}},
		{name: "TLS13/RSA-kex-name", serverName: legacyName, min: tls.VersionTLS13, wantVersion: tls.VersionTLS13, wantAlg: algPSS256, wantKey: &rsa.PublicKey{}},
		{name: "TLS12/ECDHE-RSA", serverName: "rsa.example.com", max: tls.VersionTLS12, wantVersion: tls.VersionTLS12, wantSuite: tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, wantAlg: algPSS256, wantKey: &rsa.PublicKey{}},
		{name: "TLS12/ECDHE-RSA-ChaCha", serverName: "rsa.example.com", max: tls.VersionTLS12, suites: []uint16{tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256}, wantVersion: tls.VersionTLS12, wantSuite: tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256, wantAlg: algPSS256, wantKey: &rsa.PublicKey{}},
		{name: "TLS12/ECDHE-ECDSA-P256", serverName: "p256.example.com", max: tls.VersionTLS12, wantVersion: tls.VersionTLS12, wantSuite: tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, wantAlg: algECDSA256, wantKey: &ecdsa.PublicKey{}},
		// In TLS 1.2 the client's preference picks the hash, not the curve.
		{name: "TLS12/ECDHE-ECDSA-P384", serverName: "p384.example.com", max: tls.VersionTLS12, wantVersion: tls.VersionTLS12, wantSuite: tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, wantAlg: algECDSA256, wantKey: &ecdsa.PublicKey{}},
		{name: "TLS12/ECDHE-Ed25519", serverName: "ed25519.example.com", max: tls.VersionTLS12, wantVersion: tls.VersionTLS12, wantAlg: algEd25519, wantKey: ed25519.PublicKey{}},
		{name: "TLS12/RSA-kex/enabled-name", serverName: legacyName, max: tls.VersionTLS12, suites: []uint16{rsaKexSuite}, wantVersion: tls.VersionTLS12, wantSuite: rsaKexSuite, wantAlg: noSignature, wantDecrypts: 1, wantKey: &rsa.PublicKey{}},
		{name: "TLS12/RSA-kex/enabled-name-AES256", serverName: "LEGACY.example.com.", max: tls.VersionTLS12, suites: []uint16{rsaKexSuite2}, wantVersion: tls.VersionTLS12, wantSuite: rsaKexSuite2, wantAlg: noSignature, wantDecrypts: 1, wantKey: &rsa.PublicKey{}},
		{name: "TLS12/RSA-kex/enabled-wildcard", serverName: "a.legacy-wild.example.com", max: tls.VersionTLS12, suites: []uint16{rsaKexSuite}, wantVersion: tls.VersionTLS12, wantSuite: rsaKexSuite, wantAlg: noSignature, wantDecrypts: 1, wantKey: &rsa.PublicKey{}},
		{name: "TLS12/RSA-kex/other-name-refused", serverName: "rsa.example.com", max: tls.VersionTLS12, suites: []uint16{rsaKexSuite}, wantErr: true},
		{name: "TLS12/RSA-kex/ECDHE-preferred", serverName: legacyName, max: tls.VersionTLS12, suites: []uint16{rsaKexSuite, tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256}, wantVersion: tls.VersionTLS12, wantSuite: tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, wantAlg: algPSS256, wantKey: &rsa.PublicKey{}},
		{name: "TLS12/CBC-refused", serverName: "rsa.example.com", max: tls.VersionTLS12, suites: []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA}, wantErr: true},
		{name: "unknown-name-no-default", serverName: "other.test", wantErr: true},
		{name: "no-SNI-no-default", serverName: "", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cc := env.clientConfig(tt.serverName, tt.min, tt.max)
			cc.CipherSuites = tt.suites
			if tt.serverName == "" {
				cc.InsecureSkipVerify = true // no name to verify; the server must fail anyway
			}
			signs0, decrypts0 := env.ks.ops.counts()
			r := pkitest.Handshake(t, sc, cc, nil)
			signs, decrypts := env.ks.ops.counts()
			signs, decrypts = signs-signs0, decrypts-decrypts0
			if tt.wantErr {
				if r.ClientErr == nil || r.ServerErr == nil {
					t.Fatalf("handshake errors = client %v, server %v; want both to fail", r.ClientErr, r.ServerErr)
				}
				if signs+decrypts != 0 {
					t.Errorf("a failed handshake made %d signs and %d decryptions, want none", signs, decrypts)
				}
				return
			}
			if r.ClientErr != nil || r.ServerErr != nil {
				t.Fatalf("handshake errors = client %v, server %v", r.ClientErr, r.ServerErr)
			}
			if r.State.Version != tt.wantVersion {
				t.Errorf("version = %s, want %s", tls.VersionName(r.State.Version), tls.VersionName(tt.wantVersion))
			}
			if tt.wantSuite != 0 && r.State.CipherSuite != tt.wantSuite {
				t.Errorf("cipher suite = %s, want %s", tls.CipherSuiteName(r.State.CipherSuite), tls.CipherSuiteName(tt.wantSuite))
			}
			if got, want := fmtType(r.State.PeerCertificates[0].PublicKey), fmtType(tt.wantKey); got != want {
				t.Errorf("leaf public key = %s, want %s", got, want)
			}
			wantSigns := 1
			if tt.wantAlg == noSignature {
				wantSigns = 0
			}
			if signs != wantSigns || decrypts != tt.wantDecrypts {
				t.Errorf("key operations = %d signs, %d decryptions; want %d, %d", signs, decrypts, wantSigns, tt.wantDecrypts)
			}
			if wantSigns == 1 {
				if got := env.ks.ops.lastSign().GetAlgorithm(); got != tt.wantAlg {
					t.Errorf("signature algorithm = %v, want %v", got, tt.wantAlg)
				}
			}
		})
	}
}

func fmtType(v any) string {
	switch v.(type) {
	case *rsa.PublicKey:
		return "RSA"
	case *ecdsa.PublicKey:
		return "ECDSA"
	case ed25519.PublicKey:
		return "Ed25519"
	}
	return "unknown"
}

// TestHandshakePKCS1v15 uses an RSA key for which the keyserver offers only
// PKCS #1 v1.5, as an HSM without PSS: TLS 1.2 must use PKCS #1 v1.5 and TLS
// 1.3, which has no PKCS #1 v1.5 signatures, must fail.
func TestHandshakePKCS1v15(t *testing.T) {
	pkcs1 := []tls.SignatureScheme{tls.PKCS1WithSHA256, tls.PKCS1WithSHA384, tls.PKCS1WithSHA512}
	env := newTestEnv(t, envOptions{schemes: map[link.KeyID][]tls.SignatureScheme{mustKeyID(t, pkitest.RSAKey().Public()): pkcs1}})
	sc := env.serverConfig(t)
	tests := []struct {
		name    string
		max     uint16
		wantErr bool
	}{
		{name: "TLS12", max: tls.VersionTLS12},
		{name: "TLS13", max: tls.VersionTLS13, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cc := env.clientConfig("rsa.example.com", tt.max, tt.max)
			signs0, _ := env.ks.ops.counts()
			r := pkitest.Handshake(t, sc, cc, nil)
			signs, _ := env.ks.ops.counts()
			if tt.wantErr {
				if r.ClientErr == nil || r.ServerErr == nil || signs != signs0 {
					t.Fatalf("handshake = client %v, server %v, %d signs; want failure before any key operation", r.ClientErr, r.ServerErr, signs-signs0)
				}
				return
			}
			if r.ClientErr != nil || r.ServerErr != nil {
				t.Fatalf("handshake errors = client %v, server %v", r.ClientErr, r.ServerErr)
			}
			if got := env.ks.ops.lastSign().GetAlgorithm(); got != algPKCS1256 {
				t.Errorf("signature algorithm = %v, want %v", got, algPKCS1256)
			}
		})
	}
}

// TestHandshakeRequestContext checks what the keyserver learns about each
// connection.
func TestHandshakeRequestContext(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	sc := env.serverConfig(t)
	ids := make(map[string]bool)
	for range 3 {
		r := pkitest.Handshake(t, sc, env.clientConfig("P256.example.com", 0, 0), nil)
		if r.ClientErr != nil || r.ServerErr != nil {
			t.Fatalf("handshake errors = client %v, server %v", r.ClientErr, r.ServerErr)
		}
		rc := env.ks.ops.lastSign().GetContext()
		if rc.GetServerName() != "P256.example.com" && rc.GetServerName() != "p256.example.com" {
			t.Errorf("server_name = %q, want the client's SNI", rc.GetServerName())
		}
		if !strings.HasPrefix(rc.GetClientAddress(), "127.0.0.1:") {
			t.Errorf("client_address = %q, want 127.0.0.1:port", rc.GetClientAddress())
		}
		if rc.GetConnectionId() == "" || ids[rc.GetConnectionId()] {
			t.Errorf("connection_id = %q, want a new non-empty id (seen %v)", rc.GetConnectionId(), ids)
		}
		ids[rc.GetConnectionId()] = true
	}
}

// TestResumptionNeedsNoKey checks that a resumed handshake makes no key
// operation, including for a name served by a GetConfigForClient config.
func TestResumptionNeedsNoKey(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	sc := env.serverConfig(t, legacyName)
	tests := []struct {
		name       string
		serverName string
		version    uint16
		suites     []uint16
	}{
		{"TLS12", "p256.example.com", tls.VersionTLS12, nil},
		{"TLS13", "p256.example.com", tls.VersionTLS13, nil},
		{"TLS12/RSA-kex-config", legacyName, tls.VersionTLS12, nil},
		{"TLS12/RSA-kex", legacyName, tls.VersionTLS12, []uint16{rsaKexSuite}},
		{"TLS13/RSA-kex-config", legacyName, tls.VersionTLS13, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cc := env.clientConfig(tt.serverName, tt.version, tt.version)
			cc.CipherSuites = tt.suites
			cc.ClientSessionCache = tls.NewLRUClientSessionCache(4)
			for i, wantResumed := range []bool{false, true, true} {
				s0, d0 := env.ks.ops.counts()
				r := pkitest.Handshake(t, sc, cc, nil)
				s1, d1 := env.ks.ops.counts()
				if r.ClientErr != nil || r.ServerErr != nil {
					t.Fatalf("handshake %d errors = client %v, server %v", i, r.ClientErr, r.ServerErr)
				}
				if r.State.DidResume != wantResumed {
					t.Fatalf("handshake %d: DidResume = %t, want %t", i, r.State.DidResume, wantResumed)
				}
				if ops := s1 - s0 + d1 - d0; wantResumed && ops != 0 {
					t.Errorf("resumed handshake %d made %d key operations, want 0", i, ops)
				} else if !wantResumed && ops != 1 {
					t.Errorf("full handshake %d made %d key operations, want 1", i, ops)
				}
			}
		})
	}
}

// TestRSAKeyExchangeNeedsOwnCertificate: a name listed for RSA key exchange
// but served by the default certificate does not get RSA key exchange with
// that certificate's key, which was never opted in.
func TestRSAKeyExchangeNeedsOwnCertificate(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	sc, err := NewServerTLSConfig(ServerConfig{
		Certificates:   env.newStore(t, CertStoreConfig{Default: "rsa.pem"}),
		RSAKeyExchange: []string{"unheld.example.com", legacyName},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		serverName string
		wantOK     bool
	}{{legacyName, true}, {"unheld.example.com", false}} {
		cc := env.clientConfig(tt.serverName, tls.VersionTLS12, tls.VersionTLS12)
		cc.CipherSuites = []uint16{rsaKexSuite}
		cc.InsecureSkipVerify = true // the default certificate does not cover unheld.example.com
		_, decrypts0 := env.ks.ops.counts()
		r := pkitest.Handshake(t, sc, cc, nil)
		_, decrypts := env.ks.ops.counts()
		if ok := r.ClientErr == nil && r.ServerErr == nil; ok != tt.wantOK || (decrypts-decrypts0 == 1) != tt.wantOK {
			t.Errorf("%s: errors client %v, server %v, %d decryptions; want success %t", tt.serverName, r.ClientErr, r.ServerErr, decrypts-decrypts0, tt.wantOK)
		}
	}
}

// anyNameCache hands the last session to any server name, as a client that
// tries a ticket across virtual hosts would.
type anyNameCache struct {
	mu sync.Mutex
	cs *tls.ClientSessionState
}

func (c *anyNameCache) Get(string) (*tls.ClientSessionState, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cs, c.cs != nil
}

func (c *anyNameCache) Put(_ string, cs *tls.ClientSessionState) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cs != nil {
		c.cs = cs
	}
}

// TestResumptionBoundToServerName offers a ticket issued for one name under
// another that the same certificate covers: it must not resume.
func TestResumptionBoundToServerName(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	sc := env.serverConfig(t)
	for _, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		t.Run(tls.VersionName(version), func(t *testing.T) {
			cache := &anyNameCache{}
			steps := []struct {
				serverName  string
				wantResumed bool
			}{
				{"a.wild.example.com", false},
				{"a.wild.example.com", true},
				{"A.WILD.example.com.", true}, // the same name, spelled otherwise
				{"b.wild.example.com", false},
				{"b.wild.example.com", true},
			}
			for i, s := range steps {
				cc := env.clientConfig(s.serverName, version, version)
				cc.ClientSessionCache = cache
				r := pkitest.Handshake(t, sc, cc, nil)
				if r.ClientErr != nil || r.ServerErr != nil {
					t.Fatalf("handshake %d (%s) errors = client %v, server %v", i, s.serverName, r.ClientErr, r.ServerErr)
				}
				if r.State.DidResume != s.wantResumed {
					t.Fatalf("handshake %d (%s): DidResume = %t, want %t", i, s.serverName, r.State.DidResume, s.wantResumed)
				}
			}
		})
	}
}

// TestResumptionEndsWithCertificate: a ticket no longer resumes once the
// certificate of its name is removed (even with a default certificate,
// which a TLS 1.2 resumption would otherwise be served with) or replaced;
// a full handshake then decides, as it would for a new client.
func TestResumptionEndsWithCertificate(t *testing.T) {
	for _, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		for _, dflt := range []string{"", "ed25519.pem"} {
			t.Run(fmt.Sprintf("%s/default=%q", tls.VersionName(version), dflt), func(t *testing.T) {
				env := newTestEnv(t, envOptions{})
				store := env.newStore(t, CertStoreConfig{Default: dflt})
				sc, err := NewServerTLSConfig(ServerConfig{Certificates: store})
				if err != nil {
					t.Fatal(err)
				}
				cc := env.clientConfig("p384.example.com", version, version)
				cc.ClientSessionCache = tls.NewLRUClientSessionCache(4)
				step := func(what string, wantOK, wantResumed bool) {
					t.Helper()
					r := pkitest.Handshake(t, sc, cc, nil)
					if ok := r.ClientErr == nil && r.ServerErr == nil; ok != wantOK || r.State.DidResume != wantResumed {
						t.Fatalf("%s: errors client %v, server %v, resumed %t; want success %t, resumed %t",
							what, r.ClientErr, r.ServerErr, r.State.DidResume, wantOK, wantResumed)
					}
				}
				reload := func() {
					t.Helper()
					if err := store.Load(t.Context(), env.dir); err != nil {
						t.Fatal(err)
					}
				}
				step("first handshake", true, false)
				step("second handshake", true, true)

				// Replaced: the same key, a new certificate.
				pkitest.WriteFile(t, env.dir, "p384.pem", pkitest.CertPEM(env.pki.CA.Issue(t, pkitest.P384Key().Public(), pkitest.LeafOptions{Names: []string{"p384.example.com"}})))
				reload()
				step("after the certificate was replaced", true, false)
				step("with a ticket for the new certificate", true, true)

				// Removed.
				if err := os.Remove(filepath.Join(env.dir, "p384.pem")); err != nil {
					t.Fatal(err)
				}
				reload()
				step("after the certificate was removed", false, false)
			})
		}
	}
}

// TestTicketKeysShared checks that the per-client configuration of an RSA
// key-exchange name, and a clone of the returned configuration, seal tickets
// with the returned configuration's keys: after SetSessionTicketKeys on it,
// an old ticket no longer resumes.
func TestTicketKeysShared(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	for _, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		for _, serving := range []string{"returned-config", "clone"} {
			t.Run(tls.VersionName(version)+"/"+serving, func(t *testing.T) {
				base := env.serverConfig(t, legacyName)
				sc := base
				if serving == "clone" {
					// As http.Server.ServeTLS serves a clone of its TLSConfig.
					sc = base.Clone()
				}
				cc := env.clientConfig(legacyName, version, version)
				cc.ClientSessionCache = tls.NewLRUClientSessionCache(4)
				step := func(i int, wantResumed bool) {
					t.Helper()
					r := pkitest.Handshake(t, sc, cc, nil)
					if r.ClientErr != nil || r.ServerErr != nil {
						t.Fatalf("handshake %d errors = client %v, server %v", i, r.ClientErr, r.ServerErr)
					}
					if r.State.DidResume != wantResumed {
						t.Fatalf("handshake %d: DidResume = %t, want %t", i, r.State.DidResume, wantResumed)
					}
				}
				step(0, false)
				step(1, true)
				base.SetSessionTicketKeys([][32]byte{{byte(version)}})
				step(2, false)
				step(3, true)
			})
		}
	}
}

// TestHandshakeDualCertificates serves one name with an ECDSA and an RSA
// certificate: a client that supports ECDSA gets the first one (file order),
// one that supports only RSA gets the RSA one.
func TestHandshakeDualCertificates(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	pkitest.WriteFile(t, env.dir, "dual-a-ecdsa.pem", pkitest.CertPEM(env.pki.CA.Issue(t, pkitest.P256Key().Public(), pkitest.LeafOptions{Names: []string{"dual.example.com"}})))
	pkitest.WriteFile(t, env.dir, "dual-b-rsa.pem", pkitest.CertPEM(env.pki.CA.Issue(t, pkitest.RSAKey().Public(), pkitest.LeafOptions{Names: []string{"dual.example.com"}})))
	sc := env.serverConfig(t)
	tests := []struct {
		name    string
		suites  []uint16
		wantKey string
	}{
		{"any", nil, "ECDSA"},
		{"RSA-only-client", []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256}, "RSA"},
		{"ECDSA-only-client", []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256}, "ECDSA"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cc := env.clientConfig("dual.example.com", 0, tls.VersionTLS12)
			cc.CipherSuites = tt.suites
			r := pkitest.Handshake(t, sc, cc, nil)
			if r.ClientErr != nil || r.ServerErr != nil {
				t.Fatalf("handshake errors = client %v, server %v", r.ClientErr, r.ServerErr)
			}
			if got := fmtType(r.State.PeerCertificates[0].PublicKey); got != tt.wantKey {
				t.Errorf("certificate key = %s, want %s", got, tt.wantKey)
			}
		})
	}
}

// TestHandshakePrefersValidCertificate: of two certificates of one name, the
// one valid now is served, whatever the file order.
func TestHandshakePrefersValidCertificate(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	expired := env.pki.CA.Issue(t, pkitest.P256Key().Public(), pkitest.LeafOptions{Names: []string{"renewed.example.com"},
		NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-24 * time.Hour)})
	current := env.pki.CA.Issue(t, pkitest.P384Key().Public(), pkitest.LeafOptions{Names: []string{"renewed.example.com"}})
	pkitest.WriteFile(t, env.dir, "renewed-a-old.pem", pkitest.CertPEM(expired))
	pkitest.WriteFile(t, env.dir, "renewed-b-new.pem", pkitest.CertPEM(current))
	r := pkitest.Handshake(t, env.serverConfig(t), env.clientConfig("renewed.example.com", 0, 0), nil)
	if r.ClientErr != nil || r.ServerErr != nil {
		t.Fatalf("handshake errors = client %v, server %v", r.ClientErr, r.ServerErr)
	}
	if !r.State.PeerCertificates[0].Equal(current) {
		t.Errorf("served the certificate that expired on %v", r.State.PeerCertificates[0].NotAfter)
	}
}

// TestHandshakeDeadKeyserver checks that a keyserver that never answers
// fails the handshake within the call deadline, or sooner when the
// handshake's own context ends.
func TestHandshakeDeadKeyserver(t *testing.T) {
	tests := []struct {
		name        string
		callTimeout time.Duration
		handshake   time.Duration // server handshake context; 0 for none
		wantWithin  time.Duration // the deadline the failure must meet
		version     uint16
		serverName  string
		suites      []uint16
	}{
		{name: "call-timeout/TLS13", callTimeout: 300 * time.Millisecond, wantWithin: 300 * time.Millisecond, version: tls.VersionTLS13, serverName: "p256.example.com"},
		{name: "call-timeout/TLS12-RSA-kex", callTimeout: 300 * time.Millisecond, wantWithin: 300 * time.Millisecond, version: tls.VersionTLS12, serverName: legacyName, suites: []uint16{rsaKexSuite}},
		{name: "handshake-context", callTimeout: time.Minute, handshake: 300 * time.Millisecond, wantWithin: 300 * time.Millisecond, version: tls.VersionTLS13, serverName: "rsa.example.com"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := newTestEnv(t, envOptions{
				callTimeout: tt.callTimeout,
				wrap: func(next keylessv1.KeylessServiceServer) keylessv1.KeylessServiceServer {
					return &fakeService{
						next:    next,
						sign:    blockingHandler[*keylessv1.SignRequest, *keylessv1.SignResponse](t),
						decrypt: blockingHandler[*keylessv1.DecryptRequest, *keylessv1.DecryptResponse](t),
					}
				},
			})
			sc := env.serverConfig(t, legacyName)
			ctx := t.Context()
			if tt.handshake > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tt.handshake)
				defer cancel()
			}
			cc := env.clientConfig(tt.serverName, tt.version, tt.version)
			cc.CipherSuites = tt.suites
			r := pkitest.Handshake(t, sc, cc, ctx)
			if r.ClientErr == nil || r.ServerErr == nil {
				t.Fatalf("handshake errors = client %v, server %v; want both to fail", r.ClientErr, r.ServerErr)
			}
			const slack = 2 * time.Second
			if r.Elapsed > tt.wantWithin+slack {
				t.Errorf("the handshake failed after %v, want within %v (+%v slack)", r.Elapsed, tt.wantWithin, slack)
			}
			// crypto/tls flattens the signer's error into its message, or
			// returns the handshake context's error.
			if msg := r.ServerErr.Error(); !strings.Contains(msg, "code = DeadlineExceeded") && !errors.Is(r.ServerErr, context.DeadlineExceeded) {
				t.Errorf("server error = %v, want a deadline error", r.ServerErr)
			}
		})
	}
}

// TestSharedTicketKeys: two edges with the keys of one LoadTicketKeys file
// resume each other's sessions; an edge with other keys does not. Bad files
// are refused, naming the line.
func TestSharedTicketKeys(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	shared := write("shared", "# rotated weekly\n"+strings.Repeat("ab", 32)+"\n\n"+strings.Repeat("cd", 32)+"\n", 0o600)
	keys, err := LoadTicketKeys(shared)
	if err != nil || len(keys) != 2 || keys[0][0] != 0xab || keys[1][31] != 0xcd {
		t.Fatalf("LoadTicketKeys() = %x, %v", keys, err)
	}
	edge := func(keys [][32]byte) *tls.Config {
		sc := env.serverConfig(t)
		sc.SetSessionTicketKeys(keys)
		return sc
	}
	a, b, other := edge(keys), edge(keys), edge([][32]byte{{1}})
	cc := env.clientConfig("p256.example.com", 0, 0)
	cc.ClientSessionCache = tls.NewLRUClientSessionCache(1)
	for i, s := range []struct {
		sc          *tls.Config
		wantResumed bool
	}{{a, false}, {b, true}, {a, true}, {other, false}} {
		r := pkitest.Handshake(t, s.sc, cc, nil)
		if r.ClientErr != nil || r.State.DidResume != s.wantResumed {
			t.Fatalf("handshake %d: %v, resumed %t; want resumed %t", i, r.ClientErr, r.State.DidResume, s.wantResumed)
		}
	}

	for name, tt := range map[string]struct {
		content string
		mode    os.FileMode
		want    string
	}{
		"short key":      {strings.Repeat("ab", 31) + "\n", 0o600, "line 1: want 64 hexadecimal digits"},
		"long key":       {"# c\n" + strings.Repeat("ab", 33) + "\n", 0o600, "line 2: want 64 hexadecimal digits"},
		"not hex":        {strings.Repeat("zz", 32) + "\n", 0o600, "line 1: not 64 hexadecimal digits"},
		"empty":          {"# nothing\n", 0o600, "no key"},
		"world-readable": {strings.Repeat("ab", 32) + "\n", 0o644, "chmod 600"},
	} {
		if _, err := LoadTicketKeys(write(name, tt.content, tt.mode)); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: LoadTicketKeys() = %v, want an error containing %q", name, err, tt.want)
		}
	}
}
