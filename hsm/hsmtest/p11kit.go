package hsmtest

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/hsm"
)

// Environment variables for p11-kit remoting.
const (
	// EnvP11KitClient overrides the path of p11-kit's client module,
	// p11-kit-client.so.
	EnvP11KitClient = "KEYLESS_P11KIT_CLIENT"
	// EnvP11KitAddress is the variable p11-kit's client module reads the
	// server's address from, as "unix:path=/run/socket".
	EnvP11KitAddress = "P11_KIT_SERVER_ADDRESS"
)

// p11KitClientPaths are where distributions install p11-kit's client
// module (Debian's package p11-kit-modules).
var p11KitClientPaths = []string{
	"/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
	"/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so",
	"/usr/lib64/pkcs11/p11-kit-client.so",
	"/usr/lib/pkcs11/p11-kit-client.so",
	"/usr/local/lib/pkcs11/p11-kit-client.so",
}

var (
	p11KitOnce    sync.Once
	p11KitSocket  string
	p11KitErr     error
	p11KitServing sync.Mutex // one server at a time: the address is per process
)

// P11KitServer is a `p11-kit server` process that serves one SoftHSM token
// on a unix socket, as a network HSM's appliance serves its client
// library: the keyserver under test loads p11-kit's client module
// (ClientModule) and reaches the token through the socket.
//
// p11-kit's client module reads the server's address from the environment
// when it is loaded, so the package sets P11_KIT_SERVER_ADDRESS once per
// test binary, to one socket path, and runs one server at a time: a test
// that calls [Token.ServeP11Kit] holds the server until it ends, and must
// not run in parallel with another that does. Stop and Start stop and
// start the server on the same socket, to play an outage of the
// appliance. A P11KitServer is not safe for concurrent use.
type P11KitServer struct {
	// ClientModule is the path of p11-kit-client.so, the PKCS #11 module
	// to open.
	ClientModule string
	// Socket is the server's unix socket.
	Socket string

	// ListenSocket is where the server listens: Socket, or Socket+".server"
	// once DelayAnswers has put a relay on Socket.
	ListenSocket string

	relay *delayRelay

	provider, label string
	env             []string
	tok             *Token // nil for a server made by NewP11KitServer
	cmd             *exec.Cmd
	output          *bytes.Buffer
}

// P11KitClientPath returns the path of p11-kit's client module, or "" and
// the reason it was not found.
func P11KitClientPath() (path, reason string) {
	if p := os.Getenv(EnvP11KitClient); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Sprintf("%s=%s: %v", EnvP11KitClient, p, err)
		}
		return p, ""
	}
	for _, p := range p11KitClientPaths {
		if _, err := os.Stat(p); err == nil {
			return p, ""
		}
	}
	return "", "p11-kit-client.so not found (install p11-kit-modules, or set " + EnvP11KitClient + ")"
}

// ServeP11Kit starts `p11-kit server` for the token, with SoftHSM as its
// provider, and stops it when the test ends. It skips the test (or, with
// KEYLESS_REQUIRE_SOFTHSM=1, fails it) when p11-kit or its client module is
// not installed.
func (tok *Token) ServeP11Kit(t testing.TB) *P11KitServer {
	t.Helper()
	if _, err := exec.LookPath("p11-kit"); err != nil {
		skipOrFail(t, "p11-kit not found (install p11-kit)")
	}
	client, reason := P11KitClientPath()
	if client == "" {
		skipOrFail(t, reason)
	}
	p11KitOnce.Do(func() {
		if confDir == "" {
			p11KitErr = errors.New("no SoftHSM directory: call New first")
			return
		}
		p11KitSocket = filepath.Join(confDir, "p11-kit.sock")
		p11KitErr = os.Setenv(EnvP11KitAddress, "unix:path="+p11KitSocket)
	})
	if p11KitErr != nil {
		t.Fatalf("hsmtest: p11-kit: %v", p11KitErr)
	}
	p11KitServing.Lock()
	s := &P11KitServer{ClientModule: client, Socket: p11KitSocket, ListenSocket: p11KitSocket,
		provider: tok.ModulePath, label: tok.Label, tok: tok}
	t.Cleanup(func() {
		s.Stop(t)
		if t.Failed() {
			t.Logf("p11-kit server output:\n%s", s.output)
		}
		p11KitServing.Unlock()
	})
	s.Start(t)
	return s
}

// NewP11KitServer starts `p11-kit server` on socket for the token labelled
// label of the PKCS #11 module provider, with env added to the server's
// environment (such as SOFTHSM2_CONF for a token of another process), and
// stops it when the test ends. It is for tests of other processes (which
// get P11_KIT_SERVER_ADDRESS=unix:path=socket in their environment), and
// skips or fails the test as ServeP11Kit does.
func NewP11KitServer(t testing.TB, provider, label, socket string, env []string) *P11KitServer {
	t.Helper()
	if _, err := exec.LookPath("p11-kit"); err != nil {
		skipOrFail(t, "p11-kit not found (install p11-kit)")
	}
	client, reason := P11KitClientPath()
	if client == "" {
		skipOrFail(t, reason)
	}
	s := &P11KitServer{ClientModule: client, Socket: socket, ListenSocket: socket, provider: provider, label: label, env: env}
	t.Cleanup(func() { s.Stop(t) })
	s.Start(t)
	return s
}

// Address returns the value of P11_KIT_SERVER_ADDRESS for the server.
func (s *P11KitServer) Address() string { return "unix:path=" + s.Socket }

// Config returns an hsm.Config that opens the token through p11-kit's
// client module, with a small session pool. It is for servers made by
// ServeP11Kit.
func (s *P11KitServer) Config() hsm.Config {
	cfg := s.tok.Config()
	cfg.ModulePath = s.ClientModule
	return cfg
}

// Open opens the token through p11-kit with [P11KitServer.Config] and
// closes it when the test ends.
func (s *P11KitServer) Open(t testing.TB) *hsm.Module {
	t.Helper()
	return s.tok.OpenConfig(t, s.Config())
}

// OpenConfig opens the token through p11-kit with cfg and closes it when
// the test ends. It is for servers made by ServeP11Kit.
func (s *P11KitServer) OpenConfig(t testing.TB, cfg hsm.Config) *hsm.Module {
	t.Helper()
	return s.tok.OpenConfig(t, cfg)
}

// Token returns the token the server serves, for servers made by
// ServeP11Kit.
func (s *P11KitServer) Token() *Token { return s.tok }

// Start starts the server, and waits until its socket accepts
// connections. The server runs in a process group of its own, with every
// connection's p11-kit-remote process, and is killed if the test process
// dies.
func (s *P11KitServer) Start(t testing.TB) {
	t.Helper()
	if s.cmd != nil {
		t.Fatal("hsmtest: p11-kit server already running")
	}
	_ = os.Remove(s.ListenSocket)
	s.output = new(bytes.Buffer)
	cmd := exec.Command("p11-kit", "server", "-f", "-n", s.ListenSocket,
		"--provider", s.provider, "pkcs11:token="+s.label)
	cmd.Env = append(os.Environ(), s.env...)
	cmd.Stdout, cmd.Stderr = s.output, s.output
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("hsmtest: start p11-kit server: %v", err)
	}
	s.cmd = cmd
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", s.ListenSocket); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			s.Stop(t)
			t.Fatalf("hsmtest: p11-kit server did not listen on %s within 30s; output:\n%s", s.ListenSocket, s.output)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Stop kills the server and every connection's p11-kit-remote process at
// once (SIGKILL to the process group), as when a network HSM goes away:
// the clients' connections break. It does nothing if the server is not
// running.
func (s *P11KitServer) Stop(t testing.TB) {
	t.Helper()
	if s.cmd == nil {
		return
	}
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	_ = s.cmd.Wait()
	s.cmd = nil
	_ = os.Remove(s.ListenSocket)
}

// DelayAnswers holds back everything the server sends by d, as an
// appliance that answers each call late, from a relay on Socket in front
// of the server; 0 ends the delay. The first call restarts the server
// behind the relay, which cuts the connections of the moment; later calls
// change the delay at once. The relay stops when the test ends.
func (s *P11KitServer) DelayAnswers(t testing.TB, d time.Duration) {
	t.Helper()
	if s.relay == nil {
		running := s.Running()
		s.Stop(t)
		s.ListenSocket = s.Socket + ".server"
		if running {
			s.Start(t)
		}
		s.relay = startDelayRelay(t, s.Socket, s.ListenSocket)
		t.Cleanup(s.relay.close)
	}
	s.relay.delay.Store(int64(d))
}

// Running reports whether the server has been started and not stopped.
func (s *P11KitServer) Running() bool { return s.cmd != nil }
