package hsm_test

import (
	"fmt"
	"net/url"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/hsm/hsmtest"
	"github.com/keyless-tls/keyless/signer"
)

// toolURI builds the URI of tok as p11tool --list-all prints it, with the
// token, slot and library attributes read from SoftHSM itself. The library
// must be initialised in the process (a Module open).
func toolURI(t *testing.T, tok *hsmtest.Token) string {
	t.Helper()
	slot := uint(tok.Slot(t))
	p := pkcs11.New(tok.ModulePath)
	defer p.Destroy()
	if err := p.Initialize(); err == nil {
		t.Fatal("library not initialised")
	}
	info, err := p.GetInfo()
	if err != nil {
		t.Fatal(err)
	}
	si, err := p.GetSlotInfo(slot)
	if err != nil {
		t.Fatal(err)
	}
	ti, err := p.GetTokenInfo(slot)
	if err != nil {
		t.Fatal(err)
	}
	e := url.PathEscape
	return fmt.Sprintf("pkcs11:model=%s;manufacturer=%s;serial=%s;token=%s;slot-description=%s;slot-manufacturer=%s;"+
		"library-manufacturer=%s;library-description=%s;library-version=%d.%d;type=private",
		e(ti.Model), e(ti.ManufacturerID), e(ti.SerialNumber), e(ti.Label), e(si.SlotDescription), e(si.ManufacturerID),
		e(info.ManufacturerID), e(info.LibraryDescription), info.LibraryVersion.Major, info.LibraryVersion.Minor)
}

// TestOpenByToolURI opens SoftHSM tokens with a URI naming every token,
// slot and library attribute, as tools print them: it selects its token,
// and a URI that differs in any attribute selects none, with an error
// that says what was looked for.
func TestOpenByToolURI(t *testing.T) {
	tok := hsmtest.New(t)
	tok.Open(t) // keeps the library initialised for toolURI
	full := toolURI(t, tok)
	u, err := hsm.ParseURI(full)
	if err != nil {
		t.Fatalf("ParseURI(%q) = %v", full, err)
	}
	cfg := tok.Config()
	cfg.TokenLabel, cfg.TokenSerial, cfg.TokenURI = "", u.TokenSerial, u
	m := tok.OpenConfig(t, cfg)
	if err := m.Check(testContext(t)); err != nil {
		t.Fatalf("Check() = %v", err)
	}

	for _, tt := range []struct{ attr, value, wantErr string }{
		{"model", "Other%20Model", "matching"},
		{"manufacturer", "Other", "matching"},
		{"token", "other", "matching"},
		{"slot-description", "other", "matching"},
		{"slot-manufacturer", "other", "matching"},
		{"library-manufacturer", "Other", "not the library the URI names"},
		{"library-description", "Other", "not the library the URI names"},
		{"library-version", "99.1", "not the library the URI names"},
	} {
		t.Run(tt.attr, func(t *testing.T) {
			var parts []string
			for _, p := range strings.Split(strings.TrimPrefix(full, "pkcs11:"), ";") {
				if name, _, _ := strings.Cut(p, "="); name == tt.attr {
					p = tt.attr + "=" + tt.value
				}
				parts = append(parts, p)
			}
			u, err := hsm.ParseURI("pkcs11:" + strings.Join(parts, ";"))
			if err != nil {
				t.Fatal(err)
			}
			c := cfg
			c.TokenURI = u
			m, err := hsm.Open(c)
			if err == nil {
				m.Close()
				t.Fatalf("Open() with %s=%s succeeded", tt.attr, tt.value)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("Open() with %s=%s = %v; want an error containing %q", tt.attr, tt.value, err, tt.wantErr)
			}
		})
	}
}

// TestAlwaysAuthenticateKeySkipped makes a key with CKA_ALWAYS_AUTHENTICATE
// (a login before every operation, which the module does not do): it is
// skipped with a warning that names it, and the other key is served.
func TestAlwaysAuthenticateKeySkipped(t *testing.T) {
	tok := hsmtest.New(t)
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "always-auth", "--id", "a1", "--always-auth")
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "plain", "--id", "a2")
	var logs syncBuffer
	cfg := tok.Config()
	cfg.Logger = testLogger(&logs)
	m := tok.OpenConfig(t, cfg)
	if a := tokenObject(t, tok, pkcs11.CKO_PRIVATE_KEY, []byte{0xa1}, pkcs11.CKA_ALWAYS_AUTHENTICATE)[pkcs11.CKA_ALWAYS_AUTHENTICATE]; len(a) != 1 || a[0] != 1 {
		t.Fatalf("the token did not set CKA_ALWAYS_AUTHENTICATE: %x", a)
	}
	keys, err := m.Keys(testContext(t))
	if err != nil || len(keys) != 1 || keys[0].(signer.Describer).Label() != "plain" {
		t.Fatalf("Keys() = %v, %v; want the plain key only", keys, err)
	}
	if !strings.Contains(logs.String(), "CKA_ALWAYS_AUTHENTICATE") || !strings.Contains(logs.String(), `label \"always-auth\"`) {
		t.Errorf("no warning naming the skipped key:\n%s", logs.String())
	}
}
