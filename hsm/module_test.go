package hsm_test

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/hsm/hsmtest"
	"github.com/keyless-tls/keyless/signer"
)

// syncBuffer is a log sink for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func testLogger(w *syncBuffer) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Output: w, Level: hclog.Debug})
}

func TestOpenErrors(t *testing.T) {
	// A Module stays open throughout: a failed Open must not disturb it
	// (crypto11 finalises the library when its Configure fails).
	f := mustFixture(t)
	tok := hsmtest.New(t)
	missing := filepath.Join(t.TempDir(), "missing.so")
	notLib := filepath.Join(t.TempDir(), "not-a-library.so")
	if err := os.WriteFile(notLib, []byte("not ELF"), 0o600); err != nil {
		t.Fatal(err)
	}
	serial := "no-such-serial"
	slot := 987654
	for _, tt := range []struct {
		name string
		edit func(c *hsm.Config)
		want string
	}{
		{"wrong PIN", func(c *hsm.Config) { c.PIN = "wrong-" + c.PIN }, "CKR_PIN_INCORRECT"},
		{"unknown token label", func(c *hsm.Config) { c.TokenLabel = "no-such-token" }, `no token with label "no-such-token"`},
		{"unknown token serial", func(c *hsm.Config) { c.TokenLabel, c.TokenSerial = "", serial }, `no token with serial number "no-such-serial"`},
		{"unknown slot", func(c *hsm.Config) { c.TokenLabel, c.SlotNumber = "", &slot }, "no token with slot number 987654"},
		{"missing module", func(c *hsm.Config) { c.ModulePath = missing }, "missing.so"},
		{"module that is not a library", func(c *hsm.Config) { c.ModulePath = notLib }, "cannot load PKCS #11 module"},
		{"invalid config", func(c *hsm.Config) { c.MaxSessions = 1 }, "Config.MaxSessions"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tok.Config()
			tt.edit(&cfg)
			m, err := hsm.Open(cfg)
			if err == nil {
				m.Close()
				t.Fatal("Open() succeeded")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Open() = %v; want an error containing %q", err, tt.want)
			}
			if strings.Contains(err.Error(), cfg.PIN) || strings.Contains(err.Error(), tok.PIN) {
				t.Errorf("Open() error %q contains the PIN", err)
			}
			// The fixture's module still works.
			k := f.key(t, labelP256)
			input, opts := signInput(tls.ECDSAWithP256AndSHA256, []byte("still alive"))
			sig, err := k.Sign(rand.Reader, input, opts)
			if err != nil {
				t.Fatalf("after a failed Open, Sign() = %v", err)
			}
			if err := verify(k.Public(), tls.ECDSAWithP256AndSHA256, input, sig); err != nil {
				t.Fatal(err)
			}
		})
	}
	// The right PIN still works after a wrong one.
	m := tok.Open(t)
	if err := m.Check(testContext(t)); err != nil {
		t.Errorf("Check() = %v", err)
	}
}

func TestOpenBySerialAndSlot(t *testing.T) {
	mustFixture(t) // keeps the library initialised, so slot IDs stay put
	tok := hsmtest.New(t)
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "k", "--id", "c1")
	bySerial := tok.Config()
	bySerial.TokenLabel, bySerial.TokenSerial = "", tok.Serial
	bySlot := tok.Config()
	slot := tok.Slot(t)
	bySlot.TokenLabel, bySlot.SlotNumber = "", &slot
	for name, cfg := range map[string]hsm.Config{"serial": bySerial, "slot": bySlot} {
		t.Run(name, func(t *testing.T) {
			m := tok.OpenConfig(t, cfg)
			ctx := testContext(t)
			if err := m.Check(ctx); err != nil {
				t.Fatalf("Check() = %v", err)
			}
			if keys, _ := m.Keys(ctx); len(keys) != 1 || keys[0].(signer.Describer).Label() != "k" {
				t.Fatalf("Keys() = %v; want the token's one key", keys)
			}
		})
	}
}

func TestOpenLogs(t *testing.T) {
	f := mustFixture(t)
	var buf syncBuffer
	cfg := f.tok.Config()
	cfg.Logger = testLogger(&buf)
	m := f.tok.OpenConfig(t, cfg)
	keys, _ := m.Keys(testContext(t))
	out := buf.String()
	for _, want := range []string{
		"hsm: token opened",
		"token=" + f.tok.Label,
		"CKM_RSA_X_509", "CKM_RSA_PKCS_PSS", "CKM_ECDSA", "CKM_EDDSA",
		fmt.Sprintf("keys=%d", len(keys)),
		// The key restricted to CKM_RSA_PKCS uses the masked fallback.
		"[WARN]  hsm: CKM_RSA_X_509 is unavailable", "keys_affected=1",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, f.tok.PIN) {
		t.Errorf("log contains the PIN:\n%s", out)
	}
	for _, s := range []string{fmt.Sprint(cfg), fmt.Sprintf("%+v", cfg), fmt.Sprintf("%#v", cfg)} {
		if strings.Contains(s, f.tok.PIN) || !strings.Contains(s, "<redacted>") {
			t.Errorf("formatted Config %s shows the PIN or no redaction", s)
		}
	}
}

func TestExtractableKeys(t *testing.T) {
	tok := hsmtest.New(t)
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "extractable", "--id", "e1", "--extractable")
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "normal", "--id", "e2")
	ctx := testContext(t)
	labels := func(m *hsm.Module) []string {
		keys, err := m.Keys(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, k := range keys {
			out = append(out, k.(signer.Describer).Label())
		}
		return out
	}

	var buf syncBuffer
	cfg := tok.Config()
	cfg.Logger = testLogger(&buf)
	m := tok.OpenConfig(t, cfg)
	if got := labels(m); len(got) != 1 || got[0] != "normal" {
		t.Errorf("Keys() = %q; want only the non-extractable key", got)
	}
	if !strings.Contains(buf.String(), `[WARN]  hsm: key skipped: reason="private key (label \"extractable\", CKA_ID e1) is extractable`) {
		t.Errorf("no warning for the skipped key:\n%s", buf.String())
	}

	cfg = tok.Config()
	cfg.AllowExtractable = true
	m = tok.OpenConfig(t, cfg)
	if got := labels(m); len(got) != 2 {
		t.Fatalf("with AllowExtractable, Keys() = %q; want both keys", got)
	}
	keys, _ := m.Keys(ctx)
	input, opts := signInput(tls.ECDSAWithP256AndSHA256, []byte("m"))
	sig, err := keys[0].Sign(rand.Reader, input, opts)
	if err != nil || verify(keys[0].Public(), tls.ECDSAWithP256AndSHA256, input, sig) != nil {
		t.Fatalf("extractable key does not sign: %v", err)
	}
}

func TestRefresh(t *testing.T) {
	tok := hsmtest.New(t)
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "first", "--id", "a1")
	m := tok.Open(t)
	ctx := testContext(t)
	keys, _ := m.Keys(ctx)
	if len(keys) != 1 {
		t.Fatalf("Keys() has %d keys, want 1", len(keys))
	}
	first := keys[0]

	// Another application adds a key (EdDSA) while the module is open.
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:edwards25519", "--label", "second", "--id", "a2")
	if keys, _ := m.Keys(ctx); len(keys) != 1 {
		t.Fatalf("before Refresh, Keys() has %d keys, want 1", len(keys))
	}
	if err := m.Refresh(ctx); err != nil {
		t.Fatalf("Refresh() = %v", err)
	}
	keys, _ = m.Keys(ctx)
	if len(keys) != 2 || keys[0] != first || keys[1].(signer.Describer).Label() != "second" {
		t.Fatalf("after Refresh, Keys() = %v; want the first key unchanged and the second", keys)
	}
	second := keys[1]
	msg := tls13Message(32)
	sig, err := second.Sign(rand.Reader, msg, crypto.Hash(0))
	if err != nil || verify(second.Public(), tls.Ed25519, msg, sig) != nil {
		t.Fatalf("new key does not sign: %v", err)
	}

	// And removes the first.
	tok.PKCS11Tool(t, "--delete-object", "--type", "privkey", "--id", "a1")
	if err := m.Refresh(ctx); err != nil {
		t.Fatalf("Refresh() = %v", err)
	}
	keys, _ = m.Keys(ctx)
	if len(keys) != 1 || keys[0] != second {
		t.Fatalf("after removal, Keys() = %v; want only the second key", keys)
	}
	if k, err := m.Key(ctx, keyIDOf(t, first.Public())); k != nil || err != nil {
		t.Errorf("Key(removed) = %v, %v; want nil, nil", k, err)
	}
	// The removed key's object is gone: using it fails, with an error.
	input, opts := signInput(tls.ECDSAWithP256AndSHA256, []byte("m"))
	if _, err := first.Sign(rand.Reader, input, opts); err == nil {
		t.Error("a removed key still signs")
	}
}

func TestCheckAndClose(t *testing.T) {
	tok := hsmtest.New(t)
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "rsa:2048", "--label", "r", "--id", "b1")
	m, err := hsm.Open(tok.Config())
	if err != nil {
		t.Fatal(err)
	}
	ctx := testContext(t)
	if err := m.Check(ctx); err != nil {
		t.Fatalf("Check() = %v", err)
	}
	keys, _ := m.Keys(ctx)
	if len(keys) != 1 {
		t.Fatalf("Keys() has %d keys, want 1", len(keys))
	}
	k := keys[0]
	if err := m.Close(); err != nil {
		t.Fatalf("Close() = %v", err)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("second Close() = %v", err)
	}
	if err := m.Check(ctx); !errors.Is(err, hsm.ErrClosed) {
		t.Errorf("Check() after Close = %v, want ErrClosed", err)
	}
	if _, err := m.Keys(ctx); !errors.Is(err, hsm.ErrClosed) {
		t.Errorf("Keys() after Close = %v, want ErrClosed", err)
	}
	if _, err := m.Key(ctx, [32]byte{}); !errors.Is(err, hsm.ErrClosed) {
		t.Errorf("Key() after Close = %v, want ErrClosed", err)
	}
	if err := m.Refresh(ctx); !errors.Is(err, hsm.ErrClosed) {
		t.Errorf("Refresh() after Close = %v, want ErrClosed", err)
	}
	if _, err := m.Generate(ctx, hsm.KeySpec{Type: "ecdsa", Label: "x"}); !errors.Is(err, hsm.ErrClosed) {
		t.Errorf("Generate() after Close = %v, want ErrClosed", err)
	}
	input, opts := signInput(tls.PSSWithSHA256, []byte("m"))
	if _, err := k.Sign(rand.Reader, input, opts); !errors.Is(err, hsm.ErrClosed) {
		t.Errorf("Sign() after Close = %v, want ErrClosed", err)
	}
	if _, err := k.(signer.PremasterDecrypter).DecryptPremaster(ctx, make([]byte, 256)); !errors.Is(err, hsm.ErrClosed) {
		t.Errorf("DecryptPremaster() after Close = %v, want ErrClosed", err)
	}

	// The token can be opened again after the last Module closed (which
	// finalised the library).
	m = tok.Open(t)
	if err := m.Check(ctx); err != nil {
		t.Fatalf("Check() after reopening = %v", err)
	}
}

func TestMechanisms(t *testing.T) {
	f := mustFixture(t)
	want := []string{"CKM_ECDSA", "CKM_EC_EDWARDS_KEY_PAIR_GEN", "CKM_EC_KEY_PAIR_GEN", "CKM_EDDSA", "CKM_RSA_PKCS", "CKM_RSA_PKCS_KEY_PAIR_GEN", "CKM_RSA_PKCS_PSS", "CKM_RSA_X_509"}
	if got := f.m.Mechanisms(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("Mechanisms() = %v, want %v", got, want)
	}
}

// TestConcurrent signs and decrypts from many goroutines at once, with
// fewer sessions than goroutines, under the race detector.
func TestConcurrent(t *testing.T) {
	f := mustFixture(t)
	ctx := testContext(t)
	rsaKey := f.key(t, labelRSA)
	pub := rsaKey.Public().(*rsa.PublicKey)
	labels := []string{labelRSA, labelP256, labelP384, labelEd25519, labelToolRSA, labelToolEd25519}
	const goroutines, rounds = 16, 6
	var wg sync.WaitGroup
	errc := make(chan error, goroutines*rounds)
	for g := range goroutines {
		wg.Go(func() {
			for r := range rounds {
				k := f.key(t, labels[(g+r)%len(labels)])
				if r%3 == 2 {
					pms := make([]byte, 48)
					rand.Read(pms)
					ct, _ := rsa.EncryptPKCS1v15(rand.Reader, pub, pms)
					got, err := rsaKey.(signer.PremasterDecrypter).DecryptPremaster(ctx, ct)
					if err != nil || !bytes.Equal(got, pms) {
						errc <- fmt.Errorf("DecryptPremaster: %v (match %t)", err, bytes.Equal(got, pms))
					}
					continue
				}
				s := k.(signer.SchemeLister).SignatureSchemes()[0]
				input, opts := signInput(s, tls13Message(32))
				sig, err := k.(signer.ContextSigner).SignContext(ctx, input, opts)
				if err == nil {
					err = verify(k.Public(), s, input, sig)
				}
				if err != nil {
					errc <- fmt.Errorf("%s %v: %w", k.(signer.Describer).Label(), s, err)
				}
			}
		})
	}
	wg.Go(func() {
		for range rounds {
			if err := f.m.Check(ctx); err != nil {
				errc <- fmt.Errorf("Check: %w", err)
			}
			if _, err := f.m.Keys(ctx); err != nil {
				errc <- fmt.Errorf("Keys: %w", err)
			}
		}
	})
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	if inUse, capacity := f.m.Sessions(); inUse != 0 || capacity != f.tok.Config().MaxSessions-1 {
		t.Errorf("Sessions() after the work = %d in use of %d, want 0 of %d", inUse, capacity, f.tok.Config().MaxSessions-1)
	}
}
