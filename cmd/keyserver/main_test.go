package main

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyless-tls/keyless/hsm/hsmtest"
	"github.com/keyless-tls/keyless/link"
)

func TestMain(m *testing.M) { hsmtest.Main(m) }

// runCmd runs the keyserver command in process and returns its output.
func runCmd(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errb bytes.Buffer
	err = run(t.Context(), args, &out, &errb)
	return out.String(), errb.String(), err
}

func TestRunCommands(t *testing.T) {
	tests := []struct {
		args    []string
		wantErr string
	}{
		{nil, "no command given"},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"keys"}, "keys: no command given"},
		{[]string{"keys", "shred"}, `keys: unknown command "shred"`},
		{[]string{"token"}, `want "token init"`},
		{[]string{"token", "init"}, "-label is required"},
		{[]string{"serve", "-log-level", "loud", "-tls-cert", "c", "-tls-key", "k", "-client-ca", "ca"}, `-log-level "loud"`},
		{[]string{"serve"}, "is required"},
		{[]string{"serve", "extra"}, "unexpected arguments"},
		{[]string{"keys", "list", "extra"}, "unexpected arguments"},
		{[]string{"keys", "generate", "-id", "xyz", "-label", "a"}, `-id "xyz" is not hex`},
		{[]string{"keys", "generate", "-type", "dsa", "-label", "a"}, `-type is "dsa"; want "rsa", "ecdsa" or "ed25519"`},
		{[]string{"keys", "generate", "-type", "rsa", "-bits", "1024", "-label", "a"}, "-bits is 1024; an RSA key"},
		{[]string{"keys", "generate", "-type", "ecdsa", "-curve", "P-521", "-label", "a"}, `-curve is "P-521"; want "P-256" or "P-384"`},
		{[]string{"keys", "generate", "-type", "ecdsa"}, "-label is empty"},
		{[]string{"keys", "csr", "-key", "a"}, "-dns is required"},
		{[]string{"keys", "selfsign", "-key", "a", "-dns", "x", "-days", "0"}, "-days is 0"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			_, _, err := runCmd(t, tt.args...)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("run(%q) = %v, want an error containing %q", tt.args, err, tt.wantErr)
			}
		})
	}
	if _, _, err := runCmd(t, "help"); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("run(help) = %v, want flag.ErrHelp", err)
	}
}

// tokenFlags returns the flags that open tok, with the PIN in a file.
// (-pin-env would do for one command only: it removes the variable.)
func tokenFlags(t *testing.T, tok *hsmtest.Token) []string {
	pinFile := filepath.Join(t.TempDir(), "pin")
	if err := os.WriteFile(pinFile, []byte(tok.PIN), 0o600); err != nil {
		t.Fatal(err)
	}
	return []string{"-module", tok.ModulePath, "-token-label", tok.Label, "-pin-file", pinFile}
}

func TestKeysLifecycle(t *testing.T) {
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
	for _, gen := range [][]string{
		{"-type", "rsa", "-label", "web-rsa"},
		{"-type", "ecdsa", "-curve", "P-384", "-label", "web-ec", "-id", "0a0b"},
		{"-type", "ed25519", "-label", "web-ed"},
	} {
		out := keys(append([]string{"generate"}, gen...)...)
		if !strings.Contains(out, "KEY ID") || strings.Count(out, "\n") != 2 {
			t.Errorf("generate %v printed:\n%s", gen, out)
		}
	}
	list := keys("list")
	for _, want := range []string{"RSA-2048", "web-rsa", "ECDSA-384", "web-ec", "0a0b", "ED25519-255", "web-ed", "rsa_pss_rsae_sha256", "ecdsa_sha384", "ed25519"} {
		if !strings.Contains(list, want) {
			t.Errorf("keys list lacks %q:\n%s", want, list)
		}
	}

	// Export by label and by key id give the same public key.
	block, _ := pem.Decode([]byte(keys("export", "-key", "web-ec")))
	if block == nil || block.Type != "PUBLIC KEY" {
		t.Fatalf("export printed no PUBLIC KEY block")
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := link.KeyIDOf(pub)
	if !strings.Contains(list, link.FormatKeyID(id)) {
		t.Errorf("exported key's id %s is not in the list", link.FormatKeyID(id))
	}
	if again := keys("export", "-key", link.FormatKeyID(id)); again != string(pem.EncodeToMemory(block)) {
		t.Errorf("export by key id differs from export by label")
	}
	if dash := keys("export", "-key", "web-ec", "-out", "-"); dash != string(pem.EncodeToMemory(block)) {
		t.Errorf("export -out - printed %q, want the key on standard output", dash)
	}

	// A CSR and a self-signed certificate signed inside the token.
	for _, label := range []string{"web-rsa", "web-ec", "web-ed"} {
		block, _ := pem.Decode([]byte(keys("csr", "-key", label, "-dns", "a.example,b.example")))
		csr, err := x509.ParseCertificateRequest(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if err := csr.CheckSignature(); err != nil || csr.Subject.CommonName != "a.example" || len(csr.DNSNames) != 2 {
			t.Errorf("CSR for %s: signature %v, subject %v, names %v", label, err, csr.Subject, csr.DNSNames)
		}
		out := filepath.Join(t.TempDir(), "cert.pem")
		keys("selfsign", "-key", label, "-dns", "self.example", "-cn", "Self", "-out", out)
		b, _ := os.ReadFile(out)
		block, _ = pem.Decode(b)
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if err := cert.CheckSignature(cert.SignatureAlgorithm, cert.RawTBSCertificate, cert.Signature); err != nil || cert.VerifyHostname("self.example") != nil || cert.Subject.CommonName != "Self" {
			t.Errorf("self-signed certificate for %s: %v", label, err)
		}
	}

	for _, tt := range []struct{ key, want string }{
		{"nope", `no key has id or label "nope"`},
		{"", "-key is required"},
	} {
		_, _, err := runCmd(t, append([]string{"keys", "export", "-key", tt.key}, flags...)...)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("export -key %q = %v, want %q", tt.key, err, tt.want)
		}
	}
	keys("generate", "-type", "ecdsa", "-label", "web-ec")
	if _, _, err := runCmd(t, append([]string{"keys", "export", "-key", "web-ec"}, flags...)...); err == nil || !strings.Contains(err.Error(), "2 keys have label") {
		t.Errorf("export of an ambiguous label = %v", err)
	}
}

// TestPINSources checks where the PIN may come from, and that no error
// ever contains it.
func TestPINSources(t *testing.T) {
	tok := hsmtest.New(t)
	dir := t.TempDir()
	pinFile := filepath.Join(dir, "pin")
	os.WriteFile(pinFile, []byte(tok.PIN+"\n"), 0o600)
	wrongFile := filepath.Join(dir, "wrong")
	os.WriteFile(wrongFile, []byte("wrong-pin-31337\n"), 0o600)
	emptyFile := filepath.Join(dir, "empty")
	os.WriteFile(emptyFile, nil, 0o600)
	base := []string{"keys", "list", "-module", tok.ModulePath, "-token-label", tok.Label}

	if _, errs, err := runCmd(t, append(base, "-pin-file", pinFile)...); err != nil {
		t.Fatalf("keys list with -pin-file: %v\n%s", err, errs)
	}
	t.Setenv("MY_PIN", tok.PIN)
	if _, errs, err := runCmd(t, append(base, "-pin-env", "MY_PIN")...); err != nil {
		t.Fatalf("keys list with -pin-env: %v\n%s", err, errs)
	}
	if _, ok := os.LookupEnv("MY_PIN"); ok {
		t.Error("-pin-env left the PIN in the environment")
	}
	t.Setenv(defaultPINEnv, "")
	tests := []struct {
		args []string
		want string
	}{
		{nil, "environment variable KEYLESS_PIN is not set"},
		{[]string{"-pin-env", "NO_SUCH_PIN_VAR"}, "NO_SUCH_PIN_VAR is not set"},
		{[]string{"-pin-file", filepath.Join(dir, "missing")}, "no such file"},
		{[]string{"-pin-file", emptyFile}, "is empty"},
		{[]string{"-pin-file", wrongFile}, "PIN"},
	}
	for _, tt := range tests {
		_, errs, err := runCmd(t, append(base, tt.args...)...)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("keys list %v = %v, want an error containing %q", tt.args, err, tt.want)
			continue
		}
		for _, secret := range []string{tok.PIN, "wrong-pin-31337"} {
			if strings.Contains(err.Error(), secret) || strings.Contains(errs, secret) {
				t.Errorf("keys list %v revealed a PIN: %v\n%s", tt.args, err, errs)
			}
		}
	}
}
