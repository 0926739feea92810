package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/hsm/hsmtest"
	"github.com/keyless-tls/keyless/link"
)

// testCertPEM returns a PEM certificate for pub with the given DNS names,
// valid from notBefore to notAfter, issued by a throwaway CA.
func testCertPEM(t *testing.T, pub crypto.PublicKey, notBefore, notAfter time.Time, names ...string) string {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "certs test CA"},
		NotBefore: notBefore, NotAfter: notAfter, IsCA: true, BasicConstraintsValid: true}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: names[0]},
		NotBefore: notBefore, NotAfter: notAfter, DNSNames: names}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, pub, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

func TestCertificateFiles(t *testing.T) {
	dir := t.TempDir()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	now := time.Now()
	good := testCertPEM(t, key.Public(), now.Add(-time.Hour), now.Add(time.Hour), "www.example.com", "example.com")
	writeTestFile(t, dir, "good.pem", good)
	writeTestFile(t, dir, "chain.CRT", good+testCertPEM(t, key.Public(), now.Add(-time.Hour), now.Add(time.Hour), "intermediate.example"))
	writeTestFile(t, dir, "broken.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
	writeTestFile(t, dir, "empty.crt", "nothing here\n")
	writeTestFile(t, dir, "notes.txt", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n") // not a certificate file
	writeTestFile(t, dir, ".hidden.pem", "junk")
	if err := os.Mkdir(filepath.Join(dir, "sub.pem"), 0o755); err != nil {
		t.Fatal(err)
	}
	files, err := certificateFiles(dir)
	if err != nil {
		t.Fatalf("certificateFiles() = %v", err)
	}
	got := map[string]string{}
	for _, f := range files {
		switch {
		case f.Leaf != nil && f.Err == nil:
			got[filepath.Base(f.Path)] = strings.Join(f.Leaf.DNSNames, ",")
		case f.Leaf == nil && f.Err != nil:
			got[filepath.Base(f.Path)] = "error: " + f.Err.Error()
		default:
			t.Errorf("file %s: leaf %v and error %v", f.Path, f.Leaf, f.Err)
		}
	}
	want := map[string]string{
		"good.pem":   "www.example.com,example.com",
		"chain.CRT":  "www.example.com,example.com",
		"broken.pem": "error: the certificate does not parse: x509: malformed certificate",
		"empty.crt":  "error: no CERTIFICATE PEM block",
	}
	if len(got) != len(want) {
		t.Errorf("certificateFiles() = %v, want %v", got, want)
	}
	for name, w := range want {
		if !strings.HasPrefix(got[name], w) {
			t.Errorf("certificateFiles(): %s = %q, want %q", name, got[name], w)
		}
	}

	// A private key anywhere in a certificate file is an error naming it.
	writeTestFile(t, dir, "leaked.pem", good+"-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n")
	if _, err := certificateFiles(dir); err == nil || !strings.Contains(err.Error(), "leaked.pem holds a private key (PEM block \"EC PRIVATE KEY\")") {
		t.Errorf("certificateFiles() with a private key = %v", err)
	}
	if _, err := certificateFiles(filepath.Join(dir, "missing")); err == nil {
		t.Error("certificateFiles(missing directory) = nil error")
	}
}

// TestServeCertificateChecks: keyserver serve warns, at startup and again
// at each reload, about each -certs file that is broken, expired or for a
// key the token does not hold (naming the file), and about a label:
// pattern that matches two keys of the token; a broken file does not stop
// it.
func TestServeCertificateChecks(t *testing.T) {
	tok := hsmtest.New(t)
	flags := tokenFlags(t, tok)
	keys := func(args ...string) string {
		t.Helper()
		out, errs, err := runCmd(t, append(append([]string{"keys"}, args...), flags...)...)
		if err != nil {
			t.Fatalf("keyserver keys %s: %v\n%s", strings.Join(args, " "), err, errs)
		}
		return out
	}
	keys("generate", "-type", "ecdsa", "-label", "www", "-id", "01")
	keys("generate", "-type", "ecdsa", "-label", "www", "-id", "02")
	keys("generate", "-type", "ecdsa", "-label", "api", "-id", "03")
	block, _ := pem.Decode([]byte(keys("export", "-key", "api")))
	if block == nil {
		t.Fatal("keys export printed no PEM block")
	}
	apiPub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	otherID, _ := link.KeyIDOf(other.Public())

	dir := t.TempDir()
	certs := filepath.Join(dir, "certs")
	if err := os.Mkdir(certs, 0o755); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	expired := writeTestFile(t, certs, "api-old.pem", testCertPEM(t, apiPub, now.Add(-48*time.Hour), now.Add(-24*time.Hour), "api.example.com"))
	absent := writeTestFile(t, certs, "elsewhere.pem", testCertPEM(t, other.Public(), now.Add(-time.Hour), now.Add(time.Hour), "elsewhere.example.com"))
	broken := writeTestFile(t, certs, "broken.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
	policy := writeTestFile(t, dir, "policy.yaml", `rules:
  - name: edge
    identities: [spiffe://test/edge]
    keys: [label:www, cert:api.example.com]
    operations: [sign]
    schemes: [default]
`)
	logs := startServe(t, append(append(flags, serveTLSFlags(t)...), "-policy", policy, "-certs", certs, "-audit-log", filepath.Join(dir, "audit.log"))...)
	wants := []string{
		"certificate file " + expired + " expired on ",
		"certificate file " + absent + " is for key " + link.FormatKeyID(otherID) + ", which the keyserver does not hold",
		"certificate file " + broken + " is not used for cert: patterns: the certificate does not parse",
		`rule "edge": key pattern "label:www" matches 2 keys (`,
	}
	for _, want := range wants {
		if n := strings.Count(logs.String(), want); n != 1 {
			t.Errorf("startup log has %q %d times, want once:\n%s", want, n, logs)
		}
	}
	if strings.Contains(logs.String(), `"cert:api.example.com" matches no key`) {
		t.Errorf("the expired certificate's names do not count:\n%s", logs)
	}

	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitLog(t, logs, "policy reloaded: policy=")
	for _, want := range wants {
		if n := strings.Count(logs.String(), want); n != 2 {
			t.Errorf("log after a reload has %q %d times, want twice:\n%s", want, n, logs)
		}
	}
}
