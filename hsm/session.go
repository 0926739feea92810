package hsm

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
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
//
// Each session carries the library epoch it was opened in (see
// libraries). A session from before the library was initialised again is
// dropped without C_CloseSession: its handle may by now name another,
// newer session.
type sessionPool struct {
	p11   p11API
	slot  atomic.Uint64  // changes when the library is initialised again
	epoch *atomic.Uint64 // the library's epoch; nil for none (tests)
	wait  time.Duration

	pinMu      sync.Mutex
	pin        string
	pinRefused bool // the token refused pin: do not try it again

	// slots holds one token per session in use; its capacity is the cap.
	slots chan struct{}
	inUse sync.WaitGroup

	mu     sync.Mutex
	idle   []session
	closed bool
}

// session is a pooled session and the library epoch it was opened in.
type session struct {
	sh    pkcs11.SessionHandle
	epoch uint64
}

func newSessionPool(p p11API, slot uint, pin string, size int, wait time.Duration) *sessionPool {
	sp := &sessionPool{p11: p, pin: pin, wait: wait, slots: make(chan struct{}, size)}
	sp.slot.Store(uint64(slot))
	return sp
}

// libEpoch returns the library's current epoch.
func (p *sessionPool) libEpoch() uint64 {
	if p.epoch == nil {
		return 0
	}
	return p.epoch.Load()
}

// get returns a session for the caller's exclusive use, waiting for a free
// one until ctx is done or the pool's wait timeout passes. The caller must
// hand it back with put.
func (p *sessionPool) get(ctx context.Context) (session, error) {
	select {
	case p.slots <- struct{}{}:
	default:
		t := time.NewTimer(p.wait)
		defer t.Stop()
		select {
		case p.slots <- struct{}{}:
		case <-ctx.Done():
			return session{}, ctx.Err()
		case <-t.C:
			return session{}, errPoolTimeout
		}
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		<-p.slots
		return session{}, ErrClosed
	}
	p.inUse.Add(1)
	cur := p.libEpoch()
	for n := len(p.idle); n > 0; n-- {
		s := p.idle[n-1]
		p.idle = p.idle[:n-1]
		if s.epoch == cur {
			p.mu.Unlock()
			return s, nil
		}
	}
	p.mu.Unlock()
	s, err := p.open()
	if err != nil {
		p.inUse.Done()
		<-p.slots
		return session{}, err
	}
	return s, nil
}

// adopt adds an open, logged-in session of the current library epoch to
// the idle sessions.
func (p *sessionPool) adopt(sh pkcs11.SessionHandle) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.idle = append(p.idle, session{sh, p.libEpoch()})
}

// reset closes the idle sessions, which may be stale after a fault, and
// opens new ones on slot from then on. Sessions in use are kept or dropped
// when they come back. The caller holds the libraries lock.
func (p *sessionPool) reset(slot uint) {
	p.slot.Store(uint64(slot))
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	cur := p.libEpoch()
	for _, s := range idle {
		if s.epoch == cur {
			_ = p.p11.CloseSession(s.sh)
		}
	}
}

// open opens and logs in a new session.
func (p *sessionPool) open() (session, error) {
	s := session{epoch: p.libEpoch()}
	var err error
	s.sh, err = p.p11.OpenSession(uint(p.slot.Load()), pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return session{}, fmt.Errorf("hsm: open session: %w", err)
	}
	if err := p.login(s.sh); err != nil {
		_ = p.p11.CloseSession(s.sh)
		return session{}, err
	}
	return s, nil
}

// login logs sh in, unless the token has refused the pool's PIN before:
// each attempt with a wrong PIN counts toward locking the user.
func (p *sessionPool) login(sh pkcs11.SessionHandle) error {
	p.pinMu.Lock()
	defer p.pinMu.Unlock()
	if p.pinRefused {
		return fmt.Errorf("hsm: log in: %w", pkcs11.Error(pkcs11.CKR_PIN_INCORRECT))
	}
	if err := p.p11.Login(sh, pkcs11.CKU_USER, p.pin); err != nil && !isCode(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
		p.pinRefused = isPINError(err)
		return fmt.Errorf("hsm: log in: %w", err)
	}
	return nil
}

// setPIN replaces the PIN new sessions log in with.
func (p *sessionPool) setPIN(pin string) {
	p.pinMu.Lock()
	defer p.pinMu.Unlock()
	p.pin, p.pinRefused = pin, false
}

// closeSession closes s unless the library has been initialised again
// since it was opened. It holds the libraries lock, so that the library
// cannot be initialised again between the check and the close.
func (p *sessionPool) closeSession(s session) {
	libraries.Lock()
	defer libraries.Unlock()
	if s.epoch == p.libEpoch() {
		_ = p.p11.CloseSession(s.sh)
	}
}

// put returns a session taken with get. A broken session is closed
// instead of being kept, a session from an earlier library epoch dropped.
func (p *sessionPool) put(s session, broken bool) {
	p.mu.Lock()
	stale := s.epoch != p.libEpoch()
	keep := !broken && !p.closed && !stale
	if keep {
		p.idle = append(p.idle, s)
	}
	p.mu.Unlock()
	if !keep && !stale {
		p.closeSession(s)
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
		s, err := p.get(ctx)
		if err != nil {
			return err
		}
		err = f(s.sh)
		retry := false
		switch {
		case err == nil:
		case sessionBroken(err):
			p.put(s, true)
			if attempt == 0 && !isCode(err, pkcs11.CKR_DEVICE_REMOVED) && !isCode(err, pkcs11.CKR_TOKEN_NOT_PRESENT) {
				continue
			}
			return err
		case isCode(err, pkcs11.CKR_USER_NOT_LOGGED_IN):
			retry = attempt == 0 && p.login(s.sh) == nil
		}
		p.put(s, false)
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
	for _, s := range idle {
		p.closeSession(s)
	}
	p.inUse.Wait()
}
