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
// The wait is fair between identities. Each identity waits in a queue of
// its own, first come first served, and a slot that frees goes to the
// oldest operation of the identity with the fewest operations running
// among those with operations waiting; between identities running as many,
// in turn (round robin). So every identity that wants them gets an equal
// share of the slots, and an identity that floods the keyserver lengthens
// its own queue, not the others': an operation of an identity with nothing
// running gets the next slot that frees unless another such identity's
// turn comes first, however many operations the flooding identity has
// queued. Shares are counted in operations, not in their cost: an
// identity whose operations are cheap (ECDSA) gets fewer HSM seconds per
// slot than one whose operations are dear (RSA).
//
// The queue's bound is fair too: when it is full, a unary operation of an
// identity takes the place of the newest unary operation of the identity
// with the most waiting, if that one has at least two more waiting, and
// the operation displaced fails with ErrOverloaded. So a flood cannot fill
// the queue against the others: an identity is refused only while no
// other has more than one more operation waiting than it has.
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
	// turns holds the identities with operations waiting, in turn order:
	// among those with the fewest running, the first is served next.
	turns list.List // of *identitySlots
	// ids holds the identities with operations running or waiting.
	ids map[string]*identitySlots
}

// identitySlots is one identity's operations in the limiter.
type identitySlots struct {
	identity string
	running  int
	unary    int           // waiters that are not a stream's
	waiters  list.List     // of *waiter, oldest first
	turn     *list.Element // in limiter.turns while waiters is not empty
}

// waiter is one operation waiting for a slot. ready receives a value when
// the slot is handed to it (granted) or its place is given to another
// identity's operation (evicted); those are set before, under the
// limiter's mu.
type waiter struct {
	ready    chan struct{}
	streamed bool
	granted  bool
	evicted  bool
	ids      *identitySlots
	elem     *list.Element
}

// newLimiter returns a limiter for running concurrent operations with at
// most queue waiting. running <= 0 means no limit.
func newLimiter(running, queue int) *limiter {
	if running <= 0 {
		return nil
	}
	return &limiter{capacity: running, maxQueue: int64(queue), ids: make(map[string]*identitySlots)}
}

// noRelease is the release function of an operation that took no slot.
func noRelease() {}

// acquire waits for a slot for an operation of identity until ctx is done.
// It returns ErrOverloaded at once when the queue is full and it may not
// take another identity's place, or later if another identity's operation
// takes its place (see limiter), unless the operation is a stream's
// (streamed): those queue in their stream, which bounds them, and only its
// few workers wait here. It returns ctx's error if ctx ends first. After a
// nil error the caller must call release when the operation has left the
// key store; calls after the first do nothing.
func (l *limiter) acquire(ctx context.Context, identity string, streamed bool) (release func(), err error) {
	if l == nil {
		return noRelease, nil
	}
	l.mu.Lock()
	id := l.ids[identity]
	if id == nil {
		id = &identitySlots{identity: identity}
		l.ids[identity] = id
	}
	// An operation whose caller has given up takes no slot, even a free
	// one: the HSM's time goes to operations still awaited.
	if err := ctx.Err(); err != nil {
		l.forget(id)
		l.mu.Unlock()
		return nil, err
	}
	if l.busy < l.capacity && l.turns.Len() == 0 {
		l.busy++
		id.running++
		l.mu.Unlock()
		return id.releaser(l), nil
	}
	if !streamed && l.waiting.Load() >= l.maxQueue {
		victim := l.mostWaiting()
		if victim == nil || victim.unary < id.unary+2 {
			l.forget(id)
			l.mu.Unlock()
			return nil, ErrOverloaded
		}
		l.evict(victim)
	}
	w := &waiter{ready: make(chan struct{}, 1), streamed: streamed, ids: id}
	w.elem = id.waiters.PushBack(w)
	if !streamed {
		id.unary++
	}
	if id.turn == nil {
		id.turn = l.turns.PushBack(id)
	}
	l.waiting.Add(1)
	l.mu.Unlock()

	select {
	case <-w.ready:
		if w.evicted {
			return nil, ErrOverloaded
		}
		return id.releaser(l), nil
	case <-ctx.Done():
	}
	l.mu.Lock()
	switch {
	case w.granted:
		// The slot came as ctx ended: pass it on.
		l.mu.Unlock()
		l.release(id)
		return nil, ctx.Err()
	case w.evicted:
		l.mu.Unlock()
		return nil, ctx.Err()
	}
	l.dequeue(w)
	l.forget(id)
	l.mu.Unlock()
	return nil, ctx.Err()
}

// releaser returns the function that releases a slot of id.
func (id *identitySlots) releaser(l *limiter) func() {
	var once sync.Once
	return func() { once.Do(func() { l.release(id) }) }
}

// release frees a slot of id's: it goes to the next operation waiting
// (see limiter), or back to the pool if nothing waits.
func (l *limiter) release(id *identitySlots) {
	l.mu.Lock()
	id.running--
	l.forget(id)
	next := l.next()
	if next == nil {
		l.busy--
		l.mu.Unlock()
		return
	}
	w := next.waiters.Front().Value.(*waiter)
	l.dequeue(w)
	next.running++
	w.granted = true
	l.mu.Unlock()
	w.ready <- struct{}{}
}

// next returns the identity whose operation gets the slot that frees: the
// first in turn order among those with operations waiting that have the
// fewest running, or nil if none waits. That identity then takes the last
// turn. The caller holds l.mu.
func (l *limiter) next() *identitySlots {
	var best *identitySlots
	for e := l.turns.Front(); e != nil; e = e.Next() {
		if id := e.Value.(*identitySlots); best == nil || id.running < best.running {
			best = id
			if id.running == 0 {
				break
			}
		}
	}
	if best != nil {
		l.turns.MoveToBack(best.turn)
	}
	return best
}

// mostWaiting returns the identity with the most unary operations
// waiting, or nil if none waits. The caller holds l.mu.
func (l *limiter) mostWaiting() *identitySlots {
	var most *identitySlots
	for e := l.turns.Front(); e != nil; e = e.Next() {
		if id := e.Value.(*identitySlots); most == nil || id.unary > most.unary {
			most = id
		}
	}
	return most
}

// evict takes the newest unary operation of id out of the queue; its
// acquire returns ErrOverloaded. id has one. The caller holds l.mu.
func (l *limiter) evict(id *identitySlots) {
	for e := id.waiters.Back(); e != nil; e = e.Prev() {
		if w := e.Value.(*waiter); !w.streamed {
			l.dequeue(w)
			l.forget(id)
			w.evicted = true
			w.ready <- struct{}{}
			return
		}
	}
}

// dequeue takes w out of its identity's queue, and the identity out of
// the turns if it has nothing else waiting. The caller holds l.mu.
func (l *limiter) dequeue(w *waiter) {
	id := w.ids
	id.waiters.Remove(w.elem)
	if !w.streamed {
		id.unary--
	}
	l.waiting.Add(-1)
	if id.waiters.Len() == 0 {
		l.turns.Remove(id.turn)
		id.turn = nil
	}
}

// forget drops id if it has nothing running or waiting. The caller holds
// l.mu.
func (l *limiter) forget(id *identitySlots) {
	if id.running == 0 && id.waiters.Len() == 0 {
		delete(l.ids, id.identity)
	}
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
