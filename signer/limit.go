package signer

import (
	"context"
	"sync/atomic"
)

// limiter bounds the operations running in the key store and the
// operations waiting for it. An HSM is fastest at a small concurrency and
// slows down when many callers hit it (SoftHSM locks the whole token for
// each object access), so the service queues the excess here rather than
// fanning out into the HSM.
type limiter struct {
	slots    chan struct{}
	waiting  atomic.Int64
	maxQueue int64
}

// newLimiter returns a limiter for running concurrent operations with at
// most queue waiting. running <= 0 means no limit.
func newLimiter(running, queue int) *limiter {
	if running <= 0 {
		return nil
	}
	return &limiter{slots: make(chan struct{}, running), maxQueue: int64(queue)}
}

// acquire waits for a slot until ctx is done. It returns ErrOverloaded at
// once when the queue is full, unless the operation is a stream's
// (streamed): those queue in their stream, which bounds them, and only its
// few workers wait here. The caller must call release after a nil error.
func (l *limiter) acquire(ctx context.Context, streamed bool) error {
	if l == nil {
		return nil
	}
	select {
	case l.slots <- struct{}{}:
		return nil
	default:
	}
	if l.waiting.Add(1) > l.maxQueue && !streamed {
		l.waiting.Add(-1)
		return ErrOverloaded
	}
	defer l.waiting.Add(-1)
	select {
	case l.slots <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (l *limiter) release() {
	if l != nil {
		<-l.slots
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
	return len(l.slots)
}
