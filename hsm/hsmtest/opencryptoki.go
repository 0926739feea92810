package hsmtest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
)

// Environment variables and constants for openCryptoki's software token.
const (
	// EnvOpenCryptokiModule overrides the path of openCryptoki's PKCS #11
	// library.
	EnvOpenCryptokiModule = "KEYLESS_OPENCRYPTOKI_MODULE"

	// OpenCryptokiSOPIN is the security officer PIN that [OpenCryptoki]
	// initialises the software token with: openCryptoki's default, which
	// a token that was never initialised has. It is kept, so that the next
	// test run can initialise the token again.
	OpenCryptokiSOPIN = "87654321"

	// openCryptokiModel is the model of openCryptoki's software token
	// (libpkcs11_sw.so), in CK_TOKEN_INFO.
	openCryptokiModel = "IBM SoftTok"
)

// openCryptokiPaths are where distributions install openCryptoki's
// library.
var openCryptokiPaths = []string{
	"/usr/lib/x86_64-linux-gnu/opencryptoki/libopencryptoki.so.0",
	"/usr/lib/aarch64-linux-gnu/opencryptoki/libopencryptoki.so.0",
	"/usr/lib/s390x-linux-gnu/opencryptoki/libopencryptoki.so.0",
	"/usr/lib64/opencryptoki/libopencryptoki.so.0",
	"/usr/lib/opencryptoki/libopencryptoki.so.0",
}

// The software token is one per machine, so one test binary at a time may
// use it: ock holds it from the first call of OpenCryptoki to
// ReleaseOpenCryptoki (or Cleanup). ock.mu guards the rest.
var ock struct {
	mu     sync.Mutex
	set    bool   // setup ran; its results follow
	tok    *Token // the token, once set up
	reason string // why the token cannot be used here ("" if it can)
	err    error  // a failure where it should work
	lock   *os.File
	slotd  int // pid of the pkcsslotd this binary started, or 0
}

// OpenCryptoki returns openCryptoki's software token ("IBM SoftTok"),
// initialised afresh with its own label and a random user PIN on first
// use: the same *Token for every call until [ReleaseOpenCryptoki], so tests
// that use it share its keys and must give theirs distinct labels.
//
// The token is machine-global, so the first call takes an exclusive lock
// (flock on a file in the OS temporary directory), held until
// ReleaseOpenCryptoki, [Cleanup] or the binary's exit: test binaries of
// different packages that use the token take turns. It starts the slot
// daemon pkcsslotd if none is running; ReleaseOpenCryptoki stops the one it
// started. Initialising the token needs root and wipes every object on it.
//
// It skips the test where the token cannot be used (not root, openCryptoki
// not installed), or fails it with KEYLESS_REQUIRE_SOFTHSM=1.
func OpenCryptoki(t testing.TB) *Token {
	t.Helper()
	ock.mu.Lock()
	if !ock.set {
		ock.tok, ock.reason, ock.err = setupOpenCryptoki()
		ock.set = true
	}
	tok, reason, err := ock.tok, ock.reason, ock.err
	ock.mu.Unlock()
	switch {
	case reason != "":
		skipOrFail(t, reason)
	case err != nil:
		t.Fatalf("hsmtest: openCryptoki: %v", err)
	}
	return tok
}

// ReleaseOpenCryptoki hands the software token back: it stops the
// pkcsslotd this binary started and releases the lock, so that other test
// binaries can use the token. A later [OpenCryptoki] sets the token up
// again, without the keys it had. Close every Module on the token first.
// A test that is the binary's only user of the token can release it when
// it ends: t.Cleanup(hsmtest.ReleaseOpenCryptoki).
func ReleaseOpenCryptoki() {
	ock.mu.Lock()
	defer ock.mu.Unlock()
	stopSlotDaemon()
	if ock.lock != nil {
		_ = ock.lock.Close() // releases the flock
	}
	ock.set, ock.tok, ock.reason, ock.err, ock.lock, ock.slotd = false, nil, "", nil, nil, 0
}

// OpenCryptokiModulePath returns openCryptoki's library, or "" and the
// reason it was not found.
func OpenCryptokiModulePath() (path, reason string) {
	if p := os.Getenv(EnvOpenCryptokiModule); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Sprintf("%s=%s: %v", EnvOpenCryptokiModule, p, err)
		}
		return p, ""
	}
	for _, p := range openCryptokiPaths {
		if _, err := os.Stat(p); err == nil {
			return p, ""
		}
	}
	return "", fmt.Sprintf("openCryptoki not found (set %s, or install opencryptoki)", EnvOpenCryptokiModule)
}

func setupOpenCryptoki() (tok *Token, reason string, err error) {
	if reason := openCryptokiMissing(); reason != "" {
		return nil, reason, nil
	}
	module, _ := OpenCryptokiModulePath()
	slotd, _ := slotDaemonPath()
	if err := lockOpenCryptoki(5 * time.Minute); err != nil {
		return nil, "", err
	}
	if err := startSlotDaemon(slotd); err != nil {
		return nil, "", err
	}
	tok = &Token{
		ModulePath: module,
		Label:      fmt.Sprintf("kt-ock-%d", os.Getpid()),
		// openCryptoki's PINs are 4 to 8 characters.
		PIN:   randomHex(4),
		SOPIN: OpenCryptokiSOPIN,
	}
	if tok.Serial, err = reinitInChild(module, tok.Label, tok.SOPIN, tok.PIN); err != nil {
		return nil, "", err
	}
	return tok, "", nil
}

// envReinit makes a test binary that imports this package re-initialise
// openCryptoki's software token, before its tests or TestMain run, and
// exit: see reinitInChild.
const envReinit = "KEYLESS_HSMTEST_OPENCRYPTOKI_REINIT"

// reinitInChild re-initialises the token in a child process: this test
// binary again, with envReinit set, the PINs on its standard input (never
// on a command line). A process must not load openCryptoki's library beside
// SoftHSM's: C_Initialize of one after the other has been used has crashed
// (SIGSEGV) in this machine's builds. So the test process itself never
// loads it unless its tests open the token in-process.
func reinitInChild(module, label, soPIN, pin string) (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), envReinit+"=1")
	cmd.Stdin = strings.NewReader(strings.Join([]string{module, label, soPIN, pin}, "\n") + "\n")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("re-initialise the token: %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(string(out)), nil
}

// init is the child of reinitInChild.
func init() {
	if os.Getenv(envReinit) != "1" {
		return
	}
	var module, label, soPIN, pin string
	if _, err := fmt.Scanln(&module); err == nil {
		fmt.Scanln(&label)
		fmt.Scanln(&soPIN)
		fmt.Scanln(&pin)
	}
	serial, err := reinitToken(module, openCryptokiModel, label, soPIN, pin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(serial)
	os.Exit(0)
}

// CheckOpenCryptoki skips the test (or fails it with
// KEYLESS_REQUIRE_SOFTHSM=1) if openCryptoki's software token cannot be
// used here, without touching it.
func CheckOpenCryptoki(t testing.TB) {
	t.Helper()
	if reason := openCryptokiMissing(); reason != "" {
		skipOrFail(t, reason)
	}
}

// openCryptokiMissing says why the token cannot be used here, or "".
func openCryptokiMissing() string {
	if _, reason := OpenCryptokiModulePath(); reason != "" {
		return reason
	}
	if _, err := slotDaemonPath(); err != nil {
		return err.Error()
	}
	if os.Geteuid() != 0 {
		return "openCryptoki's software token needs root (pkcsslotd and its token directory)"
	}
	return ""
}

func slotDaemonPath() (string, error) {
	if p, err := exec.LookPath("pkcsslotd"); err == nil {
		return p, nil
	}
	if _, err := os.Stat("/usr/sbin/pkcsslotd"); err != nil {
		return "", errors.New("pkcsslotd not found (install opencryptoki)")
	}
	return "/usr/sbin/pkcsslotd", nil
}

// lockOpenCryptoki takes the machine-wide lock on the software token,
// waiting at most wait for another test binary to release it.
func lockOpenCryptoki(wait time.Duration) error {
	name := filepath.Join(os.TempDir(), "keyless-opencryptoki.lock")
	f, err := os.OpenFile(name, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("lock file: %w", err)
	}
	deadline := time.Now().Add(wait)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			ock.lock = f
			return nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return fmt.Errorf("flock %s: %w", name, err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return fmt.Errorf("another test binary has held %s for %v", name, wait)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// slotDaemonPIDFile is where pkcsslotd writes its process id.
const slotDaemonPIDFile = "/run/pkcsslotd.pid"

// runningSlotDaemon returns the pid of the running pkcsslotd, or 0.
func runningSlotDaemon() int {
	b, err := os.ReadFile(slotDaemonPIDFile)
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0
	}
	// /proc/PID/stat is "pid (comm) state ...": a zombie (Z) has exited.
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	_, rest, ok := strings.Cut(string(stat), " (pkcsslotd) ")
	if !ok || strings.HasPrefix(rest, "Z") || strings.HasPrefix(rest, "X") {
		return 0
	}
	return pid
}

// startSlotDaemon starts pkcsslotd unless one is running. The daemon
// forks and its first process exits; the pid it writes is the one Cleanup
// stops.
func startSlotDaemon(path string) error {
	if runningSlotDaemon() != 0 {
		return nil
	}
	out, err := exec.Command(path).CombinedOutput()
	if err != nil {
		return fmt.Errorf("start %s: %v: %s", path, err, out)
	}
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if pid := runningSlotDaemon(); pid != 0 {
			ock.slotd = pid
			return nil
		}
	}
	return fmt.Errorf("%s started but wrote no pid to %s within 5 s", path, slotDaemonPIDFile)
}

// stopSlotDaemon stops the pkcsslotd this binary started, by its pid, and
// waits up to 5 s for it to go.
func stopSlotDaemon() {
	pid := ock.slotd
	if pid == 0 || runningSlotDaemon() != pid {
		return
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if runningSlotDaemon() != pid {
			return
		}
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
}

// reinitToken initialises, through PKCS #11 in this process, the token of
// the given model, whether or not it was initialised before (which
// destroys its objects), with a label, an unchanged SO PIN and a new user
// PIN, and returns its serial number. Nothing else in the process may
// have a session open on it.
func reinitToken(module, model, label, soPIN, pin string) (string, error) {
	p, release, err := loadLibrary(module)
	if err != nil {
		return "", err
	}
	defer release()
	slots, err := p.GetSlotList(true)
	if err != nil {
		return "", fmt.Errorf("C_GetSlotList: %w", err)
	}
	slot, found := uint(0), false
	var models []string
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err != nil {
			continue // openCryptoki lists slots whose token library is missing
		}
		models = append(models, strings.TrimSpace(ti.Model))
		if strings.TrimSpace(ti.Model) == model {
			slot, found = s, true
			break
		}
	}
	if !found {
		return "", fmt.Errorf("no token of model %q among %q (is libpkcs11_sw.so configured in opencryptoki.conf?)", model, models)
	}
	if err := p.InitToken(slot, soPIN, label); err != nil {
		if isCode(err, pkcs11.CKR_PIN_INCORRECT) {
			return "", fmt.Errorf("C_InitToken(slot %d): the token's security officer PIN is not openCryptoki's default, which the tests use; "+
				"set it back with pkcsconf -c %d -P, or remove the token's directory: %w", slot, slot, err)
		}
		return "", fmt.Errorf("C_InitToken(slot %d): %w", slot, err)
	}
	sh, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
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
	ti, err := p.GetTokenInfo(slot)
	if err != nil {
		return "", fmt.Errorf("C_GetTokenInfo: %w", err)
	}
	return strings.TrimSpace(ti.SerialNumber), nil
}
