package hsm

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// errPoolTimeout is returned when no session became free within
// Config.PoolWaitTimeout.
var errPoolTimeout = errors.New("hsm: timed out waiting for a free PKCS #11 session")

// sessionPool is the module's own bounded pool of logged-in read-write
// sessions, for the operations it does without crypto11. It is safe for
// concurrent use.
//
// PKCS #11 login state belongs to the application, not the session: while
// crypto11's persistent session is logged in, every new session is too and
// C_Login answers CKR_USER_ALREADY_LOGGED_IN. The pool still logs in each
// session it opens, and logs in again when an operation reports
// CKR_USER_NOT_LOGGED_IN, so that it recovers when the login was lost.
type sessionPool struct {
	p11  p11API
	slot uint
	pin  string
	wait time.Duration

	// slots holds one token per session in use; its capacity is the cap.
	slots chan struct{}
	inUse sync.WaitGroup

	mu     sync.Mutex
	idle   []pkcs11.SessionHandle
	closed bool
}

func newSessionPool(p p11API, slot uint, pin string, size int, wait time.Duration) *sessionPool {
	return &sessionPool{p11: p, slot: slot, pin: pin, wait: wait, slots: make(chan struct{}, size)}
}

// get returns a session for the caller's exclusive use, waiting for a free
// one until ctx is done or the pool's wait timeout passes. The caller must
// hand it back with put.
func (p *sessionPool) get(ctx context.Context) (pkcs11.SessionHandle, error) {
	select {
	case p.slots <- struct{}{}:
	default:
		t := time.NewTimer(p.wait)
		defer t.Stop()
		select {
		case p.slots <- struct{}{}:
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-t.C:
			return 0, errPoolTimeout
		}
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		<-p.slots
		return 0, ErrClosed
	}
	p.inUse.Add(1)
	if n := len(p.idle); n > 0 {
		sh := p.idle[n-1]
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		return sh, nil
	}
	p.mu.Unlock()
	sh, err := p.open()
	if err != nil {
		p.inUse.Done()
		<-p.slots
		return 0, err
	}
	return sh, nil
}

// adopt adds an open, logged-in session to the idle sessions.
func (p *sessionPool) adopt(sh pkcs11.SessionHandle) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.idle = append(p.idle, sh)
}

// reset closes the idle sessions, which may be stale after a fault.
// Sessions in use are kept or dropped when they come back.
func (p *sessionPool) reset() {
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	for _, sh := range idle {
		_ = p.p11.CloseSession(sh)
	}
}

// open opens and logs in a new session.
func (p *sessionPool) open() (pkcs11.SessionHandle, error) {
	sh, err := p.p11.OpenSession(p.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return 0, fmt.Errorf("hsm: open session: %w", err)
	}
	if err := p.login(sh); err != nil {
		_ = p.p11.CloseSession(sh)
		return 0, err
	}
	return sh, nil
}

func (p *sessionPool) login(sh pkcs11.SessionHandle) error {
	if err := p.p11.Login(sh, pkcs11.CKU_USER, p.pin); err != nil && !isCode(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
		return fmt.Errorf("hsm: log in: %w", err)
	}
	return nil
}

// put returns a session taken with get. A broken session is closed
// instead of being kept.
func (p *sessionPool) put(sh pkcs11.SessionHandle, broken bool) {
	p.mu.Lock()
	keep := !broken && !p.closed
	if keep {
		p.idle = append(p.idle, sh)
	}
	p.mu.Unlock()
	if !keep {
		_ = p.p11.CloseSession(sh)
	}
	p.inUse.Done()
	<-p.slots
}

// do runs f on a pooled session. When f fails because the session was
// closed or logged out (by a fault or by another application), do logs in
// again or opens a new session and runs f once more, so the pool heals
// itself; f must therefore be safe to run twice.
func (p *sessionPool) do(ctx context.Context, f func(sh pkcs11.SessionHandle) error) error {
	for attempt := 0; ; attempt++ {
		sh, err := p.get(ctx)
		if err != nil {
			return err
		}
		err = f(sh)
		retry := false
		switch {
		case err == nil:
		case sessionBroken(err):
			p.put(sh, true)
			if attempt == 0 && !isCode(err, pkcs11.CKR_DEVICE_REMOVED) && !isCode(err, pkcs11.CKR_TOKEN_NOT_PRESENT) {
				continue
			}
			return err
		case isCode(err, pkcs11.CKR_USER_NOT_LOGGED_IN):
			retry = attempt == 0 && p.login(sh) == nil
		}
		p.put(sh, false)
		if !retry {
			return err
		}
	}
}

// close closes the idle sessions, waits for those in use to come back and
// closes them too. Later calls to get fail with ErrClosed.
func (p *sessionPool) close() {
	p.mu.Lock()
	p.closed = true
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	for _, sh := range idle {
		_ = p.p11.CloseSession(sh)
	}
	p.inUse.Wait()
}
