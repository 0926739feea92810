package hsm

import (
	"bytes"
	"cmp"
	"context"
	"crypto"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThalesIgnite/crypto11"
	"github.com/hashicorp/go-hclog"
	"github.com/miekg/pkcs11"
)

// libraries counts the open Modules of each PKCS #11 library (by canonical
// path), mirroring crypto11's own process-wide reference count, and
// serialises the steps that initialise or finalise a library. PKCS #11
// library state (C_Initialize, login) is global to the process, so this is
// the one piece of package-level state: a failed crypto11.Configure calls
// C_Finalize even while other contexts use the library, which would break
// every other open Module, and Open must know when that can happen.
//
// A library's epoch counts the times a reconnection has finalised and
// initialised it again (recover.go). Session handles from an earlier epoch
// are dead, and the library may hand out the same numbers again, so they
// must never be passed to C_CloseSession: sessions and crypto11 contexts
// carry the epoch they were opened in. A crypto11 context of an earlier
// epoch is left open (crypto11 would close its stale handles) and stays
// counted, as crypto11 counts it.
var libraries = struct {
	sync.Mutex
	open   map[string]int
	reset  map[string]time.Time // when a reconnection last initialised the library again
	epochs map[string]*atomic.Uint64
}{open: make(map[string]int), reset: make(map[string]time.Time), epochs: make(map[string]*atomic.Uint64)}

// libraryEpoch returns the epoch counter of the library at path. The caller
// holds the libraries lock.
func libraryEpoch(path string) *atomic.Uint64 {
	e := libraries.epochs[path]
	if e == nil {
		e = new(atomic.Uint64)
		libraries.epochs[path] = e
	}
	return e
}

// Module is an open PKCS #11 token and the key pairs found on it. Its keys
// are crypto.Signer values backed by the token (see the package
// documentation for their extra methods).
//
// A Module is safe for concurrent use. The caller must call Close when done
// with it; keys obtained from it fail with [ErrClosed] afterwards.
type Module struct {
	cfg    Config
	logger hclog.Logger
	path   string        // canonical module path
	slot   atomic.Uint64 // the token's slot ID, which may change when the library is initialised again
	token  pkcs11.TokenInfo
	mechs  mechanisms

	deps deps
	p11  p11API
	raw  *sessionPool

	// fault is the token fault an operation or check met, nil while the
	// module is healthy; see recover.go. While it is set, operations fail
	// at once and the supervisor reconnects.
	fault         atomic.Pointer[faultState]
	lastReconnect atomic.Pointer[reconnectState] // the last failed attempt since fault
	tokenGone     atomic.Bool                    // the last attempt found no token
	// pinRefused is set when the token refused the PIN while reconnecting:
	// reconnection waits for SetPIN (see supervise).
	pinRefused atomic.Bool
	bg         sync.WaitGroup // closing of replaced crypto11 contexts

	calls *callTracker // the PKCS #11 calls of key operations

	// The supervisor (supervise.go) runs from Open to Close.
	wake           chan struct{} // a fault was noted
	stop           chan struct{} // closed by Close
	supervisorDone chan struct{}

	// forcePKCSDecrypt makes RSA keys use the CKM_RSA_PKCS fallback even
	// when the token has CKM_RSA_X_509 (tests only).
	forcePKCSDecrypt bool

	epoch *atomic.Uint64 // the library's epoch (see libraries), or the module's own instance's

	// perInstance is set for a library whose every C_GetFunctionList
	// returns a separate instance with its own initialisation state and
	// connection (p11-kit's client module): see attach.
	perInstance bool

	sessions int // MaxSessions, lowered to the token's limit (sessionsFor)

	// changed is closed, and replaced, whenever the module becomes faulty
	// or healthy again (see Changed).
	changedMu sync.Mutex
	changed   chan struct{}

	scanMu   sync.Mutex // serialises Refresh, Generate and reconnection
	mu       sync.RWMutex
	c11      c11Context // replaced on reconnection
	c11Epoch uint64     // the library epoch c11 was opened in
	gen      uint64     // incremented on reconnection; keys carry theirs
	keys     map[[32]byte]crypto.Signer
	list     []crypto.Signer // sorted by label, then key id

	closed    atomic.Bool
	closeOnce sync.Once
	closeErr  error
}

// deps are the constructors Open uses, replaceable in tests.
type deps struct {
	newP11    func(path string) p11API
	configure func(*crypto11.Config) (c11Context, error)
}

var defaultDeps = deps{
	newP11: func(path string) p11API {
		if p := pkcs11.New(path); p != nil {
			return p
		}
		return nil
	},
	configure: func(c *crypto11.Config) (c11Context, error) { return crypto11.Configure(c) },
}

// Open loads the PKCS #11 module cfg.ModulePath, finds the token, logs in
// with cfg.PIN, asks the token which mechanisms it supports and finds every
// key pair on it. It logs a summary: the module, the token, the mechanisms,
// the number of keys, a warning for each key it skips and a warning if RSA
// premaster decryption must fall back to CKM_RSA_PKCS.
//
// Errors come from [Config.Validate], from loading the module, from a
// token that is absent or ambiguous, from a failed login (the error names
// the PKCS #11 return value, as CKR_PIN_INCORRECT, never the PIN) and from
// the token itself. A key that cannot be served is skipped, not an error.
//
// Several Modules may be open at once in a process, on the same or
// different tokens and libraries. When a token is already logged in by
// another Module of this process, PKCS #11 does not check the PIN again.
func Open(cfg Config) (*Module, error) {
	return open(cfg, defaultDeps)
}

func open(cfg Config, d deps) (*Module, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	logger := cfg.Logger
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	m := &Module{cfg: cfg, deps: d, logger: logger.Named("hsm"), keys: make(map[[32]byte]crypto.Signer), changed: make(chan struct{})}

	path, err := canonicalPath(cfg.ModulePath)
	if err != nil {
		return nil, err
	}
	m.path = path
	sh, err := m.attach()
	if err != nil {
		return nil, err
	}
	m.raw = newSessionPool(m.p11, m.slotID(), cfg.PIN, m.sessions-1, cfg.poolWaitTimeout())
	m.raw.epoch = m.epoch
	m.calls = newCallTracker(m.sessions-1, cfg.poolWaitTimeout())
	if sh != nil {
		// The session that checked the PIN becomes the pool's first.
		m.raw.adopt(*sh)
	}
	if m.mechs, err = probeMechanisms(m.p11, m.slotID()); err != nil {
		m.Close()
		return nil, fmt.Errorf("hsm: list mechanisms of token %q: %w", m.token.Label, err)
	}
	loaded, err := m.scan(context.Background(), m.c11, m.gen)
	if err != nil {
		m.Close()
		return nil, err
	}
	m.install(loaded, false)
	m.logSummary()
	m.wake = make(chan struct{}, 1)
	m.stop = make(chan struct{})
	m.supervisorDone = make(chan struct{})
	go m.supervise()
	return m, nil
}

// slotID returns the token's current slot ID.
func (m *Module) slotID() uint { return uint(m.slot.Load()) }

func canonicalPath(p string) (string, error) {
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", fmt.Errorf("hsm: module %s: %w", p, err)
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return "", fmt.Errorf("hsm: module %s: %w", p, err)
	}
	if fi, err := os.Stat(real); err != nil || !fi.Mode().IsRegular() {
		return "", fmt.Errorf("hsm: module %s is not a regular file", p)
	}
	return real, nil
}

// attach loads the library, finds the token, checks the PIN and creates the
// crypto11 context, holding the library lock throughout. It returns the
// logged-in session that checked the PIN if it is still open.
//
// When no Module has the library open, the checks initialise it themselves
// and finalise it again, so that crypto11 (which must be the one to
// initialise it) can take over.
//
// A library that gives each C_GetFunctionList a separate instance, with its
// own C_Initialize state (p11-kit's client module, whose instances each
// have a connection to the server), is told apart here: a second, fresh
// instance answers C_GetSlotList with CKR_CRYPTOKI_NOT_INITIALIZED while
// the module's is initialised. Then the module keeps its own instance
// initialised until Close, and each crypto11 context gets its own instance
// too (see configure), none of them counted in libraries.
func (m *Module) attach() (*pkcs11.SessionHandle, error) {
	libraries.Lock()
	defer libraries.Unlock()

	p := m.deps.newP11(m.path)
	if p == nil {
		return nil, fmt.Errorf("hsm: cannot load PKCS #11 module %s", m.path)
	}
	m.p11 = p
	fail := func(err error) (*pkcs11.SessionHandle, error) {
		p.Destroy()
		return nil, err
	}
	m.epoch = libraryEpoch(m.path)
	err := p.Initialize()
	if err == nil && m.separateInstances() {
		m.perInstance = true
		m.epoch = new(atomic.Uint64)
		m.logger.Debug("the PKCS #11 module gives each caller an instance of its own; the module and each crypto11 context initialise their own", "module", m.path)
	}
	// A library initialised here while other Modules have it open was left
	// uninitialised by a failed reconnection (recover.go): it stays
	// initialised, because crypto11 counts it open and will not initialise
	// it itself.
	owned := err == nil && libraries.open[m.path] == 0 && !m.perInstance
	switch {
	case err == nil:
	case isCode(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED):
		if libraries.open[m.path] == 0 {
			return fail(fmt.Errorf("hsm: PKCS #11 module %s was initialised outside package hsm; crypto11 cannot share it", m.path))
		}
	default:
		return fail(fmt.Errorf("hsm: initialise PKCS #11 module %s: %w%s", m.path, err, initHint(m.path, err)))
	}
	var (
		sh   pkcs11.SessionHandle
		slot uint
	)
	slot, m.token, err = m.findToken()
	m.slot.Store(uint64(slot))
	if err == nil {
		var limit uint
		m.sessions, limit = sessionsFor(m.cfg.maxSessions(), m.token)
		if m.sessions < m.cfg.maxSessions() {
			m.logger.Info("the token allows fewer sessions than MaxSessions asks for: lowered to fit", "token", m.token.Label,
				"token_max_sessions", limit, "max_sessions", m.sessions, "configured", m.cfg.maxSessions())
		}
	}
	if err == nil {
		sh, err = m.checkLogin(slot)
	}
	if owned {
		if sh != 0 {
			_ = p.CloseSession(sh)
			sh = 0
		}
		_ = p.Finalize()
	}
	fail = func(err error) (*pkcs11.SessionHandle, error) {
		if sh != 0 {
			_ = p.CloseSession(sh)
		}
		if m.perInstance {
			_ = p.Finalize()
		}
		p.Destroy()
		return nil, err
	}
	if err != nil {
		return fail(err)
	}
	c11, err := m.configure(slot)
	if err != nil {
		return fail(err)
	}
	m.c11, m.c11Epoch = c11, m.epoch.Load()
	if owned {
		return nil, nil
	}
	return &sh, nil
}

// configure creates a crypto11 context for the token; the caller holds the
// library lock and has checked the token and the PIN, because a failing
// crypto11.Configure finalises the library under every other Module.
//
// For a per-instance library (see attach), crypto11 is given a path of its
// own for each context, a symbolic link to the library in a private
// temporary directory: crypto11 counts contexts by path string, so it
// initialises the context's own instance and finalises it when the context
// closes, which is what such a library needs. The dynamic loader maps the
// library once whatever the path.
func (m *Module) configure(slot uint) (c11Context, error) {
	slotNumber := int(slot)
	path, dir := m.path, ""
	if m.perInstance {
		var err error
		if dir, err = os.MkdirTemp("", "keyless-pkcs11-"); err != nil {
			return nil, fmt.Errorf("hsm: crypto11: open token %q: a path of its own for the library: %w", m.token.Label, err)
		}
		path = filepath.Join(dir, filepath.Base(m.path))
		if err := os.Symlink(m.path, path); err != nil {
			_ = os.RemoveAll(dir)
			return nil, fmt.Errorf("hsm: crypto11: open token %q: a path of its own for the library: %w", m.token.Label, err)
		}
	}
	c11, err := m.deps.configure(&crypto11.Config{
		Path:            path,
		SlotNumber:      &slotNumber,
		Pin:             m.pin(),
		MaxSessions:     m.sessions,
		PoolWaitTimeout: m.cfg.poolWaitTimeout(),
	})
	if err != nil {
		if dir != "" {
			_ = os.RemoveAll(dir)
		}
		return nil, fmt.Errorf("hsm: crypto11: open token %q: %w", m.token.Label, err)
	}
	if m.perInstance {
		return &ownContext{c11Context: c11, dir: dir}, nil
	}
	libraries.open[m.path]++
	return c11, nil
}

// ownContext is a crypto11 context with an instance of a per-instance
// library of its own, reached through a path of its own in dir (see
// configure).
type ownContext struct {
	c11Context
	dir string
}

// Close closes the context, which finalises its instance, and removes its
// path.
func (c *ownContext) Close() error {
	err := c.c11Context.Close()
	_ = os.RemoveAll(c.dir)
	return err
}

// separateInstances reports whether a fresh instance of the module's
// library is uninitialised while m.p11 is initialised: the library gives
// each C_GetFunctionList an instance of its own. The caller holds the
// library lock and has initialised m.p11.
func (m *Module) separateInstances() bool {
	q := m.deps.newP11(m.path)
	if q == nil {
		return false
	}
	defer q.Destroy()
	_, err := q.GetSlotList(true)
	return isCode(err, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED)
}

// findToken finds the slot of the configured token among the slots with a
// token present.
func (m *Module) findToken() (uint, pkcs11.TokenInfo, error) {
	slots, err := m.p11.GetSlotList(true)
	if isCode(err, pkcs11.CKR_BUFFER_TOO_SMALL) {
		// miekg/pkcs11 asks for the count, then for a list of that many;
		// p11-kit's client answers the second call so when there are no
		// slots (its server has no token, or is not running).
		slots, err = nil, nil
	}
	if err != nil {
		return 0, pkcs11.TokenInfo{}, fmt.Errorf("hsm: list slots: %w", err)
	}
	u := m.cfg.TokenURI
	want := m.wantToken()
	if u != nil && u.needsLibraryInfo() {
		info, err := m.p11.GetInfo()
		if err != nil {
			return 0, pkcs11.TokenInfo{}, fmt.Errorf("hsm: library info: %w", err)
		}
		if !u.matchLibrary(info) {
			return 0, pkcs11.TokenInfo{}, fmt.Errorf("hsm: module %s is not the library the URI names (library-manufacturer %q, library-description %q, library-version %d.%d)",
				m.path, info.ManufacturerID, info.LibraryDescription, info.LibraryVersion.Major, info.LibraryVersion.Minor)
		}
	}
	var found []uint
	var token pkcs11.TokenInfo
	var labels []string
	for _, s := range slots {
		ti, err := m.p11.GetTokenInfo(s)
		if err != nil {
			return 0, token, fmt.Errorf("hsm: token info of slot %d: %w", s, err)
		}
		if ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED != 0 {
			labels = append(labels, fmt.Sprintf("%q", ti.Label))
		}
		switch {
		case m.cfg.SlotNumber != nil && uint(*m.cfg.SlotNumber) == s,
			m.cfg.TokenLabel != "" && ti.Label == m.cfg.TokenLabel,
			m.cfg.TokenSerial != "" && ti.SerialNumber == m.cfg.TokenSerial:
		default:
			continue
		}
		if u != nil {
			var si pkcs11.SlotInfo
			if u.needsSlotInfo() {
				if si, err = m.p11.GetSlotInfo(s); err != nil {
					return 0, token, fmt.Errorf("hsm: slot info of slot %d: %w", s, err)
				}
			}
			if !u.matchToken(s, ti, si) {
				continue
			}
		}
		found = append(found, s)
		token = ti
	}
	switch {
	case len(found) == 0:
		return 0, token, fmt.Errorf("hsm: no token with %s in module %s (tokens present: %s)", want, m.path, cmp.Or(strings.Join(labels, ", "), "none"))
	case len(found) > 1:
		return 0, token, fmt.Errorf("hsm: %d tokens have %s in module %s; select one by serial number or slot", len(found), want, m.path)
	case token.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0:
		return 0, token, fmt.Errorf("hsm: token with %s is not initialised", want)
	case token.Flags&pkcs11.CKF_USER_PIN_LOCKED != 0:
		return 0, token, fmt.Errorf("hsm: the user PIN of token %q is locked", token.Label)
	}
	return found[0], token, nil
}

func (m *Module) wantToken() string {
	var w string
	switch {
	case m.cfg.TokenLabel != "":
		w = fmt.Sprintf("label %q", m.cfg.TokenLabel)
	case m.cfg.TokenSerial != "":
		w = fmt.Sprintf("serial number %q", m.cfg.TokenSerial)
	default:
		w = fmt.Sprintf("slot number %d", *m.cfg.SlotNumber)
	}
	if m.cfg.TokenURI != nil {
		w += fmt.Sprintf(" matching %s", m.cfg.TokenURI.tokenPart())
	}
	return w
}

// pin returns the user PIN, which SetPIN may replace.
func (m *Module) pin() string {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.cfg.PIN
}

// checkLogin opens a session on slot and logs in, so that a wrong PIN
// fails here rather than in crypto11.Configure.
func (m *Module) checkLogin(slot uint) (pkcs11.SessionHandle, error) {
	p := m.p11
	sh, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return 0, fmt.Errorf("hsm: open session on token %q: %w", m.token.Label, err)
	}
	if err := p.Login(sh, pkcs11.CKU_USER, m.pin()); err != nil && !isCode(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
		_ = p.CloseSession(sh)
		return 0, fmt.Errorf("hsm: log in to token %q: %w", m.token.Label, err)
	}
	return sh, nil
}

// Close stops the module's supervisor and closes its sessions and its
// crypto11 context; when it is the last Module of its library in the
// process, crypto11 finalises the library. Close waits for operations in
// progress to finish, including PKCS #11 calls whose callers have given
// up, but for no longer than [Config.StuckCallThreshold]: if a call or a
// reconnection is still stuck in the token then, Close returns an error
// and leaves the sessions and the library open, so that a process can
// still exit. It is safe to call more than once; later calls return the
// first call's result.
func (m *Module) Close() error {
	m.closeOnce.Do(func() {
		m.closed.Store(true)
		if m.calls != nil {
			m.calls.stopWorkers()
		}
		deadline := time.Now().Add(m.cfg.stuckCallThreshold())
		if m.stop != nil {
			close(m.stop)
			select {
			case <-m.supervisorDone:
			case <-time.After(time.Until(deadline)):
				m.closeErr = errors.New("hsm: close: a reconnection to the token has not returned; sessions left open")
				m.logger.Warn("closing the module while a reconnection is stuck in the token; its sessions are left open", "token", m.token.Label)
				return
			}
		}
		if m.calls != nil {
			if n := m.calls.waitIdle(deadline); n > 0 {
				m.closeErr = fmt.Errorf("hsm: close: %d PKCS #11 calls have not returned; sessions left open", n)
				m.logger.Warn("closing the module while PKCS #11 calls are stuck; their sessions are left open", "token", m.token.Label, "calls", n)
				return
			}
		}
		// Let a scan, generation or reconnection in progress finish.
		m.scanMu.Lock()
		defer m.scanMu.Unlock()
		// Our sessions first: crypto11's Close may call C_Finalize.
		if m.raw != nil {
			m.raw.close()
		}
		m.bg.Wait()
		libraries.Lock()
		defer libraries.Unlock()
		if m.p11 != nil {
			if m.perInstance {
				// The module's own instance: no crypto11 context uses it.
				_ = m.p11.Finalize()
			}
			m.p11.Destroy()
		}
		if m.c11 != nil {
			if err := m.closeContext(m.c11, m.c11Epoch); err != nil {
				m.closeErr = fmt.Errorf("hsm: close: %w", err)
			}
		}
	})
	return m.closeErr
}

// closeContext closes a crypto11 context opened in library epoch epoch,
// unless the library has been initialised again since (see libraries).
// The caller holds the libraries lock.
func (m *Module) closeContext(c11 c11Context, epoch uint64) error {
	var err error
	switch {
	case m.perInstance:
		// Its own instance, whatever became of the module's.
		err = c11.Close()
	case m.epoch != nil && epoch != m.epoch.Load():
		return nil
	default:
		libraries.open[m.path]--
		err = c11.Close()
	}
	// A library left uninitialised by a failed reconnection cannot be
	// finalised; that is not an error of Close.
	if isCode(err, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED) {
		err = nil
	}
	return err
}

// Key returns the key whose id is id, the SHA-256 of the DER encoding of
// its SubjectPublicKeyInfo (x509.MarshalPKIXPublicKey), or (nil, nil) if
// the module has no such key. It returns [ErrClosed] after Close and an
// *[UnavailableError] while the module is reconnecting after a fault.
func (m *Module) Key(ctx context.Context, id [32]byte) (crypto.Signer, error) {
	if m.closed.Load() {
		return nil, ErrClosed
	}
	if m.staleEpoch() {
		m.markFaulty(errLibraryReset)
	}
	if err := m.downError(); err != nil {
		return nil, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.keys[id], nil
}

// Keys returns every key the module serves, sorted by label and then key
// id. The caller may modify the returned slice. Errors are as for
// [Module.Key].
func (m *Module) Keys(ctx context.Context) ([]crypto.Signer, error) {
	if m.closed.Load() {
		return nil, ErrClosed
	}
	if m.staleEpoch() {
		m.markFaulty(errLibraryReset)
	}
	if err := m.downError(); err != nil {
		return nil, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return slices.Clone(m.list), nil
}

// Mechanisms returns the names of the mechanisms the module can use that
// the token offers (such as "CKM_RSA_X_509"), sorted. Keys may be further
// restricted by their own attributes; see their SignatureSchemes.
func (m *Module) Mechanisms() []string { return m.mechs.names() }

// Sessions reports how many of the module's key-operation sessions are in
// use, by PKCS #11 calls in progress (including calls whose callers gave up
// but that have not returned), and how many there are: MaxSessions-1. It is
// what an operator watches to see the HSM saturated, or calls stuck.
func (m *Module) Sessions() (inUse, capacity int) {
	return len(m.calls.slots), cap(m.calls.slots)
}

// Refresh scans the token again for key pairs, so that keys added to or
// removed from the token (by another application, or another Module)
// become visible; each change is logged. Keys that did not change keep
// their identity. The module also does this by itself every
// [Config.RescanInterval]. If an operation has met a token fault, Refresh
// tries to reconnect first, as the module does in the background (see
// [Module.Check]). Refresh returns an error, and changes nothing, if the
// token cannot be scanned; keys that cannot be served are skipped with a
// warning.
func (m *Module) Refresh(ctx context.Context) error {
	if m.closed.Load() {
		return ErrClosed
	}
	if m.staleEpoch() {
		m.markFaulty(errLibraryReset)
	}
	if f := m.fault.Load(); f != nil {
		return m.reconnect(ctx, f, 1)
	}
	m.scanMu.Lock()
	defer m.scanMu.Unlock()
	m.mu.RLock()
	c11, gen := m.c11, m.gen
	m.mu.RUnlock()
	loaded, err := m.scan(ctx, c11, gen)
	if err != nil {
		m.noteFault(err)
		return err
	}
	m.install(loaded, true)
	return nil
}

// scan finds every private key on the token and loads those it can serve.
func (m *Module) scan(ctx context.Context, c11 c11Context, gen uint64) ([]crypto.Signer, error) {
	var loaded []crypto.Signer
	err := m.raw.do(ctx, func(sh pkcs11.SessionHandle) error {
		loaded = nil
		// A token that has gone away may still answer searches, with
		// nothing found (SoftHSM): ask about the token itself first.
		if _, err := m.tokenInfo(ctx); err != nil {
			return err
		}
		hs, err := findObjects(m.p11, sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY)})
		if err != nil {
			return err
		}
		for _, h := range hs {
			if err := ctx.Err(); err != nil {
				return err
			}
			k, err := m.loadKey(sh, h, c11, gen)
			var skip *skipError
			switch {
			case errors.As(err, &skip):
				m.logger.Warn("key skipped", "reason", skip.reason)
				continue
			case err != nil:
				return err
			}
			loaded = append(loaded, k)
		}
		if _, err := m.tokenInfo(ctx); err != nil {
			return err
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("hsm: scan token %q for keys: %w", m.token.Label, err)
	}
	return loaded, nil
}

// install replaces the module's keys with loaded, keeping the old object
// for each key that did not change, and logs the keys that appeared and
// disappeared if logChanges is set.
func (m *Module) install(loaded []crypto.Signer, logChanges bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	old := m.keys
	if logChanges {
		defer m.logChanges(old)
	}
	m.keys = make(map[[32]byte]crypto.Signer, len(loaded))
	m.list = m.list[:0:0]
	for _, k := range loaded {
		b := base(k)
		if prev, ok := m.keys[b.keyID]; ok {
			m.logger.Warn("key skipped: another private key object holds the same key", "label", b.label, "object_id", fmt.Sprintf("%x", b.objID), "same_as", base(prev).label)
			continue
		}
		if prev, ok := old[b.keyID]; ok && sameObject(base(prev), b) {
			k = prev
		}
		m.keys[b.keyID] = k
		m.list = append(m.list, k)
	}
	sortKeys(m.list)
}

// logChanges logs the keys that are in m.keys and not in old, and those in
// old and not in m.keys. The caller holds m.mu.
func (m *Module) logChanges(old map[[32]byte]crypto.Signer) {
	for id, k := range m.keys {
		if _, ok := old[id]; !ok {
			m.logger.Info("key found on the token", "token", m.token.Label, "label", base(k).label, "key_id", fmt.Sprintf("%x", id))
		}
	}
	for id, k := range old {
		if _, ok := m.keys[id]; !ok {
			m.logger.Warn("key no longer on the token", "token", m.token.Label, "label", base(k).label, "key_id", fmt.Sprintf("%x", id))
		}
	}
}

// add makes a newly generated key visible.
func (m *Module) add(k crypto.Signer) {
	m.mu.Lock()
	defer m.mu.Unlock()
	b := base(k)
	if _, ok := m.keys[b.keyID]; ok {
		return
	}
	m.keys[b.keyID] = k
	m.list = append(m.list, k)
	sortKeys(m.list)
}

func sortKeys(list []crypto.Signer) {
	slices.SortFunc(list, func(a, b crypto.Signer) int {
		ba, bb := base(a), base(b)
		return cmp.Or(strings.Compare(ba.label, bb.label), bytes.Compare(ba.keyID[:], bb.keyID[:]))
	})
}

func sameObject(a, b *keyBase) bool {
	return a.gen == b.gen && a.handle == b.handle && a.label == b.label && bytes.Equal(a.objID, b.objID) && slices.Equal(a.schemes, b.schemes)
}

// base returns the shared part of one of the module's keys.
func base(k crypto.Signer) *keyBase {
	switch k := k.(type) {
	case *rsaKey:
		return &k.keyBase
	case *rsaDecryptKey:
		return &k.keyBase
	case *ecdsaKey:
		return &k.keyBase
	case *ed25519Key:
		return &k.keyBase
	}
	panic(fmt.Sprintf("hsm: unexpected key type %T", k))
}

func (m *Module) logSummary() {
	counts := map[string]int{}
	decrypters, fallback := 0, 0
	for _, k := range m.list {
		switch k := k.(type) {
		case *rsaKey:
			counts["rsa"]++
		case *rsaDecryptKey:
			counts["rsa"]++
			decrypters++
			if !k.rawDecrypt {
				fallback++
			}
		case *ecdsaKey:
			counts["ecdsa"]++
		case *ed25519Key:
			counts["ed25519"]++
		}
	}
	m.logger.Info("token opened",
		"module", m.path, "token", m.token.Label, "serial", m.token.SerialNumber,
		"manufacturer", m.token.ManufacturerID, "model", m.token.Model, "slot", m.slotID(),
		"mechanisms", strings.Join(m.mechs.names(), ","),
		"keys", len(m.list), "rsa_keys", counts["rsa"], "ecdsa_keys", counts["ecdsa"], "ed25519_keys", counts["ed25519"])
	if _, ok := m.mechs[pkcs11.CKM_RSA_X_509]; !ok || fallback > 0 {
		m.logger.Warn("CKM_RSA_X_509 is unavailable, so RSA premaster decryption falls back to CKM_RSA_PKCS with masked errors; "+
			"answers are paced to hide the token's padding-check timing (about 0.8 ms more per decryption), but prefer a token with CKM_RSA_X_509 or a documented constant-time CKM_RSA_PKCS for RSA key exchange",
			"keys_affected", fallback, "token_has_rsa_x_509", ok)
	}
	if _, ok := m.mechs[pkcs11.CKM_RSA_PKCS_PSS]; !ok && counts["rsa"] > 0 {
		m.logger.Warn("CKM_RSA_PKCS_PSS is unavailable: RSA keys cannot sign for TLS 1.3 or for clients that require PSS")
	}
}
