package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// lockedBuffer is a bytes.Buffer safe for concurrent use.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// writeSelfSigned writes a self-signed certificate and its key as PEM files
// in dir and returns their paths.
func writeSelfSigned(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), DNSNames: []string{"keyserver.test"}, NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "edge.pem"), filepath.Join(dir, "edge-key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestOpsListenerBeforeKeyservers: with no keyserver answering, the
// operations listener serves at once: /healthz 200, /readyz 503 with the
// reason, /metrics with the keyserver down; and the edge logs the
// keyserver as gone once, however often it retries.
func TestOpsListenerBeforeKeyservers(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := writeSelfSigned(t, dir)
	keyserver := freeAddr(t) // nobody listens there
	ops := freeAddr(t)
	var stderr lockedBuffer
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"-certs", dir, "-keyserver", keyserver, "-keyserver-name", "keyserver.test",
			"-keyserver-ca", certFile, "-tls-cert", certFile, "-tls-key", keyFile, "-origin", "http://127.0.0.1:1",
			"-metrics-listen", ops, "-listen", freeAddr(t), "-reconnect-backoff", "200ms"}, &stderr, nil)
	}()

	get := func(path string) (int, string, error) {
		resp, err := http.Get("http://" + ops + path)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body), err
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, body, err := get("/healthz")
		if err == nil && code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/healthz never answered 200 (last: %d %q %v); log:\n%s", code, body, err, stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	code, body, err := get("/readyz")
	if err != nil || code != http.StatusServiceUnavailable || !strings.Contains(body, "waits for a keyserver") {
		t.Errorf("/readyz = %d %q, %v; want 503 saying it waits for a keyserver", code, body, err)
	}
	// Past a few reconnection attempts: the keyserver is logged gone once.
	time.Sleep(1500 * time.Millisecond)
	code, body, err = get("/metrics")
	want := `keyless_edge_keyserver_up{keyserver="` + keyserver + `"} 0`
	if err != nil || code != http.StatusOK || !strings.Contains(body, want) {
		t.Errorf("/metrics = %d, %v; want a line %q", code, err, want)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run() = %v after its context ended before a keyserver answered; want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return after its context ended")
	}
	if n := strings.Count(stderr.String(), "keyserver gone"); n != 1 {
		t.Errorf("%d lines say the keyserver is gone, want exactly 1:\n%s", n, stderr.String())
	}
	if _, _, err := get("/healthz"); err == nil {
		t.Error("the operations listener still answers after run returned")
	}
}

func TestAccessLogFlags(t *testing.T) {
	required := []string{"-certs", "d", "-keyserver", "k:1", "-keyserver-ca", "ca", "-tls-cert", "c", "-tls-key", "k", "-origin", "http://o"}
	for _, tt := range []struct {
		args    []string
		wantErr string
	}{
		{[]string{"-access-log-format", "xml"}, `-access-log-format "xml": want json or text`},
		{[]string{"-access-log", ""}, "-access-log is empty"},
	} {
		var stderr bytes.Buffer
		if _, err := parse(append(required, tt.args...), &stderr); err == nil || !strings.Contains(err.Error(), tt.wantErr) {
			t.Errorf("parse(%q) = %v, want an error containing %q", tt.args, err, tt.wantErr)
		}
	}
	f, err := parse(required, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if l, err := f.accessLog.open(); l != nil || err != nil {
		t.Errorf("the default access log = %v, %v; want off", l, err)
	}
	path := filepath.Join(t.TempDir(), "access.log")
	f, err = parse(append(required, "-access-log", path, "-access-log-format", "text"), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	l, err := f.accessLog.open()
	if err != nil || l == nil {
		t.Fatalf("open(-access-log %s) = %v, %v", path, l, err)
	}
	defer l.Close()
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o640 {
		t.Errorf("access log file: %v, %v; want mode 0640", fi, err)
	}
	f, _ = parse(append(required, "-access-log", filepath.Join(t.TempDir(), "missing", "a.log")), io.Discard)
	if _, err := f.accessLog.open(); err == nil || !strings.HasPrefix(err.Error(), "-access-log: ") {
		t.Errorf("open(in a missing directory) = %v, want an error naming -access-log", err)
	}
}
