package signer

import (
	"container/list"
	"context"
	"sync"
	"sync/atomic"
)

// limiter bounds the operations running in the key store and the
// operations waiting for it. An HSM is fastest at a small concurrency and
// slows down when many callers hit it (SoftHSM locks the whole token for
// each object access), so the service queues the excess here rather than
// fanning out into the HSM.
//
// The wait is fair between identities: each identity waits in a queue of
// its own, first come first served, and a slot that frees goes to the
// identities with operations waiting in turn (round robin), one operation
// each. An identity that floods the keyserver therefore lengthens its own
// queue, not the others': an operation of another identity waits for at
// most one operation of each identity waiting before it, plus those
// running, however many the flooding identity has queued. Turns are by
// operation, not by cost: an identity whose operations are cheap (ECDSA)
// gets fewer HSM seconds per turn than one whose operations are dear (RSA).
//
// It is safe for concurrent use. A nil *limiter sets no bound.
type limiter struct {
	capacity int
	maxQueue int64
	// waiting is the number of operations queued; it changes only with mu
	// held, and is read without it by the metrics.
	waiting atomic.Int64

	mu   sync.Mutex
	busy int // slots taken
	// turns holds the *identityQueue of every identity with operations
	// waiting, in the order they are served; the front is next.
	turns  list.List
	queues map[string]*identityQueue
}

// identityQueue holds the operations of one identity waiting for a slot.
type identityQueue struct {
	identity string
	waiters  list.List // of *waiter, oldest first
	turn     *list.Element
}

// waiter is one operation waiting for a slot. ready receives a value when
// the slot is handed to it; granted is set at the same time, under the
// limiter's mu.
type waiter struct {
	ready   chan struct{}
	granted bool
	q       *identityQueue
	elem    *list.Element
}

// newLimiter returns a limiter for running concurrent operations with at
// most queue waiting. running <= 0 means no limit.
func newLimiter(running, queue int) *limiter {
	if running <= 0 {
		return nil
	}
	return &limiter{capacity: running, maxQueue: int64(queue), queues: make(map[string]*identityQueue)}
}

// acquire waits for a slot for an operation of identity until ctx is done.
// It returns ErrOverloaded at once when the queue is full, unless the
// operation is a stream's (streamed): those queue in their stream, which
// bounds them, and only its few workers wait here. It returns ctx's error
// if ctx ends first. The caller must call release after a nil error.
func (l *limiter) acquire(ctx context.Context, identity string, streamed bool) error {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	if l.busy < l.capacity && l.turns.Len() == 0 {
		l.busy++
		l.mu.Unlock()
		return nil
	}
	if !streamed && l.waiting.Load() >= l.maxQueue {
		l.mu.Unlock()
		return ErrOverloaded
	}
	if err := ctx.Err(); err != nil {
		l.mu.Unlock()
		return err
	}
	w := l.enqueue(identity)
	l.mu.Unlock()

	select {
	case <-w.ready:
		return nil
	case <-ctx.Done():
	}
	l.mu.Lock()
	if w.granted {
		// The slot came as ctx ended: pass it on.
		l.mu.Unlock()
		l.release()
		return ctx.Err()
	}
	l.remove(w)
	l.mu.Unlock()
	return ctx.Err()
}

// enqueue queues an operation of identity behind the others of that
// identity; an identity that had none waiting takes the last turn. The
// caller holds l.mu.
func (l *limiter) enqueue(identity string) *waiter {
	q := l.queues[identity]
	if q == nil {
		q = &identityQueue{identity: identity}
		q.turn = l.turns.PushBack(q)
		l.queues[identity] = q
	}
	w := &waiter{ready: make(chan struct{}, 1), q: q}
	w.elem = q.waiters.PushBack(w)
	l.waiting.Add(1)
	return w
}

// remove takes w out of its queue, and its identity out of the turns if
// it has nothing else waiting. The caller holds l.mu.
func (l *limiter) remove(w *waiter) {
	q := w.q
	q.waiters.Remove(w.elem)
	l.waiting.Add(-1)
	if q.waiters.Len() == 0 {
		l.turns.Remove(q.turn)
		delete(l.queues, q.identity)
	}
}

// release frees the slot of an operation that ended: it goes to the
// oldest operation of the identity whose turn it is, which then takes the
// last turn, or back to the pool if nothing waits.
func (l *limiter) release() {
	if l == nil {
		return
	}
	l.mu.Lock()
	front := l.turns.Front()
	if front == nil {
		l.busy--
		l.mu.Unlock()
		return
	}
	q := front.Value.(*identityQueue)
	w := q.waiters.Front().Value.(*waiter)
	l.remove(w)
	if q.waiters.Len() > 0 {
		l.turns.MoveToBack(q.turn)
	}
	w.granted = true
	l.mu.Unlock()
	w.ready <- struct{}{}
}

// queueDepth returns the operations waiting for the key store.
func (l *limiter) queueDepth() int64 {
	if l == nil {
		return 0
	}
	return l.waiting.Load()
}

// running returns the operations running in the key store.
func (l *limiter) running() int {
	if l == nil {
		return 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.busy
}
