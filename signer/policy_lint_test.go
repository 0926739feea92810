package signer

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/link"
)

// certificateFor returns a certificate from the test CA for pub with the
// given DNS names, valid from notBefore to notAfter.
func certificateFor(t *testing.T, pub crypto.PublicKey, notBefore, notAfter time.Time, names ...string) *x509.Certificate {
	t.Helper()
	pki := thePKI()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(pki.serial.Add(1)),
		Subject:      pkix.Name{CommonName: "lint test"},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		DNSNames:     names,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, pki.ca, pub, pki.caKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return leaf
}

// TestPolicyLintLabelSeveralKeys: a label: pattern that matches more than
// one key is warned about, with the keys it matches; one that matches a
// single key is not.
func TestPolicyLintLabelSeveralKeys(t *testing.T) {
	p := mustPolicy(t, `
rules:
  - name: web
    identities: [a.example.com]
    keys: [label:www, label:api]
    operations: [sign]
    schemes: [default]
`)
	keys := []crypto.Signer{labeled{testP256Key(), "www"}, labeled{testP384Key(), "www"}, labeled{testRSAKey(), "api"}}
	got := strings.Join(p.Lint(keys), "\n")
	ids := []string{link.FormatKeyID(link.KeyID(mustKeyID(t, testP256Key().Public()))), link.FormatKeyID(link.KeyID(mustKeyID(t, testP384Key().Public())))}
	if ids[1] < ids[0] {
		ids[0], ids[1] = ids[1], ids[0]
	}
	want := fmt.Sprintf(`policy test.yaml: line 3: rule "web": key pattern "label:www" matches 2 keys (%s, %s), and would match any key added to the token with that label; name each key with id: instead`, ids[0], ids[1])
	if !strings.Contains(got, want) {
		t.Errorf("Lint() =\n%s\nwant a warning containing %q", got, want)
	}
	if strings.Contains(got, "label:api") {
		t.Errorf("Lint() =\n%s\nwarns about label:api, which matches one key", got)
	}
}

// TestPolicyLintCertificateFiles: Lint names each certificate file that
// could not be used, has expired, is not valid yet, or is for a key the
// keyserver does not hold; a good file gets no warning. The names of an
// expired certificate still count for cert: patterns.
func TestPolicyLintCertificateFiles(t *testing.T) {
	p := mustPolicy(t, `
rules:
  - name: web
    identities: [a.example.com]
    keys: [cert:good.example.com, cert:old.example.com, cert:absent.example.com]
    operations: [sign]
    schemes: [default]
`)
	now := time.Now()
	files := []CertificateFile{
		{Path: "certs/good.pem", Leaf: certificateFor(t, testP256Key().Public(), now.Add(-time.Hour), now.Add(time.Hour), "good.example.com")},
		{Path: "certs/old.pem", Leaf: certificateFor(t, testP384Key().Public(), now.Add(-48*time.Hour), now.Add(-24*time.Hour), "old.example.com")},
		{Path: "certs/future.pem", Leaf: certificateFor(t, testP384Key().Public(), now.Add(24*time.Hour), now.Add(48*time.Hour), "future.example.com")},
		{Path: "certs/absent.pem", Leaf: certificateFor(t, testP521Key().Public(), now.Add(-time.Hour), now.Add(time.Hour), "absent.example.com")},
		{Path: "certs/broken.pem", Err: errors.New("x509: malformed certificate")},
	}
	q := p.WithCertificateFiles(files)
	keys := []crypto.Signer{testP256Key(), testP384Key()}
	got := strings.Join(q.Lint(keys), "\n")
	for _, want := range []string{
		"certificate file certs/old.pem expired on " + files[1].Leaf.NotAfter.UTC().Format(time.RFC3339) + "; cert: patterns still match its names (old.example.com)",
		"certificate file certs/future.pem is not valid before " + files[2].Leaf.NotBefore.UTC().Format(time.RFC3339),
		"certificate file certs/absent.pem is for key " + link.FormatKeyID(link.KeyID(mustKeyID(t, testP521Key().Public()))) + ", which the keyserver does not hold",
		"certificate file certs/broken.pem is not used for cert: patterns: x509: malformed certificate",
		`key pattern "cert:absent.example.com" matches no key the keyserver holds`,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("Lint() =\n%s\nwant a warning containing %q", got, want)
		}
	}
	if strings.Contains(got, "good.pem") || strings.Contains(got, `"cert:old.example.com"`) || strings.Contains(got, `"cert:good.example.com"`) {
		t.Errorf("Lint() =\n%s\nwarns about the good file or a pattern that matches", got)
	}
	// The certificates' names map to their keys.
	for _, c := range []struct {
		key  crypto.Signer
		want bool
	}{{testP256Key(), true}, {testP384Key(), true}, {testRSAKey(), false}} {
		id := link.KeyID(mustKeyID(t, c.key.Public()))
		if _, ok := q.grantsFor("a.example.com", keyRef{id: id}); ok != c.want {
			t.Errorf("grantsFor(key %s) = %t, want %t", link.FormatKeyID(id), ok, c.want)
		}
	}
	// WithCertificates drops the files along with their names.
	if r := q.WithCertificates(nil); len(r.certFiles) != 0 || len(p.certFiles) != 0 {
		t.Error("certificate files kept by WithCertificates, or set on the original")
	}
}
