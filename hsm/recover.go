package hsm

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/miekg/pkcs11"
)

// faultState records a token fault: an error after which the module's
// sessions, login or object handles cannot be trusted.
type faultState struct {
	err  error
	when time.Time
}

// errTokenGone marks an error of a call that asks about the token itself
// (C_GetTokenInfo) and fails, whatever its return value: SoftHSM answers
// CKR_GENERAL_ERROR once its token directory has gone, and still lists the
// slot and finds no objects without an error.
var errTokenGone = errors.New("hsm: the token does not answer")

// errPINLocked is the fault of a token whose user PIN is locked.
var errPINLocked = errors.New("the user PIN is locked")

// errLibraryReset is the fault of a Module whose sessions and handles
// predate a new initialisation of its PKCS #11 library by another Module
// of the process: they are dead, and their numbers may have been given to
// other sessions and objects since.
var errLibraryReset = errors.New("hsm: the PKCS #11 library was initialised again by another module; sessions and handles must be rebuilt")

// isTokenFault reports whether err means that the module's connection to
// the token is broken and must be rebuilt: crypto11's sessions do not
// recover from these, and SoftHSM (like other tokens) invalidates every
// object handle when all sessions of the application close.
func isTokenFault(err error) bool {
	if errors.Is(err, errTokenGone) || errors.Is(err, errLibraryReset) {
		return true
	}
	var e pkcs11.Error
	if !errors.As(err, &e) {
		return false
	}
	switch uint(e) {
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED,
		pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID,
		pkcs11.CKR_USER_NOT_LOGGED_IN, pkcs11.CKR_DEVICE_REMOVED,
		pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_DEVICE_ERROR,
		pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, pkcs11.CKR_TOKEN_NOT_RECOGNIZED:
		return true
	}
	return false
}

// noteFault records err if it is a token fault: from then on operations
// fail at once with an *UnavailableError, Check fails, and the supervisor
// reconnects.
func (m *Module) noteFault(err error) {
	if !isTokenFault(err) {
		return
	}
	m.markFaulty(err)
}

// markFaulty records err as a token fault, whatever it is.
func (m *Module) markFaulty(err error) {
	if m.fault.CompareAndSwap(nil, &faultState{err: err, when: time.Now()}) {
		m.logger.Warn("token fault: key operations fail until the module has reconnected", "token", m.token.Label, "error", err)
		m.notifyChanged()
	}
	m.kick()
}

// Changed returns a channel that is closed when the module next becomes
// faulty or has reconnected after a fault, so that a health reporter can
// follow the module at once rather than at its next poll. Call Changed
// again after each close, and [Module.Check] for the state itself. It is
// safe for concurrent use.
func (m *Module) Changed() <-chan struct{} {
	m.changedMu.Lock()
	defer m.changedMu.Unlock()
	return m.changed
}

func (m *Module) notifyChanged() {
	m.changedMu.Lock()
	defer m.changedMu.Unlock()
	if m.changed == nil {
		return
	}
	close(m.changed)
	m.changed = make(chan struct{})
}

func (m *Module) crypto11() c11Context {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.c11
}

// Check reports whether the token can be used now, for health checks: the
// token answers and its PIN is not locked, the module's sessions are logged
// in, its key handles are valid, crypto11's sessions answer, and PKCS #11
// calls are not all stuck. It makes no cryptographic operation.
//
// While the module is faulty (an operation or an earlier check met a
// closed session, a lost login, an invalid handle, a removed device, a
// token that does not answer), Check returns an *[UnavailableError] at
// once, describing the fault and the last failed attempt to reconnect. The
// module reconnects by itself, in the background, with backoff (see
// [Config.MaxReconnectBackoff]): it checks the token and the PIN, replaces
// the crypto11 context and its sessions, and scans the token for keys
// again; when a plain reconnection fails because the token does not
// answer, it also initialises the PKCS #11 library again (SoftHSM, for
// one, reads its token directory only then). Keys obtained before a
// reconnection stop working and must be looked up again with [Module.Key].
//
// Check returns ctx.Err() if ctx ends first and [ErrClosed] after Close.
func (m *Module) Check(ctx context.Context) error {
	if m.closed.Load() {
		return ErrClosed
	}
	if m.staleEpoch() {
		m.markFaulty(errLibraryReset)
	}
	if err := m.downError(); err != nil {
		m.kick()
		return err
	}
	threshold := m.cfg.stuckCallThreshold()
	if m.calls != nil {
		if n := m.calls.stuck(threshold); n >= cap(m.calls.slots) {
			return &UnavailableError{Reason: fmt.Sprintf("all %d call slots are held by PKCS #11 calls that have not returned for %v", n, threshold)}
		}
	}
	_, err := bounded(ctx, func() (struct{}, error) { return struct{}{}, m.probe(ctx) })
	if err == nil || ctx.Err() != nil {
		return err
	}
	if !m.closed.Load() {
		m.logger.Warn("health check failed", "token", m.token.Label, "error", err)
		m.markFaulty(err)
	}
	return m.unavailable(err)
}

// staleEpoch reports whether the module's crypto11 context predates the
// library's last initialisation (by another Module; see reconnect).
func (m *Module) staleEpoch() bool {
	if m.epoch == nil {
		return false
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.c11Epoch != m.epoch.Load()
}

// downError returns an *UnavailableError while the module is faulty, nil
// otherwise.
func (m *Module) downError() error {
	f := m.fault.Load()
	if f == nil {
		return nil
	}
	reason := "token fault; reconnecting"
	if r := m.lastReconnect.Load(); r != nil && r.err != nil {
		reason = fmt.Sprintf("token fault; reconnecting (attempt %d failed: %v)", r.attempt, r.err)
		if m.pinRefused.Load() {
			reason = fmt.Sprintf("token fault; the token refused the PIN when reconnecting, and the module waits for a new PIN (attempt %d failed: %v)", r.attempt, r.err)
		}
	}
	return &UnavailableError{Reason: reason, Since: f.when, Err: f.err}
}

// tokenInfo asks the token about itself, trying twice more after a short
// wait if it fails: SoftHSM fails C_GetTokenInfo now and then while
// another process rewrites its token file (which every C_Login does), and
// answers again a moment later, whereas a token that has gone keeps
// failing. Errors wrap errTokenGone.
func (m *Module) tokenInfo(ctx context.Context) (pkcs11.TokenInfo, error) {
	for i := 1; ; i++ {
		ti, err := m.p11.GetTokenInfo(m.slotID())
		if err == nil {
			return ti, nil
		}
		if i == 3 {
			return ti, fmt.Errorf("%w: %w", errTokenGone, err)
		}
		select {
		case <-ctx.Done():
			return ti, fmt.Errorf("%w: %w", errTokenGone, err)
		case <-time.After(time.Duration(i) * 25 * time.Millisecond):
		}
	}
}

// probe checks the token without changing anything.
func (m *Module) probe(ctx context.Context) error {
	ti, err := m.tokenInfo(ctx)
	if err != nil {
		return fmt.Errorf("hsm: check token %q: %w", m.token.Label, err)
	}
	if ti.Flags&pkcs11.CKF_USER_PIN_LOCKED != 0 {
		return fmt.Errorf("hsm: check token %q: %w", m.token.Label, errPINLocked)
	}
	m.mu.RLock()
	c11, list := m.c11, m.list
	m.mu.RUnlock()
	err = m.raw.do(ctx, func(sh pkcs11.SessionHandle) error {
		si, err := m.p11.GetSessionInfo(sh)
		if err != nil {
			return err
		}
		if si.State != pkcs11.CKS_RW_USER_FUNCTIONS && si.State != pkcs11.CKS_RO_USER_FUNCTIONS {
			return pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN)
		}
		// Object handles die with the last session of the application
		// (SoftHSM), so check that one key's still works.
		if len(list) > 0 {
			_, err = m.p11.GetAttributeValue(sh, base(list[0]).handle, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, nil)})
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("hsm: check token %q: %w", m.token.Label, err)
	}
	// A search that finds nothing exercises one of crypto11's sessions.
	if _, err := c11.FindKeyPairs(probeID, nil); err != nil {
		return fmt.Errorf("hsm: check token %q: crypto11: %w", m.token.Label, err)
	}
	return nil
}

// probeID is a CKA_ID no key is expected to have.
var probeID = []byte("keyless-hsm-health-check-no-such-key")

// libraryResetEvery bounds how often a library is initialised again after
// a fault, so that several faulty Modules of one process do not take
// turns at finalising it under each other.
const libraryResetEvery = time.Second

// reconnect rebuilds the module's connection to the token after the fault
// f; attempt counts the attempts since f (1 for the first). It does
// nothing if another call has already dealt with f.
//
// When an earlier attempt failed because the token did not answer, the
// PKCS #11 library is finalised and initialised again first: SoftHSM, for
// one, keeps a token that went away unusable, even after it has come back,
// until the library is initialised again. That breaks the sessions of every
// other Module of the process on the same library too; they reconnect in
// turn, without finalising the library again.
//
// A module with an instance of its own of a per-instance library (p11-kit's
// client; see attach) finalises and initialises its instance at every
// attempt, which affects no other Module: the instance's connection may
// have broken (p11-kit's client does not reconnect by itself). Its old
// crypto11 context, another instance, is closed once its calls have
// returned, and the new one initialises an instance of its own.
func (m *Module) reconnect(ctx context.Context, f *faultState, attempt int) error {
	m.scanMu.Lock()
	defer m.scanMu.Unlock()
	switch cur := m.fault.Load(); {
	case cur == nil:
		return nil
	case cur != f:
		f = cur
	}
	if m.closed.Load() {
		return ErrClosed
	}
	fail := func(err error) error {
		m.tokenGone.Store(errors.Is(err, errTokenGone))
		// Only the attempt's error is wrapped: the supervisor decides on
		// it (a refused PIN, an absent token), and the fault's return
		// value (CKR_DEVICE_ERROR when p11-kit's server died) would
		// otherwise be the one errors.As finds first.
		return fmt.Errorf("hsm: token %q is unusable (%v since %s) and reconnecting failed: %w",
			m.token.Label, f.err, f.when.Format(time.RFC3339), err)
	}

	// As in Open, everything crypto11.Configure checks is checked first.
	reset := false
	c11, err := func() (c11Context, error) {
		libraries.Lock()
		defer libraries.Unlock()
		switch {
		case m.perInstance:
			_ = m.p11.Finalize()
			m.epoch.Add(1)
			reset = true
		case m.tokenGone.Load() && time.Since(libraries.reset[m.path]) > libraryResetEvery:
			// The library stays counted as open by crypto11 (the old
			// context is still open), so crypto11 will not initialise it:
			// this module does, here or at its next attempt.
			_ = m.p11.Finalize()
			m.epoch.Add(1)
			libraries.reset[m.path] = time.Now()
			reset = true
		}
		switch err := m.p11.Initialize(); {
		case err == nil:
			// Initialised again here, whichever attempt finalised it (an
			// earlier one may have, and then failed to initialise it).
			reset = true
		case !isCode(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED):
			return nil, fmt.Errorf("%w: initialise PKCS #11 module %s: %w", errTokenGone, m.path, err)
		}
		// SoftHSM numbers the slots again when it is initialised again.
		slot, _, err := m.findToken()
		if err != nil {
			return nil, fmt.Errorf("%w: %w", errTokenGone, err)
		}
		sh, err := m.checkLogin(slot)
		if err != nil {
			return nil, err
		}
		c11, err := m.configure(slot)
		if err != nil {
			_ = m.p11.CloseSession(sh)
			return nil, err
		}
		if old := m.slotID(); old != slot {
			m.logger.Info("token found in another slot", "token", m.token.Label, "old_slot", old, "slot", slot)
			m.slot.Store(uint64(slot))
		}
		m.raw.reset(slot)
		m.raw.adopt(sh)
		return c11, nil
	}()
	if err != nil {
		return fail(err)
	}

	m.mu.Lock()
	old, oldGen, oldEpoch := m.c11, m.gen, m.c11Epoch
	m.c11, m.c11Epoch = c11, m.epoch.Load()
	m.gen++
	gen := m.gen
	m.mu.Unlock()
	// crypto11's Close waits for the old context's operations while it
	// holds crypto11's global lock, which every Configure needs: close it
	// only once the calls that use it have returned.
	m.bg.Go(func() {
		if !m.calls.waitGen(oldGen) {
			// crypto11's Close would wait for their sessions for ever.
			m.logger.Warn("the crypto11 context from before the reconnection is left open: calls on it have not returned", "token", m.token.Label)
			return
		}
		libraries.Lock()
		defer libraries.Unlock()
		_ = m.closeContext(old, oldEpoch)
	})

	loaded, err := m.scan(ctx, c11, gen)
	if err != nil {
		return fail(err)
	}
	m.install(loaded, true)
	m.logger.Info("reconnected to token", "token", m.token.Label, "keys", len(loaded), "attempts", attempt,
		"unavailable_for", time.Since(f.when).Round(time.Millisecond), "library_initialised_again", reset, "fault", f.err)
	m.fault.CompareAndSwap(f, nil)
	m.lastReconnect.Store(nil)
	m.tokenGone.Store(false)
	// After the log line: a health reporter following Changed puts the
	// keyserver back in service at once.
	m.notifyChanged()
	if m.perInstance {
		m.bg.Go(func() { m.abandonStaleCalls(gen) })
	}
	return nil
}

// staleCallGrace is how long calls begun before a reconnection of a
// per-instance module may take to return before their call slots are given
// back (see abandonStaleCalls).
const staleCallGrace = 250 * time.Millisecond

// abandonStaleCalls gives back, after staleCallGrace, the call slots of the
// calls begun before connection generation gen that have not returned.
// They ran on an instance of the library whose connection broke, and
// p11-kit 0.24's client can leave such a call blocked for good (a thread
// waiting in select() on a descriptor that another, failing call has set
// to -1): without this, each outage could take slots until none is left.
// Only calls through crypto11 are given up: their sessions belong to the old
// context, which is then left open; the module's own sessions are waited
// for by Close.
func (m *Module) abandonStaleCalls(gen uint64) {
	t := time.NewTimer(staleCallGrace)
	defer t.Stop()
	select {
	case <-m.stop:
		return
	case <-t.C:
	}
	if n := m.calls.abandonBefore(gen); n > 0 {
		m.logger.Warn("PKCS #11 calls begun before the reconnection have not returned; their call slots are given back", "token", m.token.Label, "calls", n)
	}
}
