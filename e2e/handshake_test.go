package e2e

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"strings"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/hsm/hsmtest"
)

// TestHandshakes runs full handshakes of every kind through the chain and
// checks that each made exactly the key operation it needs.
func TestHandshakes(t *testing.T) {
	c := sharedChain(t)
	ecdheSuites := []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256}
	tests := []struct {
		name        string
		serverName  string
		version     uint16
		suites      []uint16
		wantKey     string // "rsa", "p256", "p384", "ed25519"
		wantSigns   int64
		wantDecrypt int64
	}{
		{"TLS1.3/RSA-PSS", nameRSA, tls.VersionTLS13, nil, "rsa", 1, 0},
		{"TLS1.3/ECDSA-P256", nameECDSA, tls.VersionTLS13, nil, "p256", 1, 0},
		{"TLS1.3/ECDSA-P384", nameP384, tls.VersionTLS13, nil, "p384", 1, 0},
		{"TLS1.3/Ed25519", nameEd25519, tls.VersionTLS13, nil, "ed25519", 1, 0},
		{"TLS1.2/ECDHE-RSA", nameRSA, tls.VersionTLS12, ecdheSuites, "rsa", 1, 0},
		{"TLS1.2/ECDHE-ECDSA-P256", nameECDSA, tls.VersionTLS12, ecdheSuites, "p256", 1, 0},
		{"TLS1.2/ECDHE-ECDSA-P384", nameP384, tls.VersionTLS12, ecdheSuites, "p384", 1, 0},
		{"TLS1.2/ECDHE-Ed25519", nameEd25519, tls.VersionTLS12, ecdheSuites, "ed25519", 1, 0},
		{"TLS1.2/RSA-key-exchange", nameRSA, tls.VersionTLS12, []uint16{tls.TLS_RSA_WITH_AES_128_GCM_SHA256}, "rsa", 0, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := &tls.Config{
				ServerName:   tt.serverName,
				RootCAs:      c.webCA.pool(),
				MinVersion:   tt.version,
				MaxVersion:   tt.version,
				CipherSuites: tt.suites,
			}
			signs, decrypts := c.ops()
			st, body, err := c.get(t, cfg)
			if err != nil {
				t.Fatalf("handshake and GET: %v", err)
			}
			if st.Version != tt.version {
				t.Errorf("version = %x, want %x", st.Version, tt.version)
			}
			if got := keyKind(st.PeerCertificates[0].PublicKey); got != tt.wantKey {
				t.Errorf("served a %s key, want %s", got, tt.wantKey)
			}
			if want := "sni=" + tt.serverName + " version=" + tlsVersionName(tt.version); !strings.HasPrefix(body, want) {
				t.Errorf("origin saw %q, want %q", body, want)
			}
			s2, d2 := c.ops()
			if s2-signs != tt.wantSigns || d2-decrypts != tt.wantDecrypt {
				t.Errorf("key operations: %d signs, %d decrypts; want %d and %d", s2-signs, d2-decrypts, tt.wantSigns, tt.wantDecrypt)
			}
		})
	}
}

func keyKind(pub any) string {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		return "rsa"
	case *ecdsa.PublicKey:
		if k.Curve == elliptic.P384() {
			return "p384"
		}
		return "p256"
	case ed25519.PublicKey:
		return "ed25519"
	}
	return "unknown"
}

// TestRSAKeyExchangeOnlyWhereEnabled checks that TLS 1.2 RSA key exchange
// is refused for a name it is not enabled for, with the same RSA key.
func TestRSAKeyExchangeOnlyWhereEnabled(t *testing.T) {
	c := sharedChain(t)
	cfg := &tls.Config{ServerName: nameRSANoKex, RootCAs: c.webCA.pool(), MaxVersion: tls.VersionTLS12,
		CipherSuites: []uint16{tls.TLS_RSA_WITH_AES_128_GCM_SHA256}}
	if _, _, err := c.get(t, cfg); err == nil {
		t.Fatal("RSA key exchange succeeded for a name it is not enabled for")
	}
	cfg.CipherSuites = nil
	if _, _, err := c.get(t, cfg); err != nil {
		t.Fatalf("ECDHE handshake for the same name failed: %v", err)
	}
}

// TestResumptionMakesNoKeyOperation resumes TLS 1.2 and TLS 1.3 sessions and
// checks that the keyserver is not asked for anything.
func TestResumptionMakesNoKeyOperation(t *testing.T) {
	c := sharedChain(t)
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		for _, name := range []string{nameRSA, nameECDSA, nameEd25519} {
			t.Run(tlsVersionName(v)+"/"+name, func(t *testing.T) {
				cfg := &tls.Config{ServerName: name, RootCAs: c.webCA.pool(), MinVersion: v, MaxVersion: v,
					ClientSessionCache: tls.NewLRUClientSessionCache(4)}
				if _, _, err := c.get(t, cfg); err != nil {
					t.Fatal(err)
				}
				signs, decrypts := c.ops()
				st, body, err := c.get(t, cfg)
				if err != nil {
					t.Fatal(err)
				}
				if !st.DidResume || !strings.Contains(body, "resumed=true") {
					t.Fatalf("second handshake did not resume (DidResume %t, origin saw %q)", st.DidResume, body)
				}
				if s2, d2 := c.ops(); s2 != signs || d2 != decrypts {
					t.Errorf("resumption made %d signs and %d decrypts, want none", s2-signs, d2-decrypts)
				}
			})
		}
	}
}

// TestSNISelection checks exact, wildcard, case-insensitive and default
// certificate selection.
func TestSNISelection(t *testing.T) {
	c := sharedChain(t)
	tests := []struct {
		sni      string
		wantKey  string
		verifyAs string // the name the certificate must be valid for
	}{
		{nameRSA, "rsa", nameRSA},
		{"ECDSA.E2E.TEST", "p256", nameECDSA},
		{"www.wild.e2e.test", "p384", "www.wild.e2e.test"},
		{"a.b.wild.e2e.test", "p256", nameECDSA}, // a wildcard covers one label only: default
		{"unknown.example", "p256", nameECDSA},   // default
		{"", "p256", nameECDSA},                  // no SNI: default
	}
	for _, tt := range tests {
		t.Run("sni="+tt.sni, func(t *testing.T) {
			cfg := &tls.Config{ServerName: tt.sni, InsecureSkipVerify: true}
			st, _, err := c.get(t, cfg)
			if err != nil {
				t.Fatal(err)
			}
			leaf := st.PeerCertificates[0]
			if got := keyKind(leaf.PublicKey); got != tt.wantKey {
				t.Errorf("served a %s key, want %s", got, tt.wantKey)
			}
			if err := leaf.VerifyHostname(tt.verifyAs); err != nil {
				t.Errorf("served certificate is not for %s: %v", tt.verifyAs, err)
			}
		})
	}
}

// TestRSAKeyExchangeBadPaddingIndistinguishable sends RSA key exchanges
// whose ciphertexts are valid or defective in every way, each followed by a
// Finished the client cannot have encrypted correctly. The server must
// answer all of them with the same alert, after asking the keyserver: a
// defective ciphertext must not be told apart (no Bleichenbacher oracle).
func TestRSAKeyExchangeBadPaddingIndistinguishable(t *testing.T) {
	c := sharedChain(t)
	premaster := func() []byte {
		p := make([]byte, 48)
		rand.Read(p)
		p[0], p[1] = 3, 3
		return p
	}
	tests := []struct {
		name string
		ckx  func(*rsa.PublicKey) []byte
	}{
		{"valid", func(pub *rsa.PublicKey) []byte {
			ct, _ := rsa.EncryptPKCS1v15(rand.Reader, pub, premaster())
			return ct
		}},
		{"bad block type", func(pub *rsa.PublicKey) []byte { return rawRSAEncrypt(pub, pkcs1Block(pub, premaster(), 1)) }},
		{"no zero separator", func(pub *rsa.PublicKey) []byte {
			em := pkcs1Block(pub, premaster(), 2)
			em[len(em)-49] = 0xff
			return rawRSAEncrypt(pub, em)
		}},
		{"47-byte premaster", func(pub *rsa.PublicKey) []byte { return rawRSAEncrypt(pub, pkcs1Block(pub, premaster()[:47], 2)) }},
		{"49-byte premaster", func(pub *rsa.PublicKey) []byte {
			return rawRSAEncrypt(pub, pkcs1Block(pub, append(premaster(), 7), 2))
		}},
		{"ciphertext >= modulus", func(pub *rsa.PublicKey) []byte { return pub.N.FillBytes(make([]byte, pub.Size())) }},
		{"short ciphertext", func(pub *rsa.PublicKey) []byte {
			ct, _ := rsa.EncryptPKCS1v15(rand.Reader, pub, premaster())
			return ct[1:]
		}},
		{"random bytes", func(pub *rsa.PublicKey) []byte {
			b := make([]byte, pub.Size())
			rand.Read(b)
			b[0] = 0
			return b
		}},
	}
	const alertBadRecordMAC = 20
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, decrypts := c.ops()
			alert, err := rsaKexAlert(c.edgeAddr, nameRSA, tt.ckx)
			if err != nil {
				t.Fatal(err)
			}
			if alert != alertBadRecordMAC {
				t.Errorf("alert = %d, want bad_record_mac (%d), as for every ClientKeyExchange", alert, alertBadRecordMAC)
			}
			if _, d2 := c.ops(); d2-decrypts != 1 {
				t.Errorf("the keyserver was asked %d times to decrypt, want 1", d2-decrypts)
			}
		})
	}
}

// TestStuckKeyserverFailsWithinDeadline makes every key operation hang and
// checks that a handshake fails within the edge's call deadline instead of
// hanging; then it checks that handshakes work again.
func TestStuckKeyserverFailsWithinDeadline(t *testing.T) {
	c := sharedChain(t)
	cfg := &tls.Config{ServerName: nameECDSA, RootCAs: c.webCA.pool()}
	c.stall.Store(true)
	start := time.Now()
	_, _, err := c.get(t, cfg)
	took := time.Since(start)
	c.stall.Store(false)
	if err == nil {
		t.Fatal("handshake succeeded while the keyserver was stuck")
	}
	if took > chainCallTimeout+2*time.Second {
		t.Errorf("handshake failed after %v, want about the call deadline (%v)", took, chainCallTimeout)
	}
	if _, _, err := c.get(t, cfg); err != nil {
		t.Fatalf("handshake after the keyserver recovered: %v", err)
	}
}

// TestKeyserverDown stops the keyserver of a chain of its own and checks
// that handshakes fail within the deadline.
func TestKeyserverDown(t *testing.T) {
	hsmtest.New(t) // skips or fails here if SoftHSM is missing
	c, err := startChain(t)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.stop)
	cfg := &tls.Config{ServerName: nameRSA, RootCAs: c.webCA.pool()}
	if _, _, err := c.get(t, cfg); err != nil {
		t.Fatalf("handshake with the keyserver up: %v", err)
	}
	c.stopKeyserver()
	start := time.Now()
	if _, _, err := c.get(t, cfg); err == nil {
		t.Fatal("handshake succeeded with the keyserver down")
	}
	if took := time.Since(start); took > chainCallTimeout+2*time.Second {
		t.Errorf("handshake failed after %v, want at most about the call deadline (%v)", took, chainCallTimeout)
	}
}
