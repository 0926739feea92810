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
var libraries = struct {
	sync.Mutex
	open map[string]int
}{open: make(map[string]int)}

// Module is an open PKCS #11 token and the key pairs found on it. Its keys
// are crypto.Signer values backed by the token (see the package
// documentation for their extra methods).
//
// A Module is safe for concurrent use. The caller must call Close when done
// with it; keys obtained from it fail with [ErrClosed] afterwards.
type Module struct {
	cfg    Config
	logger hclog.Logger
	path   string // canonical module path
	slot   uint
	token  pkcs11.TokenInfo
	mechs  mechanisms

	deps deps
	p11  p11API
	raw  *sessionPool

	// fault is the last token fault an operation or check met, nil while
	// the module is healthy; see recover.go.
	fault atomic.Pointer[faultState]
	bg    sync.WaitGroup // closing of replaced crypto11 contexts

	// forcePKCSDecrypt makes RSA keys use the CKM_RSA_PKCS fallback even
	// when the token has CKM_RSA_X_509 (tests only).
	forcePKCSDecrypt bool

	scanMu sync.Mutex // serialises Refresh, Generate and reconnection
	mu     sync.RWMutex
	c11    c11Context // replaced on reconnection
	gen    uint64     // incremented on reconnection; keys carry theirs
	keys   map[[32]byte]crypto.Signer
	list   []crypto.Signer // sorted by label, then key id

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
	m := &Module{cfg: cfg, deps: d, logger: logger.Named("hsm"), keys: make(map[[32]byte]crypto.Signer)}

	path, err := canonicalPath(cfg.ModulePath)
	if err != nil {
		return nil, err
	}
	m.path = path
	sh, err := m.attach()
	if err != nil {
		return nil, err
	}
	m.raw = newSessionPool(m.p11, m.slot, cfg.PIN, cfg.maxSessions()-1, cfg.poolWaitTimeout())
	if sh != nil {
		// The session that checked the PIN becomes the pool's first.
		m.raw.adopt(*sh)
	}
	if m.mechs, err = probeMechanisms(m.p11, m.slot); err != nil {
		m.Close()
		return nil, fmt.Errorf("hsm: list mechanisms of token %q: %w", m.token.Label, err)
	}
	loaded, err := m.scan(context.Background(), m.c11, m.gen)
	if err != nil {
		m.Close()
		return nil, err
	}
	m.install(loaded)
	m.logSummary()
	return m, nil
}

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
	err := p.Initialize()
	owned := err == nil
	switch {
	case owned:
	case isCode(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED):
		if libraries.open[m.path] == 0 {
			return fail(fmt.Errorf("hsm: PKCS #11 module %s was initialised outside package hsm; crypto11 cannot share it", m.path))
		}
	default:
		return fail(fmt.Errorf("hsm: initialise PKCS #11 module %s: %w", m.path, err))
	}
	var sh pkcs11.SessionHandle
	m.slot, m.token, err = m.findToken()
	if err == nil {
		sh, err = m.checkLogin()
	}
	if owned {
		if sh != 0 {
			_ = p.CloseSession(sh)
			sh = 0
		}
		_ = p.Finalize()
	}
	if err != nil {
		if sh != 0 {
			_ = p.CloseSession(sh)
		}
		return fail(err)
	}
	c11, err := m.configure()
	if err != nil {
		if sh != 0 {
			_ = p.CloseSession(sh)
		}
		return fail(err)
	}
	m.c11 = c11
	if owned {
		return nil, nil
	}
	return &sh, nil
}

// configure creates a crypto11 context for the token; the caller holds the
// library lock and has checked the token and the PIN, because a failing
// crypto11.Configure finalises the library under every other Module.
func (m *Module) configure() (c11Context, error) {
	slot := int(m.slot)
	c11, err := m.deps.configure(&crypto11.Config{
		Path:            m.path,
		SlotNumber:      &slot,
		Pin:             m.cfg.PIN,
		MaxSessions:     m.cfg.maxSessions(),
		PoolWaitTimeout: m.cfg.poolWaitTimeout(),
	})
	if err != nil {
		return nil, fmt.Errorf("hsm: crypto11: open token %q: %w", m.token.Label, err)
	}
	libraries.open[m.path]++
	return c11, nil
}

// findToken finds the slot of the configured token among the slots with a
// token present.
func (m *Module) findToken() (uint, pkcs11.TokenInfo, error) {
	slots, err := m.p11.GetSlotList(true)
	if err != nil {
		return 0, pkcs11.TokenInfo{}, fmt.Errorf("hsm: list slots: %w", err)
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
			found = append(found, s)
			token = ti
		}
	}
	want := m.wantToken()
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
	switch {
	case m.cfg.TokenLabel != "":
		return fmt.Sprintf("label %q", m.cfg.TokenLabel)
	case m.cfg.TokenSerial != "":
		return fmt.Sprintf("serial number %q", m.cfg.TokenSerial)
	}
	return fmt.Sprintf("slot number %d", *m.cfg.SlotNumber)
}

// checkLogin opens a session and logs in, so that a wrong PIN fails here
// rather than in crypto11.Configure.
func (m *Module) checkLogin() (pkcs11.SessionHandle, error) {
	p := m.p11
	sh, err := p.OpenSession(m.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return 0, fmt.Errorf("hsm: open session on token %q: %w", m.token.Label, err)
	}
	if err := p.Login(sh, pkcs11.CKU_USER, m.cfg.PIN); err != nil && !isCode(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
		_ = p.CloseSession(sh)
		return 0, fmt.Errorf("hsm: log in to token %q: %w", m.token.Label, err)
	}
	return sh, nil
}

// Close closes the module's sessions and its crypto11 context; when it is
// the last Module of its library in the process, crypto11 finalises the
// library. Close waits for operations in progress to finish. It is safe to
// call more than once; later calls return the first call's result.
func (m *Module) Close() error {
	m.closeOnce.Do(func() {
		m.closed.Store(true)
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
			m.p11.Destroy()
		}
		if m.c11 != nil {
			if err := m.c11.Close(); err != nil {
				m.closeErr = fmt.Errorf("hsm: close: %w", err)
			}
			libraries.open[m.path]--
		}
	})
	return m.closeErr
}

// Key returns the key whose id is id, the SHA-256 of the DER encoding of
// its SubjectPublicKeyInfo (x509.MarshalPKIXPublicKey), or (nil, nil) if
// the module has no such key. It returns [ErrClosed] after Close.
func (m *Module) Key(ctx context.Context, id [32]byte) (crypto.Signer, error) {
	if m.closed.Load() {
		return nil, ErrClosed
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.keys[id], nil
}

// Keys returns every key the module serves, sorted by label and then key
// id. The caller may modify the returned slice. It returns [ErrClosed]
// after Close.
func (m *Module) Keys(ctx context.Context) ([]crypto.Signer, error) {
	if m.closed.Load() {
		return nil, ErrClosed
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return slices.Clone(m.list), nil
}

// Mechanisms returns the names of the mechanisms the module can use that
// the token offers (such as "CKM_RSA_X_509"), sorted. Keys may be further
// restricted by their own attributes; see their SignatureSchemes.
func (m *Module) Mechanisms() []string { return m.mechs.names() }

// Refresh scans the token again for key pairs, so that keys added to or
// removed from the token (by another application, or another Module)
// become visible. Keys that did not change keep their identity. If an
// operation has met a token fault, Refresh reconnects first, as
// [Module.Check] does. Refresh returns an error, and changes nothing, if
// the token cannot be scanned; keys that cannot be served are skipped with
// a warning.
func (m *Module) Refresh(ctx context.Context) error {
	if m.closed.Load() {
		return ErrClosed
	}
	if f := m.fault.Load(); f != nil {
		return m.reconnect(ctx, f)
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
	m.install(loaded)
	return nil
}

// scan finds every private key on the token and loads those it can serve.
func (m *Module) scan(ctx context.Context, c11 c11Context, gen uint64) ([]crypto.Signer, error) {
	var loaded []crypto.Signer
	err := m.raw.do(ctx, func(sh pkcs11.SessionHandle) error {
		loaded = nil
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
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("hsm: scan token %q for keys: %w", m.token.Label, err)
	}
	return loaded, nil
}

// install replaces the module's keys with loaded, keeping the old object
// for each key that did not change.
func (m *Module) install(loaded []crypto.Signer) {
	m.mu.Lock()
	defer m.mu.Unlock()
	old := m.keys
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
		"manufacturer", m.token.ManufacturerID, "model", m.token.Model, "slot", m.slot,
		"mechanisms", strings.Join(m.mechs.names(), ","),
		"keys", len(m.list), "rsa_keys", counts["rsa"], "ecdsa_keys", counts["ecdsa"], "ed25519_keys", counts["ed25519"])
	if _, ok := m.mechs[pkcs11.CKM_RSA_X_509]; !ok || fallback > 0 {
		m.logger.Warn("CKM_RSA_X_509 is unavailable, so RSA premaster decryption falls back to CKM_RSA_PKCS with masked errors; "+
			"its resistance to padding-oracle (Bleichenbacher) attacks then depends on the token's own constant-time padding check",
			"keys_affected", fallback, "token_has_rsa_x_509", ok)
	}
	if _, ok := m.mechs[pkcs11.CKM_RSA_PKCS_PSS]; !ok && counts["rsa"] > 0 {
		m.logger.Warn("CKM_RSA_PKCS_PSS is unavailable: RSA keys cannot sign for TLS 1.3 or for clients that require PSS")
	}
}
