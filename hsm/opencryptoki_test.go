package hsm_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/hsm/hsmtest"
	"github.com/keyless-tls/keyless/signer"
)

// The portable part of the suite, on a second PKCS #11 implementation:
// openCryptoki's software token, which offers RSA only (no EC mechanism)
// and makes keys extractable unless told otherwise.

// envOpenCryptokiChild marks the child process that runs the openCryptoki
// tests.
const envOpenCryptokiChild = "KEYLESS_HSM_TEST_OPENCRYPTOKI"

// TestOpenCryptoki runs the openCryptoki tests in a child process (this
// test binary again): a process must not load openCryptoki's library beside
// SoftHSM's, which the other tests of the package load (C_Initialize of
// openCryptoki after SoftHSM has been used crashed with SIGSEGV here).
func TestOpenCryptoki(t *testing.T) {
	if os.Getenv(envOpenCryptokiChild) == "1" {
		t.Cleanup(hsmtest.ReleaseOpenCryptoki)
		for _, tt := range []struct {
			name string
			f    func(*testing.T)
		}{
			{"Mechanisms", testOpenCryptokiMechanisms},
			{"Generate", testOpenCryptokiGenerate},
			{"Discovery", testOpenCryptokiDiscovery},
			{"Sign", testOpenCryptokiSign},
			{"DecryptPremaster", testOpenCryptokiDecryptPremaster},
			{"TLSHandshake", testOpenCryptokiTLSHandshake},
			{"Delete", testOpenCryptokiDelete},
		} {
			t.Run(tt.name, tt.f)
		}
		return
	}
	hsmtest.CheckOpenCryptoki(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"-test.run=^TestOpenCryptoki$", "-test.count=1", "-test.v", "-test.timeout=10m"}
	if testing.Short() {
		args = append(args, "-test.short")
	}
	// Long enough to wait for another test binary that holds the token.
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, exe, args...)
	cmd.Env = append(os.Environ(), envOpenCryptokiChild+"=1")
	out, err := cmd.CombinedOutput()
	// The child's verdict on each subtest, for the parent's log.
	for _, line := range strings.Split(string(out), "\n") {
		if l := strings.TrimSpace(line); strings.HasPrefix(l, "--- ") && strings.Count(l, "/") <= 1 {
			t.Log(l)
		}
	}
	if err != nil || !strings.Contains(string(out), "--- PASS: TestOpenCryptoki ") {
		t.Fatalf("the openCryptoki tests failed (%v):\n%s", err, out)
	}
}

// Labels of the keys on the openCryptoki token.
const (
	ockRSA       = "ock-rsa2048"   // Module.Generate
	ockToolRSA   = "ock-tool-rsa"  // pkcs11-tool, CKA_ID 0a: extractable by the token's default
	ockToolNoID  = "ock-tool-noid" // pkcs11-tool without CKA_ID
	ockRSA3072   = "ock-rsa3072"   // Module.Generate, 3072 bits
	ockKeysTotal = 3               // keys served with AllowExtractable
)

var ockShared struct {
	once sync.Once
	tok  *hsmtest.Token
	ok   bool
}

// ockFixture returns the openCryptoki token with its keys, made once per
// test binary. It skips (or fails) as hsmtest.OpenCryptoki does.
func ockFixture(t *testing.T) *hsmtest.Token {
	t.Helper()
	tok := hsmtest.OpenCryptoki(t)
	ockShared.once.Do(func() {
		tok.PKCS11Tool(t, "--keypairgen", "--key-type", "rsa:2048", "--label", ockToolRSA, "--id", "0a")
		tok.PKCS11Tool(t, "--keypairgen", "--key-type", "rsa:2048", "--label", ockToolNoID)
		m := tok.Open(t)
		ctx := testContext(t)
		for _, spec := range []hsm.KeySpec{
			{Type: hsm.KeyTypeRSA, Label: ockRSA},
			{Type: hsm.KeyTypeRSA, Bits: 3072, Label: ockRSA3072},
		} {
			if _, err := m.Generate(ctx, spec); err != nil {
				t.Fatalf("Generate(%+v) = %v", spec, err)
			}
		}
		ockShared.tok, ockShared.ok = tok, true
	})
	if !ockShared.ok {
		t.Fatal("the openCryptoki fixture could not be created (see the first test that used it)")
	}
	return ockShared.tok
}

// ockOpen opens the openCryptoki token, serving extractable keys too, and
// returns the module and its keys by label.
func ockOpen(t *testing.T, tok *hsmtest.Token, logs *syncBuffer) (*hsm.Module, map[string]crypto.Signer) {
	t.Helper()
	cfg := tok.Config()
	cfg.AllowExtractable = true
	if logs != nil {
		cfg.Logger = testLogger(logs)
	}
	m := tok.OpenConfig(t, cfg)
	keys, err := m.Keys(testContext(t))
	if err != nil {
		t.Fatal(err)
	}
	byLabel := map[string]crypto.Signer{}
	for _, k := range keys {
		byLabel[k.(signer.Describer).Label()] = k
	}
	return m, byLabel
}

// testOpenCryptokiMechanisms: the token offers RSA and no EC mechanism, and
// the module says so when asked for an EC key.
func testOpenCryptokiMechanisms(t *testing.T) {
	tok := ockFixture(t)
	m := tok.Open(t)
	mechs := m.Mechanisms()
	for _, want := range []string{"CKM_RSA_PKCS", "CKM_RSA_PKCS_PSS", "CKM_RSA_X_509", "CKM_RSA_PKCS_KEY_PAIR_GEN"} {
		if !slices.Contains(mechs, want) {
			t.Errorf("Mechanisms() = %v, want %s among them", mechs, want)
		}
	}
	for _, none := range []string{"CKM_ECDSA", "CKM_EDDSA", "CKM_EC_KEY_PAIR_GEN", "CKM_EC_EDWARDS_KEY_PAIR_GEN"} {
		if slices.Contains(mechs, none) {
			t.Errorf("Mechanisms() = %v; openCryptoki's software token has no %s", mechs, none)
		}
	}
	ctx := testContext(t)
	for _, tt := range []struct {
		spec hsm.KeySpec
		want string
	}{
		{hsm.KeySpec{Type: hsm.KeyTypeECDSA, Label: "ock-p256"}, "cannot generate P-256 keys (CKM_EC_KEY_PAIR_GEN)"},
		{hsm.KeySpec{Type: hsm.KeyTypeECDSA, Curve: "P-384", Label: "ock-p384"}, "cannot generate P-384 keys (CKM_EC_KEY_PAIR_GEN)"},
		{hsm.KeySpec{Type: hsm.KeyTypeEd25519, Label: "ock-ed25519"}, "cannot generate Ed25519 keys (CKM_EC_EDWARDS_KEY_PAIR_GEN)"},
	} {
		if k, err := m.Generate(ctx, tt.spec); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Generate(%+v) = %v, %v; want an error containing %q", tt.spec, k, err, tt.want)
		}
	}
}

// testOpenCryptokiGenerate: keys generated by the module have the
// attributes Generate promises, read back from the token, and are found by
// id and listed by an independent tool.
func testOpenCryptokiGenerate(t *testing.T) {
	tok := ockFixture(t)
	m := tok.Open(t)
	ctx := testContext(t)
	keys, err := m.Keys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	list := tok.PKCS11Tool(t, "--list-objects")
	for _, tt := range []struct {
		label string
		bits  int
	}{{ockRSA, 2048}, {ockRSA3072, 3072}} {
		t.Run(tt.label, func(t *testing.T) {
			var k crypto.Signer
			for _, key := range keys {
				if key.(signer.Describer).Label() == tt.label {
					k = key
				}
			}
			if k == nil {
				t.Fatalf("Keys() has no key labelled %q", tt.label)
			}
			if bits := k.Public().(*rsa.PublicKey).N.BitLen(); bits != tt.bits {
				t.Errorf("key has %d bits, want %d", bits, tt.bits)
			}
			if got, err := m.Key(ctx, keyIDOf(t, k.Public())); err != nil || got != k {
				t.Errorf("Key(SPKI hash) = %v, %v; want the key", got, err)
			}
			id := k.(signer.Describer).ObjectID()
			priv := tokenObject(t, tok, pkcs11.CKO_PRIVATE_KEY, id,
				pkcs11.CKA_TOKEN, pkcs11.CKA_PRIVATE, pkcs11.CKA_SENSITIVE, pkcs11.CKA_EXTRACTABLE,
				pkcs11.CKA_ALWAYS_SENSITIVE, pkcs11.CKA_NEVER_EXTRACTABLE, pkcs11.CKA_SIGN, pkcs11.CKA_DECRYPT,
				pkcs11.CKA_UNWRAP, pkcs11.CKA_DERIVE)
			pub := tokenObject(t, tok, pkcs11.CKO_PUBLIC_KEY, id, pkcs11.CKA_TOKEN, pkcs11.CKA_VERIFY, pkcs11.CKA_ENCRYPT)
			for _, c := range []struct {
				name string
				v    []byte
				want bool
			}{
				{"private CKA_TOKEN", priv[pkcs11.CKA_TOKEN], true},
				{"private CKA_PRIVATE", priv[pkcs11.CKA_PRIVATE], true},
				{"private CKA_SENSITIVE", priv[pkcs11.CKA_SENSITIVE], true},
				{"private CKA_EXTRACTABLE", priv[pkcs11.CKA_EXTRACTABLE], false},
				{"private CKA_ALWAYS_SENSITIVE", priv[pkcs11.CKA_ALWAYS_SENSITIVE], true},
				{"private CKA_NEVER_EXTRACTABLE", priv[pkcs11.CKA_NEVER_EXTRACTABLE], true},
				{"private CKA_SIGN", priv[pkcs11.CKA_SIGN], true},
				{"private CKA_DECRYPT", priv[pkcs11.CKA_DECRYPT], true},
				{"private CKA_UNWRAP", priv[pkcs11.CKA_UNWRAP], false},
				{"private CKA_DERIVE", priv[pkcs11.CKA_DERIVE], false},
				{"public CKA_TOKEN", pub[pkcs11.CKA_TOKEN], true},
				{"public CKA_VERIFY", pub[pkcs11.CKA_VERIFY], true},
				{"public CKA_ENCRYPT", pub[pkcs11.CKA_ENCRYPT], true},
			} {
				if got := len(c.v) == 1 && c.v[0] != 0; got != c.want {
					t.Errorf("%s = %x, want %t", c.name, c.v, c.want)
				}
			}
			if !strings.Contains(list, "label:      "+tt.label+"\n") {
				t.Errorf("pkcs11-tool --list-objects does not list %q:\n%s", tt.label, list)
			}
		})
	}
}

// testOpenCryptokiDiscovery: keys made by another tool are found, or
// skipped with the reason logged. openCryptoki makes a private key
// extractable unless the template says otherwise (SoftHSM does not), so
// pkcs11-tool's key is served only with AllowExtractable.
func testOpenCryptokiDiscovery(t *testing.T) {
	tok := ockFixture(t)
	ctx := testContext(t)

	var logs syncBuffer
	cfg := tok.Config()
	cfg.Logger = testLogger(&logs)
	strict := tok.OpenConfig(t, cfg)
	keys, err := strict.Keys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var labels []string
	for _, k := range keys {
		labels = append(labels, k.(signer.Describer).Label())
	}
	slices.Sort(labels)
	if want := []string{ockRSA, ockRSA3072}; !slices.Equal(labels, want) {
		t.Errorf("Keys() without AllowExtractable = %q, want %q", labels, want)
	}
	for _, want := range []string{
		ockToolRSA + `\", CKA_ID 0a) is extractable or not sensitive`,
		ockToolNoID + `\", CKA_ID ) is extractable or not sensitive`,
	} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("the log does not say %q:\n%s", want, logs.String())
		}
	}

	var logs2 syncBuffer
	m, byLabel := ockOpen(t, tok, &logs2)
	want := ockKeysTotal
	// The key without CKA_ID is either served, paired with its public key
	// by label, and then signs; or skipped with the reason logged. Never
	// dropped silently.
	if k := byLabel[ockToolNoID]; k != nil {
		want++
		input, opts := signInput(tls.PSSWithSHA256, tls13Message(32))
		sig, err := k.(signer.ContextSigner).SignContext(ctx, input, opts)
		if err != nil || verify(k.Public(), tls.PSSWithSHA256, input, sig) != nil {
			t.Errorf("the key without CKA_ID is served but does not sign: %v", err)
		}
	} else if reason := ockToolNoID + `\", CKA_ID ) has no CKA_ID`; !strings.Contains(logs2.String(), reason) {
		t.Errorf("the key without CKA_ID is not served, and the log does not say %q:\n%s", reason, logs2.String())
	}
	if len(byLabel) != want || byLabel[ockToolRSA] == nil {
		t.Errorf("Keys() with AllowExtractable = %v; want %d keys including %q", byLabel, want, ockToolRSA)
	}
	// A key's id is the SHA-256 of its SubjectPublicKeyInfo.
	for label, k := range byLabel {
		if got, err := m.Key(ctx, keyIDOf(t, k.Public())); err != nil || got != k {
			t.Errorf("Key(SPKI hash of %q) = %v, %v; want the key", label, got, err)
		}
	}
}

// testOpenCryptokiSign signs with every scheme each key reports, as
// crypto/tls would, and verifies every signature with the standard library.
func testOpenCryptokiSign(t *testing.T) {
	tok := ockFixture(t)
	_, byLabel := ockOpen(t, tok, nil)
	ctx := testContext(t)
	allRSA := []tls.SignatureScheme{tls.PSSWithSHA256, tls.PSSWithSHA384, tls.PSSWithSHA512, tls.PKCS1WithSHA256, tls.PKCS1WithSHA384, tls.PKCS1WithSHA512}
	for _, label := range []string{ockRSA, ockRSA3072, ockToolRSA} {
		k := byLabel[label]
		if k == nil {
			t.Fatalf("no key labelled %q", label)
		}
		schemes := k.(signer.SchemeLister).SignatureSchemes()
		if !slices.Equal(schemes, allRSA) {
			t.Errorf("%s: SignatureSchemes() = %v, want %v", label, schemes, allRSA)
		}
		for _, s := range schemes {
			t.Run(label+"/"+s.String(), func(t *testing.T) {
				input, opts := signInput(s, tls13Message(48))
				sig, err := k.(signer.ContextSigner).SignContext(ctx, input, opts)
				if err != nil {
					t.Fatalf("SignContext(%v) = %v", s, err)
				}
				if err := verify(k.Public(), s, input, sig); err != nil {
					t.Fatalf("signature does not verify: %v", err)
				}
			})
		}
	}
}

// testOpenCryptokiDecryptPremaster runs every premaster case through raw
// RSA and through the masked CKM_RSA_PKCS fallback on openCryptoki, whose
// errors for bad padding differ from SoftHSM's, and checks that both, and
// a second Module, reject alike.
func testOpenCryptokiDecryptPremaster(t *testing.T) {
	tok := ockFixture(t)
	_, byLabel := ockOpen(t, tok, nil)
	for _, label := range []string{ockRSA, ockRSA3072, ockToolRSA} {
		t.Run(label, func(t *testing.T) {
			k := byLabel[label]
			if raw, ok := hsm.RawDecrypt(k); !raw || !ok {
				t.Fatalf("RawDecrypt() = %t, %t; want CKM_RSA_X_509", raw, ok)
			}
			testDecryptPremaster(t, k.(signer.PremasterDecrypter), k.Public().(*rsa.PublicKey))
		})
	}

	fallback, _ := ockOpen(t, tok, nil)
	ctx := testContext(t)
	if err := hsm.UsePKCSDecryptFallback(ctx, fallback); err != nil {
		t.Fatal(err)
	}
	raw := byLabel[ockRSA]
	k, err := fallback.Key(ctx, keyIDOf(t, raw.Public()))
	if err != nil || k == nil {
		t.Fatalf("Key() = %v, %v", k, err)
	}
	if isRaw, ok := hsm.RawDecrypt(k); isRaw || !ok {
		t.Fatalf("RawDecrypt() = %t, %t; want the fallback", isRaw, ok)
	}
	t.Run("fallback", func(t *testing.T) {
		testDecryptPremaster(t, k.(signer.PremasterDecrypter), k.Public().(*rsa.PublicKey))
	})
	invalid := bytes.Repeat([]byte{0x42}, k.Public().(*rsa.PublicKey).Size())
	a, errA := raw.(signer.PremasterDecrypter).DecryptPremaster(ctx, invalid)
	b, errB := k.(signer.PremasterDecrypter).DecryptPremaster(ctx, invalid)
	if errA != nil || errB != nil || !bytes.Equal(a, b) {
		t.Fatalf("raw RSA and the fallback rejected a ciphertext with %x, %v and %x, %v; want the same bytes", a, errA, b, errB)
	}
}

// testOpenCryptokiTLSHandshake completes crypto/tls handshakes, TLS 1.3
// and TLS 1.2, whose server key is on the openCryptoki token.
func testOpenCryptokiTLSHandshake(t *testing.T) {
	tok := ockFixture(t)
	_, byLabel := ockOpen(t, tok, nil)
	k := byLabel[ockRSA]
	cert := selfSigned(t, k, x509.SHA256WithRSAPSS)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	for _, version := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
		t.Run(tls.VersionName(version), func(t *testing.T) {
			server := &tls.Config{
				Certificates: []tls.Certificate{{
					Certificate:                  [][]byte{cert.Raw},
					PrivateKey:                   k,
					SupportedSignatureAlgorithms: k.(signer.SchemeLister).SignatureSchemes(),
				}},
				MinVersion: version,
				MaxVersion: version,
			}
			client := &tls.Config{RootCAs: pool, ServerName: "keyless.test", MinVersion: version, MaxVersion: version}
			handshake(t, server, client)
		})
	}
	// The key signs with crypto.Signer's context-free Sign, too.
	input, opts := signInput(tls.PSSWithSHA256, []byte("context-free"))
	sig, err := k.Sign(rand.Reader, input, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := verify(k.Public(), tls.PSSWithSHA256, input, sig); err != nil {
		t.Fatal(err)
	}
}
