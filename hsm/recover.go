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

// isTokenFault reports whether err means that the module's connection to
// the token is broken and must be rebuilt: crypto11's sessions do not
// recover from these, and SoftHSM (like other tokens) invalidates every
// object handle when all sessions of the application close.
func isTokenFault(err error) bool {
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

// noteFault records err if it is a token fault, so that the next Check or
// Refresh reconnects.
func (m *Module) noteFault(err error) {
	if !isTokenFault(err) {
		return
	}
	if m.fault.Swap(&faultState{err: err, when: time.Now()}) == nil {
		m.logger.Warn("token fault; the next health check or refresh reconnects", "token", m.token.Label, "error", err)
	}
}

func (m *Module) crypto11() c11Context {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.c11
}

// Check reports whether the token can be used now: the token is present
// and its PIN not locked, the module's sessions are logged in, its key
// handles are valid and crypto11's sessions answer. It makes no
// cryptographic operation and is meant for health checks.
//
// If the check fails, or an operation has met a token fault since the last
// check (a closed session, a lost login, an invalid handle, a removed
// device), Check reconnects: it checks the token and the PIN, replaces the
// crypto11 context and its sessions, and scans the token for keys again.
// Keys obtained before then stop working once their operations in
// progress finish, and must be looked up again with [Module.Key]. Check
// returns nil if the token is usable, possibly after reconnecting; an error
// describing the fault and the failed reconnection; ctx.Err() if ctx ends
// first; [ErrClosed] after Close.
//
// Reconnecting rebuilds sessions, not the library: a token that needs the
// PKCS #11 library to be initialised again (some HSMs after a restart)
// needs every Module of the process to be closed and opened again.
func (m *Module) Check(ctx context.Context) error {
	if m.closed.Load() {
		return ErrClosed
	}
	_, err := bounded(ctx, func() (struct{}, error) {
		f := m.fault.Load()
		if f == nil {
			err := m.probe(ctx)
			if err == nil || ctx.Err() != nil {
				return struct{}{}, err
			}
			f = &faultState{err: err, when: time.Now()}
			if !m.fault.CompareAndSwap(nil, f) {
				f = m.fault.Load()
			}
			m.logger.Warn("health check failed; reconnecting", "token", m.token.Label, "error", err)
		}
		return struct{}{}, m.reconnect(ctx, f)
	})
	return err
}

// probe checks the token without changing anything.
func (m *Module) probe(ctx context.Context) error {
	ti, err := m.p11.GetTokenInfo(m.slot)
	if err != nil {
		return fmt.Errorf("hsm: check token %q: %w", m.token.Label, err)
	}
	if ti.Flags&pkcs11.CKF_USER_PIN_LOCKED != 0 {
		return fmt.Errorf("hsm: check token %q: the user PIN is locked", m.token.Label)
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

// reconnect rebuilds the module's connection to the token after the fault
// f. It does nothing if another call has already dealt with f.
func (m *Module) reconnect(ctx context.Context, f *faultState) error {
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
		return fmt.Errorf("hsm: token %q is unusable (%w since %s) and reconnecting failed: %w",
			m.token.Label, f.err, f.when.Format(time.RFC3339), err)
	}

	// As in Open, everything crypto11.Configure checks is checked first.
	c11, err := func() (c11Context, error) {
		libraries.Lock()
		defer libraries.Unlock()
		slot, _, err := m.findToken()
		if err != nil {
			return nil, err
		}
		if slot != m.slot {
			return nil, fmt.Errorf("hsm: token %q moved from slot %d to slot %d; close and open the module", m.token.Label, m.slot, slot)
		}
		sh, err := m.checkLogin()
		if err != nil {
			return nil, err
		}
		c11, err := m.configure()
		if err != nil {
			_ = m.p11.CloseSession(sh)
			return nil, err
		}
		m.raw.reset()
		m.raw.adopt(sh)
		return c11, nil
	}()
	if err != nil {
		return fail(err)
	}

	m.mu.Lock()
	old := m.c11
	m.c11 = c11
	m.gen++
	gen := m.gen
	m.mu.Unlock()
	// The old context's Close waits for its operations in progress.
	m.bg.Go(func() {
		_ = old.Close()
		libraries.Lock()
		libraries.open[m.path]--
		libraries.Unlock()
	})

	loaded, err := m.scan(ctx, c11, gen)
	if err != nil {
		return fail(err)
	}
	m.install(loaded)
	m.fault.CompareAndSwap(f, nil)
	m.logger.Info("reconnected to token", "token", m.token.Label, "keys", len(loaded), "fault", f.err)
	return nil
}
