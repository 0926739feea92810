// Package opsserver is the operations listener of the keyless commands:
// Prometheus metrics on /metrics, liveness on /healthz and readiness on
// /readyz. It is separate from the traffic listeners, off unless a command
// is given an address, and on loopback unless the operator allows another
// address explicitly.
package opsserver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"regexp"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// NewRegistry returns a private registry with the Go runtime and process
// collectors: each process registers its metrics there, never with the
// global default registry. Besides the collector's defaults it exports
// go_gc_heap_live_bytes (runtime/metrics /gc/heap/live:bytes), the heap
// the last garbage collection marked live: unlike go_memstats_heap_*, it
// leaves out garbage not yet collected.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(collectors.WithGoCollectorRuntimeMetrics(
			collectors.GoRuntimeMetricsRule{Matcher: regexp.MustCompile(`^/gc/heap/live:bytes$`)})),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// Listen listens on addr. Unless allowRemote is set, the host of addr must
// be a loopback address or "localhost": metrics name keys and identity
// groups, which an operator may not want on the network.
func Listen(addr string, allowRemote bool) (net.Listener, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("%q: %w", addr, err)
	}
	if !allowRemote {
		ip := net.ParseIP(host)
		if host != "localhost" && (ip == nil || !ip.IsLoopback()) {
			return nil, fmt.Errorf("%q is not a loopback address; set -metrics-allow-remote to listen on it", addr)
		}
	}
	return net.Listen("tcp", addr)
}

// Handler returns the operations handler: /metrics from reg, /healthz
// (200 while the process runs) and /readyz (200 if ready returns nil, else
// 503 with the error's text). ready is called with a 5 s deadline.
func Handler(reg *prometheus.Registry, ready func(context.Context) error) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		if err := ready(ctx); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}

// Serve serves Handler(reg, ready) on ln until ctx is done, then closes
// it. Errors other than the shutdown are logged.
func Serve(ctx context.Context, ln net.Listener, reg *prometheus.Registry, ready func(context.Context) error, logger hclog.Logger) {
	srv := &http.Server{Handler: Handler(reg, ready), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		logger.Error("metrics listener stopped", "error", err)
	}
}
