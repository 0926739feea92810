package tlscore

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// metricValue returns the value of the series name{labels} in reg (a
// histogram's sample count), and false if there is none.
func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) (float64, bool) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			if len(m.GetLabel()) != len(labels) {
				continue
			}
			for _, l := range m.GetLabel() {
				if labels[l.GetName()] != l.GetValue() {
					continue next
				}
			}
			switch mf.GetType() {
			case dto.MetricType_COUNTER:
				return m.GetCounter().GetValue(), true
			case dto.MetricType_GAUGE:
				return m.GetGauge().GetValue(), true
			case dto.MetricType_HISTOGRAM:
				return float64(m.GetHistogram().GetSampleCount()), true
			}
		}
	}
	return 0, false
}

func TestMetrics(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	client := dialTestClient(t, env.pki, ClientConfig{Metrics: m}, map[string]*testKeyserver{"ks1.test:443": env.ks})
	store, err := NewCertStore(CertStoreConfig{Client: client, Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	if store.Loaded() != 0 {
		t.Errorf("Loaded() = %d before Load, want 0", store.Loaded())
	}
	if err := store.Load(t.Context(), env.dir); err != nil {
		t.Fatal(err)
	}
	// The connection that answered ListKeys may report READY a little
	// after the answer arrives (health checks, a loaded machine).
	for deadline := time.Now().Add(defaultTestTimeout); !client.Ready() && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if store.Loaded() != len(envCerts) || !client.Ready() {
		t.Errorf("Loaded() = %d, Ready() = %v after Load; want %d, true", store.Loaded(), client.Ready(), len(envCerts))
	}
	sc, err := NewServerTLSConfig(ServerConfig{Certificates: store})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		done <- ServeHTTP(ctx, ln, sc, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.Proto) }), 0, nil, WithMetrics(m))
	}()
	t.Cleanup(func() { cancel(); <-done })
	addr := ln.Addr().String()

	// HTTP/2 over TLS 1.3 still works through the metrics' listener.
	resp, err := httpClient(t, env, addr, true, tls.VersionTLS13).Get("https://p256.example.com/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "HTTP/2.0" {
		t.Errorf("protocol = %q, want HTTP/2.0", body)
	}
	// TLS 1.2, twice with one session cache: the second resumes.
	cc := env.clientConfig("rsa.example.com", tls.VersionTLS12, tls.VersionTLS12)
	cc.ClientSessionCache = tls.NewLRUClientSessionCache(4)
	for i := range 2 {
		c, err := tls.Dial("tcp", addr, cc)
		if err != nil {
			t.Fatal(err)
		}
		if got := c.ConnectionState().DidResume; got != (i == 1) {
			t.Errorf("handshake %d: DidResume = %v", i, got)
		}
		c.Close()
	}
	// A handshake that fails: no certificate for the name.
	if c, err := tls.Dial("tcp", addr, env.clientConfig("unknown.example.org", tls.VersionTLS13, tls.VersionTLS13)); err == nil {
		c.Close()
		t.Error("handshake for an unknown name succeeded")
	}

	want := []struct {
		labels map[string]string
		value  float64
	}{
		{map[string]string{"version": "1.3", "key_type": "ecdsa_p256", "resumed": "false", "outcome": "ok"}, 1},
		{map[string]string{"version": "1.2", "key_type": "rsa", "resumed": "false", "outcome": "ok"}, 1},
		{map[string]string{"version": "1.2", "key_type": "rsa", "resumed": "true", "outcome": "ok"}, 1},
		{map[string]string{"version": "1.3", "key_type": "none", "resumed": "false", "outcome": "error"}, 1},
	}
	for _, w := range want {
		// The count lands when the server's side of the handshake ends,
		// possibly after the client's.
		var got float64
		for range 100 {
			if got, _ = metricValue(t, reg, "keyless_edge_handshakes_total", w.labels); got >= w.value {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if got != w.value {
			t.Errorf("keyless_edge_handshakes_total%v = %v, want %v", w.labels, got, w.value)
		}
	}

	if got, _ := metricValue(t, reg, "keyless_edge_certificates_loaded", nil); got != float64(len(envCerts)) {
		t.Errorf("keyless_edge_certificates_loaded = %v, want %d", got, len(envCerts))
	}
	for file, leaf := range env.leaves {
		got, ok := metricValue(t, reg, "keyless_edge_certificate_expiry_timestamp_seconds", map[string]string{"name": leaf.DNSNames[0]})
		if !ok || got != float64(leaf.NotAfter.Unix()) {
			t.Errorf("expiry of %s = %v (%v), want %d", file, got, ok, leaf.NotAfter.Unix())
		}
	}
	ks := map[string]string{"method": "ListKeys", "keyserver": "ks1.test:443"}
	if got, _ := metricValue(t, reg, "keyless_edge_keyserver_call_duration_seconds", ks); got != 1 {
		t.Errorf("ListKeys calls to ks1.test:443 = %v, want 1", got)
	}
	sign := map[string]string{"method": "Sign", "keyserver": "ks1.test:443"}
	if got, _ := metricValue(t, reg, "keyless_edge_keyserver_call_duration_seconds", sign); got < 2 {
		t.Errorf("Sign calls to ks1.test:443 = %v, want at least 2", got)
	}

	// A reload without the RSA certificate drops its expiry series.
	if err := os.Remove(filepath.Join(env.dir, "rsa.pem")); err != nil {
		t.Fatal(err)
	}
	if err := store.Load(t.Context(), env.dir); err != nil {
		t.Fatal(err)
	}
	if got, _ := metricValue(t, reg, "keyless_edge_certificates_loaded", nil); got != float64(len(envCerts)-1) {
		t.Errorf("keyless_edge_certificates_loaded = %v after removing one, want %d", got, len(envCerts)-1)
	}
	if _, ok := metricValue(t, reg, "keyless_edge_certificate_expiry_timestamp_seconds", map[string]string{"name": "rsa.example.com"}); ok {
		t.Error("expiry series of a removed certificate remains")
	}

	// Nothing names a client.
	mfs, _ := reg.Gather()
	for _, mf := range mfs {
		if s := mf.String(); strings.Contains(s, "127.0.0.1") || strings.Contains(s, "unknown.example.org") {
			t.Errorf("%s carries a client address or server name", mf.GetName())
		}
	}
}

func TestHandshakeOutcome(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want string
	}{
		{nil, "ok"},
		{context.DeadlineExceeded, "timeout"},
		{io.EOF, "client_closed"},
		{net.ErrClosed, "client_closed"},
		{io.ErrShortWrite, "error"},
	} {
		if got := handshakeOutcome(tt.err); got != tt.want {
			t.Errorf("handshakeOutcome(%v) = %q, want %q", tt.err, got, tt.want)
		}
	}
	var m *Metrics // nil records nothing, and does not panic
	m.setCertificates(nil)
}
