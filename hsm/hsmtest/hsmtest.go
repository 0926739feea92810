// Package hsmtest creates SoftHSM tokens for tests of code that uses
// package hsm, in the manner of net/http/httptest.
//
// [New] returns a fresh, empty token with its own label, user PIN and SO PIN.
// All tokens of a test binary live in one temporary directory, named by a
// softhsm2.conf that the package writes and points SOFTHSM2_CONF at the
// first time New is called: SoftHSM reads that variable when the library
// is initialised, and crypto11 initialises a library once per process.
// Call [Main] from TestMain to remove the directory when the tests end;
// otherwise it stays in the OS temporary directory.
//
// # Finding SoftHSM
//
// The SoftHSM module is looked for in the environment variable
// KEYLESS_SOFTHSM_MODULE, then in the usual install locations. When it is
// missing the test is skipped, unless KEYLESS_REQUIRE_SOFTHSM is "1", in
// which case it fails: set that in CI.
//
// # Through p11-kit
//
// [Token.ServeP11Kit] serves a token with `p11-kit server` on a unix
// socket, so that the code under test reaches it through p11-kit's client
// module (p11-kit-client.so), as through a network HSM's client library;
// the server can be stopped and started again to play an outage. It needs
// the p11-kit and p11-kit-modules packages, and skips or fails as for
// SoftHSM when they are missing.
//
// # openCryptoki
//
// [OpenCryptoki] returns openCryptoki's software token, a second PKCS #11
// implementation independent of SoftHSM, initialised afresh for the test
// binary. It is one per machine and needs root: see its documentation.
//
// # How tokens are made
//
// New initialises the token through PKCS #11 in the test process itself
// (C_InitToken on SoftHSM's free slot, then C_InitPIN), not by running
// softhsm2-util: SoftHSM reads its token directory only in C_Initialize,
// so a token that another process creates while a Module is open in this
// one stays invisible here. New and [Token.Open] are serialised with each
// other; a test that calls hsm.Open directly must not run in parallel with
// New.
package hsmtest

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/keyless-tls/keyless/hsm"
)

// Environment variables the package reads.
const (
	// EnvModule overrides the path of the SoftHSM PKCS #11 module.
	EnvModule = "KEYLESS_SOFTHSM_MODULE"
	// EnvRequire set to "1" turns a missing SoftHSM (or pkcs11-tool, for
	// [Token.PKCS11Tool], or openCryptoki or root, for [OpenCryptoki])
	// from a skip into a failure.
	EnvRequire = "KEYLESS_REQUIRE_SOFTHSM"
)

// modulePaths are where distributions install SoftHSM 2.
var modulePaths = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib64/pkcs11/libsofthsm2.so",
	"/usr/lib64/softhsm/libsofthsm2.so",
	"/usr/lib/pkcs11/libsofthsm2.so",
	"/usr/local/lib/softhsm/libsofthsm2.so",
	"/opt/homebrew/lib/softhsm/libsofthsm2.so",
	"/usr/local/opt/softhsm/lib/softhsm/libsofthsm2.so",
}

var (
	setupOnce sync.Once
	setupErr  error
	confDir   string

	// mu serialises token creation with Token.Open: creating a token may
	// initialise and finalise the library, which must not overlap with
	// hsm.Open.
	mu      sync.Mutex
	counter atomic.Int64
)

// Token is a SoftHSM token created for a test.
type Token struct {
	// ModulePath is the SoftHSM PKCS #11 module.
	ModulePath string
	// Label is the token label, unique within the test binary.
	Label string
	// Serial is the token serial number.
	Serial string
	// PIN is the user PIN; SOPIN the security officer's. Both are random.
	PIN, SOPIN string
}

// New creates a fresh SoftHSM token for the test. It skips the test (or,
// with KEYLESS_REQUIRE_SOFTHSM=1, fails it) when SoftHSM is not installed.
func New(t testing.TB) *Token {
	t.Helper()
	module := requireModule(t)
	setupOnce.Do(func() { setupErr = setup() })
	if setupErr != nil {
		t.Fatalf("hsmtest: %v", setupErr)
	}
	tok := &Token{
		ModulePath: module,
		// Fixed width, so that no label is a prefix of another:
		// pkcs11-tool's --token-label picks the first token whose label
		// starts with the one given (with "kt-1-1", token "kt-1-10" and its
		// PIN, once a test binary has made ten tokens).
		Label: fmt.Sprintf("kt-%d-%05d", os.Getpid(), counter.Add(1)),
		PIN:   "pin-" + randomHex(8),
		SOPIN: "so-" + randomHex(8),
	}
	mu.Lock()
	defer mu.Unlock()
	serial, err := initToken(module, tok.Label, tok.SOPIN, tok.PIN)
	if err != nil {
		t.Fatalf("hsmtest: create token %q: %v", tok.Label, err)
	}
	tok.Serial = serial
	return tok
}

// ModulePath returns the SoftHSM module, or "" and the reason it was not
// found.
func ModulePath() (path, reason string) {
	if p := os.Getenv(EnvModule); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Sprintf("%s=%s: %v", EnvModule, p, err)
		}
		return p, ""
	}
	for _, p := range modulePaths {
		if _, err := os.Stat(p); err == nil {
			return p, ""
		}
	}
	return "", fmt.Sprintf("SoftHSM 2 not found (set %s, or install softhsm2)", EnvModule)
}

func requireModule(t testing.TB) string {
	t.Helper()
	p, reason := ModulePath()
	if p == "" {
		skipOrFail(t, reason)
	}
	return p
}

func skipOrFail(t testing.TB, reason string) {
	t.Helper()
	if os.Getenv(EnvRequire) == "1" {
		t.Fatalf("hsmtest: %s, and %s=1", reason, EnvRequire)
	}
	t.Skipf("hsmtest: %s", reason)
}

// setup writes the SoftHSM configuration and points SOFTHSM2_CONF at it.
func setup() error {
	dir, err := os.MkdirTemp("", "keyless-softhsm-")
	if err != nil {
		return err
	}
	tokens := filepath.Join(dir, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		return err
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	body := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokens)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		return err
	}
	confDir = dir
	return os.Setenv("SOFTHSM2_CONF", conf)
}

// Dir returns the directory that holds the token files of every token of
// the test binary (SoftHSM's directories.tokendir), or "" before the first
// call of New. Tests of faults may move it away and back.
func Dir() string {
	if confDir == "" {
		return ""
	}
	return filepath.Join(confDir, "tokens")
}

// Main runs the tests and then calls [Cleanup]. Call it from TestMain:
//
//	func TestMain(m *testing.M) { hsmtest.Main(m) }
func Main(m *testing.M) {
	code := m.Run()
	Cleanup()
	os.Exit(code)
}

// Cleanup removes the SoftHSM directory with every token of the test
// binary and, if [OpenCryptoki] was used, stops the pkcsslotd it started
// and releases the software token's lock. Call it at the end of TestMain,
// after closing any Module still open; no token can be used afterwards.
func Cleanup() {
	if confDir != "" {
		_ = os.RemoveAll(confDir)
	}
	ReleaseOpenCryptoki()
}

// loadLibrary loads the PKCS #11 library module and initialises it unless
// something in the process already has. release finalises it again if
// this call initialised it (so that crypto11 can initialise it later, as
// the first user of the library) and unloads it.
func loadLibrary(module string) (p *pkcs11.Ctx, release func(), err error) {
	p = pkcs11.New(module)
	if p == nil {
		return nil, nil, fmt.Errorf("cannot load %s", module)
	}
	err = p.Initialize()
	switch {
	case err == nil:
		return p, func() { p.Finalize(); p.Destroy() }, nil
	case isCode(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED):
		return p, p.Destroy, nil
	}
	p.Destroy()
	return nil, nil, fmt.Errorf("C_Initialize: %w", err)
}

// initToken initialises SoftHSM's free slot as a token with the given
// label and PINs, through PKCS #11 in this process.
func initToken(module, label, soPIN, pin string) (string, error) {
	p, release, err := loadLibrary(module)
	if err != nil {
		return "", err
	}
	defer release()
	slots, err := p.GetSlotList(true)
	if err != nil {
		return "", fmt.Errorf("C_GetSlotList: %w", err)
	}
	free, found := uint(0), false
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err != nil {
			return "", fmt.Errorf("C_GetTokenInfo: %w", err)
		}
		if ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			free, found = s, true
			break
		}
	}
	if !found {
		return "", fmt.Errorf("SoftHSM has no free slot")
	}
	if err := p.InitToken(free, soPIN, label); err != nil {
		return "", fmt.Errorf("C_InitToken: %w", err)
	}
	sh, err := p.OpenSession(free, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return "", fmt.Errorf("C_OpenSession: %w", err)
	}
	defer p.CloseSession(sh)
	if err := p.Login(sh, pkcs11.CKU_SO, soPIN); err != nil {
		return "", fmt.Errorf("C_Login as SO: %w", err)
	}
	defer p.Logout(sh)
	if err := p.InitPIN(sh, pin); err != nil {
		return "", fmt.Errorf("C_InitPIN: %w", err)
	}
	ti, err := p.GetTokenInfo(free)
	if err != nil {
		return "", fmt.Errorf("C_GetTokenInfo: %w", err)
	}
	return ti.SerialNumber, nil
}

func isCode(err error, code uint) bool {
	e, ok := err.(pkcs11.Error)
	return ok && uint(e) == code
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Config returns an hsm.Config for the token, selected by label, with a
// small session pool.
func (tok *Token) Config() hsm.Config {
	return hsm.Config{
		ModulePath:  tok.ModulePath,
		TokenLabel:  tok.Label,
		PIN:         tok.PIN,
		MaxSessions: 4,
	}
}

// Open opens the token with [Token.Config] and closes it when the test
// ends.
func (tok *Token) Open(t testing.TB) *hsm.Module {
	t.Helper()
	return tok.OpenConfig(t, tok.Config())
}

// OpenConfig opens the token with cfg and closes it when the test ends.
func (tok *Token) OpenConfig(t testing.TB, cfg hsm.Config) *hsm.Module {
	t.Helper()
	mu.Lock()
	m, err := hsm.Open(cfg)
	mu.Unlock()
	if err != nil {
		t.Fatalf("hsm.Open(token %q) = %v", tok.Label, err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("Module.Close() = %v", err)
		}
	})
	return m
}

// PKCS11Tool runs OpenSC's pkcs11-tool logged in to the token, as
// `pkcs11-tool --module M --token-label L --login --pin P args...`, and
// returns its combined output. It fails the test if the tool fails, and
// skips it (or fails, with KEYLESS_REQUIRE_SOFTHSM=1) if the tool is not
// installed.
func (tok *Token) PKCS11Tool(t testing.TB, args ...string) string {
	t.Helper()
	tool, err := exec.LookPath("pkcs11-tool")
	if err != nil {
		skipOrFail(t, "pkcs11-tool not found (install opensc)")
	}
	full := append([]string{"--module", tok.ModulePath, "--token-label", tok.Label, "--login", "--pin", tok.PIN}, args...)
	out, err := exec.Command(tool, full...).CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Slot returns the PKCS #11 slot ID of the token as this process sees it,
// for tests that select the token by hsm.Config.SlotNumber. SoftHSM
// renumbers slots when the library is initialised again (after the last
// Module closes), so use the result while a Module is open, or right away.
func (tok *Token) Slot(t testing.TB) int {
	t.Helper()
	mu.Lock()
	defer mu.Unlock()
	p := pkcs11.New(tok.ModulePath)
	if p == nil {
		t.Fatalf("hsmtest: cannot load %s", tok.ModulePath)
	}
	defer p.Destroy()
	if err := p.Initialize(); err == nil {
		defer p.Finalize()
	} else if !isCode(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		t.Fatalf("hsmtest: C_Initialize: %v", err)
	}
	slots, err := p.GetSlotList(true)
	if err != nil {
		t.Fatalf("hsmtest: C_GetSlotList: %v", err)
	}
	for _, s := range slots {
		if ti, err := p.GetTokenInfo(s); err == nil && ti.Label == tok.Label {
			return int(s)
		}
	}
	t.Fatalf("hsmtest: token %q not found", tok.Label)
	return 0
}
