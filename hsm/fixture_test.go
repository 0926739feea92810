package hsm_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"hash"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/hsm/hsmtest"
	"github.com/keyless-tls/keyless/signer"
)

// defaultTestTimeout bounds every operation of a test.
const defaultTestTimeout = 30 * time.Second

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.f != nil {
		_ = shared.f.m.Close()
	}
	hsmtest.Cleanup()
	os.Exit(code)
}

// The module's keys satisfy package signer's interfaces structurally.
var (
	_ signer.KeyStore = (*hsm.Module)(nil)
	_ signer.Checker  = (*hsm.Module)(nil)
)

// fixture is one SoftHSM token, opened for the whole test binary, holding
// a key of every kind. RSA key generation is slow, so tests share it.
type fixture struct {
	tok  *hsmtest.Token
	m    *hsm.Module
	keys map[string]crypto.Signer // by label
}

// Labels of the fixture's keys. The "tool-" keys are made by pkcs11-tool,
// the others by Module.Generate.
const (
	labelRSA         = "rsa2048"
	labelP256        = "p256"
	labelP384        = "p384"
	labelEd25519     = "ed25519"
	labelToolRSA     = "tool-rsa"
	labelToolP256    = "tool-p256"
	labelToolEd25519 = "tool-ed25519"
	labelToolP521    = "tool-p521"
	labelToolRSAPKCS = "tool-rsa-pkcs-only" // CKA_ALLOWED_MECHANISMS = CKM_RSA_PKCS
)

var generatedSpecs = []hsm.KeySpec{
	{Type: hsm.KeyTypeRSA, Label: labelRSA},
	{Type: hsm.KeyTypeECDSA, Label: labelP256},
	{Type: hsm.KeyTypeECDSA, Curve: "P-384", Label: labelP384},
	{Type: hsm.KeyTypeEd25519, Label: labelEd25519},
}

var shared struct {
	once sync.Once
	f    *fixture
}

// mustFixture returns the shared fixture, creating it on first use. It
// skips the test when SoftHSM is missing, as hsmtest.New does.
func mustFixture(t testing.TB) *fixture {
	t.Helper()
	shared.once.Do(func() {
		tok := hsmtest.New(t)
		tok.PKCS11Tool(t, "--keypairgen", "--key-type", "rsa:2048", "--label", labelToolRSA, "--id", "01")
		tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:prime256v1", "--label", labelToolP256, "--id", "02")
		tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:edwards25519", "--label", labelToolEd25519, "--id", "03")
		tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:secp521r1", "--label", labelToolP521, "--id", "04")
		tok.PKCS11Tool(t, "--keypairgen", "--key-type", "rsa:2048", "--label", labelToolRSAPKCS, "--id", "05",
			"--allowed-mechanisms", "RSA-PKCS")
		m, err := hsm.Open(tok.Config())
		if err != nil {
			t.Fatalf("hsm.Open() = %v", err)
		}
		f := &fixture{tok: tok, m: m, keys: map[string]crypto.Signer{}}
		ctx, cancel := context.WithTimeout(context.Background(), defaultTestTimeout)
		defer cancel()
		for _, spec := range generatedSpecs {
			if _, err := m.Generate(ctx, spec); err != nil {
				m.Close()
				t.Fatalf("Generate(%+v) = %v", spec, err)
			}
		}
		keys, err := m.Keys(ctx)
		if err != nil {
			m.Close()
			t.Fatalf("Keys() = %v", err)
		}
		for _, k := range keys {
			f.keys[k.(signer.Describer).Label()] = k
		}
		shared.f = f
	})
	if shared.f == nil {
		if _, reason := hsmtest.ModulePath(); reason != "" && os.Getenv(hsmtest.EnvRequire) != "1" {
			t.Skipf("hsmtest: %s", reason)
		}
		t.Fatal("the shared SoftHSM fixture could not be created (see the first test that used it)")
	}
	return shared.f
}

func (f *fixture) key(t testing.TB, label string) crypto.Signer {
	t.Helper()
	k, ok := f.keys[label]
	if !ok {
		t.Fatalf("fixture has no key labelled %q", label)
	}
	// Look the key up again: a fault test, or another Module's
	// initialisation of the library, may have made the module reconnect,
	// which replaces its key objects. Wait for the reconnection if one is
	// under way.
	ctx := testContext(t)
	for {
		fresh, err := f.m.Key(ctx, keyIDOf(t, k.Public()))
		var unavailable *hsm.UnavailableError
		if errors.As(err, &unavailable) && ctx.Err() == nil {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if err != nil || fresh == nil {
			t.Fatalf("fixture key %q: Key() = %v, %v", label, fresh, err)
		}
		return fresh
	}
}

func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), defaultTestTimeout)
	t.Cleanup(cancel)
	return ctx
}

func keyIDOf(t testing.TB, pub crypto.PublicKey) [32]byte {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(der)
}

// schemeOpts returns the hash and signer options crypto/tls uses for a
// scheme.
func schemeOpts(s tls.SignatureScheme) (crypto.Hash, crypto.SignerOpts) {
	switch s {
	case tls.PSSWithSHA256, tls.PSSWithSHA384, tls.PSSWithSHA512:
		h := map[tls.SignatureScheme]crypto.Hash{tls.PSSWithSHA256: crypto.SHA256, tls.PSSWithSHA384: crypto.SHA384, tls.PSSWithSHA512: crypto.SHA512}[s]
		return h, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: h}
	case tls.PKCS1WithSHA256, tls.ECDSAWithP256AndSHA256:
		return crypto.SHA256, crypto.SHA256
	case tls.PKCS1WithSHA384, tls.ECDSAWithP384AndSHA384:
		return crypto.SHA384, crypto.SHA384
	case tls.PKCS1WithSHA512, tls.ECDSAWithP521AndSHA512:
		return crypto.SHA512, crypto.SHA512
	case tls.Ed25519:
		return 0, crypto.Hash(0)
	}
	panic(fmt.Sprintf("unexpected scheme %v", s))
}

func newHash(h crypto.Hash) hash.Hash {
	switch h {
	case crypto.SHA256:
		return sha256.New()
	case crypto.SHA384:
		return sha512.New384()
	case crypto.SHA512:
		return sha512.New()
	}
	panic(h)
}

// tls13Message returns a TLS 1.3 server CertificateVerify signature input
// (RFC 8446, section 4.4.3) over a random transcript hash.
func tls13Message(hashLen int) []byte {
	msg := slices.Repeat([]byte{0x20}, 64)
	msg = append(msg, "TLS 1.3, server CertificateVerify\x00"...)
	th := make([]byte, hashLen)
	rand.Read(th)
	return append(msg, th...)
}

// signInput returns what a key is given for a scheme: a digest of msg, or
// msg itself for Ed25519.
func signInput(s tls.SignatureScheme, msg []byte) ([]byte, crypto.SignerOpts) {
	h, opts := schemeOpts(s)
	if h == 0 {
		return msg, opts
	}
	hh := newHash(h)
	hh.Write(msg)
	return hh.Sum(nil), opts
}

// verify checks sig with the standard library.
func verify(pub crypto.PublicKey, s tls.SignatureScheme, input, sig []byte) error {
	h, opts := schemeOpts(s)
	switch pub := pub.(type) {
	case *rsa.PublicKey:
		if _, ok := opts.(*rsa.PSSOptions); ok {
			return rsa.VerifyPSS(pub, h, input, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
		}
		return rsa.VerifyPKCS1v15(pub, h, input, sig)
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(pub, input, sig) {
			return fmt.Errorf("ECDSA signature does not verify")
		}
		return nil
	case ed25519.PublicKey:
		if !ed25519.Verify(pub, input, sig) {
			return fmt.Errorf("Ed25519 signature does not verify")
		}
		return nil
	}
	return fmt.Errorf("unexpected public key %T", pub)
}

// tokenObject reads attributes of the object of the given class and CKA_ID
// on tok, with a PKCS #11 handle of the test's own. A Module must be open
// on the token (the test relies on its initialisation and login).
func tokenObject(t *testing.T, tok *hsmtest.Token, class uint, id []byte, types ...uint) map[uint][]byte {
	t.Helper()
	p := pkcs11.New(tok.ModulePath)
	if p == nil {
		t.Fatalf("cannot load %s", tok.ModulePath)
	}
	defer p.Destroy()
	if err := p.Initialize(); err == nil {
		p.Finalize()
		t.Fatal("tokenObject needs an open Module; the library was not initialised")
	}
	slots, err := p.GetSlotList(true)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err != nil || ti.Label != tok.Label {
			continue
		}
		sh, err := p.OpenSession(s, pkcs11.CKF_SERIAL_SESSION)
		if err != nil {
			t.Fatal(err)
		}
		defer p.CloseSession(sh)
		if err := p.FindObjectsInit(sh, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
			pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		}); err != nil {
			t.Fatal(err)
		}
		hs, _, err := p.FindObjects(sh, 10)
		p.FindObjectsFinal(sh)
		if err != nil || len(hs) != 1 {
			t.Fatalf("found %d objects of class %d with CKA_ID %x (%v), want 1", len(hs), class, id, err)
		}
		var tmpl []*pkcs11.Attribute
		for _, ty := range types {
			tmpl = append(tmpl, pkcs11.NewAttribute(ty, nil))
		}
		attrs, err := p.GetAttributeValue(sh, hs[0], tmpl)
		if err != nil {
			t.Fatalf("GetAttributeValue: %v", err)
		}
		out := map[uint][]byte{}
		for _, a := range attrs {
			out[a.Type] = a.Value
		}
		return out
	}
	t.Fatalf("token %q not found", tok.Label)
	return nil
}
