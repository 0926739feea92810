package bench

import (
	"bufio"
	"encoding/json"
	"io"
	"slices"
	"strings"
	"testing"
)

// TestHandshakeKinds runs the load generator for a short while with every
// handshake kind against the tls-server mode with software keys: each kind
// must negotiate what it asks for (the generator checks version, suite and
// resumption) without a single error.
func TestHandshakeKinds(t *testing.T) {
	dir := t.TempDir()
	web, err := newCA("test web CA")
	if err != nil {
		t.Fatal(err)
	}
	if err := writeSoftCerts(dir, web); err != nil {
		t.Fatal(err)
	}
	stdin, stop := io.Pipe()
	stdout, out := io.Pipe()
	served := make(chan error, 1)
	go func() {
		served <- runTLSServer(t.Context(), []string{"-keys", "soft", "-certs", dir, "-lifetime", "1m"}, stdin, out, io.Discard)
		out.Close()
	}()
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("tls-server: %v (%v)", err, <-served)
	}
	addr, ok := strings.CutPrefix(strings.TrimSpace(line), "ready ")
	if !ok {
		t.Fatalf("tls-server printed %q", line)
	}
	go io.Copy(io.Discard, stdout)
	t.Cleanup(func() {
		stop.Close()
		if err := <-served; err != nil {
			t.Errorf("tls-server: %v", err)
		}
	})

	// Every kind negotiates what it asks for (handshake checks version,
	// suite and resumption).
	for _, kind := range slices.Concat(handshakeKinds, resumeKinds) {
		t.Run(kind, func(t *testing.T) {
			k, err := kindOf(kind)
			if err != nil {
				t.Fatal(err)
			}
			cfg := k.clientConfig()
			if k.resume {
				if err := prime(t.Context(), addr, cfg); err != nil {
					t.Fatalf("first handshake: %v", err)
				}
			}
			for range 3 {
				if err := handshake(t.Context(), addr, k, cfg); err != nil {
					t.Fatalf("handshake: %v", err)
				}
			}
		})
	}

	// The mode reports a Result.
	var b strings.Builder
	err = runLoadgen(t.Context(), []string{"-addr", addr, "-kind", ResumeTLS13, "-concurrency", "2",
		"-warmup", "0s", "-duration", "1s"}, &b, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	var r Result
	if err := json.Unmarshal([]byte(b.String()), &r); err != nil {
		t.Fatalf("loadgen printed %q: %v", b.String(), err)
	}
	if r.Ops == 0 || r.Errors != 0 || r.Name != ResumeTLS13 || r.Concurrency != 2 {
		t.Errorf("loadgen = %+v; want handshakes and no error", r)
	}
}

func TestKindOf(t *testing.T) {
	if _, err := kindOf("tls11"); err == nil {
		t.Error(`kindOf("tls11") = nil error`)
	}
	for _, k := range slices.Concat(handshakeKinds, resumeKinds) {
		hk, err := kindOf(k)
		if err != nil {
			t.Fatal(err)
		}
		if cfg := hk.clientConfig(); (cfg.ClientSessionCache != nil) != hk.resume || cfg.MaxVersion != hk.version {
			t.Errorf("clientConfig(%s) = %+v", k, cfg)
		}
	}
}
