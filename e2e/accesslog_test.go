package e2e

import (
	"bufio"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
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

// accessLines returns the JSON lines of the access log at path whose type
// is typ, waiting up to 10 s for at least n of them.
func accessLines(t *testing.T, path, typ string, n int) []map[string]any {
	t.Helper()
	var out []map[string]any
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		out = out[:0]
		if f, err := os.Open(path); err == nil {
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				var m map[string]any
				if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
					t.Fatalf("access log line %q is not JSON: %v", sc.Text(), err)
				}
				if m["type"] == typ {
					out = append(out, m)
				}
			}
			f.Close()
		}
		if len(out) >= n || time.Now().After(deadline) {
			return out
		}
	}
}

// certKeyID returns the key id (SHA-256 of the SubjectPublicKeyInfo) of
// the certificate in file.
func certKeyID(t *testing.T, file string) string {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		t.Fatalf("%s holds no PEM", file)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(sum[:])
}

// TestAccessLogCurl drives an edge with curl and checks its access log:
// a line per request with the TLS facts, the key id and keyserver of the
// handshake, no query string; a line per failed handshake; a new file
// after logrotate's rename and SIGHUP. It also checks the per-keyserver
// gauge, and that the edge logs the keyserver gone once when it stops.
func TestAccessLogCurl(t *testing.T) {
	needTool(t, "curl")
	path := filepath.Join(t.TempDir(), "access.log")
	d := startDeployment(t, "-access-log", path, "-metrics-listen", "127.0.0.1:0", "-handshakes-per-client", "0")
	metricsAddr := d.edge.waitFor(t, readyEdgeMetrics)[1]

	curl := func(host string, args ...string) (string, error) {
		args = append([]string{"-sS", "--max-time", "20", "--cacert", d.caFile, "--resolve", d.resolve(host)}, args...)
		return run(t, nil, "curl", args...)
	}
	if out, err := curl("ecdsa.e2e.test", "--http2", "--tlsv1.3", "--fail-with-body", "--data-binary", "hello world", d.url("ecdsa.e2e.test")+"post/it?token=s3cret"); err != nil {
		t.Fatalf("curl: %v\n%s", err, out)
	}
	if out, err := curl("rsa.e2e.test", "--http1.1", "--tlsv1.2", "--tls-max", "1.2", "--ciphers", "AES128-GCM-SHA256", "--fail-with-body", d.url("rsa.e2e.test")+"kex"); err != nil {
		t.Fatalf("curl with RSA key exchange: %v\n%s", err, out)
	}
	// A handshake that fails: TLS 1.2 with only a CBC suite.
	if out, err := curl("ecdsa.e2e.test", "--tlsv1.2", "--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-AES128-SHA", d.url("ecdsa.e2e.test")); err == nil {
		t.Fatalf("curl with only a CBC suite succeeded:\n%s", out)
	}

	lines := accessLines(t, path, "http", 2)
	if len(lines) != 2 {
		t.Fatalf("%d request lines in the access log, want 2", len(lines))
	}
	checks := []map[string]any{{
		"server_name": "ecdsa.e2e.test", "tls_version": "1.3", "resumed": false, "alpn": "h2", "protocol": "HTTP/2.0",
		"method": "POST", "host": "ecdsa.e2e.test:" + strings.Split(d.edgeAddr, ":")[1], "path": "/post/it", "status": float64(200),
		"bytes_in": float64(len("hello world")), "key_id": certKeyID(t, filepath.Join(d.certsDir, "ecdsa.e2e.test.pem")),
		"keyserver": d.keyserverAddr,
	}, {
		"server_name": "rsa.e2e.test", "tls_version": "1.2", "cipher": "TLS_RSA_WITH_AES_128_GCM_SHA256", "protocol": "HTTP/1.1",
		"method": "GET", "path": "/kex", "key_id": certKeyID(t, filepath.Join(d.certsDir, "rsa.e2e.test.pem")), "keyserver": d.keyserverAddr,
	}}
	for i, want := range checks {
		for k, v := range want {
			if lines[i][k] != v {
				t.Errorf("line %d: %s = %#v, want %#v\n%v", i, k, lines[i][k], v, lines[i])
			}
		}
		if u, ok := lines[i]["upstream_duration"].(float64); !ok || u <= 0 {
			t.Errorf("line %d: upstream_duration = %v, want a positive number", i, lines[i]["upstream_duration"])
		}
	}
	data, _ := os.ReadFile(path)
	if strings.Contains(string(data), "s3cret") {
		t.Errorf("the access log holds the query string:\n%s", data)
	}
	fails := accessLines(t, path, "handshake_error", 1)
	if len(fails) != 1 || fails[0]["server_name"] != "ecdsa.e2e.test" || !strings.HasPrefix(fails[0]["client"].(string), "127.0.0.1:") {
		t.Errorf("handshake_error lines = %v, want one for ecdsa.e2e.test from 127.0.0.1", fails)
	}

	text := scrape(t, metricsAddr)
	for series, want := range map[string]float64{
		`keyless_edge_keyserver_up{keyserver="` + d.keyserverAddr + `"}`:                                  1,
		`keyless_edge_http_requests_total{code="2xx",protocol="2",server_name="ecdsa.e2e.test"}`:          1,
		`keyless_edge_http_requests_total{code="2xx",protocol="1.1",server_name="rsa.e2e.test"}`:          1,
		`keyless_edge_handshakes_total{key_type="ecdsa_p256",outcome="ok",resumed="false",version="1.3"}`: 1,
	} {
		if got, ok := metricValue(text, series); !ok || got != want {
			t.Errorf("%s = %v (%v), want %v", series, got, ok, want)
		}
	}

	// logrotate: rename, then SIGHUP; the next line goes to a new file.
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	d.edge.cmd.Process.Signal(syscall.SIGHUP)
	d.edge.waitFor(t, regexp.MustCompile(`reload complete`))
	if out, err := curl("p384.e2e.test", "--fail-with-body", d.url("p384.e2e.test")+"after-rotate"); err != nil {
		t.Fatalf("curl after SIGHUP: %v\n%s", err, out)
	}
	if after := accessLines(t, path, "http", 1); len(after) != 1 || after[0]["path"] != "/after-rotate" {
		t.Errorf("lines in the new file after SIGHUP = %v, want the one request made since", after)
	}

	// The keyserver stops: the edge says so once, and the gauge drops.
	d.keyserver.stop(t)
	d.edge.waitFor(t, regexp.MustCompile(`keyserver gone: keyserver=`+regexp.QuoteMeta(d.keyserverAddr)))
	time.Sleep(2 * time.Second) // reconnection attempts
	if n := strings.Count(d.edge.out.String(), "keyserver gone"); n != 1 {
		t.Errorf("the edge logged %d keyserver gone lines, want 1:\n%s", n, d.edge.out.String())
	}
	if got, _ := metricValue(scrape(t, metricsAddr), `keyless_edge_keyserver_up{keyserver="`+d.keyserverAddr+`"}`); got != 0 {
		t.Errorf("keyless_edge_keyserver_up = %v after the keyserver stopped, want 0", got)
	}
}

// TestAccessLogTCPOpenSSL: in TCP mode, openssl s_client's connection gets
// one line with the bytes relayed each way and the handshake's key.
func TestAccessLogTCPOpenSSL(t *testing.T) {
	needTool(t, "openssl")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(30 * time.Second))
				line, _ := bufio.NewReader(c).ReadString('\n')
				fmt.Fprintf(c, "origin got %q\n", line)
			}()
		}
	}()
	d := startDeployment(t)
	path := filepath.Join(t.TempDir(), "access.log")
	_, addr := d.startEdge(t, d.link.edgeCert, d.link.edgeKey, "-tcp-origin", ln.Addr().String(), "-access-log", path)
	cmd := exec.Command("openssl", "s_client", "-quiet", "-connect", addr, "-servername", "p384.e2e.test",
		"-CAfile", d.caFile, "-verify_return_error")
	cmd.Stdin = strings.NewReader("hello origin\n")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("openssl s_client: %v\n%s", err, out)
	}
	lines := accessLines(t, path, "tcp", 1)
	if len(lines) != 1 {
		t.Fatalf("%d tcp lines in the access log, want 1", len(lines))
	}
	for k, v := range map[string]any{
		"server_name": "p384.e2e.test", "tls_version": "1.3", "status": "ok", "origin": ln.Addr().String(),
		"bytes_in": float64(len("hello origin\n")), "bytes_out": float64(len(out)),
		"key_id": certKeyID(t, filepath.Join(d.certsDir, "p384.e2e.test.pem")), "keyserver": d.keyserverAddr,
	} {
		if lines[0][k] != v {
			t.Errorf("tcp line: %s = %#v, want %#v\n%v", k, lines[0][k], v, lines[0])
		}
	}
}
