package hsm_test

import (
	"crypto"
	"crypto/tls"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/hsm/hsmtest"
	"github.com/keyless-tls/keyless/signer"
)

// attributer is the method the module's keys have for what the token
// reports of them.
type attributer interface{ Attributes() hsm.KeyAttributes }

func TestKeyAttributes(t *testing.T) {
	f := mustFixture(t)
	for _, tt := range []struct {
		label   string
		allowed []string
		decrypt string
	}{
		{labelRSA, nil, "CKM_RSA_X_509"},
		{labelToolRSAPKCS, []string{"CKM_RSA_PKCS"}, "CKM_RSA_PKCS"},
		{labelP256, nil, ""},
		{labelEd25519, nil, ""},
	} {
		t.Run(tt.label, func(t *testing.T) {
			k := f.key(t, tt.label)
			a := k.(attributer).Attributes()
			if !a.Sensitive || a.Extractable || !slices.Equal(a.AllowedMechanisms, tt.allowed) {
				t.Errorf("Attributes() = %+v, want sensitive, not extractable, allowed mechanisms %q", a, tt.allowed)
			}
			var got string
			if d, ok := k.(interface{ DecryptMechanism() string }); ok {
				got = d.DecryptMechanism()
			}
			if got != tt.decrypt {
				t.Errorf("DecryptMechanism() = %q, want %q", got, tt.decrypt)
			}
		})
	}
}

// testDelete deletes one of the keys of tok and checks that both of its
// objects are gone from the token and the module, and that the other keys
// stay and still sign.
func testDelete(t *testing.T, tok *hsmtest.Token, m *hsm.Module, victim, survivor string) {
	t.Helper()
	ctx := testContext(t)
	byLabel := func(m *hsm.Module) map[string]crypto.Signer {
		keys, err := m.Keys(ctx)
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]crypto.Signer{}
		for _, k := range keys {
			out[k.(signer.Describer).Label()] = k
		}
		return out
	}
	other := tok.Open(t) // a second module, which learns of the deletion by a scan
	k := byLabel(m)[victim]
	if k == nil {
		t.Fatalf("no key labelled %q", victim)
	}
	if err := other.Delete(ctx, k); err == nil {
		t.Fatal("Delete() of another module's key succeeded")
	}
	if err := m.Delete(ctx, k); err != nil {
		t.Fatalf("Delete(%q) = %v", victim, err)
	}
	if got, err := m.Key(ctx, keyIDOf(t, k.Public())); got != nil || err != nil {
		t.Errorf("Key() after Delete = %v, %v; want nil, nil", got, err)
	}
	if _, ok := byLabel(m)[victim]; ok {
		t.Error("Keys() still lists the deleted key")
	}
	if list := tok.PKCS11Tool(t, "--list-objects"); strings.Contains(list, "label:      "+victim+"\n") {
		t.Errorf("an object labelled %q is still on the token:\n%s", victim, list)
	}
	if err := other.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	keys := byLabel(other)
	if _, ok := keys[victim]; ok {
		t.Error("a second module still finds the deleted key after a scan")
	}
	s := keys[survivor]
	if s == nil {
		t.Fatalf("the key %q went too", survivor)
	}
	input, opts := signInput(tls13Scheme(s), tls13Message(32))
	sig, err := s.(signer.ContextSigner).SignContext(ctx, input, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := verify(s.Public(), tls13Scheme(s), input, sig); err != nil {
		t.Fatal(err)
	}
	var ue *hsm.UnavailableError
	if err := m.Delete(ctx, k); err == nil || errors.As(err, &ue) {
		t.Errorf("a second Delete() = %v; want the token's error", err)
	}
}

// tls13Scheme returns the first scheme k lists.
func tls13Scheme(k crypto.Signer) tls.SignatureScheme {
	return k.(signer.SchemeLister).SignatureSchemes()[0]
}

func TestDelete(t *testing.T) {
	tok := hsmtest.New(t)
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "tool-p256", "--id", "0c")
	m := tok.Open(t)
	ctx := testContext(t)
	for _, spec := range []hsm.KeySpec{
		{Type: hsm.KeyTypeECDSA, Label: "gen-p256"},
		{Type: hsm.KeyTypeEd25519, Label: "gen-ed25519"},
		{Type: hsm.KeyTypeEd25519, Label: "gen-ed25519-2"},
	} {
		if _, err := m.Generate(ctx, spec); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	t.Run("generated ECDSA", func(t *testing.T) { testDelete(t, tok, m, "gen-p256", "tool-p256") })
	t.Run("pkcs11-tool's ECDSA", func(t *testing.T) { testDelete(t, tok, m, "tool-p256", "gen-ed25519") })
	t.Run("generated Ed25519", func(t *testing.T) { testDelete(t, tok, m, "gen-ed25519", "gen-ed25519-2") })
}

func testOpenCryptokiDelete(t *testing.T) {
	tok := ockFixture(t)
	m := tok.Open(t)
	if _, err := m.Generate(testContext(t), hsm.KeySpec{Type: hsm.KeyTypeRSA, Label: "ock-delete-me"}); err != nil {
		t.Fatal(err)
	}
	testDelete(t, tok, m, "ock-delete-me", ockRSA)
}
