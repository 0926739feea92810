package tlscore

import (
	"context"
	"crypto"
	"errors"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/keyless-tls/keyless/internal/pkitest"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// TestKeyserverStateChanges: each keyserver's state changes are logged
// once (ready, failing, back, gone), keyless_edge_keyserver_up follows
// them, and an operation that failed on one keyserver is counted as
// retried.
func TestKeyserverStateChanges(t *testing.T) {
	// Streams opened before flaky:1 was connected all go to good:1; renew
	// them often, so that operations reach flaky:1 soon.
	old := streamMaxAge
	streamMaxAge = 200 * time.Millisecond
	t.Cleanup(func() { streamMaxAge = old })
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	real := newSignerService(t, []crypto.Signer{pkitest.P256Key()}, nil)
	var broken atomic.Bool
	flaky := &fakeService{next: real, sign: func(ctx context.Context, req *keylessv1.SignRequest) (*keylessv1.SignResponse, error) {
		if broken.Load() {
			return nil, status.Error(codes.Unavailable, "HSM unplugged")
		}
		return real.Sign(ctx, req)
	}}
	servers := map[string]*testKeyserver{
		"good:1":  startKeyserver(t, pki, &fakeService{next: real}),
		"flaky:1": startKeyserver(t, pki, flaky),
	}
	tlsCfg, err := link.ClientMTLSConfig(pki.ClientCert, pki.ClientKey, pki.CAFile, keyserverName)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	logger, logs := newTestLogger()
	c, err := Dial(ClientConfig{
		Addresses:        []string{"good:1", "flaky:1", "absent:1"},
		TLS:              tlsCfg,
		Metrics:          m,
		Logger:           logger,
		ReconnectBackoff: 100 * time.Millisecond,
		Dialer: func(ctx context.Context, addr string) (net.Conn, error) {
			if ks := servers[addr]; ks != nil {
				return ks.lis.DialContext(ctx)
			}
			return nil, errors.New("connect: connection refused")
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	h := c.health

	// waitFor signs until cond holds. While flaky:1 is broken a signature
	// may fail, when its retry lands on flaky:1 again; otherwise each must
	// succeed.
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !cond(); {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not reached; states good=%q flaky=%q absent=%q; log:\n%s", what, h.state("good:1"), h.state("flaky:1"), h.state("absent:1"), logs.String())
			}
			if err := signVerified(t, c, 0); err != nil && !broken.Load() {
				t.Fatalf("%s: Sign() = %v", what, err)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	up := func(ks string) float64 {
		v, _ := metricValue(t, reg, "keyless_edge_keyserver_up", map[string]string{"keyserver": ks})
		return v
	}
	waitFor("both ready", func() bool {
		return h.state("good:1") == ksReady && h.state("flaky:1") == ksReady && h.state("absent:1") == ksGone
	})
	if up("good:1") != 1 || up("flaky:1") != 1 || up("absent:1") != 0 {
		t.Errorf("keyless_edge_keyserver_up = good %v, flaky %v, absent %v; want 1, 1, 0", up("good:1"), up("flaky:1"), up("absent:1"))
	}

	// Operations that fail on flaky:1 are retried on good:1, and counted.
	broken.Store(true)
	for deadline := time.Now().Add(10 * time.Second); ; {
		v, _ := metricValue(t, reg, "keyless_edge_keyserver_call_retries_total", map[string]string{"keyserver": "flaky:1", "code": "Unavailable"})
		if v >= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no retry counted while flaky:1 answered Unavailable; log:\n%s", logs.String())
		}
		signVerified(t, c, 0) // may fail when its retry lands on flaky:1 too
	}
	// The HSM fault is reported by flaky:1's health service.
	servers["flaky:1"].health.SetServingStatus(keylessv1.KeylessService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_NOT_SERVING)
	waitFor("flaky failing", func() bool { return h.state("flaky:1") == ksFailing })
	if up("flaky:1") != 0 {
		t.Errorf("keyless_edge_keyserver_up{flaky:1} = %v while failing, want 0", up("flaky:1"))
	}
	// More failures: no more lines; most signatures succeed by the retry
	// on good:1.
	failed := 0
	for range 20 {
		if err := signVerified(t, c, 0); err != nil {
			failed++
		}
	}
	if failed > 10 {
		t.Errorf("%d of 20 signatures failed while only flaky:1 failed; the retries should have saved most", failed)
	}

	broken.Store(false)
	servers["flaky:1"].health.SetServingStatus(keylessv1.KeylessService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	waitFor("flaky back", func() bool { return h.state("flaky:1") == ksReady })

	servers["good:1"].srv.Stop()
	for deadline := time.Now().Add(10 * time.Second); h.state("good:1") != ksGone; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("good:1 not gone after its server stopped; log:\n%s", logs.String())
		}
	}
	if up("good:1") != 0 || up("flaky:1") != 1 {
		t.Errorf("keyless_edge_keyserver_up = good %v, flaky %v after good:1 stopped; want 0, 1", up("good:1"), up("flaky:1"))
	}
	time.Sleep(500 * time.Millisecond) // reconnection attempts: no new lines

	out := logs.String()
	for _, want := range []struct {
		line string
		n    int
	}{
		{"keyserver ready: keyserver=good:1", 1},
		{"keyserver ready: keyserver=flaky:1", 1},
		{"keyserver gone: not reachable: keyserver=absent:1", 1},
		{"keyserver failing: keyserver=flaky:1", 1},
		{"keyserver back: keyserver=flaky:1 was=failing", 1},
		{"keyserver gone: keyserver=good:1", 1},
		{"keyserver=absent:1", 1},
		{"keyserver=good:1", 2},
	} {
		if n := strings.Count(out, want.line); n != want.n {
			t.Errorf("%d log lines contain %q, want %d; log:\n%s", n, want.line, want.n, out)
		}
	}
	if !strings.Contains(out, `reason="its health service reports NOT_SERVING"`) {
		t.Errorf("the failing line does not give the reason; log:\n%s", out)
	}
}
