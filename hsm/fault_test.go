package hsm_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

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

// waitHealthy waits until m.Check succeeds and returns how long that took.
// It fails the test after 30 seconds.
func waitHealthy(ctx context.Context, t *testing.T, m *hsm.Module) time.Duration {
	t.Helper()
	start := time.Now()
	var err error
	for time.Since(start) < 30*time.Second {
		if err = m.Check(ctx); err == nil {
			return time.Since(start)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("the module did not recover within 30 s: %v", err)
	return 0
}

// wantUnavailable checks that err is an *hsm.UnavailableError, as package
// signer recognises it.
func wantUnavailable(t *testing.T, what string, err error) {
	t.Helper()
	var ue interface{ Unavailable() bool }
	if !errors.As(err, &ue) || !ue.Unavailable() {
		t.Errorf("%s = %v; want an error with Unavailable() true", what, err)
	}
}

// TestReconnect closes every session under the module's feet. crypto11's
// sessions do not heal and SoftHSM invalidates every object handle; the
// module notices (through a failed operation or its health check), fails
// fast while it is faulty, and reconnects by itself.
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
		err := m.Check(ctx)
		if err == nil {
			// The supervisor may have been faster than this check.
			t.Log("Check() found the module healthy already")
		} else {
			wantUnavailable(t, "Check() after the fault", err)
		}
		waitHealthy(ctx, t, m)
		// The module is healthy as soon as the fault is cleared; the
		// supervisor logs the reconnection just after.
		deadline := time.Now().Add(5 * time.Second)
		for !strings.Contains(logs.String(), "reconnected to token") && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if !strings.Contains(logs.String(), "reconnected to token") {
			t.Errorf("no reconnection in the log:\n%s", logs.String())
		}
		useAll(ctx, t, m)
	})

	t.Run("found by an operation, healed in the background", func(t *testing.T) {
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
		wantUnavailable(t, "DecryptPremaster() with a dead handle", err)
		waitHealthy(ctx, t, m)
		useAll(ctx, t, m)
		// A key from before the reconnection stops working; looking it up
		// again gives a working one.
		input, opts := signInput(tls.PSSWithSHA256, []byte("m"))
		if _, err := old.Sign(rand.Reader, input, opts); err == nil {
			t.Error("a key from before the reconnection still signs")
		} else {
			wantUnavailable(t, "Sign() with a key from before the reconnection", err)
		}
		k, err := m.Key(ctx, keyIDOf(t, old.Public()))
		if err != nil || k == nil || k == old {
			t.Fatalf("Key() = %v, %v; want a new key object", k, err)
		}
		if _, err := k.Sign(rand.Reader, input, opts); err != nil {
			t.Errorf("Sign() with the new key object = %v", err)
		}
	})

	t.Run("healed by Refresh", func(t *testing.T) {
		m := tok.Open(t)
		ctx := testContext(t)
		closeAllSessions(t, tok)
		// A fault the module has not met yet is invisible to Refresh,
		// whose own sessions heal; an operation meets it.
		keys, _ := m.Keys(ctx)
		input, opts := signInput(tls.ECDSAWithP256AndSHA256, []byte("m"))
		if _, err := keys[0].(signer.ContextSigner).SignContext(ctx, input, opts); err == nil {
			t.Fatal("SignContext() succeeded on a closed session")
		}
		if err := m.Refresh(ctx); err != nil {
			t.Fatalf("Refresh() = %v", err)
		}
		useAll(ctx, t, m)
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
		waitHealthy(ctx, t, m)
		useAll(ctx, t, m)
	})
}

// TestTokenDirectoryMovedAway moves SoftHSM's token directory away and
// back under open Modules. While it is away, SoftHSM still lists the slot,
// answers C_GetTokenInfo with CKR_GENERAL_ERROR, finds no objects without
// an error and refuses every key handle; once it is back, it stays so until
// the library is initialised again. The module must fail fast while the
// token is gone and serve again within seconds of its return, without
// being closed and opened.
func TestTokenDirectoryMovedAway(t *testing.T) {
	f := mustFixture(t) // also a Module of the same library, which must recover too
	tok := hsmtest.New(t)
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "ec", "--id", "e1")
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "rsa:2048", "--label", "rsa", "--id", "e2")
	var logs syncBuffer
	cfg := tok.Config()
	cfg.Logger = testLogger(&logs)
	cfg.MaxReconnectBackoff = 200 * time.Millisecond
	m := tok.OpenConfig(t, cfg)
	ctx := testContext(t)
	useAll(ctx, t, m)

	dir := hsmtest.Dir()
	away := dir + ".away"
	if err := os.Rename(dir, away); err != nil {
		t.Fatal(err)
	}
	moved := true
	t.Cleanup(func() {
		if moved {
			os.Rename(away, dir)
		}
	})

	// The first operation meets the fault; every later one fails at once.
	keys, err := m.Keys(ctx)
	if err != nil {
		t.Fatalf("Keys() = %v", err)
	}
	input, opts := signInput(tls.ECDSAWithP256AndSHA256, []byte("m"))
	if _, err := keys[0].(signer.ContextSigner).SignContext(ctx, input, opts); err == nil {
		t.Fatal("SignContext() succeeded with the token directory gone")
	}
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		start := time.Now()
		_, err := m.Key(ctx, keyIDOf(t, keys[0].Public()))
		if err == nil {
			t.Fatal("Key() succeeded with the token directory gone")
		}
		wantUnavailable(t, "Key() with the token gone", err)
		if d := time.Since(start); d > time.Second {
			t.Errorf("Key() took %v with the token gone; want it to fail at once", d)
		}
		if err := m.Check(ctx); err == nil {
			t.Fatal("Check() succeeded with the token directory gone")
		}
		time.Sleep(100 * time.Millisecond)
	}

	if err := os.Rename(away, dir); err != nil {
		t.Fatal(err)
	}
	moved = false
	took := waitHealthy(ctx, t, m)
	t.Logf("serving again %v after the token directory came back", took)
	useAll(ctx, t, m)
	if !strings.Contains(logs.String(), "library_initialised_again=true") {
		t.Errorf("the library was not initialised again:\n%s", logs.String())
	}
	// The fixture's Module, which made no call meanwhile, recovers too.
	waitHealthy(ctx, t, f.m)
}

// toolRetry is tok.PKCS11Tool for a token that this process uses at the
// same time: SoftHSM processes race on the token's files, and now and then
// the other process's operation fails (CKR_FUNCTION_FAILED), so it is tried
// up to three times.
func toolRetry(t *testing.T, tok *hsmtest.Token, args ...string) {
	t.Helper()
	full := append([]string{"--module", tok.ModulePath, "--token-label", tok.Label, "--login", "--pin", tok.PIN}, args...)
	var out []byte
	var err error
	for range 3 {
		if out, err = exec.Command("pkcs11-tool", full...).CombinedOutput(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("pkcs11-tool %s: %v\n%s", strings.Join(args, " "), err, out)
}

// TestRescan adds a key to the token and removes it again from another
// process; the module notices both by itself.
func TestRescan(t *testing.T) {
	mustFixture(t)
	tok := hsmtest.New(t)
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "first", "--id", "f1")
	var logs syncBuffer
	cfg := tok.Config()
	cfg.Logger = testLogger(&logs)
	cfg.RescanInterval = 100 * time.Millisecond
	m := tok.OpenConfig(t, cfg)
	ctx := testContext(t)

	waitKeys := func(want int) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			keys, err := m.Keys(ctx)
			if err == nil && len(keys) == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("Keys() = %d keys, %v; want %d", len(keys), err, want)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitKeys(1)
	toolRetry(t, tok, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "second", "--id", "f2")
	waitKeys(2)
	if !strings.Contains(logs.String(), `key found on the token: token=`+tok.Label+` label=second`) {
		t.Errorf("the new key was not logged:\n%s", logs.String())
	}
	useAll(ctx, t, m)
	toolRetry(t, tok, "--delete-object", "--type", "privkey", "--id", "f2")
	waitKeys(1)
	if !strings.Contains(logs.String(), `key no longer on the token: token=`+tok.Label+` label=second`) {
		t.Errorf("the removed key was not logged:\n%s", logs.String())
	}
	useAll(ctx, t, m)
}

// TestPINRefusedStopsLogins changes the token's user PIN under an open
// module and makes it reconnect: the token refuses the old PIN once, and
// the module then stops logging in (on a real HSM each attempt counts
// toward locking the user) and stays unavailable until SetPIN gives it the
// new one.
func TestPINRefusedStopsLogins(t *testing.T) {
	mustFixture(t) // another Module stays open, so the library stays initialised
	tok := hsmtest.New(t)
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "ec", "--id", "e1")
	var logs syncBuffer
	cfg := tok.Config()
	cfg.Logger = testLogger(&logs)
	m := tok.OpenConfig(t, cfg)
	ctx := testContext(t)
	useAll(ctx, t, m)

	const newPIN = "a-new-user-pin"
	// Change it in this process, which SoftHSM's state is per process, then
	// end every session so that the module must log in again.
	p := pkcs11.New(tok.ModulePath)
	defer p.Destroy()
	_ = p.Initialize() // already initialised by the modules
	slot := uint(tok.Slot(t))
	sh, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Login(sh, pkcs11.CKU_USER, tok.PIN); err != nil && err != pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
		t.Fatal(err)
	}
	if err := p.SetPIN(sh, tok.PIN, newPIN); err != nil {
		t.Fatal(err)
	}
	if err := p.CloseAllSessions(slot); err != nil {
		t.Fatal(err)
	}
	_ = m.Check(ctx) // finds the fault
	const refused = "the token refused the PIN: not trying again"
	for deadline := time.Now().Add(20 * time.Second); !strings.Contains(logs.String(), refused); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the module did not stop at the refused PIN:\n%s", logs.String())
		}
	}
	attempts := strings.Count(logs.String(), "CKR_PIN_INCORRECT")
	time.Sleep(1500 * time.Millisecond) // several backoffs, were it still retrying
	if got := strings.Count(logs.String(), "CKR_PIN_INCORRECT"); got != attempts {
		t.Errorf("the module tried the refused PIN again: %d mentions of CKR_PIN_INCORRECT, then %d:\n%s", attempts, got, logs.String())
	}
	wantUnavailable(t, "Check() with the PIN refused", m.Check(ctx))

	m.SetPIN(newPIN)
	waitHealthy(ctx, t, m)
	useAll(ctx, t, m)
}
