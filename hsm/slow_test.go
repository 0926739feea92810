package hsm_test

import (
	"context"
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/signer"
)

// TestP11KitSlowAppliance delays every answer of `p11-kit server` by
// 300 ms (hsmtest's relay on its socket), and sends more
// operations than there are sessions, each with a 200 ms deadline: every
// call returns by its deadline (or sooner, when no session is free in
// time), no more calls than sessions reach the token, the module serves
// again once the answers are quick, and after Close no goroutine is left.
func TestP11KitSlowAppliance(t *testing.T) {
	srv := newP11KitToken(t)
	srv.DelayAnswers(t, 0)
	baseline := runtime.NumGoroutine()

	cfg := srv.Config()
	cfg.MaxSessions = 4 // 3 for operations
	cfg.PoolWaitTimeout = 100 * time.Millisecond
	cfg.RescanInterval = -1
	m, err := hsm.Open(cfg)
	if err != nil {
		t.Fatalf("hsm.Open() through the relay = %v", err)
	}
	ctx := testContext(t)
	keys, err := m.Keys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var k signer.ContextSigner
	for _, key := range keys {
		if key.(signer.Describer).Label() == "ec" {
			k = key.(signer.ContextSigner)
		}
	}
	input, opts := signInput(0x0403, tls13Message(32)) // ECDSA P-256 SHA-256

	srv.DelayAnswers(t, 300*time.Millisecond)
	const deadline = 200 * time.Millisecond
	var (
		wg                sync.WaitGroup
		late, unavailable atomic.Int32
		deadlines         atomic.Int32
		slowest           atomic.Int64
	)
	for range 12 {
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, deadline)
			defer cancel()
			start := time.Now()
			_, err := k.SignContext(cctx, input, opts)
			took := time.Since(start)
			for cur := slowest.Load(); int64(took) > cur && !slowest.CompareAndSwap(cur, int64(took)); cur = slowest.Load() {
			}
			if took > deadline+time.Second {
				late.Add(1)
			}
			var ue interface{ Unavailable() bool }
			switch {
			case errors.Is(err, context.DeadlineExceeded):
				deadlines.Add(1)
			case errors.As(err, &ue):
				unavailable.Add(1)
			default:
				t.Errorf("SignContext() on a slow appliance = %v; want its deadline or Unavailable", err)
			}
		})
	}
	time.Sleep(50 * time.Millisecond)
	if inUse, capacity := m.Sessions(); inUse > capacity || capacity != 3 {
		t.Errorf("Sessions() = %d in use of %d; want at most 3 of 3", inUse, capacity)
	}
	wg.Wait()
	t.Logf("12 operations with a %v deadline against 300 ms answers: %d hit the deadline, %d found no session in time (Unavailable); slowest returned after %v",
		deadline, deadlines.Load(), unavailable.Load(), time.Duration(slowest.Load()).Round(time.Millisecond))
	if late.Load() > 0 {
		t.Errorf("%d operations returned more than a second after their deadline", late.Load())
	}

	// Quick answers again: once the late calls have returned, the module
	// serves as before.
	srv.DelayAnswers(t, 0)
	waitIdle := time.Now().Add(10 * time.Second)
	for inUse, _ := m.Sessions(); inUse > 0; inUse, _ = m.Sessions() {
		if time.Now().After(waitIdle) {
			t.Fatalf("%d calls still in the token 10 s after the delay ended", inUse)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := oneOperation(ctx, m); err != nil {
		t.Errorf("an operation after the delay ended = %v", err)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("Close() = %v", err)
	}
	var n int
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if n = runtime.NumGoroutine(); n <= baseline {
			break
		}
	}
	if n > baseline {
		buf := make([]byte, 1<<16)
		t.Errorf("%d goroutines after Close, %d before Open:\n%s", n, baseline, buf[:runtime.Stack(buf, true)])
	}
}
