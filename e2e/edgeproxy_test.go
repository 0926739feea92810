package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
)

// These tests drive the edge as a reverse proxy, as its own process, with
// curl, nghttp, openssl s_client and HAProxy in front of it and several
// origins behind it.

// startNamedOrigin starts an HTTP origin in the test that answers with its
// name and what it received.
func startNamedOrigin(t *testing.T, name string) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "origin=%s\nhost=%s\npath=%s\nxff=%s\nforwarded=%s\n", name, r.Host, r.URL.Path,
			strings.Join(r.Header.Values("X-Forwarded-For"), "|"), strings.Join(r.Header.Values("Forwarded"), "|"))
	}))
	t.Cleanup(srv.Close)
	return srv
}

// writeRoutes writes an edge -config file with the given routes section.
func writeRoutes(t *testing.T, path, routes string) {
	t.Helper()
	if err := os.WriteFile(path, []byte("routes:\n"+routes), 0o600); err != nil {
		t.Fatal(err)
	}
}

func curlEdge(t *testing.T, d *deployment, host string, args ...string) string {
	t.Helper()
	args = append([]string{"-sS", "--max-time", "20", "--cacert", d.caFile, "--resolve", d.resolve(host),
		"-w", "status=%{http_code}\n"}, args...)
	args = append(args, d.url(host)+"p")
	out, err := run(t, nil, "curl", args...)
	if err != nil {
		t.Fatalf("curl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func wantLines(t *testing.T, what, out string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("%s output lacks %q:\n%s", what, w, out)
		}
	}
}

// TestEdgeRoutes: routes from the -config file send each host name to its
// origin (exact, wildcard, and -origin as the default), over HTTP/1.1
// (curl) and HTTP/2 (nghttp), with the client's Host or the route's; a
// SIGHUP puts a changed list in force; an origin that does not answer in
// time gets a 504, and a dead one a 502, each counted and logged.
func TestEdgeRoutes(t *testing.T) {
	needTool(t, "curl")
	needTool(t, "nghttp")
	a, b := startNamedOrigin(t, "a"), startNamedOrigin(t, "b")
	// An origin that takes requests and never answers.
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { silent.Close() })
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	config := filepath.Join(t.TempDir(), "edge.yaml")
	writeRoutes(t, config, fmt.Sprintf(`  - hosts: [ecdsa.e2e.test]
    origin: %s/a
  - name: others
    hosts: ["*.e2e.test"]
    origin: %s/b
    host: backend.internal
  - name: silent
    hosts: [ed25519.e2e.test]
    origin: http://%s
`, a.URL, b.URL, silent.Addr()))
	// The default route is the deployment's demo origin (-origin).
	d := startDeployment(t, "-config", config, "-trusted-proxies", "192.0.2.0/24", "-forwarded", "-metrics-listen", "127.0.0.1:0",
		"-origin-response-timeout", "500ms")
	metrics := d.edge.waitFor(t, readyEdgeMetrics)[1]
	_, port, _ := net.SplitHostPort(d.edgeAddr)

	out := curlEdge(t, d, "ecdsa.e2e.test", "--http1.1", "-H", "X-Forwarded-For: 198.51.100.7")
	wantLines(t, "curl", out, "origin=a", "host=ecdsa.e2e.test:"+port, "path=/a/p", "xff=127.0.0.1\n",
		"forwarded=for=127.0.0.1;host=\"ecdsa.e2e.test:"+port+"\";proto=https", "status=200")
	out = curlEdge(t, d, "rsa.e2e.test", "--http2")
	wantLines(t, "curl", out, "origin=b", "host=backend.internal\n", "path=/b/p", "status=200")

	// nghttp over HTTP/2 with no SNI (an IP address): the route follows
	// :authority.
	// An origin that does not answer in time: 504, counted.
	out = curlEdge(t, d, "ed25519.e2e.test")
	wantLines(t, "curl", out, "504 Gateway Timeout: the origin server did not answer in time", "status=504")
	if v, _ := metricValue(scrape(t, metrics), `keyless_edge_origin_errors_total{reason="timeout",route="silent"}`); v != 1 {
		t.Errorf("keyless_edge_origin_errors_total{timeout, silent} = %v, want 1", v)
	}
	d.edge.waitFor(t, regexp.MustCompile(`origin request failed: route=silent .*reason=timeout client_address=127.0.0.1:`))

	out, err = run(t, nil, "nghttp", "-v", "-H", ":authority: p384.e2e.test", "https://"+d.edgeAddr+"/n")
	if err != nil {
		t.Fatalf("nghttp: %v\n%s", err, out)
	}
	wantLines(t, "nghttp", out, ":status: 200", "origin=b", "path=/b/n")
	out, err = run(t, nil, "nghttp", "-v", "-H", ":authority: elsewhere.test", "https://"+d.edgeAddr+"/n")
	if err != nil {
		t.Fatalf("nghttp: %v\n%s", err, out)
	}
	wantLines(t, "nghttp", out, ":status: 200", "Hello from the keyless demo origin.", "request:     GET /n HTTP/1.1")

	// Reload: ecdsa.e2e.test moves to b, and the wildcard goes.
	writeRoutes(t, config, fmt.Sprintf("  - hosts: [ecdsa.e2e.test]\n    origin: %s/b\n", b.URL))
	if err := d.edge.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	d.edge.waitFor(t, regexp.MustCompile(`routes reloaded: routes=2`))
	wantLines(t, "curl", curlEdge(t, d, "ecdsa.e2e.test"), "origin=b", "path=/b/p")
	wantLines(t, "curl", curlEdge(t, d, "rsa.e2e.test"), "Hello from the keyless demo origin.")

	// A broken list keeps the routes in force.
	writeRoutes(t, config, "  - hosts: [ecdsa.e2e.test]\n")
	d.edge.cmd.Process.Signal(syscall.SIGHUP)
	d.edge.waitFor(t, regexp.MustCompile(`reload of the routes failed; the previous ones stay in force: .*route 1: origin is required`))
	wantLines(t, "curl", curlEdge(t, d, "ecdsa.e2e.test"), "origin=b")

	// The origin dies: 502, with a body that says so, counted.
	b.Close()
	out = curlEdge(t, d, "ecdsa.e2e.test")
	wantLines(t, "curl", out, "502 Bad Gateway: the origin server could not be reached", "status=502")
	if v, _ := metricValue(scrape(t, metrics), `keyless_edge_origin_errors_total{reason="unreachable",route="ecdsa.e2e.test"}`); v != 1 {
		t.Errorf("keyless_edge_origin_errors_total{unreachable, ecdsa.e2e.test} = %v, want 1", v)
	}
}

// proxyV2 returns a PROXY protocol v2 header written by hand from the
// specification (not by the library the edge uses): command PROXY, TCP over
// IPv4, from src to dst.
func proxyV2(src, dst netip.AddrPort) []byte {
	h := []byte("\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c")
	s, d := src.Addr().As4(), dst.Addr().As4()
	h = append(append(h, s[:]...), d[:]...)
	h = binary.BigEndian.AppendUint16(h, src.Port())
	return binary.BigEndian.AppendUint16(h, dst.Port())
}

// TestEdgeProxyProtocol: an edge behind a load balancer that sends PROXY
// headers (HAProxy with send-proxy-v2, and a hand-written v2 header) sees
// the client's own address: in the origin's X-Forwarded-For and in the
// keyserver's audit trail. A client that is not a trusted proxy is served
// as it is, and cannot claim an address with a header.
func TestEdgeProxyProtocol(t *testing.T) {
	needTool(t, "curl")
	needTool(t, "haproxy")
	d := startDeployment(t, "-proxy-protocol", "-trusted-proxies", "127.0.0.1/32")

	t.Run("HAProxy", func(t *testing.T) {
		front := startHAProxy(t, d.edgeAddr)
		_, port, _ := net.SplitHostPort(front)
		// curl connects from 127.0.0.5; HAProxy, from 127.0.0.1, says so.
		args := []string{"-sS", "--max-time", "20", "--cacert", d.caFile, "--interface", "127.0.0.5",
			"--resolve", "ecdsa.e2e.test:" + port + ":127.0.0.1", "https://ecdsa.e2e.test:" + port + "/via-haproxy"}
		out, err := run(t, nil, "curl", args...)
		if err != nil {
			t.Fatalf("curl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		wantLines(t, "curl", out, "client:      127.0.0.5\n", "request:     GET /via-haproxy")
		waitAudit(t, d.auditFile, `"client_address":"127.0.0.5:`)
	})

	t.Run("hand-written v2", func(t *testing.T) {
		conn, err := net.DialTimeout("tcp", d.edgeAddr, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(20 * time.Second))
		if _, err := conn.Write(proxyV2(netip.MustParseAddrPort("203.0.113.7:40000"), netip.MustParseAddrPort(d.edgeAddr))); err != nil {
			t.Fatal(err)
		}
		tc := tls.Client(conn, &tls.Config{ServerName: "p384.e2e.test", RootCAs: readCertPool(t, d.caFile), NextProtos: []string{"http/1.1"}})
		fmt.Fprintf(tc, "GET /hand-written HTTP/1.1\r\nHost: p384.e2e.test\r\nConnection: close\r\n\r\n")
		body, err := io.ReadAll(tc)
		if err != nil {
			t.Fatalf("read: %v\n%s", err, body)
		}
		wantLines(t, "response", string(body), "HTTP/1.1 200 OK", "client:      203.0.113.7\n", "request:     GET /hand-written")
		waitAudit(t, d.auditFile, `"client_address":"203.0.113.7:40000"`)
	})

	t.Run("untrusted peer", func(t *testing.T) {
		// Served as it is, by its own address.
		out := curlEdge(t, d, "ecdsa.e2e.test", "--interface", "127.0.0.6")
		wantLines(t, "curl", out, "client:      127.0.0.6\n", "status=200")
		// Its PROXY header is not read: the TLS handshake fails on it.
		conn, err := (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.6")}, Timeout: 10 * time.Second}).Dial("tcp", d.edgeAddr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(20 * time.Second))
		conn.Write(proxyV2(netip.MustParseAddrPort("203.0.113.8:40000"), netip.MustParseAddrPort(d.edgeAddr)))
		tc := tls.Client(conn, &tls.Config{ServerName: "ecdsa.e2e.test", RootCAs: readCertPool(t, d.caFile)})
		if err := tc.Handshake(); err == nil {
			t.Error("handshake after a PROXY header from an untrusted peer succeeded")
		}
	})
}

// startHAProxy runs HAProxy in TCP mode in front of the edge at edgeAddr,
// sending it PROXY v2 headers, and returns its address. It stops at the
// end of the test.
func startHAProxy(t *testing.T, edgeAddr string) string {
	t.Helper()
	addr := freeAddr(t)
	cfg := filepath.Join(t.TempDir(), "haproxy.cfg")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`global
  maxconn 64
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend edge_front
  bind %s
  default_backend edges
backend edges
  server edge1 %s send-proxy-v2
`, addr, edgeAddr)), 0o600)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	cmd := exec.CommandContext(ctx, "haproxy", "-db", "-f", cfg)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("start haproxy: %v", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		cancel()
		if t.Failed() {
			t.Logf("haproxy output:\n%s", out)
		}
	})
	for deadline := time.Now().Add(20 * time.Second); ; {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return addr
		}
		select {
		case <-done:
			t.Fatalf("haproxy exited:\n%s", out)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("haproxy did not listen on %s within 20 s:\n%s", addr, out)
		}
	}
}

// waitAudit waits until the audit trail at path contains want.
func waitAudit(t *testing.T, path, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("audit trail lacks %s:\n%s", want, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestEdgeTCPOriginProxyProtocol: in TCP mode with -origin-proxy-protocol
// 2, the origin reads a PROXY v2 header naming the client (openssl
// s_client) before its bytes.
func TestEdgeTCPOriginProxyProtocol(t *testing.T) {
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
				r := bufio.NewReader(c)
				h, err := proxyproto.Read(r)
				if err != nil {
					fmt.Fprintf(c, "no PROXY header: %v\n", err)
					return
				}
				line, _ := r.ReadString('\n')
				fmt.Fprintf(c, "PROXY v%d from %s to %s, then %q\n", h.Version, h.SourceAddr, h.DestinationAddr, line)
			}()
		}
	}()
	d := startDeployment(t)
	_, addr := d.startEdge(t, d.link.edgeCert, d.link.edgeKey, "-tcp-origin", ln.Addr().String(), "-origin-proxy-protocol", "2")
	cmd := exec.Command("openssl", "s_client", "-quiet", "-connect", addr, "-servername", "ecdsa.e2e.test",
		"-CAfile", d.caFile, "-verify_return_error")
	cmd.Stdin = strings.NewReader("hello origin\n")
	outb, err := cmd.CombinedOutput()
	out := string(outb)
	if err != nil {
		t.Fatalf("openssl s_client: %v\n%s", err, out)
	}
	wantLines(t, "openssl s_client", out, "PROXY v2 from 127.0.0.1:", "to "+addr+`, then "hello origin\n"`)
}
