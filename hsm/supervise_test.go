package hsm

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/miekg/pkcs11"
)

// logBuffer is a log sink for concurrent writers.
type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// waitLog waits until the log contains s.
func waitLog(t *testing.T, logs *logBuffer, s string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(logs.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("the log has no %q within 10 s:\n%s", s, logs.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// newSupervisedStub returns a stub module with sessions sessions whose
// supervisor runs until the test ends.
func newSupervisedStub(t *testing.T, p *stubP11, sessions int, stuckAfter time.Duration, logs *logBuffer) *Module {
	t.Helper()
	m := newStubModule(p, sessions)
	m.cfg.StuckCallThreshold = stuckAfter
	m.cfg.RescanInterval = -1
	m.logger = hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Debug})
	m.wake, m.stop, m.supervisorDone = make(chan struct{}, 1), make(chan struct{}), make(chan struct{})
	go m.supervise()
	t.Cleanup(func() { m.Close() })
	return m
}

func newStubEd25519Key(t *testing.T, m *Module, p *stubP11) (*ed25519Key, *atomic.Int64, chan struct{}) {
	t.Helper()
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	var calls atomic.Int64
	release := make(chan struct{})
	p.sign = func(msg []byte) ([]byte, error) {
		calls.Add(1)
		<-release
		return ed25519.Sign(priv, msg), nil
	}
	k := &ed25519Key{keyBase: keyBase{m: m, label: "stuck-ed", schemes: ed25519Schemes(keyMechanisms{eddsa: true})}, pub: pub}
	return k, &calls, release
}

func wantUnavailableErr(t *testing.T, what string, err error) {
	t.Helper()
	var ue interface{ Unavailable() bool }
	if !errors.As(err, &ue) || !ue.Unavailable() {
		t.Errorf("%s = %v; want an error with Unavailable() true", what, err)
	}
}

// TestStuckCalls runs key operations against a token whose C_Sign does not
// return. Each caller gets its deadline; the stuck calls keep their
// sessions and call slots, are logged, and once they fill every slot new
// operations fail at once and Check fails. When the calls return, the
// slots come back.
func TestStuckCalls(t *testing.T) {
	var logs logBuffer
	p := newStubP11()
	m := newSupervisedStub(t, p, 2, 50*time.Millisecond, &logs)
	k, calls, release := newStubEd25519Key(t, m, p)
	released := false
	defer func() {
		if !released {
			close(release)
		}
	}()

	for i := range 2 {
		ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
		start := time.Now()
		_, err := k.SignContext(ctx, []byte("message"), crypto.Hash(0))
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("SignContext() %d = %v, want context.DeadlineExceeded", i, err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("SignContext() %d returned after %v", i, d)
		}
	}
	// Each stuck call keeps its own session: none is used twice.
	p.mu.Lock()
	sessions := len(p.open)
	p.mu.Unlock()
	if sessions != 2 {
		t.Errorf("%d sessions open for 2 stuck calls, want 2", sessions)
	}
	if inUse, capacity := m.Sessions(); inUse != 2 || capacity != 2 {
		t.Errorf("Sessions() = %d in use of %d, want 2 of 2: stuck calls hold their sessions", inUse, capacity)
	}
	waitLog(t, &logs, `hsm call stuck for`)
	if !strings.Contains(logs.String(), `C_Sign key="stuck-ed"`) {
		t.Errorf("the stuck call is not named in the log:\n%s", logs.String())
	}

	// Both slots are held by stuck calls: fail at once, without calling
	// the token, and report unhealthy.
	_, err := k.SignContext(t.Context(), []byte("message"), crypto.Hash(0))
	wantUnavailableErr(t, "SignContext() with every slot stuck", err)
	if n := calls.Load(); n != 2 {
		t.Errorf("the token got %d calls, want 2", n)
	}
	if err := m.Check(t.Context()); err == nil || !strings.Contains(err.Error(), "have not returned") {
		t.Errorf("Check() with every slot stuck = %v", err)
	}

	close(release)
	released = true
	waitLog(t, &logs, "stuck PKCS #11 call returned")
	deadline := time.Now().Add(5 * time.Second)
	for m.calls.stuck(0) > 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	sig, err := k.SignContext(t.Context(), []byte("message"), crypto.Hash(0))
	if err != nil || !ed25519.Verify(k.pub, []byte("message"), sig) {
		t.Errorf("SignContext() after the calls returned = %v", err)
	}
}

// TestCloseWithStuckCall checks that Close gives up waiting for a call that
// does not return, so that a keyserver can still shut down.
func TestCloseWithStuckCall(t *testing.T) {
	var logs logBuffer
	p := newStubP11()
	// Close waits this long for the supervisor too: long enough for a
	// loaded machine, so that only the stuck call is reported.
	m := newSupervisedStub(t, p, 2, 500*time.Millisecond, &logs)
	k, _, release := newStubEd25519Key(t, m, p)
	defer close(release)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Millisecond)
	defer cancel()
	if _, err := k.SignContext(ctx, []byte("m"), crypto.Hash(0)); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("SignContext() = %v, want context.DeadlineExceeded", err)
	}
	done := make(chan error, 1)
	go func() { done <- m.Close() }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "1 PKCS #11 calls have not returned") {
			t.Errorf("Close() = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close() waits for a stuck call")
	}
	_, err := k.SignContext(t.Context(), []byte("m"), crypto.Hash(0))
	wantUnavailableErr(t, "SignContext() after Close", err)
	if !errors.Is(err, ErrClosed) {
		t.Errorf("SignContext() after Close = %v, want ErrClosed", err)
	}
}

// TestFaultFailsFast checks that a token fault met by an operation is
// reported as unavailable and that later operations fail without calling
// the token until the module has reconnected.
func TestFaultFailsFast(t *testing.T) {
	p := newStubP11()
	m := newStubModule(p, 2)
	k, calls, release := newStubEd25519Key(t, m, p)
	close(release)
	ctx := t.Context()
	if _, err := k.SignContext(ctx, []byte("m"), crypto.Hash(0)); err != nil {
		t.Fatalf("SignContext() = %v", err)
	}
	for _, code := range []uint{pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_TOKEN_NOT_PRESENT} {
		m.fault.Store(nil)
		p.errs = []error{pkcs11.Error(code)}
		_, err := k.SignContext(ctx, []byte("m"), crypto.Hash(0))
		wantUnavailableErr(t, "SignContext() meeting "+pkcs11.Error(code).Error(), err)
		if !isCode(err, code) {
			t.Errorf("SignContext() = %v; want it to wrap %v", err, pkcs11.Error(code))
		}
		before := calls.Load()
		for range 3 {
			_, err = k.SignContext(ctx, []byte("m"), crypto.Hash(0))
			wantUnavailableErr(t, "SignContext() while faulty", err)
		}
		if calls.Load() != before {
			t.Errorf("the token was called %d times while the module was faulty", calls.Load()-before)
		}
		if _, err := m.Key(ctx, [32]byte{}); err == nil {
			t.Error("Key() succeeded while the module was faulty")
		}
		if err := m.Check(ctx); err == nil {
			t.Error("Check() succeeded while the module was faulty")
		}
	}
	// An error that is not a token fault does not make the module faulty.
	m.fault.Store(nil)
	p.errs = []error{pkcs11.Error(pkcs11.CKR_FUNCTION_FAILED)}
	if _, err := k.SignContext(ctx, []byte("m"), crypto.Hash(0)); err == nil || m.fault.Load() != nil {
		t.Errorf("SignContext() = %v, faulty %t; want an error and a healthy module", err, m.fault.Load() != nil)
	}
}

func TestUnavailableError(t *testing.T) {
	inner := pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED)
	e := &UnavailableError{Reason: "token fault; reconnecting", Since: time.Now().Add(-time.Second), Err: inner}
	if !errors.Is(e, inner) || !e.Unavailable() {
		t.Errorf("UnavailableError does not unwrap or is not unavailable")
	}
	for _, want := range []string{"hsm: token unavailable: token fault; reconnecting", "since", "CKR_DEVICE_REMOVED"} {
		if !strings.Contains(e.Error(), want) {
			t.Errorf("Error() = %q, want it to contain %q", e.Error(), want)
		}
	}
	m := &Module{}
	for _, err := range []error{ErrClosed, errPoolTimeout, inner, errTokenGone} {
		wantUnavailableErr(t, "unavailable("+err.Error()+")", m.unavailable(err))
	}
	if err := m.unavailable(ErrInvalidRequest); !errors.Is(err, ErrInvalidRequest) {
		t.Errorf("unavailable(ErrInvalidRequest) = %v", err)
	}
	var ue *UnavailableError
	if errors.As(m.unavailable(ErrInvalidRequest), &ue) {
		t.Error("an invalid request counts as unavailable")
	}
}

// TestCallGoroutinesReused: calls run on goroutines that wait for the next
// call instead of ending, so that sequential calls need at most two (one
// finishing while the next starts), and stopWorkers ends them.
func TestCallGoroutinesReused(t *testing.T) {
	tr := newCallTracker(4, time.Second)
	before := runtime.NumGoroutine()
	ran := 0
	for range 200 {
		done := make(chan struct{})
		tr.run(func() { ran++; close(done) })
		<-done
	}
	if ran != 200 {
		t.Fatalf("ran %d calls, want 200", ran)
	}
	if n := runtime.NumGoroutine() - before; n > 2 {
		t.Errorf("%d call goroutines after 200 sequential calls, want at most 2", n)
	}
	tr.stopWorkers()
	tr.stopWorkers() // twice is harmless
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			t.Fatalf("%d call goroutines left after stopWorkers", runtime.NumGoroutine()-before)
		}
		time.Sleep(time.Millisecond)
	}
	// A call after stopWorkers still runs, on a goroutine of its own.
	done := make(chan struct{})
	tr.run(func() { close(done) })
	<-done
}
