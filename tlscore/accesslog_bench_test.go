package tlscore

import (
	"crypto/tls"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// BenchmarkAccessLog measures what the access log and the request metrics
// add to a request, in process (no network, no TLS): a handler that writes
// 1 KiB, bare, then wrapped with metrics, then with metrics and a JSON
// access log to a file. Each reports its time per request as a ratio to
// the bare handler's, measured just before in the same run (x_bare).
func BenchmarkAccessLog(b *testing.B) {
	body := make([]byte, 1024)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) })
	req := httptest.NewRequest(http.MethodGet, "https://www.example.com/a/b?q=1", nil)
	req.TLS = &tls.ConnectionState{Version: tls.VersionTLS13, CipherSuite: tls.TLS_AES_128_GCM_SHA256, ServerName: "www.example.com", NegotiatedProtocol: "h2"}
	serve := func(h http.Handler) func(*testing.B) {
		return func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				h.ServeHTTP(httptest.NewRecorder(), req)
			}
		}
	}
	var bare float64 // ns per request of the bare handler, this run
	al, err := OpenAccessLog(AccessLogConfig{Path: filepath.Join(b.TempDir(), "access.log")})
	if err != nil {
		b.Fatal(err)
	}
	defer al.Close()
	for _, c := range []struct {
		name string
		h    http.Handler
	}{
		{"bare", h},
		{"metrics", observeRequests(h, nil, NewMetrics(prometheus.NewRegistry()))},
		{"metrics+accesslog", observeRequests(h, al, NewMetrics(prometheus.NewRegistry()))},
	} {
		b.Run(c.name, func(b *testing.B) {
			serve(c.h)(b)
			ns := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
			if c.name == "bare" {
				bare = ns
			}
			b.ReportMetric(ns/bare, "x_bare")
		})
	}
}
