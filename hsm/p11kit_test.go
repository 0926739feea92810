package hsm_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/hsm/hsmtest"
	"github.com/keyless-tls/keyless/signer"
)

// newP11KitToken makes a SoftHSM token with an RSA, a P-256 and an Ed25519
// key and serves it with `p11-kit server`: a token that the module reaches
// through p11-kit-client.so and a unix socket, as a network HSM's client
// library reaches its appliance.
func newP11KitToken(t *testing.T) *hsmtest.P11KitServer {
	t.Helper()
	tok := hsmtest.New(t)
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "rsa:2048", "--label", "rsa", "--id", "e1")
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "ec", "--id", "e2")
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:edwards25519", "--label", "ed", "--id", "e3")
	return tok.ServeP11Kit(t)
}

// useServed is useAll for a token reached through p11-kit 0.24, whose
// client lists no mechanism it cannot marshal: CKM_EDDSA is not among them,
// so an Ed25519 key is found but can sign with nothing, and says so.
func useServed(ctx context.Context, t *testing.T, m *hsm.Module) {
	t.Helper()
	keys, err := m.Keys(ctx)
	if err != nil {
		t.Fatalf("Keys() = %v", err)
	}
	n := 0
	for _, k := range keys {
		s := k.(signer.SchemeLister).SignatureSchemes()
		if len(s) == 0 {
			if _, ok := k.Public().(ed25519.PublicKey); !ok {
				t.Errorf("key %q has no signature scheme", k.(signer.Describer).Label())
			}
			continue
		}
		input, opts := signInput(s[0], tls13Message(32))
		sig, err := k.(signer.ContextSigner).SignContext(ctx, input, opts)
		if err == nil {
			err = verify(k.Public(), s[0], input, sig)
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
		n++
	}
	if n < 2 {
		t.Errorf("%d keys could be used, want the RSA and the ECDSA key at least", n)
	}
}

// TestP11Kit opens a token through p11-kit's client module, which gives
// each C_GetFunctionList caller an instance of its own: two Modules at once
// (each with its own instances, for itself and for each crypto11 context),
// every key type, signing and RSA premaster decryption, key generation
// through the socket, and a Module opened again after the others closed
// (their instances finalised).
func TestP11Kit(t *testing.T) {
	srv := newP11KitToken(t)
	ctx := testContext(t)

	var logs syncBuffer
	logOnFailure(t, &logs)
	cfg := srv.Config()
	cfg.Logger = testLogger(&logs)
	m, err := hsm.Open(cfg)
	if err != nil {
		t.Fatalf("hsm.Open(p11-kit) = %v", err)
	}
	m2 := srv.Open(t)
	for _, mod := range []*hsm.Module{m, m2} {
		keys, err := mod.Keys(ctx)
		if err != nil || len(keys) != 3 {
			t.Fatalf("Keys() = %d keys, %v; want 3\n%s", len(keys), err, logs.String())
		}
		useServed(ctx, t, mod)
		if err := mod.Check(ctx); err != nil {
			t.Errorf("Check() = %v", err)
		}
	}
	t.Logf("mechanisms through p11-kit: %s", strings.Join(m.Mechanisms(), ", "))

	k, err := m.Generate(ctx, hsm.KeySpec{Type: hsm.KeyTypeECDSA, Label: "generated"})
	if err != nil {
		t.Fatalf("Generate() through p11-kit = %v", err)
	}
	input, opts := signInput(tls.ECDSAWithP256AndSHA256, tls13Message(32))
	sig, err := k.(signer.ContextSigner).SignContext(ctx, input, opts)
	if err == nil {
		err = verify(k.Public(), tls.ECDSAWithP256AndSHA256, input, sig)
	}
	if err != nil {
		t.Errorf("the generated key: %v", err)
	}
	if err := m2.Refresh(ctx); err != nil {
		t.Fatalf("Refresh() = %v", err)
	}
	if got, _ := m2.Keys(ctx); len(got) != 4 {
		t.Errorf("the other Module sees %d keys after Refresh, want 4", len(got))
	}

	if err := m.Close(); err != nil {
		t.Fatalf("Close() = %v", err)
	}
	useServed(ctx, t, m2) // the other Module's instances are its own
	if err := m2.Close(); err != nil {
		t.Fatalf("Close() = %v", err)
	}
	m3 := srv.Open(t)
	useServed(ctx, t, m3)
}

// logOnFailure prints the module's log at the end of a failed test.
func logOnFailure(t *testing.T, logs *syncBuffer) {
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("module log:\n%s", logs.String())
		}
	})
}

// keyLoad runs key operations on every key of m from n goroutines until
// stop is called, counting successes and failures, and the slowest failure.
type keyLoad struct {
	ok, failed atomic.Int64
	slowestNs  atomic.Int64 // the longest a failed operation took
	// faultAt is when the module was known faulty (UnixNano; 0 when it
	// is not), and slowestAfterNs the longest a failed operation begun
	// after that took: those must fail at once, whereas those in flight
	// when the server died may take their whole deadline (a PKCS #11 call
	// cannot be interrupted, and p11-kit's client leaves some blocked).
	faultAt        atomic.Int64
	slowestAfterNs atomic.Int64
	lastErr        atomic.Pointer[error]
	stop           func()
}

func startKeyLoad(t *testing.T, m *hsm.Module, n int) *keyLoad {
	t.Helper()
	// Not testContext: the load outlives its 30 s deadline in a long
	// outage; each operation has a deadline of its own.
	ctx, cancel := context.WithCancel(context.Background())
	l := &keyLoad{}
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			for ctx.Err() == nil {
				start := time.Now()
				err := oneOperation(ctx, m)
				if ctx.Err() != nil {
					return
				}
				if err == nil {
					l.ok.Add(1)
					continue
				}
				l.failed.Add(1)
				l.lastErr.Store(&err)
				d := int64(time.Since(start))
				if d > l.slowestNs.Load() {
					l.slowestNs.Store(d)
				}
				if f := l.faultAt.Load(); f != 0 && start.UnixNano() > f && d > l.slowestAfterNs.Load() {
					l.slowestAfterNs.Store(d)
				}
				time.Sleep(5 * time.Millisecond)
			}
		})
	}
	l.stop = func() { cancel(); wg.Wait() }
	t.Cleanup(l.stop)
	return l
}

// oneOperation signs with each key of m, as package signer does: the key
// is looked up for each operation, and each signature verified.
func oneOperation(ctx context.Context, m *hsm.Module) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	keys, err := m.Keys(ctx)
	if err != nil {
		return err
	}
	for _, k := range keys {
		ss := k.(signer.SchemeLister).SignatureSchemes()
		if len(ss) == 0 {
			continue // Ed25519 through p11-kit 0.24 (see useServed)
		}
		input, opts := signInput(ss[0], tls13Message(32))
		sig, err := k.(signer.ContextSigner).SignContext(ctx, input, opts)
		if err == nil {
			err = verify(k.Public(), ss[0], input, sig)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// waitOK waits until l has counted n more successes.
func (l *keyLoad) waitOK(t *testing.T, n int64) {
	t.Helper()
	want := l.ok.Load() + n
	deadline := time.Now().Add(20 * time.Second)
	for l.ok.Load() < want {
		if time.Now().After(deadline) {
			t.Fatalf("%d operations succeeded within 20 s, want %d", l.ok.Load()-want+n, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// outage stops srv for d while l runs against m, checks that m fails fast
// and reports the fault at once, and returns how long m took to be healthy
// again after srv listened again (noticed through Module.Changed, as the
// keyserver's health reporter does).
func outage(t *testing.T, srv *hsmtest.P11KitServer, m *hsm.Module, l *keyLoad, d time.Duration) time.Duration {
	t.Helper()
	l.waitOK(t, 20)
	changed := m.Changed()
	failedBefore := l.failed.Load()
	srv.Stop(t)
	down := time.Now()
	select {
	case <-changed:
	case <-time.After(10 * time.Second):
		t.Fatal("Changed() did not fire within 10 s of the server's death under load")
	}
	l.faultAt.Store(time.Now().UnixNano())
	t.Logf("fault noticed %v after the server died", time.Since(down).Round(time.Millisecond))
	if err := m.Check(testContext(t)); err == nil {
		t.Error("Check() = nil while the server is down")
	} else {
		wantUnavailable(t, "Check() while the server is down", err)
	}
	time.Sleep(d - time.Since(down))
	if n := l.failed.Load() - failedBefore; n == 0 {
		t.Error("no operation failed while the server was down")
	}
	if e := l.lastErr.Load(); e != nil {
		wantUnavailable(t, "an operation while the server was down", *e)
	}
	changed = m.Changed()
	srv.Start(t)
	up := time.Now()
	ctx := testContext(t)
	for {
		select {
		case <-changed:
		case <-time.After(30 * time.Second):
			t.Fatalf("the module did not recover within 30 s of the server's return: %v", m.Check(ctx))
		}
		if m.Check(ctx) == nil {
			recovery := time.Since(up)
			l.faultAt.Store(0)
			l.waitOK(t, 20)
			return recovery
		}
		changed = m.Changed()
	}
}

// TestP11KitServerKilled kills the p11-kit server (and its per-connection
// processes) under load, as when a network HSM goes away: operations fail
// fast with an UnavailableError rather than hang, the module reports the
// fault at once, and recovers by itself when the server is started again.
// The recovery time after the server's return is printed, for outages of
// 4 s and (with KEYLESS_LONG_OUTAGE=1) 30 s.
func TestP11KitServerKilled(t *testing.T) {
	srv := newP11KitToken(t)
	var logs syncBuffer
	logOnFailure(t, &logs)
	cfg := srv.Config()
	cfg.Logger = testLogger(&logs)
	cfg.MaxReconnectBackoff = 5 * time.Second // the default, which the fast token polling must beat
	// Not OpenConfig, whose Close must succeed: see the end.
	m, err := hsm.Open(cfg)
	if err != nil {
		t.Fatalf("hsm.Open() = %v", err)
	}
	t.Cleanup(func() { _ = m.Close() }) // after a failure; Close is idempotent
	l := startKeyLoad(t, m, 4)

	outages := []time.Duration{time.Second, 4 * time.Second}
	if os.Getenv("KEYLESS_LONG_OUTAGE") == "1" {
		outages = append(outages, 30*time.Second)
	}
	for _, d := range outages {
		r := outage(t, srv, m, l, d)
		t.Logf("outage of %v: healthy %v after the p11-kit server listened again", d, r.Round(time.Millisecond))
	}
	l.stop()
	// Calls stuck for good in p11-kit's client when its server died (it
	// happens) gave their slots back shortly after the reconnection:
	// every slot is free once the load has stopped.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		inUse, capacity := m.Sessions()
		if inUse == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("%d of %d call slots still held 5 s after the load stopped", inUse, capacity)
			break
		}
	}
	t.Logf("calls abandoned after the server's death: %d log lines", strings.Count(logs.String(), "their call slots are given back"))
	slowest, slowestAfter := time.Duration(l.slowestNs.Load()), time.Duration(l.slowestAfterNs.Load())
	t.Logf("%d operations succeeded, %d failed; the slowest failure took %v, the slowest begun after the fault was known %v",
		l.ok.Load(), l.failed.Load(), slowest.Round(time.Millisecond), slowestAfter.Round(time.Millisecond))
	if slowestAfter >= time.Second {
		t.Errorf("an operation begun while the module was faulty took %v to fail; want at once", slowestAfter)
	}
	if slowest > 3*time.Second {
		t.Errorf("a failed operation took %v, past its 2 s deadline", slowest)
	}
	if !strings.Contains(logs.String(), "reconnected to token") {
		t.Errorf("no reconnection in the log:\n%s", logs.String())
	}
	useServed(testContext(t), t, m)
	// Calls that p11-kit's client left blocked are still inside it: Close
	// then says so, and leaves the module loaded.
	if err := m.Close(); err != nil && !strings.Contains(err.Error(), "have not returned") {
		t.Errorf("Close() = %v", err)
	} else if err != nil {
		t.Logf("Close() = %v", err)
	}
}

// TestP11KitPINRefused changes the token's PIN behind the module's back
// and makes it reconnect: the token refuses the old PIN once, the module
// stops logging in (it would lock the user out of a real HSM), says so,
// and serves again only after SetPIN with the new PIN.
func TestP11KitPINRefused(t *testing.T) {
	srv := newP11KitToken(t)
	var logs syncBuffer
	logOnFailure(t, &logs)
	cfg := srv.Config()
	cfg.Logger = testLogger(&logs)
	m := srv.OpenConfig(t, cfg)
	ctx := testContext(t)
	useServed(ctx, t, m)

	tok := srv.Token()
	newPIN := "new-" + tok.PIN
	tok.PKCS11Tool(t, "--change-pin", "--new-pin", newPIN)
	// The server dies and comes back: every session, and the login, is gone.
	srv.Stop(t)
	srv.Start(t)
	if err := oneOperation(ctx, m); err == nil {
		t.Log("an operation succeeded before the fault was noticed")
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(logs.String(), "the token refused the PIN") {
		if time.Now().After(deadline) {
			t.Fatalf("no refused PIN in the log within 10 s:\n%s", logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// No more logins: the count of attempts in the log stays where it is.
	time.Sleep(time.Second)
	before := strings.Count(logs.String(), "CKR_PIN_INCORRECT")
	time.Sleep(time.Second)
	if after := strings.Count(logs.String(), "CKR_PIN_INCORRECT"); after != before {
		t.Errorf("the module kept logging in with the refused PIN (%d more refusals in the log)", after-before)
	}
	err := m.Check(ctx)
	wantUnavailable(t, "Check() with a refused PIN", err)
	if err == nil || !strings.Contains(err.Error(), "refused the PIN") || strings.Contains(err.Error(), tok.PIN) {
		t.Errorf("Check() = %v; want an error saying the PIN was refused, without the PIN", err)
	}
	if strings.Contains(logs.String(), tok.PIN) {
		t.Error("the PIN is in the log")
	}

	changed := m.Changed()
	m.SetPIN(newPIN)
	select {
	case <-changed:
	case <-time.After(10 * time.Second):
		t.Fatalf("no recovery within 10 s of SetPIN: %v", m.Check(ctx))
	}
	if err := m.Check(ctx); err != nil {
		t.Fatalf("Check() after SetPIN = %v", err)
	}
	useServed(ctx, t, m)
}
