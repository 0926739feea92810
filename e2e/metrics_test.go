package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

var readyMetrics = regexp.MustCompile(`keyserver ready: .*metrics=(\S+)`)

// scrape returns the text of http://addr/metrics.
func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s\n%s", resp.Status, b)
	}
	return string(b)
}

// metricValue returns the value of the series whose line starts with
// series (name and labels, as exposed), and false if there is none.
func metricValue(text, series string) (float64, bool) {
	for _, line := range strings.Split(text, "\n") {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			return v, err == nil
		}
	}
	return 0, false
}

// httpStatus returns the status code of GET http://addr/path.
func httpStatus(t *testing.T, addr, path string) int {
	t.Helper()
	resp, err := http.Get("http://" + addr + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// waitStatus waits up to 15 s for GET path to answer want.
func waitStatus(t *testing.T, addr, path string, want int) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		got := httpStatus(t, addr, path)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s = %d, want %d", path, got, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestKeyserverMetrics scrapes the keyserver's /metrics after real
// handshakes through an edge, and checks that /readyz turns 503 when the
// token goes away.
func TestKeyserverMetrics(t *testing.T) {
	d := startDeploymentWith(t, []string{"-metrics-listen", "127.0.0.1:0"}, nil)
	addr := d.keyserver.waitFor(t, readyMetrics)[1]
	if got := httpStatus(t, addr, "/healthz"); got != http.StatusOK {
		t.Fatalf("/healthz = %d, want 200", got)
	}
	waitStatus(t, addr, "/readyz", http.StatusOK)

	roots := readCertPool(t, d.caFile)
	const handshakes = 3
	for i := 0; i < handshakes; i++ {
		for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
			conn, err := tls.Dial("tcp", d.edgeAddr, &tls.Config{ServerName: "ecdsa.e2e.test", RootCAs: roots, MinVersion: v, MaxVersion: v})
			if err != nil {
				t.Fatalf("handshake: %v", err)
			}
			conn.Close()
		}
	}
	text := scrape(t, addr)
	for _, want := range []struct {
		series string
		min    float64
	}{
		// The default-deny policy names the edge in no group.
		{`keyless_keyserver_operations_total{identity_group="none",key="ecdsa.e2e.test",op="sign",outcome="OK",scheme="ecdsa_sha256"}`, 2 * handshakes},
		{`keyless_keyserver_operation_duration_seconds_count{op="sign",outcome="OK"}`, 2 * handshakes},
		{`keyless_keyserver_hsm_up`, 1},
		{`keyless_keyserver_keys`, float64(len(webNames))},
		{`keyless_keyserver_hsm_queue_depth`, 0},
		{`keyless_keyserver_hsm_operations_running`, 0},
		{`keyless_keyserver_streams_open`, 1}, // the edge sends its operations on a stream
		{`keyless_keyserver_stream_messages_total{direction="received"}`, 1},
		{`keyless_keyserver_stream_operations_total{direction="received"}`, 2 * handshakes},
		{`keyless_keyserver_stream_messages_total{direction="sent"}`, 1},
		{`keyless_keyserver_stream_operations_total{direction="sent"}`, 2 * handshakes},
		{`keyless_keyserver_hsm_sessions_in_use`, 0},
		{`keyless_keyserver_hsm_sessions`, 7}, // -max-sessions 8, less crypto11's own
		{`go_goroutines`, 1},
	} {
		got, ok := metricValue(text, want.series)
		if !ok || got < want.min {
			t.Errorf("%s = %v (present: %v), want at least %v; keyless series:\n%s", want.series, got, ok, want.min, keylessSeries(text))
		}
	}
	if strings.Contains(text, "127.0.0.1") || strings.Contains(text, "spiffe://") {
		t.Errorf("metrics carry an address or an identity:\n%s", text)
	}

	// A client that is not an edge is refused in the mTLS handshake, and
	// counted.
	if conn, err := tls.Dial("tcp", d.keyserverAddr, &tls.Config{InsecureSkipVerify: true}); err == nil {
		conn.Handshake()
		io.ReadAll(conn)
		conn.Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		text = scrape(t, addr)
		if strings.Contains(text, "keyless_keyserver_handshakes_refused_total{") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no keyless_keyserver_handshakes_refused_total series after a refused handshake")
		}
		time.Sleep(100 * time.Millisecond)
	}

	// The token goes away: the keyserver is no longer ready.
	conf := ""
	for _, e := range d.keyserver.cmd.Env {
		if v, ok := strings.CutPrefix(e, "SOFTHSM2_CONF="); ok {
			conf = v
		}
	}
	tokens := filepath.Join(filepath.Dir(conf), "tokens")
	if err := os.Rename(tokens, tokens+".away"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Rename(tokens+".away", tokens) })
	waitStatus(t, addr, "/readyz", http.StatusServiceUnavailable)
	if got, _ := metricValue(scrape(t, addr), "keyless_keyserver_hsm_up"); got != 0 {
		t.Errorf("keyless_keyserver_hsm_up = %v with the token gone, want 0", got)
	}
	if err := os.Rename(tokens+".away", tokens); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, addr, "/readyz", http.StatusOK)
}

// keylessSeries returns the keyless_ lines of a scrape, for messages.
func keylessSeries(text string) string {
	var out []string
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, "keyless_") {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}

var readyEdgeMetrics = regexp.MustCompile(`edge ready: .*metrics=(\S+)`)

// TestEdgeMetrics scrapes the edge's /metrics after real handshakes (TLS
// 1.2, TLS 1.3 and a resumption), and checks that /readyz turns 503 when
// the keyserver stops.
func TestEdgeMetrics(t *testing.T) {
	d := startDeploymentWith(t, nil, []string{"-metrics-listen", "127.0.0.1:0"})
	addr := d.edge.waitFor(t, readyEdgeMetrics)[1]
	if got := httpStatus(t, addr, "/healthz"); got != http.StatusOK {
		t.Fatalf("/healthz = %d, want 200", got)
	}
	waitStatus(t, addr, "/readyz", http.StatusOK)

	roots := readCertPool(t, d.caFile)
	const handshakes = 2
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		cache := tls.NewLRUClientSessionCache(4)
		for i := 0; i < handshakes; i++ {
			conn, err := tls.Dial("tcp", d.edgeAddr, &tls.Config{ServerName: "ecdsa.e2e.test", RootCAs: roots, MinVersion: v, MaxVersion: v, ClientSessionCache: cache})
			if err != nil {
				t.Fatalf("handshake: %v", err)
			}
			// A request, so that TLS 1.3 session tickets arrive.
			io.WriteString(conn, "GET / HTTP/1.1\r\nHost: ecdsa.e2e.test\r\nConnection: close\r\n\r\n")
			io.ReadAll(conn)
			conn.Close()
		}
	}
	var text string
	deadline := time.Now().Add(5 * time.Second)
	for {
		text = scrape(t, addr)
		v12, _ := metricValue(text, `keyless_edge_handshakes_total{key_type="ecdsa_p256",outcome="ok",resumed="false",version="1.2"}`)
		v13, _ := metricValue(text, `keyless_edge_handshakes_total{key_type="ecdsa_p256",outcome="ok",resumed="false",version="1.3"}`)
		if v12 >= 1 && v13 >= 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	var resumed float64
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, "keyless_edge_handshakes_total{") && strings.Contains(line, `outcome="ok",resumed="true"`) {
			_, v, _ := strings.Cut(line, "} ")
			f, _ := strconv.ParseFloat(v, 64)
			resumed += f
		}
	}
	if resumed < 1 {
		t.Errorf("resumed handshakes = %v, want at least 1; keyless series:\n%s", resumed, keylessSeries(text))
	}
	for _, want := range []struct {
		series string
		min    float64
	}{
		{`keyless_edge_handshakes_total{key_type="ecdsa_p256",outcome="ok",resumed="false",version="1.2"}`, 1},
		{`keyless_edge_handshakes_total{key_type="ecdsa_p256",outcome="ok",resumed="false",version="1.3"}`, 1},
		{`keyless_edge_certificates_loaded`, float64(len(webNames))},
		{`keyless_edge_keyserver_call_duration_seconds_count{keyserver="` + d.keyserverAddr + `",method="Sign"}`, 2},
		{`keyless_edge_keyserver_call_duration_seconds_count{keyserver="` + d.keyserverAddr + `",method="ListKeys"}`, 1},
	} {
		got, ok := metricValue(text, want.series)
		if !ok || got < want.min {
			t.Errorf("%s = %v (present: %v), want at least %v; keyless series:\n%s", want.series, got, ok, want.min, keylessSeries(text))
		}
	}
	if got, _ := metricValue(text, `keyless_edge_certificates_loaded`); got != float64(len(webNames)) {
		t.Errorf("keyless_edge_certificates_loaded = %v, want %d", got, len(webNames))
	}
	for _, n := range webNames {
		leaf := readCertPEM(t, filepath.Join(d.certsDir, n.name+".pem"))
		got, ok := metricValue(text, `keyless_edge_certificate_expiry_timestamp_seconds{name="`+n.name+`"}`)
		if !ok || got != float64(leaf.NotAfter.Unix()) {
			t.Errorf("expiry of %s = %v (present: %v), want %d", n.name, got, ok, leaf.NotAfter.Unix())
		}
	}

	// The keyserver stops: the edge is no longer ready.
	d.keyserver.stop(t)
	waitStatus(t, addr, "/readyz", http.StatusServiceUnavailable)
	if got := httpStatus(t, addr, "/healthz"); got != http.StatusOK {
		t.Errorf("/healthz = %d with the keyserver down, want 200", got)
	}
}

// readCertPEM reads the first certificate of a PEM file.
func readCertPEM(t *testing.T, file string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(b)
	if block == nil {
		t.Fatalf("%s: no PEM", file)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestEdgeDrain stops an edge started with -drain-delay: for the delay its
// /readyz answers 503 while it still completes handshakes and requests;
// then it stops.
func TestEdgeDrain(t *testing.T) {
	const delay = 3 * time.Second
	d := startDeploymentWith(t, nil, []string{"-metrics-listen", "127.0.0.1:0", "-drain-delay", delay.String()})
	addr := d.edge.waitFor(t, readyEdgeMetrics)[1]
	waitStatus(t, addr, "/readyz", http.StatusOK)

	start := time.Now()
	d.edge.cmd.Process.Signal(syscall.SIGTERM)
	waitStatus(t, addr, "/readyz", http.StatusServiceUnavailable)
	roots := readCertPool(t, d.caFile)
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: roots},
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", d.edgeAddr)
		},
	}}
	resp, err := client.Get(d.url("ecdsa.e2e.test"))
	if err != nil {
		t.Fatalf("a request while draining: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("a request while draining: %s, want 200", resp.Status)
	}
	if time.Since(start) >= delay {
		t.Fatalf("the checks took %v, longer than the drain delay; the test proves nothing", time.Since(start))
	}
	select {
	case <-d.edge.done:
	case <-time.After(delay + 15*time.Second):
		t.Fatal("the edge did not stop after the drain delay")
	}
	if took := time.Since(start); took < delay {
		t.Errorf("the edge stopped %v after SIGTERM, before the drain delay of %v", took, delay)
	}
	if !strings.Contains(d.edge.out.String(), "draining") {
		t.Errorf("the edge did not log that it was draining:\n%s", d.edge.out.String())
	}
}
