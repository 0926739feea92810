package opsserver

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
)

func TestListen(t *testing.T) {
	tests := []struct {
		addr        string
		allowRemote bool
		wantErr     string
	}{
		{"127.0.0.1:0", false, ""},
		{"localhost:0", false, ""},
		{"[::1]:0", false, ""},
		{"0.0.0.0:0", false, "not a loopback address"},
		{"192.0.2.1:9090", false, "not a loopback address"},
		{"example.com:9090", false, "not a loopback address"},
		{"no-port", false, "no-port"},
		{"0.0.0.0:0", true, ""},
	}
	for _, tt := range tests {
		ln, err := Listen(tt.addr, tt.allowRemote)
		if ln != nil {
			ln.Close()
		}
		switch {
		case tt.wantErr == "" && err != nil && !strings.Contains(err.Error(), "cannot assign"):
			t.Errorf("Listen(%q, %t) = %v, want success", tt.addr, tt.allowRemote, err)
		case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
			t.Errorf("Listen(%q, %t) = %v, want an error containing %q", tt.addr, tt.allowRemote, err, tt.wantErr)
		}
	}
}

func TestHandler(t *testing.T) {
	var down atomic.Bool
	h := Handler(NewRegistry(), func(context.Context) error {
		if down.Load() {
			return errors.New("hsm: token not present")
		}
		return nil
	})
	get := func(path string) (int, string) {
		t.Helper()
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		body, _ := io.ReadAll(rec.Result().Body)
		return rec.Code, string(body)
	}
	if code, body := get("/metrics"); code != 200 || !strings.Contains(body, "go_goroutines") || !strings.Contains(body, "process_") {
		t.Errorf("/metrics = %d, %.200q; want 200 with the Go and process collectors", code, body)
	} else if !strings.Contains(body, "\ngo_gc_heap_live_bytes ") {
		t.Errorf("/metrics has no go_gc_heap_live_bytes sample, the heap live after the last GC")
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Errorf("/healthz = %d, want 200", code)
	}
	if code, _ := get("/readyz"); code != 200 {
		t.Errorf("/readyz = %d while ready, want 200", code)
	}
	down.Store(true)
	if code, body := get("/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "token not present") {
		t.Errorf("/readyz = %d, %q while not ready; want 503 with the reason", code, body)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Errorf("/healthz = %d while not ready, want 200 (the process is alive)", code)
	}
	if code, _ := get("/debug/pprof/"); code != http.StatusNotFound {
		t.Errorf("/debug/pprof/ = %d, want 404: nothing else is served", code)
	}
}
