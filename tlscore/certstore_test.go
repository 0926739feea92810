package tlscore

import (
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/internal/pkitest"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// TestCertStoreSelection checks certificate selection by SNI.
func TestCertStoreSelection(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	// An exact name that a wildcard also covers.
	exact := env.pki.CA.Issue(t, pkitest.P384Key().Public(), pkitest.LeafOptions{Names: []string{"exact.wild.example.com"}})
	pkitest.WriteFile(t, env.dir, "exact.crt", pkitest.CertPEM(exact))
	ed, p256, p384, rsaLeaf := env.leaves["ed25519.pem"], env.leaves["p256.pem"], env.leaves["p384.pem"], env.leaves["rsa.pem"]

	stores := map[string]*CertStore{
		"none":      env.newStore(t, CertStoreConfig{}),
		"file":      env.newStore(t, CertStoreConfig{Default: "ed25519.pem"}),
		"name":      env.newStore(t, CertStoreConfig{Default: "RSA.example.com"}),
		"wild-name": env.newStore(t, CertStoreConfig{Default: "default.wild.example.com"}),
	}
	tests := []struct {
		name       string
		dflt       string
		serverName string
		want       *x509.Certificate // nil: an error
	}{
		{"exact", "none", "p384.example.com", p384},
		{"exact/case-and-dot", "none", "P384.Example.COM.", p384},
		{"wildcard", "none", "x.wild.example.com", p256},
		{"wildcard/case", "none", "X.WILD.example.com", p256},
		{"exact-before-wildcard", "none", "exact.wild.example.com", exact},
		{"wildcard/two-labels", "none", "a.b.wild.example.com", nil},
		{"wildcard/bare-parent", "none", "wild.example.com", nil},
		{"wildcard/empty-label", "none", ".wild.example.com", nil},
		{"unknown", "none", "unknown.test", nil},
		{"no-SNI", "none", "", nil},
		{"default-file/no-SNI", "file", "", ed},
		{"default-file/unknown", "file", "unknown.test", ed},
		{"default-file/two-labels", "file", "a.b.wild.example.com", ed},
		{"default-file/known", "file", "p384.example.com", p384},
		{"default-name/no-SNI", "name", "", rsaLeaf},
		{"default-name/unknown", "name", "unknown.test", rsaLeaf},
		{"default-wildcard-name", "wild-name", "", p256},
		{"wildcard/underscore", "none", "under_score.wild.example.com", p256},
		// Not host names: as no server name, so never a certificate of
		// the name they resemble.
		{"not-UTF-8", "none", "\xff.wild.example.com", nil},
		{"Kelvin-sign", "none", "\u212a.wild.example.com", nil},
		{"default-file/not-UTF-8", "file", "\xff.wild.example.com", ed},
		{"default-file/Kelvin-sign", "file", "\u212a.wild.example.com", ed},
		{"default-file/IPv6", "file", "::1", ed},
		{"default-file/space", "file", "a b.example.com", ed},
		{"254-bytes", "none", strings.Repeat("a", 250) + ".com", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := stores[tt.dflt].GetCertificate(&tls.ClientHelloInfo{ServerName: tt.serverName})
			if tt.want == nil {
				if err == nil {
					t.Fatalf("GetCertificate(%q) = %v, want an error", tt.serverName, got.Leaf.DNSNames)
				}
				return
			}
			if err != nil {
				t.Fatalf("GetCertificate(%q) = %v", tt.serverName, err)
			}
			if !got.Leaf.Equal(tt.want) {
				t.Errorf("GetCertificate(%q) = %v, want %v", tt.serverName, got.Leaf.DNSNames, tt.want.DNSNames)
			}
		})
	}
}

// TestCertStoreCertificate checks what GetCertificate returns.
func TestCertStoreCertificate(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	inter := pkitest.NewCA(t, "Intermediate")
	inter.Cert = env.pki.CA.Issue(t, inter.Key.Public(), pkitest.LeafOptions{CA: true})
	leaf := inter.Issue(t, pkitest.P256Key().Public(), pkitest.LeafOptions{Names: []string{"chain.example.com"}})
	pkitest.WriteFile(t, env.dir, "chain.pem", pkitest.CertPEM(leaf, inter.Cert))
	s := env.newStore(t, CertStoreConfig{})

	c1, err := s.GetCertificate(&tls.ClientHelloInfo{ServerName: "chain.example.com"})
	if err != nil {
		t.Fatal(err)
	}
	c2, err := s.GetCertificate(&tls.ClientHelloInfo{ServerName: "chain.example.com"})
	if err != nil {
		t.Fatal(err)
	}
	if len(c1.Certificate) != 2 || !slices.Equal(c1.Certificate[1], inter.Cert.Raw) {
		t.Errorf("chain has %d certificates, want the leaf and the intermediate", len(c1.Certificate))
	}
	if !c1.Leaf.Equal(leaf) {
		t.Errorf("Leaf = %v, want the leaf", c1.Leaf.Subject)
	}
	if c1.PrivateKey == c2.PrivateKey {
		t.Error("two handshakes got the same PrivateKey; each must be bound to its own handshake")
	}
	k, ok := c1.PrivateKey.(RemoteKey)
	if !ok || k.KeyID() != mustKeyID(t, pkitest.P256Key().Public()) {
		t.Errorf("PrivateKey = %T, want the P-256 RemoteKey", c1.PrivateKey)
	}
	want := []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256, tls.ECDSAWithP384AndSHA384, tls.ECDSAWithP521AndSHA512}
	if !slices.Equal(c1.SupportedSignatureAlgorithms, want) {
		t.Errorf("SupportedSignatureAlgorithms = %v, want %v", c1.SupportedSignatureAlgorithms, want)
	}
}

// TestCertStoreLoadErrors checks the errors of Load with RequireAll: every
// problem of every file is reported, and nothing is served.
func TestCertStoreLoadErrors(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	unknownKey := pkitest.MustECDSA(elliptic.P256())
	good := pkitest.CertPEM(env.pki.CA.Issue(t, pkitest.P256Key().Public(), pkitest.LeafOptions{Names: []string{"good.example.com"}}))
	inter := pkitest.NewCA(t, "Intermediate")
	inter.Cert = env.pki.CA.Issue(t, inter.Key.Public(), pkitest.LeafOptions{CA: true})
	chainLeaf := inter.Issue(t, pkitest.P256Key().Public(), pkitest.LeafOptions{Names: []string{"chain.example.com"}})

	tests := []struct {
		name    string
		files   map[string][]byte
		dflt    string
		wantErr []string // substrings; nil for success
	}{
		{name: "ok/other-blocks-and-files-skipped", files: map[string][]byte{
			"good.pem":    append(pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: []byte{1}}), good...),
			"readme.txt":  []byte("not a certificate"),
			".hidden.pem": []byte("ignored"),
		}},
		{name: "ok/chain", files: map[string][]byte{"chain.pem": pkitest.CertPEM(chainLeaf, inter.Cert)}},
		{name: "private-key", files: map[string][]byte{"bad.pem": append(good, pkitest.KeyPEM(t, unknownKey)...)},
			wantErr: []string{"bad.pem", "holds a private key", `"PRIVATE KEY"`}},
		{name: "EC-private-key-first", files: map[string][]byte{"bad.crt": append(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: []byte{1}}), good...)},
			wantErr: []string{"bad.crt", "holds a private key", `"EC PRIVATE KEY"`}},
		{name: "RSA-private-key-after-broken-cert", files: map[string][]byte{"bad.pem": append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1}}), pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: []byte{1}})...)},
			wantErr: []string{"bad.pem", "holds a private key"}},
		{name: "key-file", files: map[string][]byte{"good.key": pkitest.KeyPEM(t, unknownKey)},
			wantErr: []string{"good.key", "a private key file in the certificate directory"}},
		{name: "missing-key", files: map[string][]byte{"unknown.pem": pkitest.CertPEM(env.pki.CA.Issue(t, unknownKey.Public(), pkitest.LeafOptions{Names: []string{"unknown.example.com"}}))},
			wantErr: []string{"holds no key for", "unknown.pem", link.FormatKeyID(mustKeyID(t, unknownKey.Public()))}},
		{name: "broken-certificate", files: map[string][]byte{"broken.pem": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("junk")})},
			wantErr: []string{"broken.pem", "certificate 1"}},
		{name: "no-certificate", files: map[string][]byte{"empty.pem": []byte("nothing here")},
			wantErr: []string{"empty.pem", "no CERTIFICATE PEM block"}},
		{name: "chain-out-of-order", files: map[string][]byte{"chain.pem": pkitest.CertPEM(inter.Cert, chainLeaf)},
			wantErr: []string{"chain.pem", "was not issued by certificate 2"}},
		{name: "several-problems", files: map[string][]byte{"a.pem": []byte("x"), "b.pem": append(good, pkitest.KeyPEM(t, unknownKey)...)},
			wantErr: []string{"a.pem", "b.pem"}},
		{name: "default-not-found", dflt: "nothing.example.com", wantErr: []string{`default certificate "nothing.example.com"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			for _, c := range envCerts {
				pkitest.WriteFile(t, dir, c.file, readFile(t, filepath.Join(env.dir, c.file)))
			}
			for name, data := range tt.files {
				pkitest.WriteFile(t, dir, name, data)
			}
			s, err := NewCertStore(CertStoreConfig{Client: env.client, Default: tt.dflt, RequireAll: true})
			if err != nil {
				t.Fatal(err)
			}
			err = s.Load(t.Context(), dir)
			if tt.wantErr == nil {
				if err != nil {
					t.Fatalf("Load() = %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Load() succeeded, want an error containing %q", tt.wantErr)
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Load() = %v, want it to contain %q", err, w)
				}
			}
			if n := strings.Count(err.Error(), "tlscore:"); n != 1 {
				t.Errorf("Load() = %v, names the package %d times, want once", err, n)
			}
			if _, err := s.GetCertificate(&tls.ClientHelloInfo{ServerName: "p256.example.com"}); err == nil {
				t.Error("GetCertificate() succeeded after a failed first Load")
			}
		})
	}
}

// TestCertStoreMissingKeys checks both ways of handling a certificate whose
// key the keyserver does not hold: skipped by default, an error with
// RequireAll.
func TestCertStoreMissingKeys(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	unknownKey := pkitest.MustECDSA(elliptic.P256())
	pkitest.WriteFile(t, env.dir, "unknown.pem", pkitest.CertPEM(env.pki.CA.Issue(t, unknownKey.Public(), pkitest.LeafOptions{Names: []string{"unknown.example.com"}})))

	s, err := NewCertStore(CertStoreConfig{Client: env.client, RequireAll: true})
	if err != nil {
		t.Fatal(err)
	}
	err = s.Load(t.Context(), env.dir)
	var missing *MissingKeysError
	if !errors.As(err, &missing) {
		t.Fatalf("Load() with RequireAll = %v, want a *MissingKeysError", err)
	}
	if want := []string{filepath.Join(env.dir, "unknown.pem")}; !slices.Equal(missing.Files, want) {
		t.Errorf("MissingKeysError.Files = %v, want %v", missing.Files, want)
	}
	if want := []link.KeyID{mustKeyID(t, unknownKey.Public())}; !slices.Equal(missing.KeyIDs, want) {
		t.Errorf("MissingKeysError.KeyIDs = %x, want %x", missing.KeyIDs, want)
	}

	logger, logs := newTestLogger()
	s, err = NewCertStore(CertStoreConfig{Client: env.client, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Load(t.Context(), env.dir); err != nil {
		t.Fatalf("Load() = %v, want the missing key skipped", err)
	}
	if !strings.Contains(logs.String(), "unknown.pem") {
		t.Errorf("no error names the skipped file; log:\n%s", logs)
	}
	if _, err := s.GetCertificate(&tls.ClientHelloInfo{ServerName: "unknown.example.com"}); err == nil {
		t.Error("GetCertificate() served a certificate whose key is missing")
	}
	if _, err := s.GetCertificate(&tls.ClientHelloInfo{ServerName: "p256.example.com"}); err != nil {
		t.Errorf("GetCertificate() = %v for a certificate with its key", err)
	}
}

// TestCertStoreReload checks that Load replaces the set atomically and that
// a failed Load keeps the previous one.
func TestCertStoreReload(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	s := env.newStore(t, CertStoreConfig{})
	get := func(name string) error {
		_, err := s.GetCertificate(&tls.ClientHelloInfo{ServerName: name})
		return err
	}
	if err := get("new.example.com"); err == nil {
		t.Fatal("new.example.com served before it exists")
	}
	pkitest.WriteFile(t, env.dir, "new.pem", pkitest.CertPEM(env.pki.CA.Issue(t, pkitest.P384Key().Public(), pkitest.LeafOptions{Names: []string{"new.example.com"}})))
	if err := s.Load(t.Context(), env.dir); err != nil {
		t.Fatal(err)
	}
	if err := get("new.example.com"); err != nil {
		t.Errorf("after Load: %v", err)
	}
	// A failure that is not one file's: a private key in the directory.
	pkitest.WriteFile(t, env.dir, "zz-bad.pem", readFile(t, filepath.Join(env.dir, "rsa.pem")), pkitest.KeyPEM(t, pkitest.MustECDSA(elliptic.P256())))
	if os.Remove(filepath.Join(env.dir, "p384.pem")) != nil {
		t.Fatal("remove")
	}
	if err := s.Load(t.Context(), env.dir); err == nil {
		t.Fatal("Load() of a directory with a private key succeeded")
	}
	for _, name := range []string{"new.example.com", "p384.example.com"} {
		if err := get(name); err != nil {
			t.Errorf("after a failed Load, %s: %v; want the previous certificates", name, err)
		}
	}
}

// TestCertStoreValidityWarnings checks that expired and not yet valid
// certificates are loaded, with a warning.
func TestCertStoreValidityWarnings(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	now := time.Now()
	pkitest.WriteFile(t, env.dir, "expired.pem", pkitest.CertPEM(env.pki.CA.Issue(t, pkitest.P256Key().Public(), pkitest.LeafOptions{Names: []string{"expired.example.com"}, NotBefore: now.Add(-48 * time.Hour), NotAfter: now.Add(-time.Hour)})))
	pkitest.WriteFile(t, env.dir, "future.pem", pkitest.CertPEM(env.pki.CA.Issue(t, pkitest.P256Key().Public(), pkitest.LeafOptions{Names: []string{"future.example.com"}, NotBefore: now.Add(time.Hour), NotAfter: now.Add(48 * time.Hour)})))
	logger, logs := newTestLogger()
	s := env.newStore(t, CertStoreConfig{Logger: logger})
	for _, want := range []string{"certificate has expired: file=" + filepath.Join(env.dir, "expired.pem"), "certificate is not yet valid: file=" + filepath.Join(env.dir, "future.pem")} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %q; log:\n%s", want, logs)
		}
	}
	if _, err := s.GetCertificate(&tls.ClientHelloInfo{ServerName: "expired.example.com"}); err != nil {
		t.Errorf("expired certificate not served: %v", err)
	}
}

func TestCertStoreConfigValidate(t *testing.T) {
	if _, err := NewCertStore(CertStoreConfig{}); err == nil {
		t.Error("NewCertStore() without a client succeeded")
	}
	env := newTestEnv(t, envOptions{})
	s, err := NewCertStore(CertStoreConfig{Client: env.client})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetCertificate(&tls.ClientHelloInfo{ServerName: "p256.example.com"}); err == nil {
		t.Error("GetCertificate() before Load succeeded")
	}
	if err := s.Load(t.Context(), filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("Load() of a missing directory succeeded")
	}
	if err := s.Load(t.Context(), t.TempDir()); err == nil || !strings.Contains(err.Error(), "no certificate to serve") {
		t.Errorf("Load() of an empty directory = %v, want a no-certificate error", err)
	}
}

func TestCertificateSchemes(t *testing.T) {
	const (
		pss256   = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA256
		pkcs1256 = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256
		pkcs1SHA = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA1
		ecSHA1   = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA1
	)
	rsaPub, p256, p384, ed := pkitest.RSAKey().Public(), pkitest.P256Key().Public(), pkitest.P384Key().Public(), pkitest.Ed25519Key().Public()
	p224 := pkitest.MustECDSA(elliptic.P224()).Public()
	tests := []struct {
		name      string
		pub       any
		offered   []keylessv1.SignatureAlgorithm
		want      []tls.SignatureScheme
		wantTLS13 bool
		wantErr   bool
	}{
		{name: "P256/all", pub: p256, offered: []keylessv1.SignatureAlgorithm{algECDSA256, algECDSA384, algECDSA512, ecSHA1},
			want: []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256, tls.ECDSAWithP384AndSHA384, tls.ECDSAWithP521AndSHA512}, wantTLS13: true},
		{name: "P256/only-SHA512", pub: p256, offered: []keylessv1.SignatureAlgorithm{algECDSA512},
			want: []tls.SignatureScheme{tls.ECDSAWithP521AndSHA512}, wantTLS13: false},
		{name: "P384/only-SHA384", pub: p384, offered: []keylessv1.SignatureAlgorithm{algECDSA384},
			want: []tls.SignatureScheme{tls.ECDSAWithP384AndSHA384}, wantTLS13: true},
		{name: "P384/only-SHA256", pub: p384, offered: []keylessv1.SignatureAlgorithm{algECDSA256},
			want: []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256}, wantTLS13: false},
		{name: "RSA/PSS-and-PKCS1", pub: rsaPub, offered: []keylessv1.SignatureAlgorithm{pss256, pkcs1256, pkcs1SHA},
			want: []tls.SignatureScheme{tls.PSSWithSHA256, tls.PKCS1WithSHA256}, wantTLS13: true},
		{name: "RSA/PKCS1-only", pub: rsaPub, offered: []keylessv1.SignatureAlgorithm{pkcs1256},
			want: []tls.SignatureScheme{tls.PKCS1WithSHA256}, wantTLS13: false},
		{name: "RSA/foreign-schemes-dropped", pub: rsaPub, offered: []keylessv1.SignatureAlgorithm{algECDSA256, algEd25519, pss256, 9999},
			want: []tls.SignatureScheme{tls.PSSWithSHA256}, wantTLS13: true},
		{name: "Ed25519", pub: ed, offered: []keylessv1.SignatureAlgorithm{algEd25519}, want: []tls.SignatureScheme{tls.Ed25519}, wantTLS13: true},
		{name: "SHA1-only", pub: rsaPub, offered: []keylessv1.SignatureAlgorithm{pkcs1SHA}, wantErr: true},
		{name: "none", pub: p256, wantErr: true},
		{name: "P224", pub: p224, offered: []keylessv1.SignatureAlgorithm{algECDSA256}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, tls13, err := certificateSchemes(tt.pub, tt.offered)
			if tt.wantErr {
				if err == nil || len(got) != 0 {
					t.Fatalf("certificateSchemes() = %v, %v; want an error and no schemes", got, err)
				}
				return
			}
			if err != nil || !slices.Equal(got, tt.want) || tls13 != tt.wantTLS13 {
				t.Errorf("certificateSchemes() = %v, %t, %v; want %v, %t", got, tls13, err, tt.want, tt.wantTLS13)
			}
		})
	}
}
