package main

import (
	"context"
	"encoding/pem"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/hsm/hsmtest"
	"github.com/keyless-tls/keyless/link"
	"github.com/keyless-tls/keyless/signer"
)

// serveNoToken is a complete set of serve flags except the token.
var serveNoToken = []string{"-tls-cert", "ks.pem", "-tls-key", "ks.key", "-client-ca", "ca.pem", "-policy", "policy.yaml"}

func TestParseServeTokenURIConflicts(t *testing.T) {
	const uri = "pkcs11:token=web;object=a?module-path=/opt/hsm/lib.so&pin-source=file:/etc/keyless/pin"
	tests := []struct {
		args []string
		want []string // what the error must name
	}{
		{[]string{"-token-uri", uri, "-token-label", "other"}, []string{"-token-uri", "-token-label"}},
		{[]string{"-token-uri", uri, "-token-serial", "1234"}, []string{"-token-uri", "-token-serial"}},
		{[]string{"-token-uri", uri, "-slot", "0"}, []string{"-token-uri", "-slot"}},
		{[]string{"-token-uri", uri, "-module", "/usr/lib/other.so"}, []string{"-token-uri", "module-path", "-module"}},
		{[]string{"-token-uri", uri, "-pin-file", "/tmp/pin"}, []string{"-token-uri", "pin-source", "-pin-file"}},
		{[]string{"-token-uri", uri, "-pin-env", "PIN"}, []string{"-token-uri", "pin-source", "-pin-env"}},
		{[]string{"-token-uri", "pkcs11:token=web?pin-value=1234"}, []string{"-token-uri", "pin-value is refused"}},
		{[]string{"-token-uri", "pkcs11:token=web;vendor=x"}, []string{"-token-uri", "unsupported attributes vendor"}},
		{[]string{"-token-uri", "token=web"}, []string{"-token-uri", "pkcs11:"}},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			_, err := parseServe(append(tt.args, serveNoToken...), io.Discard)
			if err == nil {
				t.Fatalf("parseServe(%q) succeeded", tt.args)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("parseServe(%q) = %v, want an error naming %s", tt.args, err, w)
				}
			}
			if strings.Contains(err.Error(), "1234") && strings.Contains(err.Error(), "pin-value") {
				t.Errorf("the error shows the pin-value: %v", err)
			}
		})
	}
	// A conflict with a setting from the environment is found too.
	t.Setenv("KEYSERVER_TOKEN_LABEL", "other")
	if _, err := parseServe(append([]string{"-token-uri", uri}, serveNoToken...), io.Discard); err == nil || !strings.Contains(err.Error(), "-token-label") {
		t.Errorf("parseServe with KEYSERVER_TOKEN_LABEL and -token-uri = %v, want a conflict naming -token-label", err)
	}
}

// TestParseServeTokenURIFromTools checks that a URI as p11tool
// --list-privkeys and pkcs11-tool print it, naming the token by serial,
// label, manufacturer and model at once, is accepted as it is: the token
// is looked up by serial and must match the rest.
func TestParseServeTokenURIFromTools(t *testing.T) {
	const uri = "pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;serial=c79b6fa882de6672;token=web;id=%01;object=www;type=private"
	f, err := parseServe(append([]string{"-token-uri", uri, "-module", "/usr/lib/softhsm/libsofthsm2.so"}, serveNoToken...), io.Discard)
	if err != nil {
		t.Fatalf("parseServe(%q) = %v", uri, err)
	}
	h := f.hsm
	if h.tokenSerial != "c79b6fa882de6672" || h.tokenLabel != "" || h.slot != -1 {
		t.Errorf("token selected by serial %q, label %q, slot %d; want the serial only", h.tokenSerial, h.tokenLabel, h.slot)
	}
	if u := h.uri; u == nil || u.TokenLabel != "web" || u.TokenManufacturer != "SoftHSM project" || u.TokenModel != "SoftHSM v2" {
		t.Errorf("uri = %+v; want the label, manufacturer and model kept for matching", u)
	}
}

func TestParseServeTokenURISources(t *testing.T) {
	const uri = "pkcs11:slot-id=3;id=%0a%0b?module-path=/opt/hsm/lib.so&pin-source=/etc/keyless/pin"
	check := func(t *testing.T, f *serveConfig) {
		t.Helper()
		h := f.hsm
		if h.uri == nil || h.module != "/opt/hsm/lib.so" || h.slot != 3 || h.pinFile != "/etc/keyless/pin" || h.tokenLabel != "" {
			t.Errorf("flags from -token-uri: module %q slot %d pin-file %q token-label %q uri %v", h.module, h.slot, h.pinFile, h.tokenLabel, h.uri)
		}
		if h.uri != nil && !h.uri.MatchKey("anything", []byte{0x0a, 0x0b}) {
			t.Errorf("uri %v does not select id 0a0b", h.uri)
		}
	}
	t.Run("flag", func(t *testing.T) {
		f, err := parseServe(append([]string{"-token-uri", uri}, serveNoToken...), io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		check(t, f)
	})
	t.Run("config file", func(t *testing.T) {
		file := filepath.Join(t.TempDir(), "keyserver.yaml")
		os.WriteFile(file, []byte("token-uri: '"+uri+"'\n"), 0o600)
		f, err := parseServe(append([]string{"-config", file}, serveNoToken...), io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		check(t, f)
	})
	t.Run("environment", func(t *testing.T) {
		t.Setenv("KEYSERVER_TOKEN_URI", uri)
		f, err := parseServe(serveNoToken, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		check(t, f)
	})
}

// TestTokenURIKeys checks -token-uri and -key URIs against a SoftHSM
// token: listing, exporting and the key store filter serve uses.
func TestTokenURIKeys(t *testing.T) {
	tok := hsmtest.New(t)
	dir := t.TempDir()
	pinFile := writeTestFile(t, dir, "pin", tok.PIN+"\n")
	os.Chmod(pinFile, 0o600)
	base := "pkcs11:token=" + tok.Label
	query := "?module-path=" + tok.ModulePath + "&pin-source=file:" + pinFile
	for _, gen := range [][]string{
		{"-label", "a.uri.test", "-id", "01"},
		{"-label", "b.uri.test", "-id", "02"},
	} {
		if _, errs, err := runCmd(t, append([]string{"keys", "generate", "-token-uri", base + query}, gen...)...); err != nil {
			t.Fatalf("keys generate %v: %v\n%s", gen, err, errs)
		}
	}
	// generate takes -label and -id from the URI's object= and id=.
	if out, errs, err := runCmd(t, "keys", "generate", "-token-uri", base+";object=c.uri.test;id=%03"+query); err != nil || !strings.Contains(out, "c.uri.test") {
		t.Fatalf("keys generate -token-uri with object=: %v\n%s%s", err, out, errs)
	}

	out, errs, err := runCmd(t, "keys", "list", "-token-uri", base+";object=a.uri.test"+query)
	if err != nil {
		t.Fatalf("keys list: %v\n%s", err, errs)
	}
	if !strings.Contains(out, "a.uri.test") || strings.Contains(out, "b.uri.test") || strings.Contains(out, "c.uri.test") {
		t.Errorf("keys list -token-uri ...object=a.uri.test printed:\n%s", out)
	}

	// -key as a URI, alone or with the token flags; by label, by id.
	export := func(args ...string) string {
		t.Helper()
		out, errs, err := runCmd(t, append([]string{"keys", "export"}, args...)...)
		if err != nil {
			t.Fatalf("keys export %q: %v\n%s", args, err, errs)
		}
		if b, _ := pem.Decode([]byte(out)); b == nil || b.Type != "PUBLIC KEY" {
			t.Fatalf("keys export %q printed no public key:\n%s", args, out)
		}
		return out
	}
	byURI := export("-key", base+";object=b.uri.test"+query)
	if byID := export(append([]string{"-key", "pkcs11:id=%02"}, tokenFlags(t, tok)...)...); byID != byURI {
		t.Error("export by -key pkcs11:id=%02 differs from export by object=b.uri.test")
	}
	if byLabel := export(append([]string{"-key", "b.uri.test"}, tokenFlags(t, tok)...)...); byLabel != byURI {
		t.Error("export by URI differs from export by label")
	}
	if _, _, err := runCmd(t, "keys", "export", "-key", base+";object=nope"+query); err == nil || !strings.Contains(err.Error(), "no key matches") {
		t.Errorf("export of a missing key = %v, want no key matches", err)
	}
	if _, _, err := runCmd(t, "keys", "export", "-key", base+query); err == nil || !strings.Contains(err.Error(), "names no key") {
		t.Errorf("export -key without object= or id= = %v, want names no key", err)
	}
	if _, _, err := runCmd(t, "keys", "export", "-token-uri", base+query, "-key", base+";object=a.uri.test"); err == nil || !strings.Contains(err.Error(), "-key and -token-uri") {
		t.Errorf("export with both -key and -token-uri naming the token = %v", err)
	}

	// The key store serve uses sees only the selected key, and checks the
	// module's health.
	m, err := hsm.Open(hsm.Config{ModulePath: tok.ModulePath, TokenLabel: tok.Label, PIN: tok.PIN})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	u, err := hsm.ParseURI("pkcs11:object=a.uri.test;id=%01")
	if err != nil {
		t.Fatal(err)
	}
	store := newKeyStore(m, u)
	if _, ok := store.(signer.Checker); !ok {
		t.Error("the filtered key store is not a signer.Checker")
	}
	if err := store.(signer.Checker).Check(context.Background()); err != nil {
		t.Errorf("Check = %v", err)
	}
	keys, err := store.Keys(context.Background())
	if err != nil || len(keys) != 1 || keys[0].(signer.Describer).Label() != "a.uri.test" {
		t.Fatalf("Keys = %d keys, %v; want a.uri.test alone", len(keys), err)
	}
	all, _ := m.Keys(context.Background())
	for _, k := range all {
		id, _ := link.KeyIDOf(k.Public())
		got, err := store.Key(context.Background(), id)
		want := k.(signer.Describer).Label() == "a.uri.test"
		if err != nil || (got != nil) != want {
			t.Errorf("Key(%s) = %v, %v; want found=%t", k.(signer.Describer).Label(), got != nil, err, want)
		}
	}
	if s := newKeyStore(m, nil); s != signer.KeyStore(m) {
		t.Error("newKeyStore without a URI wraps the module")
	}
}
