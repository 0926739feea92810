package tlscore

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyless-tls/keyless/internal/pkitest"
	"github.com/keyless-tls/keyless/link"
)

// readLines returns the JSON lines of the access log at path.
func readLines(t *testing.T, path string) []map[string]any {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("access log line %q is not JSON: %v", sc.Text(), err)
		}
		out = append(out, m)
	}
	return out
}

// waitLines waits until the access log at path has n lines of type typ,
// and returns them.
func waitLines(t *testing.T, path, typ string, n int) []map[string]any {
	t.Helper()
	var got []map[string]any
	for deadline := time.Now().Add(defaultTestTimeout); ; time.Sleep(10 * time.Millisecond) {
		got = got[:0]
		for _, l := range readLines(t, path) {
			if l["type"] == typ {
				got = append(got, l)
			}
		}
		if len(got) >= n || time.Now().After(deadline) {
			break
		}
	}
	if len(got) != n {
		t.Fatalf("%d access log lines of type %s, want %d", len(got), typ, n)
	}
	return got
}

// TestAccessLogHTTP: one line per request through the reverse proxy, with
// the handshake's key id and keyserver, without the query string; request
// metrics by configured name; failed handshakes logged, rate-limited;
// Reopen starts a new file.
func TestAccessLogHTTP(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	client := dialTestClient(t, env.pki, ClientConfig{Metrics: m}, map[string]*testKeyserver{"ks1.test:443": env.ks})
	store, err := NewCertStore(CertStoreConfig{Client: client, Metrics: m, Default: "p384.pem"})
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Load(t.Context(), env.dir); err != nil {
		t.Fatal(err)
	}
	sc, err := NewServerTLSConfig(ServerConfig{Certificates: store, Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "access.log")
	al, err := OpenAccessLog(AccessLogConfig{Path: path, HandshakeErrorsPerSecond: 3})
	if err != nil {
		t.Fatal(err)
	}
	defer al.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		done <- ServeHTTP(ctx, ln, sc, mustProxy(t, ProxyConfig{Routes: []Route{{Origin: newEchoOrigin(t)}}}), 0, nil, WithMetrics(m), WithAccessLog(al))
	}()
	t.Cleanup(func() { cancel(); <-done })
	addr := ln.Addr().String()

	resp, err := httpClient(t, env, addr, true, tls.VersionTLS13).Post("https://x.wild.example.com/a/b?token=secret", "text/plain", strings.NewReader("12345"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	// TLS 1.2 with the default certificate, for a name no certificate
	// covers.
	hc := httpClient(t, env, addr, false, tls.VersionTLS12)
	hc.Transport.(*http.Transport).TLSClientConfig.InsecureSkipVerify = true // the default certificate names p384.example.com
	resp, err = hc.Get("https://nothing.example.org/c")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()

	lines := waitLines(t, path, "http", 2)
	l := lines[0]
	want := map[string]any{
		"server_name": "x.wild.example.com", "tls_version": "1.3", "cipher": "TLS_AES_128_GCM_SHA256", "resumed": false,
		"alpn": "h2", "protocol": "HTTP/2.0", "method": "POST", "host": "x.wild.example.com", "path": "/a/b",
		"status": float64(200), "bytes_in": float64(5), "bytes_out": float64(len(body)),
		"key_id": link.FormatKeyID(mustKeyID(t, pkitest.P256Key().Public())), "keyserver": "ks1.test:443",
	}
	for k, v := range want {
		if l[k] != v {
			t.Errorf("HTTP/2 line: %s = %#v, want %#v (line %v)", k, l[k], v, l)
		}
	}
	for _, k := range []string{"time", "client", "duration", "upstream_duration"} {
		if _, ok := l[k].(string); k == "time" && !ok {
			t.Errorf("HTTP/2 line: %s = %#v, want a string", k, l[k])
		}
		if _, ok := l[k].(float64); k != "time" && k != "client" && !ok {
			t.Errorf("HTTP/2 line: %s = %#v, want a number", k, l[k])
		}
	}
	if c, _ := l["client"].(string); !strings.HasPrefix(c, "127.0.0.1:") {
		t.Errorf("HTTP/2 line: client = %q, want 127.0.0.1:port", c)
	}
	l = lines[1]
	for k, v := range map[string]any{"server_name": "nothing.example.org", "tls_version": "1.2", "protocol": "HTTP/1.1",
		"key_id": link.FormatKeyID(mustKeyID(t, pkitest.P384Key().Public())), "path": "/c"} {
		if l[k] != v {
			t.Errorf("HTTP/1.1 line: %s = %#v, want %#v (line %v)", k, l[k], v, l)
		}
	}
	if data, _ := os.ReadFile(path); strings.Contains(string(data), "secret") {
		t.Errorf("the access log holds the query string:\n%s", data)
	}

	for _, w := range []struct {
		labels map[string]string
	}{
		{map[string]string{"server_name": "*.wild.example.com", "code": "2xx", "protocol": "2"}},
		{map[string]string{"server_name": "other", "code": "2xx", "protocol": "1.1"}},
	} {
		if v, _ := metricValue(t, reg, "keyless_edge_http_requests_total", w.labels); v != 1 {
			t.Errorf("keyless_edge_http_requests_total%v = %v, want 1", w.labels, v)
		}
	}

	// A TLS 1.3 resumption: no key operation (no key id in its line), and
	// counted with the key type of the name's certificate.
	resuming := httpClient(t, env, addr, false, tls.VersionTLS13)
	tr := resuming.Transport.(*http.Transport)
	tr.TLSClientConfig.ClientSessionCache = tls.NewLRUClientSessionCache(4)
	tr.DisableKeepAlives = true
	for range 2 {
		resp, err := resuming.Get("https://p256.example.com/resume")
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	resumed := waitLines(t, path, "http", 4)[2:]
	if resumed[0]["resumed"] != false || resumed[1]["resumed"] != true || resumed[1]["key_id"] != "" || resumed[1]["keyserver"] != "" {
		t.Errorf("lines of a full handshake and its resumption = %v, %v; want resumed false then true, without key id or keyserver", resumed[0], resumed[1])
	}
	if v, _ := metricValue(t, reg, "keyless_edge_handshakes_total", map[string]string{"version": "1.3", "key_type": "ecdsa_p256", "resumed": "true", "outcome": "ok"}); v != 1 {
		t.Errorf("TLS 1.3 resumptions counted with key type ecdsa_p256 = %v, want 1", v)
	}

	// Failed handshakes (TLS 1.2 with only a CBC suite, which the edge
	// does not offer): 10 in a row, of which 3 are logged at once, then one
	// more after a second, saying how many were left out.
	cbc := &tls.Config{ServerName: "bad.example.com", MaxVersion: tls.VersionTLS12, InsecureSkipVerify: true,
		CipherSuites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA}}
	for range 10 {
		c, err := tls.Dial("tcp", addr, cbc)
		if err == nil {
			c.Close()
			t.Fatal("a handshake with only a CBC suite succeeded")
		}
	}
	time.Sleep(1100 * time.Millisecond)
	if c, err := tls.Dial("tcp", addr, cbc); err == nil {
		c.Close()
	}
	fails := waitLines(t, path, "handshake_error", 4)
	if fails[0]["server_name"] != "bad.example.com" || fails[0]["reason"] != "error" || !strings.Contains(fails[0]["error"].(string), "cipher suite") {
		t.Errorf("handshake_error line = %v, want server_name bad.example.com, reason error and the cipher suite error", fails[0])
	}
	if fails[3]["suppressed"] != float64(7) {
		t.Errorf("suppressed = %v in the line after the burst, want 7", fails[3]["suppressed"])
	}

	// logrotate: the file is renamed, then Reopen starts a new one.
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	if err := al.Reopen(); err != nil {
		t.Fatal(err)
	}
	resp, err = httpClient(t, env, addr, false, tls.VersionTLS13).Get("https://p256.example.com/after")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if got := waitLines(t, path, "http", 1); got[0]["path"] != "/after" {
		t.Errorf("first line after Reopen = %v", got[0])
	}
	if n := len(readLines(t, path+".1")); n != 8 {
		t.Errorf("the rotated file has %d lines, want 8", n)
	}
}

// TestAccessLogTCPAndText: a TCP connection gets one line, here in the
// text format, with its byte counts.
func TestAccessLogTCPAndText(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	origin, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer origin.Close()
	go func() {
		for {
			c, err := origin.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	path := filepath.Join(t.TempDir(), "access.log")
	al, err := OpenAccessLog(AccessLogConfig{Path: path, Format: AccessLogText})
	if err != nil {
		t.Fatal(err)
	}
	defer al.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		done <- ServeTCP(ctx, ln, env.serverConfig(t), origin.Addr().String(), time.Second, nil, WithAccessLog(al))
	}()
	t.Cleanup(func() { cancel(); <-done })

	c, err := tls.Dial("tcp", ln.Addr().String(), env.clientConfig("rsa.example.com", tls.VersionTLS13, tls.VersionTLS13))
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "hello")
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	io.Copy(io.Discard, c)
	c.Close()

	var line string
	for deadline := time.Now().Add(defaultTestTimeout); line == "" && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		data, _ := os.ReadFile(path)
		line = strings.TrimSpace(string(data))
	}
	for _, want := range []string{" type=tcp ", " server_name=rsa.example.com ", " tls_version=1.3 ", " resumed=false ",
		" key_id=" + link.FormatKeyID(mustKeyID(t, pkitest.RSAKey().Public())) + " ", " keyserver=ks1.test:443 ", // a Client with a Dialer names keyservers by their configured address
		" origin=" + origin.Addr().String() + " ", " status=ok ", " bytes_in=5 ", " bytes_out=5 ", ` alpn="" `} {
		if !strings.Contains(line, want) {
			t.Errorf("TCP line %q lacks %q", line, want)
		}
	}
}

func TestOpenAccessLogErrors(t *testing.T) {
	if _, err := OpenAccessLog(AccessLogConfig{}); err == nil || !strings.Contains(err.Error(), "no path") {
		t.Errorf("OpenAccessLog(no path) = %v", err)
	}
	if _, err := OpenAccessLog(AccessLogConfig{Path: "-", Format: "xml"}); err == nil || !strings.Contains(err.Error(), `"xml"`) {
		t.Errorf("OpenAccessLog(format xml) = %v", err)
	}
	if _, err := OpenAccessLog(AccessLogConfig{Path: filepath.Join(t.TempDir(), "missing", "a.log")}); err == nil {
		t.Error("OpenAccessLog(in a missing directory) succeeded")
	}
}

func TestWriteTextValue(t *testing.T) {
	var b strings.Builder
	for _, v := range []any{"plain", "two words", `a"b`, "k=v", "", "new\nline", int64(-3), 1.5, true} {
		var buf = new(bytesBuffer)
		writeTextValue(&buf.Buffer, v)
		b.WriteString(buf.String() + "|")
	}
	want := `plain|"two words"|"a\"b"|"k=v"|""|"new\nline"|-3|1.5|true|`
	if b.String() != want {
		t.Errorf("text values = %s, want %s", b.String(), want)
	}
}

type bytesBuffer struct{ bytes.Buffer }

// validUTF8 returns s with each byte of invalid UTF-8 replaced by U+FFFD,
// as encoding/json decodes it.
func validUTF8(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b.WriteRune(utf8.RuneError)
		} else {
			b.WriteString(s[i : i+size])
		}
		i += size
	}
	return b.String()
}

// TestWriteJSONString: every string, however hostile, becomes JSON that
// decodes to it (invalid UTF-8 to U+FFFD, as encoding/json does) on one
// line.
func TestWriteJSONString(t *testing.T) {
	for _, s := range []string{"", "plain", `q"uote\back`, "new\nline\r\t", "\x00\x1f\x7f", "<script>&", "é ü 日本",
		"bad \xff\xfe utf8", "\u2028\u2029", strings.Repeat("x", 3000)} {
		var b bytes.Buffer
		writeJSONString(&b, s)
		if strings.ContainsAny(b.String(), "\n\r") {
			t.Errorf("writeJSONString(%q) = %s spans lines", s, b.String())
		}
		var got string
		if err := json.Unmarshal(b.Bytes(), &got); err != nil {
			t.Errorf("writeJSONString(%q) = %s: not JSON: %v", s, b.String(), err)
			continue
		}
		if want := validUTF8(s); got != want {
			t.Errorf("writeJSONString(%q) decodes to %q, want %q", s, got, want)
		}
	}
}

func FuzzWriteJSONString(f *testing.F) {
	f.Add("a\"b\\c\n\xff\u2028")
	f.Fuzz(func(t *testing.T, s string) {
		var b bytes.Buffer
		writeJSONString(&b, s)
		var got string
		if err := json.Unmarshal(b.Bytes(), &got); err != nil {
			t.Fatalf("writeJSONString(%q) = %s: not JSON: %v", s, b.String(), err)
		}
		if want := validUTF8(s); got != want {
			t.Fatalf("writeJSONString(%q) decodes to %q, want %q", s, got, want)
		}
	})
}
