package tlscore

import (
	"sync"
	"time"
)

// rttDeadlineFactor is how many measured round trips a call may take
// before its deadline, when that is longer than the configured timeout:
// one for the operation, and room for the keyserver's queue and a retry.
const rttDeadlineFactor = 4

// rttWindow is how long one observation of the link's round trip counts:
// the estimate is the shortest successful operation over the last one to
// two windows, so it follows a path that grows longer within that time.
const rttWindow = 10 * time.Second

// rttEstimator estimates a keyserver link's round-trip time as the
// shortest successful operation recently seen: the path's delay plus the
// HSM's fastest operation, without the queueing that longer operations
// include (a windowed minimum, as TCP's and BBR's min-RTT filters keep).
// The zero value is ready to use, with no estimate. It is safe for
// concurrent use.
type rttEstimator struct {
	mu        sync.Mutex
	start     time.Time     // when the current window began
	cur, prev time.Duration // the shortest in the current and previous windows; 0: none
	now       func() time.Time
}

// observe records a successful operation that took d.
func (e *rttEstimator) observe(d time.Duration) {
	if d <= 0 {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.rotate()
	if e.cur == 0 || d < e.cur {
		e.cur = d
	}
}

// get returns the estimate, or 0 when no operation succeeded in the last
// one to two windows.
func (e *rttEstimator) get() time.Duration {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.rotate()
	switch {
	case e.prev == 0:
		return e.cur
	case e.cur == 0:
		return e.prev
	}
	return min(e.cur, e.prev)
}

// rotate starts a new window when the current one is over; e.mu is held.
func (e *rttEstimator) rotate() {
	now := time.Now()
	if e.now != nil {
		now = e.now()
	}
	switch el := now.Sub(e.start); {
	case el < rttWindow:
	case el < 2*rttWindow:
		e.prev, e.cur, e.start = e.cur, 0, e.start.Add(rttWindow)
	default:
		e.prev, e.cur, e.start = 0, 0, now
	}
}

// deadline returns the timeout of a call: timeout, or rttDeadlineFactor ×
// the estimate if that is longer.
func (e *rttEstimator) deadline(timeout time.Duration) time.Duration {
	return max(timeout, rttDeadlineFactor*e.get())
}
