package e2e

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestDemo runs `make demo` as the README says, tries it with curl as the
// demo suggests, interrupts it like Ctrl-C does, and checks that it stopped
// everything it started.
func TestDemo(t *testing.T) {
	needTool(t, "curl")
	needTool(t, "make")
	softhsmModule(t)
	dir := t.TempDir()
	addrs := freeAddrs(t, 3)
	addr, ksAddr, originAddr := addrs[0], addrs[1], addrs[2]
	cmd := exec.Command("make", "-s", "demo")
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "KEYLESS_DEMO_ADDR="+addr, "KEYLESS_DEMO_DIR="+dir,
		"KEYLESS_DEMO_KEYSERVER_ADDR="+ksAddr, "KEYLESS_DEMO_ORIGIN_ADDR="+originAddr)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	// Its own process group, so that the interrupt reaches make, the script
	// and its children, as a terminal's Ctrl-C does.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		if t.Failed() {
			t.Logf("make demo output:\n%s", out.String())
		}
	})

	deadline := time.After(3 * time.Minute)
	for !strings.Contains(out.String(), "Press Ctrl-C to stop") {
		select {
		case err := <-done:
			t.Fatalf("make demo exited early (%v):\n%s", err, out.String())
		case <-deadline:
			t.Fatalf("make demo did not come up within 3 minutes:\n%s", out.String())
		case <-time.After(100 * time.Millisecond):
		}
	}

	// Run the curl commands the demo printed, as a user would.
	curls := regexp.MustCompile(`(?m)^\s+(curl [^\\\n]+/)\s*$`).FindAllStringSubmatch(out.String(), -1)
	if len(curls) < 2 {
		t.Fatalf("the demo printed %d curl commands, want at least 2:\n%s", len(curls), out.String())
	}
	for _, c := range curls {
		got, err := run(t, nil, "sh", "-c", c[1]+" --max-time 20 -sS")
		if err != nil {
			t.Fatalf("%s: %v\n%s", c[1], err, got)
		}
		if !strings.Contains(got, "Hello from the keyless demo origin") || !strings.Contains(got, "tls version: TLS 1.3") {
			t.Errorf("%s answered:\n%s", c[1], got)
		}
	}
	// The edge logs each request in the access log the demo names, once
	// the response is sent.
	var (
		access []byte
		err    error
	)
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		access, err = os.ReadFile(filepath.Join(dir, "logs", "access.log"))
		if err == nil && strings.Count(string(access), `"type":"http"`) >= len(curls) || time.Now().After(deadline) {
			break
		}
	}
	if n := strings.Count(string(access), `"type":"http"`); err != nil || n < len(curls) {
		t.Errorf("$KEYLESS_DEMO_DIR/logs/access.log (%v) holds %d request lines, want one per curl request (%d):\n%s", err, n, len(curls), access)
	}
	if !fileExists(filepath.Join(dir, "ca.pem")) {
		t.Errorf("the demo CA is not at $KEYLESS_DEMO_DIR/ca.pem")
	}
	checkDemoCertificates(t, dir, addr)
	if edgeLog, err := os.ReadFile(filepath.Join(dir, "logs", "edge.log")); err != nil || !strings.Contains(string(edgeLog), "ticket_keys=keyserver") {
		t.Errorf("the demo edge does not take its session ticket keys from the keyserver (%v):\n%s", err, edgeLog)
	}

	syscall.Kill(-cmd.Process.Pid, syscall.SIGINT)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("make demo did not stop within 30 s of SIGINT:\n%s", out.String())
	}
	// make itself dies of the SIGINT it got, whatever the recipe did; the
	// script must stop cleanly.
	if got := out.String(); strings.Contains(got, "exited unexpectedly") || !strings.Contains(got, "stopped; logs are in") {
		t.Errorf("the demo did not stop cleanly on SIGINT:\n%s", got)
	}
	for _, a := range []string{addr, ksAddr, originAddr} {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			t.Errorf("after the demo stopped, %s is still in use: %v", a, err)
			continue
		}
		ln.Close()
	}
}
