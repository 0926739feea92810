package tlscore

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
	"github.com/prometheus/client_golang/prometheus"
)

func mustProxy(t *testing.T, cfg ProxyConfig) *Proxy {
	t.Helper()
	p, err := NewProxy(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// getSeen makes a GET for url through client and returns the status, the
// body, and what the echo origin saw if it answered.
func getSeen(t *testing.T, client *http.Client, url string, hdr http.Header) (int, string, originSeen) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), "GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var seen originSeen
	if resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(body, &seen); err != nil {
			t.Fatalf("origin's answer %q: %v", body, err)
		}
	}
	return resp.StatusCode, string(body), seen
}

// TestProxyRoutes: requests go to the origin of their Host's route, exact
// or wildcard, with the client's Host or the route's; a host no route
// names gets 421 until a default route is set.
func TestProxyRoutes(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	reg := prometheus.NewRegistry()
	metrics := NewMetrics(reg)
	a, b := newEchoOrigin(t), newEchoOrigin(t)
	a.Path, b.Path = "/a", "/b"
	p := mustProxy(t, ProxyConfig{Metrics: metrics, Routes: []Route{
		{Hosts: []string{"p256.example.com"}, Origin: a},
		{Name: "wild", Hosts: []string{"*.wild.example.com"}, Origin: b, HostHeader: "internal.b:8080"},
	}})
	addr, _ := startHTTPEdge(t, env.serverConfig(t), p, time.Second)

	for _, h2 := range []bool{false, true} {
		client := httpClient(t, env, addr, h2, 0)
		tests := []struct {
			url, wantPath, wantHost string
			wantStatus              int
		}{
			{"https://p256.example.com/x", "/a/x", "p256.example.com", 200},
			{"https://P256.example.com:443/y", "/a/y", "P256.example.com:443", 200},
			{"https://www.wild.example.com/x", "/b/x", "internal.b:8080", 200},
			{"https://rsa.example.com/x", "", "", http.StatusMisdirectedRequest},
		}
		for _, tt := range tests {
			status, body, seen := getSeen(t, client, tt.url, nil)
			if status != tt.wantStatus || seen.Path != tt.wantPath || seen.Host != tt.wantHost {
				t.Errorf("h2=%v GET %s = %d, origin saw path %q Host %q; want %d, %q, %q (body %q)", h2, tt.url, status, seen.Path, seen.Host, tt.wantStatus, tt.wantPath, tt.wantHost, body)
			}
			if status == http.StatusMisdirectedRequest && !strings.Contains(body, "no origin is configured for this host name") {
				t.Errorf("421 body = %q, want it to say why", body)
			}
		}
	}
	if v, _ := metricValue(t, reg, "keyless_edge_origin_errors_total", map[string]string{"route": "none", "reason": "no_route"}); v != 2 {
		t.Errorf("origin_errors_total{no_route} = %v, want 2", v)
	}

	// A reload: a default route; the wildcard now goes to a.
	if err := p.SetRoutes([]Route{{Hosts: []string{"p256.example.com"}, Origin: b}, {Origin: a}}); err != nil {
		t.Fatal(err)
	}
	if err := p.SetRoutes([]Route{{Origin: a}, {Origin: b}}); err == nil {
		t.Fatal("SetRoutes with two defaults succeeded")
	}
	client := httpClient(t, env, addr, true, 0)
	for url, want := range map[string]string{"https://p256.example.com/x": "/b/x", "https://rsa.example.com/x": "/a/x", "https://www.wild.example.com/x": "/a/x"} {
		if status, body, seen := getSeen(t, client, url, nil); status != 200 || seen.Path != want {
			t.Errorf("after reload, GET %s = %d %q, origin path %q, want 200 and %q", url, status, body, seen.Path, want)
		}
	}
}

// TestProxyForwardedHeaders: X-Forwarded-For and Forwarded are extended
// for a trusted peer and replaced for anyone else; lookalikes are dropped
// either way.
func TestProxyForwardedHeaders(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	origin := newEchoOrigin(t)
	sc := env.serverConfig(t)
	tests := []struct {
		name, trusted, wantXFF, wantForwarded string
	}{
		{"trusted", "127.0.0.0/8", "198.51.100.1, 198.51.100.2, 127.0.0.1", "for=198.51.100.1, for=127.0.0.1;host=p256.example.com;proto=https"},
		{"untrusted", "192.0.2.0/24", "127.0.0.1", "for=127.0.0.1;host=p256.example.com;proto=https"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			trusted, err := ParseTrustedProxies(tt.trusted)
			if err != nil {
				t.Fatal(err)
			}
			p := mustProxy(t, ProxyConfig{Routes: []Route{{Origin: origin}}, TrustedProxies: trusted, Forwarded: true})
			addr, _ := startHTTPEdge(t, sc, p, time.Second)
			hdr := http.Header{
				"X-Forwarded-For": {"198.51.100.1", "198.51.100.2"},
				"Forwarded":       {"for=198.51.100.1"},
				"X_Forwarded_For": {"192.0.2.99"},
				"X-Real-Ip":       {"192.0.2.98"},
			}
			for _, h2 := range []bool{false, true} {
				status, body, seen := getSeen(t, httpClient(t, env, addr, h2, 0), "https://p256.example.com/", hdr)
				if status != 200 {
					t.Fatalf("status %d %q", status, body)
				}
				want := map[string]string{"X-Forwarded-For": tt.wantXFF, "Forwarded": tt.wantForwarded, "X-Forwarded-Proto": "https", "X-Forwarded-Host": "p256.example.com"}
				for k, w := range want {
					if got := seen.Headers[k]; got != w {
						t.Errorf("h2=%v origin saw %s: %q, want %q", h2, k, got, w)
					}
				}
				for k, v := range seen.Headers {
					if strings.Contains(v, "192.0.2.9") {
						t.Errorf("origin saw %s: %q, a lookalike the client sent", k, v)
					}
				}
			}
		})
	}
}

// TestProxyOriginErrors: an unreachable origin gets 502, one that does not
// answer in time 504, each with a body saying so, each counted by route
// and reason.
func TestProxyOriginErrors(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	reg := prometheus.NewRegistry()
	// Closed before the edge starts: nothing listens there.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := mustURL(t, "http://"+ln.Addr().String())
	ln.Close()
	// Accepts and reads, never answers.
	slowLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { slowLn.Close() })
	go func() {
		for {
			c, err := slowLn.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	slow := mustURL(t, "http://"+slowLn.Addr().String())
	logger, logs := newTestLogger()
	p := mustProxy(t, ProxyConfig{
		Routes:          []Route{{Name: "down", Hosts: []string{"p256.example.com"}, Origin: down}, {Name: "slow", Hosts: []string{"rsa.example.com"}, Origin: slow}},
		ResponseTimeout: 200 * time.Millisecond,
		Metrics:         NewMetrics(reg),
		Logger:          logger,
	})
	addr, _ := startHTTPEdge(t, env.serverConfig(t), p, time.Second)
	tests := []struct {
		url, route, reason string
		status             int
		body               string
	}{
		{"https://p256.example.com/", "down", "unreachable", 502, "502 Bad Gateway: the origin server could not be reached\n"},
		{"https://rsa.example.com/", "slow", "timeout", 504, "504 Gateway Timeout: the origin server did not answer in time\n"},
	}
	for _, tt := range tests {
		for _, h2 := range []bool{false, true} {
			status, body, _ := getSeen(t, httpClient(t, env, addr, h2, 0), tt.url, nil)
			if status != tt.status || body != tt.body {
				t.Errorf("h2=%v GET %s = %d %q, want %d %q", h2, tt.url, status, body, tt.status, tt.body)
			}
		}
		if v, _ := metricValue(t, reg, "keyless_edge_origin_errors_total", map[string]string{"route": tt.route, "reason": tt.reason}); v != 2 {
			t.Errorf("origin_errors_total{route=%q,reason=%q} = %v, want 2", tt.route, tt.reason, v)
		}
	}
	if n := strings.Count(logs.String(), "origin request failed"); n != 4 {
		t.Errorf("%d log lines for 4 failed requests; log:\n%s", n, logs)
	}
}

// proxyV2Header returns a hand-written PROXY protocol v2 header (PROXY
// command, TCP over IPv4) saying the connection came from src to dst.
func proxyV2Header(src, dst netip.AddrPort) []byte {
	h := []byte("\r\n\r\n\x00\r\nQUIT\n")
	h = append(h, 0x21, 0x11) // version 2, PROXY; AF_INET, STREAM
	h = binary.BigEndian.AppendUint16(h, 12)
	s, d := src.Addr().As4(), dst.Addr().As4()
	h = append(h, s[:]...)
	h = append(h, d[:]...)
	h = binary.BigEndian.AppendUint16(h, src.Port())
	return binary.BigEndian.AppendUint16(h, dst.Port())
}

// TestProxyProtocolListener: behind a trusted load balancer that sends
// PROXY headers (v2, hand-written, and v1), the client address the origin
// and the keyserver see is the one in the header; a header from an
// untrusted peer, or none from a trusted one, fails the connection.
func TestProxyProtocolListener(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	origin := newEchoOrigin(t)
	sc := env.serverConfig(t)
	serve := func(t *testing.T, trusted string) string {
		tp, err := ParseTrustedProxies(trusted)
		if err != nil {
			t.Fatal(err)
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		pln, err := ProxyProtocolListener(ln, tp)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() {
			done <- ServeHTTP(ctx, pln, sc, mustProxy(t, ProxyConfig{Routes: []Route{{Origin: origin}}, TrustedProxies: tp}), time.Second, nil)
		}()
		t.Cleanup(func() { cancel(); <-done })
		return ln.Addr().String()
	}
	// client returns a client whose every connection starts with header.
	client := func(t *testing.T, addr string, header []byte) *http.Client {
		tr := &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: env.pki.CA.Pool},
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				var d net.Dialer
				c, err := d.DialContext(ctx, network, addr)
				if err == nil && header != nil {
					_, err = c.Write(header)
				}
				return c, err
			},
		}
		t.Cleanup(tr.CloseIdleConnections)
		return &http.Client{Timeout: defaultTestTimeout, Transport: tr}
	}

	addr := serve(t, "127.0.0.0/8")
	edgeAddr := netip.MustParseAddrPort(addr)
	for _, tt := range []struct {
		name, want string
		header     []byte
	}{
		{"v2", "203.0.113.9:5555", proxyV2Header(netip.MustParseAddrPort("203.0.113.9:5555"), edgeAddr)},
		{"v1", "203.0.113.10:5556", []byte("PROXY TCP4 203.0.113.10 127.0.0.1 5556 443\r\n")},
	} {
		t.Run(tt.name, func(t *testing.T) {
			status, body, seen := getSeen(t, client(t, addr, tt.header), "https://p256.example.com/", nil)
			if status != 200 {
				t.Fatalf("status %d %q", status, body)
			}
			wantIP, _, _ := net.SplitHostPort(tt.want)
			if got := seen.Headers["X-Forwarded-For"]; got != wantIP {
				t.Errorf("origin saw X-Forwarded-For %q, want %q", got, wantIP)
			}
			if got := env.ks.ops.lastSign().GetContext().GetClientAddress(); got != tt.want {
				t.Errorf("keyserver saw client address %q, want %q", got, tt.want)
			}
		})
	}
	t.Run("trusted peer without header", func(t *testing.T) {
		if _, err := client(t, addr, nil).Get("https://p256.example.com/"); err == nil {
			t.Error("request without a PROXY header from a trusted peer succeeded")
		}
	})
	t.Run("untrusted peer with header", func(t *testing.T) {
		addr := serve(t, "192.0.2.0/24")
		if _, err := client(t, addr, proxyV2Header(netip.MustParseAddrPort("203.0.113.9:5555"), edgeAddr)).Get("https://p256.example.com/"); err == nil {
			t.Error("request with a PROXY header from an untrusted peer succeeded")
		}
		if status, body, seen := getSeen(t, client(t, addr, nil), "https://p256.example.com/", nil); status != 200 || seen.Headers["X-Forwarded-For"] != "127.0.0.1" {
			t.Errorf("plain request from an untrusted peer = %d %q, X-Forwarded-For %q; want 200 from 127.0.0.1", status, body, seen.Headers["X-Forwarded-For"])
		}
	})
	if _, err := ProxyProtocolListener(nil, TrustedProxies{}); err == nil {
		t.Error("ProxyProtocolListener with no trusted proxies succeeded")
	}
}

// TestServeTCPOriginProxyProtocol: with WithOriginProxyProtocol, the TCP
// origin reads a PROXY header of the version asked for, naming the
// client's address, before the client's bytes.
func TestServeTCPOriginProxyProtocol(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	for _, version := range []byte{1, 2} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			r := bufio.NewReader(c)
			h, err := proxyproto.Read(r)
			if err != nil {
				io.WriteString(c, "error: "+err.Error())
				return
			}
			rest, _ := io.ReadAll(r)
			io.WriteString(c, fmtHeader(h)+" "+string(rest))
		}()
		addr, _ := startTCPEdge(t, env, ln.Addr().String(), time.Second, WithOriginProxyProtocol(version))
		c := dialEdge(t, env, addr)
		io.WriteString(c, "hello")
		c.CloseWrite()
		got, err := io.ReadAll(c)
		c.Close()
		want := fmtVersion(version) + " " + c.LocalAddr().String() + "->" + addr + " hello"
		if err != nil || string(got) != want {
			t.Errorf("v%d: origin saw %q (%v), want %q", version, got, err, want)
		}
	}
}

func fmtVersion(v byte) string { return "v" + string('0'+rune(v)) }

func fmtHeader(h *proxyproto.Header) string {
	return fmtVersion(h.Version) + " " + h.SourceAddr.String() + "->" + h.DestinationAddr.String()
}

// TestProxyPoolsOriginConnections: sequential requests reuse one origin
// connection; with MaxIdleConns -1 each opens its own.
func TestProxyPoolsOriginConnections(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	sc := env.serverConfig(t)
	for _, tt := range []struct {
		maxIdle, wantConns int
	}{{0, 1}, {-1, 5}} {
		var mu sync.Mutex
		conns := 0
		srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, `{"Path":"ok"}`) }))
		srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				mu.Lock()
				conns++
				mu.Unlock()
			}
		}
		srv.Start()
		t.Cleanup(srv.Close)
		p := mustProxy(t, ProxyConfig{Routes: []Route{{Origin: mustURL(t, srv.URL)}}, MaxIdleConns: tt.maxIdle})
		addr, _ := startHTTPEdge(t, sc, p, time.Second)
		client := httpClient(t, env, addr, true, 0)
		for range 5 {
			if status, body, seen := getSeen(t, client, "https://p256.example.com/", nil); status != 200 || seen.Path != "ok" {
				t.Fatalf("GET = %d %q, want 200 from the origin", status, body)
			}
		}
		mu.Lock()
		if conns != tt.wantConns {
			t.Errorf("MaxIdleConns %d: origin saw %d connections for 5 sequential requests, want %d", tt.maxIdle, conns, tt.wantConns)
		}
		mu.Unlock()
	}
}
