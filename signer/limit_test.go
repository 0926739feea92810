package signer

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// grant is an operation that got a slot of a limiter in a test.
type grant struct {
	name    string
	release func()
	err     error
}

// limiterTest drives a limiter from a test: operations queue one at a
// time, in a known order, and report when they get a slot.
type limiterTest struct {
	t       *testing.T
	l       *limiter
	ctx     context.Context
	granted chan grant
}

func newLimiterTest(t *testing.T, running, queue int) *limiterTest {
	return &limiterTest{t: t, l: newLimiter(running, queue), ctx: testContext(t, 0), granted: make(chan grant, 64)}
}

// take acquires a free slot for identity at once.
func (lt *limiterTest) take(identity string) func() {
	lt.t.Helper()
	release, err := lt.l.acquire(lt.ctx, identity, false)
	if err != nil {
		lt.t.Fatalf("acquire(%q) with a free slot = %v", identity, err)
	}
	return release
}

// queue starts an operation named name of identity and waits until it is
// queued.
func (lt *limiterTest) queue(name, identity string, streamed bool) {
	lt.t.Helper()
	want := lt.l.queueDepth() + 1
	go func() {
		release, err := lt.l.acquire(lt.ctx, identity, streamed)
		lt.granted <- grant{name, release, err}
	}()
	waitUntil(lt.t, name+" to queue", func() bool { return lt.l.queueDepth() == want })
}

// next waits for the next operation to get a slot.
func (lt *limiterTest) next() grant {
	lt.t.Helper()
	select {
	case g := <-lt.granted:
		if g.err != nil {
			lt.t.Fatalf("queued acquire() of %s = %v", g.name, g.err)
		}
		return g
	case <-time.After(defaultTestTimeout):
		lt.t.Fatal("no queued operation got a slot")
		return grant{}
	}
}

// checkEmpty checks that the limiter holds nothing.
func (lt *limiterTest) checkEmpty() {
	lt.t.Helper()
	l := lt.l
	if l.running() != 0 || l.queueDepth() != 0 || len(l.ids) != 0 || l.turns.Len() != 0 {
		lt.t.Errorf("after every operation ended: running %d, waiting %d, %d identities, %d turns; want all 0",
			l.running(), l.queueDepth(), len(l.ids), l.turns.Len())
	}
}

// TestLimiterRoundRobin checks the order in which queued operations get a
// slot when every identity has as many running (none, with one slot): in
// turn, each identity's oldest first, an identity that starts waiting
// taking the last turn.
func TestLimiterRoundRobin(t *testing.T) {
	lt := newLimiterTest(t, 1, 64)
	release := lt.take("a")
	for _, op := range []struct{ name, identity string }{
		{"a1", "a"}, {"a2", "a"}, {"a3", "a"}, {"b1", "b"}, {"c1", "c"}, {"c2", "c"},
	} {
		lt.queue(op.name, op.identity, false)
	}
	var order []string
	for range 7 {
		release()
		g := lt.next()
		order = append(order, g.name)
		release = g.release
		if g.name == "a2" {
			lt.queue("d1", "d", false)
		}
	}
	release()
	if got, want := strings.Join(order, " "), "a1 b1 c1 a2 c2 a3 d1"; got != want {
		t.Errorf("slots went to %s, want %s", got, want)
	}
	lt.checkEmpty()
}

// TestLimiterFewestRunningFirst checks that a slot that frees goes to the
// identity with the fewest operations running, before one whose turn
// comes first but has more running.
func TestLimiterFewestRunningFirst(t *testing.T) {
	lt := newLimiterTest(t, 3, 64)
	a1, a2, b1 := lt.take("a"), lt.take("a"), lt.take("b")
	lt.queue("a3", "a", false)
	lt.queue("a4", "a", false)
	lt.queue("b2", "b", false)
	lt.queue("c1", "c", false)

	// a has 1 running, b 1, c none: c first, though last in turn.
	a1()
	g1 := lt.next()
	// a has 1, b 1, c none but nothing waiting: a's turn, then b's.
	g1.release()
	g2 := lt.next()
	a2()
	g3 := lt.next()
	// Only a waits.
	b1()
	g4 := lt.next()
	if got, want := strings.Join([]string{g1.name, g2.name, g3.name, g4.name}, " "), "c1 a3 b2 a4"; got != want {
		t.Errorf("slots went to %s, want %s", got, want)
	}
	g2.release()
	g3.release()
	g4.release()
	lt.checkEmpty()
}

// TestLimiterCancelledWait checks that an operation whose context ends
// while it waits leaves the queue (and its identity the turns, if it was
// its last) without taking or leaking a slot.
func TestLimiterCancelledWait(t *testing.T) {
	lt := newLimiterTest(t, 1, 64)
	release := lt.take("a")
	cctx, cancel := context.WithCancel(lt.ctx)
	cancelled := make(chan error, 1)
	go func() {
		_, err := lt.l.acquire(cctx, "b", false)
		cancelled <- err
	}()
	waitUntil(t, "b to queue", func() bool { return lt.l.queueDepth() == 1 })
	lt.queue("c1", "c", false)

	cancel()
	if err := <-cancelled; !errors.Is(err, context.Canceled) {
		t.Errorf("acquire() whose context was cancelled = %v, want context.Canceled", err)
	}
	if lt.l.queueDepth() != 1 || lt.l.turns.Len() != 1 || lt.l.ids["b"] != nil {
		t.Errorf("after the cancelled wait: waiting %d, %d turns, b's entry %v; want 1, 1, nil", lt.l.queueDepth(), lt.l.turns.Len(), lt.l.ids["b"])
	}
	release()
	lt.next().release()
	lt.checkEmpty()

	// A context that ended before the wait began does not queue.
	release = lt.take("a")
	if _, err := lt.l.acquire(cctx, "b", false); !errors.Is(err, context.Canceled) {
		t.Errorf("acquire() with a cancelled context and no free slot = %v, want context.Canceled", err)
	}
	if lt.l.queueDepth() != 0 {
		t.Errorf("queueDepth() = %d after a cancelled acquire, want 0", lt.l.queueDepth())
	}
	release()
	release() // a second call is ignored
	lt.checkEmpty()

	// Nor does it take a free slot: the caller has given up.
	for _, streamed := range []bool{false, true} {
		if _, err := lt.l.acquire(cctx, "b", streamed); !errors.Is(err, context.Canceled) {
			t.Errorf("acquire(streamed %t) with a cancelled context and a free slot = %v, want context.Canceled", streamed, err)
		}
		lt.checkEmpty()
	}
}

// TestLimiterQueueBound checks that the bound on waiting unary operations
// is over all identities, counts a stream's waiting operations, and does
// not refuse those: they are bounded in their stream.
func TestLimiterQueueBound(t *testing.T) {
	lt := newLimiterTest(t, 2, 2)
	r1, r2 := lt.take("a"), lt.take("a")
	lt.queue("a1", "a", true)
	lt.queue("b1", "b", false)
	if _, err := lt.l.acquire(lt.ctx, "c", false); !errors.Is(err, ErrOverloaded) {
		t.Errorf("unary acquire() with the queue full = %v, want ErrOverloaded", err)
	}
	lt.queue("c1", "c", true) // a stream's operation waits all the same
	if _, err := lt.l.acquire(lt.ctx, "d", false); !errors.Is(err, ErrOverloaded) {
		t.Errorf("unary acquire() with the queue over full = %v, want ErrOverloaded", err)
	}
	r1()
	g1 := lt.next()
	r2()
	g2 := lt.next()
	g1.release()
	g3 := lt.next()
	g2.release()
	g3.release()
	lt.checkEmpty()
}

// TestLimiterQueueFullFair checks that, with the queue full, an identity
// with fewer operations waiting takes the place of the newest one of the
// identity with the most, if it has at least two more, and is refused
// otherwise.
func TestLimiterQueueFullFair(t *testing.T) {
	lt := newLimiterTest(t, 1, 4)
	release := lt.take("a")
	lt.queue("a1", "a", false)
	lt.queue("a2", "a", true) // a stream's: never displaced
	lt.queue("a3", "a", false)
	lt.queue("a4", "a", false)

	// displace queues identity's operation and checks that it took the
	// place of want's.
	displace := func(identity, want string) {
		t.Helper()
		go func() {
			release, err := lt.l.acquire(lt.ctx, identity, false)
			lt.granted <- grant{identity, release, err}
		}()
		select {
		case g := <-lt.granted:
			if g.name != want || !errors.Is(g.err, ErrOverloaded) {
				t.Fatalf("with the queue full, %s's acquire() ended %s's with %v; want %s's with ErrOverloaded", identity, g.name, g.err, want)
			}
		case <-time.After(defaultTestTimeout):
			t.Fatalf("%s's acquire() displaced nothing; want %s", identity, want)
		}
		waitUntil(t, identity+" to queue", func() bool { return lt.l.queueDepth() == 4 })
	}
	refused := func(identity string) {
		t.Helper()
		if _, err := lt.l.acquire(lt.ctx, identity, false); !errors.Is(err, ErrOverloaded) {
			t.Errorf("acquire(%q) with the queue full = %v, want ErrOverloaded", identity, err)
		}
	}
	displace("b", "a4") // a has 3 unary waiting, b none
	refused("b")        // a 2, b 1
	displace("c", "a3") // a 2, c none
	for _, identity := range []string{"a", "b", "c", "d"} {
		refused(identity) // a 1, b 1, c 1
	}
	for range 4 {
		release()
		release = lt.next().release
	}
	release()
	lt.checkEmpty()
}

// TestLimiterNil checks that a nil limiter sets no bound.
func TestLimiterNil(t *testing.T) {
	l := newLimiter(0, 0)
	if l != nil {
		t.Fatalf("newLimiter(0, 0) = %v, want nil", l)
	}
	for range 3 {
		release, err := l.acquire(t.Context(), "a", false)
		if err != nil {
			t.Fatalf("nil limiter: acquire() = %v", err)
		}
		release()
	}
	if l.running() != 0 || l.queueDepth() != 0 {
		t.Errorf("nil limiter: running %d, waiting %d; want 0 and 0", l.running(), l.queueDepth())
	}
}
