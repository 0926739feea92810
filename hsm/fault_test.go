package hsm_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"errors"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/hsm/hsmtest"
	"github.com/keyless-tls/keyless/signer"
)

// closeAllSessions closes every session of the token in this process, as a
// fault or a careless second user of the library would. The login and, in
// SoftHSM, every object handle go with them.
func closeAllSessions(t *testing.T, tok *hsmtest.Token) {
	t.Helper()
	slot := uint(tok.Slot(t))
	p := pkcs11.New(tok.ModulePath)
	defer p.Destroy()
	if err := p.Initialize(); err == nil {
		t.Fatal("library not initialised")
	}
	if err := p.CloseAllSessions(slot); err != nil {
		t.Fatal(err)
	}
}

// useAll signs with every key of m, freshly looked up, and decrypts with the
// RSA ones, verifying each result.
func useAll(ctx context.Context, t *testing.T, m *hsm.Module) {
	t.Helper()
	keys, err := m.Keys(ctx)
	if err != nil || len(keys) == 0 {
		t.Fatalf("Keys() = %d keys, %v", len(keys), err)
	}
	for _, k := range keys {
		s := k.(signer.SchemeLister).SignatureSchemes()[0]
		input, opts := signInput(s, tls13Message(32))
		sig, err := k.(signer.ContextSigner).SignContext(ctx, input, opts)
		if err == nil {
			err = verify(k.Public(), s, input, sig)
		}
		if err != nil {
			t.Errorf("%s: %v", k.(signer.Describer).Label(), err)
		}
		if d, ok := k.(signer.PremasterDecrypter); ok {
			pms := make([]byte, 48)
			rand.Read(pms)
			ct, _ := rsa.EncryptPKCS1v15(rand.Reader, k.Public().(*rsa.PublicKey), pms)
			if got, err := d.DecryptPremaster(ctx, ct); err != nil || !bytes.Equal(got, pms) {
				t.Errorf("%s: DecryptPremaster() = %v (match %t)", k.(signer.Describer).Label(), err, bytes.Equal(got, pms))
			}
		}
	}
}

// TestReconnect closes every session under the module's feet. crypto11's
// sessions do not heal and SoftHSM invalidates every object handle; the
// module notices (through a failed operation or its health check) and
// reconnects.
func TestReconnect(t *testing.T) {
	mustFixture(t) // another Module stays open, so the library stays initialised
	tok := hsmtest.New(t)
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:edwards25519", "--label", "ed", "--id", "d1")
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "rsa:2048", "--label", "rsa", "--id", "d2")
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "ec", "--id", "d3")

	t.Run("found by Check", func(t *testing.T) {
		var logs syncBuffer
		cfg := tok.Config()
		cfg.Logger = testLogger(&logs)
		m := tok.OpenConfig(t, cfg)
		ctx := testContext(t)
		useAll(ctx, t, m)
		closeAllSessions(t, tok)
		if err := m.Check(ctx); err != nil {
			t.Fatalf("Check() = %v; want a successful reconnection", err)
		}
		if !strings.Contains(logs.String(), "reconnected to token") {
			t.Errorf("no reconnection in the log:\n%s", logs.String())
		}
		useAll(ctx, t, m)
		if err := m.Check(ctx); err != nil {
			t.Fatalf("second Check() = %v", err)
		}
	})

	t.Run("found by an operation, healed by Refresh", func(t *testing.T) {
		m := tok.Open(t)
		ctx := testContext(t)
		keys, _ := m.Keys(ctx)
		old := keys[2]
		if old.(signer.Describer).Label() != "rsa" {
			t.Fatalf("Keys() = %v; want ec, ed, rsa", keys)
		}
		closeAllSessions(t, tok)
		_, err := old.(signer.PremasterDecrypter).DecryptPremaster(ctx, make([]byte, 256))
		if err == nil {
			t.Fatal("DecryptPremaster() with a dead handle succeeded")
		}
		if errors.Is(err, hsm.ErrInvalidRequest) {
			t.Fatalf("DecryptPremaster() = %v; want a token error", err)
		}
		if err := m.Refresh(ctx); err != nil {
			t.Fatalf("Refresh() = %v", err)
		}
		useAll(ctx, t, m)
		// A key from before the reconnection stops working; looking it up
		// again gives a working one.
		input, opts := signInput(tls.PSSWithSHA256, []byte("m"))
		if _, err := old.Sign(rand.Reader, input, opts); err == nil {
			t.Error("a key from before the reconnection still signs")
		}
		k, err := m.Key(ctx, keyIDOf(t, old.Public()))
		if err != nil || k == nil || k == old {
			t.Fatalf("Key() = %v, %v; want a new key object", k, err)
		}
		if _, err := k.Sign(rand.Reader, input, opts); err != nil {
			t.Errorf("Sign() with the new key object = %v", err)
		}
	})

	t.Run("Check with a cancelled context", func(t *testing.T) {
		m := tok.Open(t)
		ctx := testContext(t)
		closeAllSessions(t, tok)
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if err := m.Check(cctx); !errors.Is(err, context.Canceled) {
			t.Errorf("Check(cancelled) = %v, want context.Canceled", err)
		}
		if err := m.Check(ctx); err != nil {
			t.Errorf("Check() = %v", err)
		}
		useAll(ctx, t, m)
	})
}
