package signer

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
)

// TestLimiterRoundRobin checks the order in which queued operations get a
// slot: one per identity with operations waiting, in turn, each identity's
// oldest first, an identity that starts waiting taking the last turn.
func TestLimiterRoundRobin(t *testing.T) {
	l := newLimiter(1, 64)
	ctx := testContext(t, 0)
	if err := l.acquire(ctx, "a", false); err != nil {
		t.Fatalf("acquire() with a free slot = %v", err)
	}
	granted := make(chan string, 16)
	queue := func(name, identity string) {
		t.Helper()
		want := l.queueDepth() + 1
		go func() {
			if err := l.acquire(ctx, identity, false); err != nil {
				granted <- fmt.Sprintf("%s: %v", name, err)
				return
			}
			granted <- name
		}()
		waitUntil(t, name+" to queue", func() bool { return l.queueDepth() == want })
	}
	for _, op := range []struct{ name, identity string }{
		{"a1", "a"}, {"a2", "a"}, {"a3", "a"}, {"b1", "b"}, {"c1", "c"}, {"c2", "c"},
	} {
		queue(op.name, op.identity)
	}
	var order []string
	for range 6 {
		l.release()
		order = append(order, <-granted)
		if order[len(order)-1] == "a2" {
			// An identity that starts waiting now takes the last turn.
			queue("d1", "d")
		}
	}
	l.release()
	order = append(order, <-granted)
	l.release()
	if got, want := strings.Join(order, " "), "a1 b1 c1 a2 c2 a3 d1"; got != want {
		t.Errorf("slots went to %s, want %s", got, want)
	}
	if l.running() != 0 || l.queueDepth() != 0 || len(l.queues) != 0 || l.turns.Len() != 0 {
		t.Errorf("after every operation ended: running %d, waiting %d, %d queues, %d turns; want all 0",
			l.running(), l.queueDepth(), len(l.queues), l.turns.Len())
	}
}

// TestLimiterCancelledWait checks that an operation whose context ends
// while it waits leaves the queue (and its identity the turns, if it was
// its last) without taking or leaking a slot.
func TestLimiterCancelledWait(t *testing.T) {
	l := newLimiter(1, 64)
	ctx := testContext(t, 0)
	if err := l.acquire(ctx, "a", false); err != nil {
		t.Fatalf("acquire() with a free slot = %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancelled := make(chan error, 1)
	go func() { cancelled <- l.acquire(cctx, "b", false) }()
	waitUntil(t, "b to queue", func() bool { return l.queueDepth() == 1 })
	granted := make(chan error, 1)
	go func() { granted <- l.acquire(ctx, "c", false) }()
	waitUntil(t, "c to queue", func() bool { return l.queueDepth() == 2 })

	cancel()
	if err := <-cancelled; !errors.Is(err, context.Canceled) {
		t.Errorf("acquire() whose context was cancelled = %v, want context.Canceled", err)
	}
	if l.queueDepth() != 1 || len(l.queues) != 1 || l.turns.Len() != 1 {
		t.Errorf("after the cancelled wait: waiting %d, %d queues, %d turns; want 1 each", l.queueDepth(), len(l.queues), l.turns.Len())
	}
	l.release()
	if err := <-granted; err != nil {
		t.Errorf("acquire() of the operation after the cancelled one = %v", err)
	}
	l.release()
	if l.running() != 0 || l.queueDepth() != 0 {
		t.Errorf("after every operation ended: running %d, waiting %d; want 0 and 0", l.running(), l.queueDepth())
	}
	// A context that ended before the wait began does not queue.
	if err := l.acquire(ctx, "a", false); err != nil {
		t.Fatalf("acquire() with a free slot = %v", err)
	}
	if err := l.acquire(cctx, "b", false); !errors.Is(err, context.Canceled) {
		t.Errorf("acquire() with a cancelled context and no free slot = %v, want context.Canceled", err)
	}
	if l.queueDepth() != 0 {
		t.Errorf("queueDepth() = %d after a cancelled acquire, want 0", l.queueDepth())
	}
	l.release()
}

// TestLimiterQueueBound checks that the bound on waiting unary operations
// is over all identities, counts a stream's waiting operations, and does
// not refuse those: they are bounded in their stream.
func TestLimiterQueueBound(t *testing.T) {
	l := newLimiter(2, 2)
	ctx := testContext(t, 0)
	for range 2 {
		if err := l.acquire(ctx, "a", false); err != nil {
			t.Fatalf("acquire() with a free slot = %v", err)
		}
	}
	granted := make(chan error, 8)
	queue := func(identity string, streamed bool) {
		t.Helper()
		want := l.queueDepth() + 1
		go func() { granted <- l.acquire(ctx, identity, streamed) }()
		waitUntil(t, identity+" to queue", func() bool { return l.queueDepth() == want })
	}
	queue("a", true)
	queue("b", false)
	if err := l.acquire(ctx, "c", false); !errors.Is(err, ErrOverloaded) {
		t.Errorf("unary acquire() with the queue full = %v, want ErrOverloaded", err)
	}
	queue("c", true) // a stream's operation waits all the same
	if err := l.acquire(ctx, "d", false); !errors.Is(err, ErrOverloaded) {
		t.Errorf("unary acquire() with the queue over full = %v, want ErrOverloaded", err)
	}
	for range 3 {
		l.release()
		if err := <-granted; err != nil {
			t.Errorf("queued acquire() = %v", err)
		}
	}
	l.release()
	l.release()
	if l.running() != 0 || l.queueDepth() != 0 {
		t.Errorf("after every operation ended: running %d, waiting %d; want 0 and 0", l.running(), l.queueDepth())
	}
}

// TestLimiterNil checks that a nil limiter sets no bound.
func TestLimiterNil(t *testing.T) {
	l := newLimiter(0, 0)
	if l != nil {
		t.Fatalf("newLimiter(0, 0) = %v, want nil", l)
	}
	for range 3 {
		if err := l.acquire(t.Context(), "a", false); err != nil {
			t.Errorf("nil limiter: acquire() = %v", err)
		}
	}
	l.release()
	if l.running() != 0 || l.queueDepth() != 0 {
		t.Errorf("nil limiter: running %d, waiting %d; want 0 and 0", l.running(), l.queueDepth())
	}
}
