package tlscore

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"
)

// originSeen is what the test origin reports about a request.
type originSeen struct {
	Path    string
	Host    string
	Headers map[string]string
}

// newEchoOrigin returns an origin that answers with what it saw.
func newEchoOrigin(t *testing.T) *url.URL {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen := originSeen{Path: r.URL.Path, Host: r.Host, Headers: make(map[string]string)}
		for h, v := range r.Header {
			seen.Headers[h] = strings.Join(v, ",")
		}
		json.NewEncoder(w).Encode(seen)
	}))
	t.Cleanup(srv.Close)
	u, err := url.Parse(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// startHTTPEdge serves h with ServeHTTP on a loopback listener. stop cancels
// the serving context and returns ServeHTTP's result.
func startHTTPEdge(t *testing.T, sc *tls.Config, h http.Handler, grace time.Duration) (addr string, stop func() error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- ServeHTTP(ctx, ln, sc, h, grace, nil) }()
	var result error
	stopped := false
	stop = func() error {
		if !stopped {
			stopped = true
			cancel()
			select {
			case result = <-done:
			case <-time.After(defaultTestTimeout):
				t.Fatal("ServeHTTP did not return after its context ended")
			}
		}
		return result
	}
	t.Cleanup(func() { stop() })
	return ln.Addr().String(), stop
}

// httpClient returns a client that reaches every host name at addr, over
// HTTP/1.1 only or HTTP/2 only.
func httpClient(t *testing.T, env *testEnv, addr string, h2 bool, maxVersion uint16) *http.Client {
	t.Helper()
	var protos http.Protocols
	protos.SetHTTP1(!h2)
	protos.SetHTTP2(h2)
	tr := &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: env.pki.CA.Pool, MaxVersion: maxVersion},
		Protocols:       &protos,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		},
	}
	// Before the edge's shutdown (cleanups run last first): an HTTP/2
	// server otherwise waits a second for the client to leave.
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Timeout: defaultTestTimeout, Transport: tr}
}

func TestReverseProxy(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	sc := env.serverConfig(t, legacyName)
	origin := newEchoOrigin(t)
	origin.Path = "/base"
	addr, _ := startHTTPEdge(t, sc, mustProxy(t, ProxyConfig{Routes: []Route{{Origin: origin}}, Logger: nil}), time.Second)

	tests := []struct {
		name        string
		host        string
		h2          bool
		maxVersion  uint16
		wantProto   string
		wantVersion string
	}{
		{"HTTP1/TLS13", "p256.example.com", false, 0, "HTTP/1.1", "TLS 1.3"},
		{"HTTP2/TLS13", "p256.example.com", true, 0, "HTTP/2.0", "TLS 1.3"},
		{"HTTP2/TLS12", "rsa.example.com", true, tls.VersionTLS12, "HTTP/2.0", "TLS 1.2"},
		// Served by the config GetConfigForClient returns.
		{"HTTP2/RSA-kex-name", legacyName, true, 0, "HTTP/2.0", "TLS 1.3"},
		{"HTTP2/RSA-kex-name/TLS12", legacyName, true, tls.VersionTLS12, "HTTP/2.0", "TLS 1.2"},
		{"HTTP1/RSA-kex-name", legacyName, false, 0, "HTTP/1.1", "TLS 1.3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := http.NewRequestWithContext(t.Context(), "GET", "https://"+tt.host+"/hello", nil)
			if err != nil {
				t.Fatal(err)
			}
			// Spoofed values must not reach the origin.
			req.Header.Set(HeaderServerName, "evil.example.com")
			req.Header.Set(HeaderTLSVersion, "SSL 2.0")
			req.Header.Set("X-Forwarded-For", "192.0.2.66")
			// And lookalikes that CGI-style origins read the same.
			spoofs := map[string]string{
				"X_Forwarded_For":       "192.0.2.67",
				"X-Real-Ip":             "192.0.2.68",
				"X_Keyless_Server_Name": "evil2.example.com",
				"Forwarded":             "for=192.0.2.69",
			}
			for k, v := range spoofs {
				req.Header[k] = []string{v}
			}
			resp, err := httpClient(t, env, addr, tt.h2, tt.maxVersion).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK || resp.Proto != tt.wantProto {
				t.Fatalf("response = %s %s, want 200 over %s", resp.Proto, resp.Status, tt.wantProto)
			}
			var seen originSeen
			if err := json.NewDecoder(resp.Body).Decode(&seen); err != nil {
				t.Fatal(err)
			}
			want := map[string]string{
				"X-Forwarded-For":   "127.0.0.1",
				"X-Forwarded-Host":  tt.host,
				"X-Forwarded-Proto": "https",
				HeaderServerName:    tt.host,
				HeaderTLSVersion:    tt.wantVersion,
			}
			for h, w := range want {
				if got := seen.Headers[http.CanonicalHeaderKey(h)]; got != w {
					t.Errorf("origin saw %s: %q, want %q", h, got, w)
				}
			}
			for name, v := range seen.Headers {
				for k, spoof := range spoofs {
					if v == spoof {
						t.Errorf("origin saw %s: %q, sent by the client as %s", name, v, k)
					}
				}
			}
			if seen.Path != "/base/hello" || seen.Host != tt.host {
				t.Errorf("origin saw Host %q path %q, want %q %q", seen.Host, seen.Path, tt.host, "/base/hello")
			}
		})
	}
}

// TestServeHTTPHeaderLimit: request headers beyond 64 KiB are refused, over
// HTTP/1.1 and HTTP/2, and ones within it pass.
func TestServeHTTPHeaderLimit(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	addr, _ := startHTTPEdge(t, env.serverConfig(t), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}), time.Second)
	for _, h2 := range []bool{false, true} {
		for _, tt := range []struct {
			size int
			ok   bool
		}{{32 << 10, true}, {96 << 10, false}} {
			req, err := http.NewRequestWithContext(t.Context(), "GET", "https://p256.example.com/", nil)
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("X-Filler", strings.Repeat("f", tt.size))
			resp, err := httpClient(t, env, addr, h2, 0).Do(req)
			if err == nil {
				resp.Body.Close()
			}
			if ok := err == nil && resp.StatusCode == http.StatusOK; ok != tt.ok {
				t.Errorf("HTTP/2 %t, %d bytes of headers: %v, %v; want accepted %t", h2, tt.size, resp, err, tt.ok)
			}
		}
	}
}

// TestReverseProxyStreaming checks that the origin's first write reaches the
// client before the origin finishes.
func TestReverseProxyStreaming(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	more := make(chan struct{})
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first\n")
		w.(http.Flusher).Flush()
		select {
		case <-more:
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, "second\n")
	}))
	t.Cleanup(origin.Close)
	u, _ := url.Parse(origin.URL)
	addr, _ := startHTTPEdge(t, env.serverConfig(t), mustProxy(t, ProxyConfig{Routes: []Route{{Origin: u}}, Logger: nil}), time.Second)
	for _, h2 := range []bool{false, true} {
		t.Run(map[bool]string{false: "HTTP1", true: "HTTP2"}[h2], func(t *testing.T) {
			resp, err := httpClient(t, env, addr, h2, 0).Get("https://p256.example.com/stream")
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			r := bufio.NewReader(resp.Body)
			line, err := r.ReadString('\n')
			if err != nil || line != "first\n" {
				t.Fatalf("first line = %q, %v", line, err)
			}
			more <- struct{}{} // the origin is still running: the first line was streamed
			if rest, err := io.ReadAll(r); err != nil || string(rest) != "second\n" {
				t.Errorf("rest = %q, %v", rest, err)
			}
		})
	}
}

func TestReverseProxyOriginDown(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := &url.URL{Scheme: "http", Host: ln.Addr().String()}
	logger, logs := newTestLogger()
	addr, _ := startHTTPEdge(t, env.serverConfig(t), mustProxy(t, ProxyConfig{Routes: []Route{{Origin: down}}, Logger: logger}), time.Second)
	ln.Close() // only now, so that the edge cannot have been given its port
	for _, h2 := range []bool{false, true} {
		resp, err := httpClient(t, env, addr, h2, 0).Get("https://p256.example.com/")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadGateway || !strings.Contains(string(body), "502 Bad Gateway") {
			t.Errorf("response = %s %q, want 502 with a short body", resp.Status, body)
		}
	}
	if n := strings.Count(logs.String(), "origin request failed"); n != 2 {
		t.Errorf("%d log lines for 2 failed requests, want 2; log:\n%s", n, logs)
	}
}

// TestServeHTTPShutdown checks that a request in progress when the context
// ends finishes, and that one that outlives the grace period is cut off.
func TestServeHTTPShutdown(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	sc := env.serverConfig(t)
	tests := []struct {
		name    string
		grace   time.Duration
		release bool // whether the origin answers after the shutdown starts
	}{
		{"finishes-within-grace", 5 * time.Second, true},
		// Long enough that the checks below run before it expires, even
		// on a loaded machine.
		{"grace-expires", 1500 * time.Millisecond, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			arrived, release := make(chan struct{}), make(chan struct{})
			h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				close(arrived)
				select {
				case <-release:
					io.WriteString(w, "done")
				case <-r.Context().Done():
				}
			})
			addr, stop := startHTTPEdge(t, sc, h, tt.grace)
			type result struct {
				body string
				err  error
			}
			got := make(chan result, 1)
			go func() {
				resp, err := httpClient(t, env, addr, false, 0).Get("https://p256.example.com/slow")
				if err != nil {
					got <- result{err: err}
					return
				}
				defer resp.Body.Close()
				b, err := io.ReadAll(resp.Body)
				got <- result{string(b), err}
			}()
			<-arrived
			stopped := make(chan error, 1)
			start := time.Now()
			go func() { stopped <- stop() }()
			// New connections are refused once shutdown has begun.
			deadline := time.Now().Add(defaultTestTimeout)
			for {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					break
				}
				c.Close()
				if time.Now().After(deadline) {
					t.Fatal("the listener still accepts after shutdown began")
				}
				time.Sleep(10 * time.Millisecond)
			}
			select {
			case err := <-stopped:
				t.Fatalf("ServeHTTP returned %v with a request in progress", err)
			default:
			}
			if tt.release {
				close(release)
				if r := <-got; r.err != nil || r.body != "done" {
					t.Errorf("in-flight request = %q, %v; want it to finish", r.body, r.err)
				}
				if err := <-stopped; err != nil {
					t.Errorf("ServeHTTP() = %v, want nil after a clean shutdown", err)
				}
				return
			}
			err := <-stopped
			if err == nil || !strings.Contains(err.Error(), "grace period") {
				t.Errorf("ServeHTTP() = %v, want a grace-period error", err)
			}
			if elapsed := time.Since(start); elapsed > tt.grace+2*time.Second {
				t.Errorf("shutdown took %v with a %v grace period", elapsed, tt.grace)
			}
			if r := <-got; r.err == nil {
				t.Errorf("the cut-off request succeeded with %q", r.body)
			}
		})
	}
}

// startTCPEdge runs ServeTCP in front of origin on a loopback listener.
func startTCPEdge(t *testing.T, env *testEnv, origin string, grace time.Duration, opts ...ServeOption) (addr string, stop func() error) {
	t.Helper()
	sc, err := NewServerTLSConfig(ServerConfig{Certificates: env.newStore(t, CertStoreConfig{}), NextProtos: []string{}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- ServeTCP(ctx, ln, sc, origin, grace, nil, opts...) }()
	var result error
	stopped := false
	stop = func() error {
		if !stopped {
			stopped = true
			cancel()
			select {
			case result = <-done:
			case <-time.After(defaultTestTimeout):
				t.Fatal("ServeTCP did not return after its context ended")
			}
		}
		return result
	}
	t.Cleanup(func() { stop() })
	return ln.Addr().String(), stop
}

// startEchoUntilEOF runs an origin that reads until the client half-closes,
// then answers "echo:" and what it read, and closes.
func startEchoUntilEOF(t *testing.T) string {
	t.Helper()
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
				b, err := io.ReadAll(c)
				if err != nil {
					return
				}
				c.Write(append([]byte("echo:"), b...))
			}()
		}
	}()
	return ln.Addr().String()
}

func dialEdge(t *testing.T, env *testEnv, addr string) *tls.Conn {
	t.Helper()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: defaultTestTimeout}, "tcp", addr, env.clientConfig("p384.example.com", 0, 0))
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(defaultTestTimeout))
	return c
}

func TestServeTCP(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	addr, stop := startTCPEdge(t, env, startEchoUntilEOF(t), time.Second)
	for _, payload := range []string{"ping", strings.Repeat("x", 1<<20)} {
		c := dialEdge(t, env, addr)
		if p := c.ConnectionState().NegotiatedProtocol; p != "" {
			t.Errorf("ALPN protocol %q negotiated by a TCP edge with ALPN off", p)
		}
		if _, err := io.WriteString(c, payload); err != nil {
			t.Fatal(err)
		}
		if err := c.CloseWrite(); err != nil { // half-close: the origin sees EOF
			t.Fatal(err)
		}
		got, err := io.ReadAll(c) // ends when the origin's close arrives
		c.Close()
		if err != nil || string(got) != "echo:"+payload {
			t.Errorf("read %d bytes (%v), want %d bytes of echo", len(got), err, len("echo:"+payload))
		}
	}
	if err := stop(); err != nil {
		t.Errorf("ServeTCP() = %v, want nil", err)
	}
}

// TestServeTCPIdleTimeout: a connection on which nothing moves is closed
// after the idle timeout, not before; one busy in a single direction for
// longer is not.
func TestServeTCPIdleTimeout(t *testing.T) {
	const idle = time.Second
	env := newTestEnv(t, envOptions{})
	addr, _ := startTCPEdge(t, env, startEchoUntilEOF(t), time.Second, WithIdleTimeout(idle))

	t.Run("quiet", func(t *testing.T) {
		start := time.Now() // before the edge can start counting
		c := dialEdge(t, env, addr)
		defer c.Close()
		n, err := c.Read(make([]byte, 1))
		if took := time.Since(start); n != 0 || err == nil || took < idle {
			t.Fatalf("Read() = %d, %v after %v; want the connection closed after %v", n, err, took, idle)
		}
	})
	t.Run("busy one way", func(t *testing.T) {
		c := dialEdge(t, env, addr)
		defer c.Close()
		var sent strings.Builder
		for i := 0; i < 25; i++ { // a byte every 100 ms: 2.5 idle timeouts
			if _, err := io.WriteString(c, "b"); err != nil {
				t.Fatalf("write %d: %v", i, err)
			}
			sent.WriteString("b")
			time.Sleep(100 * time.Millisecond)
		}
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if got, err := io.ReadAll(c); err != nil || string(got) != "echo:"+sent.String() {
			t.Fatalf("read %q, %v; want the echo", got, err)
		}
	})
	t.Run("busy the other way", func(t *testing.T) {
		// An origin that talks to a silent client: the edge's reads of the
		// client's tls.Conn time out and go on.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			for range 25 {
				if _, err := io.WriteString(c, "o"); err != nil {
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
		}()
		addr, _ := startTCPEdge(t, env, ln.Addr().String(), time.Second, WithIdleTimeout(idle))
		c := dialEdge(t, env, addr)
		defer c.Close()
		if got, err := io.ReadAll(c); err != nil || string(got) != strings.Repeat("o", 25) {
			t.Fatalf("read %q, %v; want 25 bytes", got, err)
		}
	})
}

// TestServeTCPShutdown checks that connections open when the context ends
// may finish within the grace period and are closed after it.
func TestServeTCPShutdown(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	for _, finish := range []bool{true, false} {
		t.Run(map[bool]string{true: "finishes-within-grace", false: "grace-expires"}[finish], func(t *testing.T) {
			grace := 300 * time.Millisecond
			if finish {
				grace = 5 * time.Second
			}
			addr, stop := startTCPEdge(t, env, startEchoUntilEOF(t), grace)
			c := dialEdge(t, env, addr)
			defer c.Close()
			if _, err := io.WriteString(c, "in flight"); err != nil {
				t.Fatal(err)
			}
			stopped := make(chan error, 1)
			go func() { stopped <- stop() }()
			// The listener closes while the connection stays up.
			deadline := time.Now().Add(defaultTestTimeout)
			for {
				nc, err := net.Dial("tcp", addr)
				if err != nil {
					break
				}
				nc.Close()
				if time.Now().After(deadline) {
					t.Fatal("the listener still accepts after shutdown began")
				}
				time.Sleep(10 * time.Millisecond)
			}
			if !finish {
				err := <-stopped
				if err == nil || !strings.Contains(err.Error(), "1 TCP connections") {
					t.Errorf("ServeTCP() = %v, want an error about 1 connection cut off", err)
				}
				if _, err := c.Read(make([]byte, 1)); err == nil {
					t.Errorf("read on a cut-off connection = %v, want an error", err)
				}
				return
			}
			if err := c.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(c)
			if err != nil || string(got) != "echo:in flight" {
				t.Errorf("in-flight connection read %q, %v", got, err)
			}
			if err := <-stopped; err != nil {
				t.Errorf("ServeTCP() = %v, want nil after a clean shutdown", err)
			}
		})
	}
}
