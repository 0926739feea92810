package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/hsm/hsmtest"
)

const servePolicy = `rules:
  - name: edge
    identities: [spiffe://test/edge]
    keys: ["*"]
    operations: [sign]
    schemes: [default]
`

func writeTestFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// serveTLSFlags writes a CA and a keyserver certificate and returns the
// flags that name them.
func serveTLSFlags(t *testing.T) []string {
	t.Helper()
	dir := t.TempDir()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
		DNSNames: []string{"keyserver.test"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalPKCS8PrivateKey(key)
	cert := writeTestFile(t, dir, "cert.pem", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))
	return []string{"-tls-cert", cert, "-client-ca", cert,
		"-tls-key", writeTestFile(t, dir, "key.pem", string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})))}
}

func TestServeFlagErrors(t *testing.T) {
	dir := t.TempDir()
	tlsFlags := []string{"-tls-cert", "c", "-tls-key", "k", "-client-ca", "ca"}
	good := writeTestFile(t, dir, "policy.yaml", servePolicy)
	bad := writeTestFile(t, dir, "bad.yaml", strings.Replace(servePolicy, "operations", "operation", 1))
	certs := filepath.Join(dir, "certs")
	os.Mkdir(certs, 0o755)
	writeTestFile(t, certs, "leaked.pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
	tests := []struct {
		args []string
		want string
	}{
		{tlsFlags, "-policy is required: the keyserver denies everything a policy does not allow"},
		{append(tlsFlags, "-policy", filepath.Join(dir, "missing.yaml")), "-policy: open"},
		{append(tlsFlags, "-policy", bad), `line 5: unknown field "operation" in a rule`},
		{append(tlsFlags, "-policy", good, "-certs", certs), "leaked.pem holds a private key"},
		{append(tlsFlags, "-policy", good, "-certs", filepath.Join(dir, "nope")), "-certs: open"},
		{append(tlsFlags, "-policy", good, "-max-inflight-per-identity", "-1"), "-max-inflight-per-identity -1: must be 0 (no bound) or more"},
		{append(tlsFlags, "-policy", good, "-max-streams-per-identity", "-1"), "-max-streams-per-identity -1"},
		{append(tlsFlags, "-policy", good, "-rate-per-identity", "-2"), "-rate-per-identity -2: must be 0 (no bound) or a positive number"},
		{append(serveTLSFlags(t), "-policy", good, "-audit-log", ""), `-audit-log: no file given; use "-" for standard error`},
		{append(serveTLSFlags(t), "-policy", good, "-client-crl", good), `-client-crl: link: client CRL file "` + good + `": CRL 1: x509: malformed crl`},
		{append(serveTLSFlags(t), "-policy", good, "-client-crl", filepath.Join(dir, "none.crl")), "-client-crl: link: client CRL file: open"},
		{append(tlsFlags, "-policy", good, "-client-crl", "a,,b"), `-client-crl: empty file name in "a,,b"`},
		{append(tlsFlags, "-policy", good, "-handshake-timeout", "0s"), "-handshake-timeout 0s: must be positive"},
		{append(tlsFlags, "-policy", good, "-max-connections-per-source", "-1"), "-max-connections-per-source -1"},
		{append(tlsFlags, "-policy", good, "-max-connection-age", "-1s"), "-max-connection-age -1s"},
		{append(serveTLSFlags(t), "-policy", good, "-audit-log", filepath.Join(dir, "no", "such", "dir", "audit.log")), "-audit-log: open audit log"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			_, _, err := runCmd(t, append([]string{"serve"}, tt.args...)...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("serve %q = %v, want an error containing %q", tt.args, err, tt.want)
			}
		})
	}
}

// lockedBuffer is a bytes.Buffer that serve may write while the test reads.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startServe runs "keyserver serve" in process until the test ends and
// returns its log once it is ready.
func startServe(t *testing.T, args ...string) *lockedBuffer {
	t.Helper()
	logs := &lockedBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, append([]string{"serve", "-listen", "127.0.0.1:0"}, args...), &bytes.Buffer{}, logs)
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve = %v", err)
		}
	})
	waitLog(t, logs, "keyserver ready")
	return logs
}

func waitLog(t *testing.T, logs *lockedBuffer, want string) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !strings.Contains(logs.String(), want); {
		if time.Now().After(deadline) {
			t.Fatalf("serve did not log %q:\n%s", want, logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestServeAllowExtractable checks that serve skips an extractable key
// unless -allow-extractable is set, and warns loudly when it is.
func TestServeAllowExtractable(t *testing.T) {
	tok := hsmtest.New(t)
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "extractable", "--id", "e1", "--extractable")
	dir := t.TempDir()
	args := append(append(tokenFlags(t, tok), serveTLSFlags(t)...), "-policy", writeTestFile(t, dir, "policy.yaml", servePolicy),
		"-audit-log", filepath.Join(dir, "audit.log"))
	keysRE := regexp.MustCompile(`keyserver ready: .* keys=(\d+)`)

	logs := startServe(t, args...)
	if m := keysRE.FindStringSubmatch(logs.String()); m == nil || m[1] != "0" {
		t.Errorf("without -allow-extractable the keyserver serves %v keys, want 0:\n%s", m, logs)
	}
	if !strings.Contains(logs.String(), "is extractable or not sensitive") {
		t.Errorf("the skipped key was not logged:\n%s", logs)
	}

	logs = startServe(t, append(args, "-allow-extractable")...)
	if m := keysRE.FindStringSubmatch(logs.String()); m == nil || m[1] != "1" {
		t.Errorf("with -allow-extractable the keyserver serves %v keys, want 1:\n%s", m, logs)
	}
	if !strings.Contains(logs.String(), "[WARN]  keyserver: *** -allow-extractable is set") || !strings.Contains(logs.String(), "allow_extractable=true") {
		t.Errorf("-allow-extractable was not warned about:\n%s", logs)
	}
}

// TestServeReload checks SIGHUP: a broken policy keeps the old one, a good
// one replaces it, and the audit log is reopened (for log rotation).
func TestServeReload(t *testing.T) {
	tok := hsmtest.New(t)
	dir := t.TempDir()
	policy := writeTestFile(t, dir, "policy.yaml", servePolicy)
	audit := filepath.Join(dir, "audit.log")
	logs := startServe(t, append(append(tokenFlags(t, tok), serveTLSFlags(t)...), "-policy", policy, "-audit-log", audit)...)
	if !strings.Contains(logs.String(), "1 rules, 1 identities") || !strings.Contains(logs.String(), "identities=spiffe://test/edge") {
		t.Fatalf("startup log:\n%s", logs)
	}
	hup := func() {
		t.Helper()
		if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
	}
	writeTestFile(t, dir, "policy.yaml", "rules: [")
	os.Rename(audit, audit+".1")
	hup()
	waitLog(t, logs, "policy not reloaded; the previous one stays in force")
	if _, err := os.Stat(audit); err != nil {
		t.Errorf("the audit log was not reopened: %v", err)
	}
	writeTestFile(t, dir, "policy.yaml", servePolicy+"  - name: second\n    identities: [edge-2.test]\n    keys: [\"*\"]\n    operations: [decrypt]\n")
	hup()
	waitLog(t, logs, "policy reloaded: policy=")
	waitLog(t, logs, "2 rules, 2 identities")
}

// TestServeAssembleFailureCloses checks that when assembling fails after
// the HSM and the gRPC listener are open (here: -metrics-listen is taken),
// serve reports the flag and leaves nothing open behind it.
func TestServeAssembleFailureCloses(t *testing.T) {
	tok := hsmtest.New(t)
	dir := t.TempDir()
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	listen := free.Addr().String()
	free.Close()
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	args := append(append([]string{"serve", "-listen", listen, "-metrics-listen", taken.Addr().String()}, tokenFlags(t, tok)...), serveTLSFlags(t)...)
	args = append(args, "-policy", writeTestFile(t, dir, "policy.yaml", servePolicy), "-audit-log", filepath.Join(dir, "audit.log"))
	if _, _, err := runCmd(t, args...); err == nil || !strings.Contains(err.Error(), "serve: -metrics-listen") {
		t.Fatalf("serve with -metrics-listen taken = %v, want a -metrics-listen error", err)
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		t.Fatalf("the gRPC listener %s is still open after serve failed: %v", listen, err)
	}
	ln.Close()
	// The module was closed: the token opens again in the same process.
	if _, _, err := runCmd(t, append([]string{"keys", "list"}, tokenFlags(t, tok)...)...); err != nil {
		t.Errorf("keys list after the failed serve: %v", err)
	}
}
