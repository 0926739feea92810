package hsm

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// UnavailableError is the error of an operation that the token cannot
// perform now, though it may later: the module met a token fault and is
// reconnecting, the token stopped answering, every call slot is taken by
// calls that have not returned, or the module is closed. Operations fail
// with it at once, without calling the token, until the module has
// reconnected; [Module.Check] returns it too.
//
// Package signer cannot import this package; it recognises the error by its
// Unavailable method and answers gRPC Unavailable, which lets an edge retry
// on another keyserver.
type UnavailableError struct {
	// Reason says what is wrong, as "token fault" or "all 7 call slots are
	// held by stuck calls".
	Reason string
	// Since is when the token became unavailable, if known.
	Since time.Time
	// Err is the underlying error, such as the PKCS #11 return value of
	// the fault; it may be nil.
	Err error
}

func (e *UnavailableError) Error() string {
	msg := "hsm: token unavailable: " + e.Reason
	if !e.Since.IsZero() {
		msg += fmt.Sprintf(" (since %s, %v ago)", e.Since.Format(time.RFC3339), time.Since(e.Since).Round(time.Millisecond))
	}
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	return msg
}

// Unwrap returns e.Err.
func (e *UnavailableError) Unwrap() error { return e.Err }

// Unavailable reports true: the operation may succeed later, or on another
// keyserver.
func (e *UnavailableError) Unavailable() bool { return true }

// unavailable wraps err in an *UnavailableError if it means the token cannot
// be used now, and returns it unchanged otherwise.
func (m *Module) unavailable(err error) error {
	var ue *UnavailableError
	switch {
	case err == nil, errors.As(err, &ue):
		return err
	case errors.Is(err, ErrClosed):
		return &UnavailableError{Reason: "module closed", Err: err}
	case errors.Is(err, errPoolTimeout):
		return &UnavailableError{Reason: "no PKCS #11 session or call slot became free in time", Err: err}
	case isTokenFault(err):
		since := time.Now()
		if f := m.fault.Load(); f != nil {
			since = f.when
		}
		return &UnavailableError{Reason: "token fault; reconnecting", Since: since, Err: err}
	}
	return err
}

// callTracker bounds and watches the PKCS #11 calls of key operations.
//
// A call takes a slot before it starts and gives it back when the PKCS #11
// function returns, which may be long after the operation's context ended
// and its caller went away: such a call still holds a session and occupies
// the token, so it must keep counting. The number of slots is the size of
// the session pools, so a key operation never waits inside a pool. It is
// safe for concurrent use.
type callTracker struct {
	slots chan struct{}

	// Calls run on goroutines that are kept for the next call (see run),
	// so that their stacks stay grown; stopWorkers ends them.
	jobs     chan func()
	stop     chan struct{}
	stopOnce sync.Once

	wait time.Duration // longest wait for a slot

	mu      sync.Mutex
	cond    *sync.Cond // signalled when a call ends
	next    uint64
	running map[uint64]*callRecord
	perGen  map[uint64]int // running calls per connection generation
}

// callRecord is one call in progress.
type callRecord struct {
	op, key  string
	gen      uint64
	start    time.Time
	reported bool // logged as stuck
	// viaCrypto11 marks a call on one of crypto11's sessions, which may be
	// abandoned (see abandonBefore); a call on the module's own sessions
	// never is, because Close waits for those sessions.
	viaCrypto11 bool
	abandoned   bool // its slot was given back by abandonBefore
}

func newCallTracker(slots int, wait time.Duration) *callTracker {
	t := &callTracker{
		slots:   make(chan struct{}, slots),
		jobs:    make(chan func()),
		stop:    make(chan struct{}),
		wait:    wait,
		running: make(map[uint64]*callRecord),
		perGen:  make(map[uint64]int),
	}
	t.cond = sync.NewCond(&t.mu)
	return t
}

// acquire takes a slot, waiting until ctx ends or the tracker's wait
// passes. It fails at once when every slot is held by a call older than
// stuckAfter: waiting would only make the caller time out too.
func (t *callTracker) acquire(ctx context.Context, stuckAfter time.Duration) error {
	select {
	case t.slots <- struct{}{}:
		return nil
	default:
	}
	if n := t.stuck(stuckAfter); n >= cap(t.slots) {
		return &UnavailableError{Reason: fmt.Sprintf("all %d call slots are held by PKCS #11 calls that have not returned for %v", n, stuckAfter)}
	}
	timer := time.NewTimer(t.wait)
	defer timer.Stop()
	select {
	case t.slots <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		return errPoolTimeout
	}
}

// run runs f on a call goroutine: one that is waiting for work, else a
// new one, which afterwards waits for the next call until stopWorkers.
// Every running call holds a slot, so there are about as many call
// goroutines as slots at most.
func (t *callTracker) run(f func()) {
	select {
	case t.jobs <- f:
	default:
		go t.work(f)
	}
}

func (t *callTracker) work(f func()) {
	for {
		f()
		select {
		case f = <-t.jobs:
		case <-t.stop:
			return
		}
	}
}

// stopWorkers makes the call goroutines end once their call returns.
func (t *callTracker) stopWorkers() {
	t.stopOnce.Do(func() { close(t.stop) })
}

// start records a call that holds a slot and returns its id.
func (t *callTracker) start(op, key string, gen uint64, viaCrypto11 bool) uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.next++
	t.running[t.next] = &callRecord{op: op, key: key, gen: gen, start: time.Now(), viaCrypto11: viaCrypto11}
	t.perGen[gen]++
	return t.next
}

// finish ends call id, gives back its slot and returns its record.
func (t *callTracker) finish(id uint64) *callRecord {
	t.mu.Lock()
	r := t.running[id]
	delete(t.running, id)
	if t.perGen[r.gen]--; t.perGen[r.gen] == 0 {
		delete(t.perGen, r.gen)
	}
	t.cond.Broadcast()
	t.mu.Unlock()
	if !r.abandoned {
		<-t.slots
	}
	return r
}

// abandonBefore gives back the slots of the calls through crypto11 of
// connection generations before gen that are still running, and returns how many
// there were. Such a call runs on a connection that a reconnection has
// replaced, and may never return (p11-kit 0.24's client can leave a call
// blocked for good when its server dies): it must not keep its slot for
// ever. It stays listed until it returns, but no longer counts.
func (t *callTracker) abandonBefore(gen uint64) int {
	t.mu.Lock()
	n := 0
	for _, r := range t.running {
		if !r.abandoned && r.viaCrypto11 && r.gen < gen {
			r.abandoned = true
			n++
		}
	}
	t.cond.Broadcast()
	t.mu.Unlock()
	for range n {
		<-t.slots
	}
	return n
}

// stuck returns the number of calls that hold a slot and have run for
// longer than d.
func (t *callTracker) stuck(d time.Duration) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, r := range t.running {
		if !r.abandoned && time.Since(r.start) > d {
			n++
		}
	}
	return n
}

// newlyStuck returns copies of the calls running for longer than d that
// have not been reported yet, and marks them reported.
func (t *callTracker) newlyStuck(d time.Duration) []callRecord {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []callRecord
	for _, r := range t.running {
		if !r.reported && time.Since(r.start) > d {
			r.reported = true
			out = append(out, *r)
		}
	}
	return out
}

// waitIdle waits until no call that holds a slot is running or deadline
// passes, and returns the number of such calls still running. Abandoned
// calls are not waited for.
func (t *callTracker) waitIdle(deadline time.Time) int {
	for {
		t.mu.Lock()
		n := 0
		for _, r := range t.running {
			if !r.abandoned {
				n++
			}
		}
		t.mu.Unlock()
		if n == 0 || !time.Now().Before(deadline) {
			return n
		}
		time.Sleep(min(10*time.Millisecond, time.Until(deadline)))
	}
}

// waitGen waits until no call of connection generation gen is running,
// and reports true; or until those still running are all abandoned (see
// abandonBefore), and reports false.
func (t *callTracker) waitGen(gen uint64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	for t.perGen[gen] > 0 {
		live := 0
		for _, r := range t.running {
			if r.gen == gen && !r.abandoned {
				live++
			}
		}
		if live == 0 {
			return false
		}
		t.cond.Wait()
	}
	return true
}

// call runs f, one PKCS #11 operation of key k named op (as "C_Sign"),
// bounded by ctx. It fails at once while the module is closed or faulty, or
// k is from before a reconnection; it waits for a call slot, then runs f on
// a call goroutine (callTracker.run) that keeps the slot until f returns,
// even if ctx ends first and call returns ctx.Err(). Errors that mean the
// token cannot be used are recorded as faults (so that the module
// reconnects) and returned as *UnavailableError.
func call[T any](ctx context.Context, k *keyBase, op string, f func() (T, error)) (T, error) {
	return trackedCall(ctx, k, op, false, f)
}

// callCrypto11 is call for an operation through crypto11's sessions (see
// callTracker.abandonBefore).
func callCrypto11[T any](ctx context.Context, k *keyBase, op string, f func() (T, error)) (T, error) {
	return trackedCall(ctx, k, op, true, f)
}

func trackedCall[T any](ctx context.Context, k *keyBase, op string, viaCrypto11 bool, f func() (T, error)) (T, error) {
	var zero T
	m := k.m
	if err := k.ready(ctx); err != nil {
		return zero, err
	}
	if err := m.calls.acquire(ctx, m.cfg.stuckCallThreshold()); err != nil {
		return zero, m.unavailable(err)
	}
	id := m.calls.start(op, k.label, k.gen, viaCrypto11)
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	m.calls.run(func() {
		v, err := f()
		r := m.calls.finish(id)
		if r.reported {
			m.logger.Info("stuck PKCS #11 call returned", "op", r.op, "key", r.key, "after", time.Since(r.start).Round(time.Millisecond), "error", err)
		}
		done <- result{v, err}
	})
	select {
	case r := <-done:
		if r.err != nil {
			m.noteFault(r.err)
			return zero, m.unavailable(r.err)
		}
		return r.v, nil
	case <-ctx.Done():
		return zero, ctx.Err()
	}
}

// supervise runs from Open to Close. It reconnects after token faults,
// with exponential backoff (but looks for a token that has gone every
// tokenPollInterval), scans the token for added and removed keys
// every Config.RescanInterval while the token is healthy, and logs calls
// that are stuck.
func (m *Module) supervise() {
	defer close(m.supervisorDone)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-m.stop
		cancel()
	}()

	stuckAfter := m.cfg.stuckCallThreshold()
	stuckTick := time.NewTicker(min(max(stuckAfter/4, 10*time.Millisecond), time.Second))
	defer stuckTick.Stop()
	var rescan <-chan time.Time
	if d := m.cfg.rescanInterval(); d > 0 {
		t := time.NewTicker(d)
		defer t.Stop()
		rescan = t.C
	}
	// Stopped until a fault; since Go 1.23 a stopped timer delivers no
	// stale value, so Reset needs no draining.
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	var (
		retrying bool
		attempt  int
		backoff  time.Duration
	)
	for {
		select {
		case <-m.stop:
			return
		case <-m.wake:
			if !retrying && m.fault.Load() != nil && !m.pinRefused.Load() {
				retrying, attempt, backoff = true, 0, 0
				retry.Reset(0)
			}
		case <-retry.C:
			f := m.fault.Load()
			if f == nil {
				retrying = false
				continue
			}
			attempt++
			err := m.reconnect(ctx, f, attempt)
			if err == nil || errors.Is(err, ErrClosed) || ctx.Err() != nil {
				retrying = false
				continue
			}
			m.lastReconnect.Store(&reconnectState{attempt: attempt, err: err})
			if isPINError(err) {
				// Another attempt with the same PIN could lock the user
				// out of a real HSM: wait for a new PIN.
				m.pinRefused.Store(true)
				retrying = false
				m.logger.Error("the token refused the PIN: not trying again, so as not to lock the user; the keyserver stays unavailable until the PIN is fixed (-pin-file, then SIGHUP) or it is restarted",
					"token", m.token.Label, "attempt", attempt, "error", err)
				continue
			}
			backoff = min(max(2*backoff, minReconnectBackoff), m.cfg.maxReconnectBackoff())
			if errors.Is(err, errTokenGone) {
				// Finding no token costs a C_Initialize and a
				// C_GetSlotList or C_GetTokenInfo, and nothing of the
				// token's: look often, so that a token is back in service
				// soon after it returns, however long it was away.
				backoff = min(backoff, tokenPollInterval)
			}
			if attempt&(attempt-1) == 0 {
				m.logger.Warn("reconnecting to the token failed; retrying", "token", m.token.Label, "attempt", attempt, "retry_in", backoff, "error", err)
			}
			retry.Reset(backoff)
		case <-rescan:
			if m.fault.Load() == nil {
				if err := m.Refresh(ctx); err != nil && ctx.Err() == nil {
					m.logger.Warn("periodic scan of the token failed", "token", m.token.Label, "error", err)
				}
			}
		case <-stuckTick.C:
			for _, r := range m.calls.newlyStuck(stuckAfter) {
				m.logger.Warn(fmt.Sprintf("hsm call stuck for %v: %s key=%q", time.Since(r.start).Round(time.Second), r.op, r.key),
					"op", r.op, "key", r.key, "running_for", time.Since(r.start).Round(time.Millisecond))
			}
		}
	}
}

// reconnectState is the outcome of the last failed reconnection.
type reconnectState struct {
	attempt int
	err     error
}

// kick wakes the supervisor.
func (m *Module) kick() {
	if m.wake == nil {
		return
	}
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// isPINError reports whether err is the token's refusal of a PIN, or a
// token whose user PIN is locked: logging in again with the same PIN can
// only make it worse.
func isPINError(err error) bool {
	if errors.Is(err, errPINLocked) {
		return true
	}
	var e pkcs11.Error
	if !errors.As(err, &e) {
		return false
	}
	switch uint(e) {
	case pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_LOCKED, pkcs11.CKR_PIN_EXPIRED,
		pkcs11.CKR_PIN_INVALID, pkcs11.CKR_PIN_LEN_RANGE:
		return true
	}
	return false
}

// SetPIN replaces the user PIN the module logs in with when it reconnects,
// and, if the token refused the previous one, tries to reconnect at once.
// A keyserver calls it on SIGHUP with the PIN read again from its file.
// Reconnection stops after the token refuses a PIN (see [Module.Check]),
// because each further attempt with a wrong PIN counts toward locking the
// user on a real HSM.
func (m *Module) SetPIN(pin string) {
	m.mu.Lock()
	m.cfg.PIN = pin
	m.mu.Unlock()
	m.raw.setPIN(pin)
	if m.pinRefused.Swap(false) {
		m.kick()
	}
}
