package tlscore

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// handshakeServer serves TLS handshakes with sc on loopback TCP until the
// test ends, and reports each handshake's error (nil for a success) on
// errs.
type handshakeServer struct {
	addr string
	errs chan error
}

func startHandshakeServer(t *testing.T, sc *tls.Config) *handshakeServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &handshakeServer{addr: ln.Addr().String(), errs: make(chan error, 4096)}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(defaultTestTimeout))
				tc := tls.Server(c, sc)
				err := tc.HandshakeContext(t.Context())
				if err == nil {
					// Lets the client's handshake finish (TLS 1.3 clients
					// return before the server has read their Finished).
					_, err = tc.Write([]byte("ok"))
				}
				s.errs <- err
			})
		}
	})
	return s
}

// handshake makes one handshake with the server and reads its "ok".
func (s *handshakeServer) handshake(cc *tls.Config) error {
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: defaultTestTimeout}, Config: cc}
	ctx, cancel := context.WithTimeout(context.Background(), defaultTestTimeout)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", s.addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(defaultTestTimeout))
	buf := make([]byte, 2)
	_, err = c.Read(buf)
	return err
}

// serverErr returns the error of the next handshake the server finished.
func (s *handshakeServer) serverErr(t *testing.T) error {
	t.Helper()
	select {
	case err := <-s.errs:
		return err
	case <-time.After(defaultTestTimeout):
		t.Fatal("the TLS server did not finish a handshake")
		return nil
	}
}

// TestKeyOperationBound: with MaxKeyOperations handshakes waiting for a
// keyserver that does not answer yet, one more handshake fails at once
// (before the keyserver is released), naming the bound, without its key
// operation reaching the keyserver; once the keyserver answers, the
// waiting handshakes succeed (the client verifies each signature with the
// certificate's key) and the bound admits handshakes again. For
// signatures in TLS 1.3 and 1.2, and RSA key exchange.
func TestKeyOperationBound(t *testing.T) {
	const bound = 3
	tests := []struct {
		name    string
		server  string
		version uint16
		suites  []uint16
	}{
		{"TLS 1.3 ECDSA", "p256.example.com", tls.VersionTLS13, nil},
		{"TLS 1.2 ECDHE RSA", "rsa.example.com", tls.VersionTLS12, []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256}},
		{"TLS 1.2 RSA key exchange", "legacy.example.com", tls.VersionTLS12, []uint16{tls.TLS_RSA_WITH_AES_128_GCM_SHA256}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			release := make(chan struct{})
			var releaseOnce sync.Once
			unblock := func() { releaseOnce.Do(func() { close(release) }) }
			t.Cleanup(unblock)
			env := newTestEnv(t, envOptions{callTimeout: defaultTestTimeout, wrap: func(next keylessv1.KeylessServiceServer) keylessv1.KeylessServiceServer {
				return &fakeService{next: next,
					sign: func(ctx context.Context, req *keylessv1.SignRequest) (*keylessv1.SignResponse, error) {
						<-release
						return next.Sign(ctx, req)
					},
					decrypt: func(ctx context.Context, req *keylessv1.DecryptRequest) (*keylessv1.DecryptResponse, error) {
						<-release
						return next.Decrypt(ctx, req)
					},
				}
			}})
			reg := prometheus.NewRegistry()
			m := NewMetrics(reg)
			logger, logs := newTestLogger()
			sc, err := NewServerTLSConfig(ServerConfig{Certificates: env.newStore(t, CertStoreConfig{}), RSAKeyExchange: []string{"legacy.example.com"},
				MaxKeyOperations: bound, Metrics: m, Logger: logger})
			if err != nil {
				t.Fatal(err)
			}
			srv := startHandshakeServer(t, sc)
			cc := env.clientConfig(tt.server, tt.version, tt.version)
			cc.CipherSuites = tt.suites
			ops := func() int { s, d := env.ks.ops.counts(); return s + d }

			waiting := make(chan error, bound)
			for range bound {
				go func() { waiting <- srv.handshake(cc) }()
			}
			for deadline := time.Now().Add(defaultTestTimeout); ops() < bound; time.Sleep(5 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("the keyserver received %d operations, want %d", ops(), bound)
				}
			}
			if v, _ := metricValue(t, reg, "keyless_edge_key_operations_in_flight", nil); v != bound {
				t.Errorf("keyless_edge_key_operations_in_flight = %v, want %d", v, bound)
			}

			// The keyserver is still blocked: this handshake can only fail
			// by being refused.
			if err := srv.handshake(cc); err == nil {
				t.Fatal("a handshake beyond the bound succeeded")
			}
			if err := srv.serverErr(t); err == nil || !strings.Contains(err.Error(), "key operations in flight") {
				t.Fatalf("server error %v; want the bound named", err)
			}
			if n := ops(); n != bound {
				t.Errorf("the keyserver received %d operations, want %d: the refused one reached it", n, bound)
			}
			if v, _ := metricValue(t, reg, "keyless_edge_handshakes_shed_total", map[string]string{"reason": "key_operations"}); v != 1 {
				t.Errorf("keyless_edge_handshakes_shed_total{reason=key_operations} = %v, want 1", v)
			}

			if n := strings.Count(logs.String(), "[WARN]  refusing new handshakes: the edge has as many key operations in flight as it allows: max_key_operations=3 reason=key_operations refused=1"); n != 1 {
				t.Errorf("%d warnings about the refusal, want 1:\n%s", n, logs.String())
			}

			unblock()
			for range bound {
				if err := <-waiting; err != nil {
					t.Errorf("a handshake within the bound failed: %v", err)
				}
				if err := srv.serverErr(t); err != nil {
					t.Errorf("a handshake within the bound failed on the server: %v", err)
				}
			}
			if err := srv.handshake(cc); err != nil {
				t.Errorf("a handshake after the others finished: %v", err)
			}
			if err := srv.serverErr(t); err != nil {
				t.Errorf("a handshake after the others finished, on the server: %v", err)
			}
			if v, _ := metricValue(t, reg, "keyless_edge_key_operations_in_flight", nil); v != 0 {
				t.Errorf("keyless_edge_key_operations_in_flight = %v after every handshake ended, want 0", v)
			}
		})
	}
}

// TestHandshakeFloodOneClient: 1000 full handshakes from one address, each
// with a new random server name, at the edge command's default limits,
// cost at most the client's burst plus its rate over the flood's duration
// in keyserver operations; every other handshake is refused, naming the
// rate, and counted as shed. Without a limit each would cost one.
func TestHandshakeFloodOneClient(t *testing.T) {
	const (
		handshakes = 1000
		workers    = 8
	)
	env := newTestEnv(t, envOptions{})
	reg := prometheus.NewRegistry()
	logger, logs := newTestLogger()
	sc, err := NewServerTLSConfig(ServerConfig{Certificates: env.newStore(t, CertStoreConfig{}),
		HandshakesPerClient: DefaultHandshakesPerClient, HandshakeBurst: DefaultHandshakeBurst, Metrics: NewMetrics(reg), Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	srv := startHandshakeServer(t, sc)

	start := time.Now()
	jobs := make(chan struct{}, handshakes)
	for range handshakes {
		jobs <- struct{}{}
	}
	close(jobs)
	var (
		mu       sync.Mutex
		clientOK int
		wg       sync.WaitGroup
	)
	for range workers {
		wg.Go(func() {
			for range jobs {
				// A wildcard name of the store, new each time: no session
				// to resume, and nothing shared between handshakes.
				cc := env.clientConfig(randomLabel()+".wild.example.com", tls.VersionTLS13, tls.VersionTLS13)
				cc.CurvePreferences = []tls.CurveID{tls.X25519}
				if srv.handshake(cc) == nil {
					mu.Lock()
					clientOK++
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)

	var serverOK, refused int
	for range handshakes {
		switch err := srv.serverErr(t); {
		case err == nil:
			serverOK++
		case strings.Contains(err.Error(), "over its rate of full handshakes"):
			refused++
		default:
			t.Errorf("handshake failed for another reason: %v", err)
		}
	}
	signs, _ := env.ks.ops.counts()
	allowed := DefaultHandshakeBurst + int(elapsed.Seconds()*DefaultHandshakesPerClient) + 1
	t.Logf("%d handshakes in %v: %d succeeded, %d refused, %d keyserver operations (at most %d allowed)", handshakes, elapsed, serverOK, refused, signs, allowed)
	if signs > allowed {
		t.Errorf("%d keyserver operations for %d handshakes from one client in %v; want at most %d", signs, handshakes, elapsed, allowed)
	}
	if signs != serverOK || clientOK != serverOK || serverOK+refused != handshakes {
		t.Errorf("%d keyserver operations, %d handshakes succeeded on the server and %d on the client, %d refused; want one operation per success, and every other handshake refused",
			signs, serverOK, clientOK, refused)
	}
	if serverOK < DefaultHandshakeBurst {
		t.Errorf("%d handshakes succeeded; want at least the burst, %d", serverOK, DefaultHandshakeBurst)
	}
	if v, _ := metricValue(t, reg, "keyless_edge_handshakes_shed_total", map[string]string{"reason": "client_rate"}); int(v) != refused {
		t.Errorf("keyless_edge_handshakes_shed_total{reason=client_rate} = %v, want %d", v, refused)
	}
	// Refusals are reported once a minute, not once each.
	if n := strings.Count(logs.String(), "refusing new handshakes of clients over their rate"); refused > 0 && n != 1 {
		t.Errorf("%d warnings for %d refusals, want 1:\n%s", n, refused, logs.String())
	}
	if strings.Contains(logs.String(), "127.0.0.1") {
		t.Errorf("the log names a client's address:\n%s", logs.String())
	}
}

func randomLabel() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func TestServerConfigMaxKeyOperations(t *testing.T) {
	store := &CertStore{}
	tests := []struct {
		max     int
		want    int64 // 0: no bound
		wantErr bool
	}{
		{0, DefaultMaxKeyOperations, false},
		{1, 1, false},
		{-1, 0, false},
		{MaxKeyOperationsLimit, MaxKeyOperationsLimit, false},
		{MaxKeyOperationsLimit + 1, 0, true},
	}
	for _, tt := range tests {
		cfg := ServerConfig{Certificates: store, MaxKeyOperations: tt.max}
		err := cfg.Validate()
		if (err != nil) != tt.wantErr {
			t.Errorf("Validate() with MaxKeyOperations %d = %v, want error %t", tt.max, err, tt.wantErr)
			continue
		}
		if err != nil {
			if !strings.Contains(err.Error(), "MaxKeyOperations") {
				t.Errorf("Validate() with MaxKeyOperations %d = %v, want the field named", tt.max, err)
			}
			continue
		}
		var got int64
		if g := cfg.keyGuard(); g != nil && g.slots != nil {
			got = g.slots.max
		}
		if got != tt.want {
			t.Errorf("MaxKeyOperations %d gives a bound of %d, want %d", tt.max, got, tt.want)
		}
	}
}
