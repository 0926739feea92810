package e2e

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/keyless-tls/keyless/hsm/hsmtest"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// startP11KitCluster starts a cluster (an RSA and a P-256 key) whose one
// keyserver reaches the token through p11-kit remoting, as through a
// network HSM's client library: p11-kit-client.so in the keyserver, and
// `p11-kit server` (run by the test, in front of SoftHSM) at the other
// end of a unix socket. extra are further keyserver flags.
//
// With relay set, the server sits behind hsmtest's relay from the start,
// so that its answers can be delayed (P11KitServer.DelayAnswers).
func startP11KitCluster(t *testing.T, relay bool, extra ...string) (*cluster, *hsmtest.P11KitServer) {
	t.Helper()
	c := startCluster(t, clusterOptions{keyservers: 1, rsa: true})
	srv := hsmtest.NewP11KitServer(t, softhsmModule(t), "cluster", filepath.Join(c.dir, "p11-kit.sock"), c.env)
	if relay {
		srv.DelayAnswers(t, 0)
	}
	// The cluster's keyserver opened SoftHSM itself; its successor goes
	// through p11-kit.
	c.kill(t, 0, syscall.SIGTERM)
	c.env = append(slices.Clone(c.env), hsmtest.EnvP11KitAddress+"="+srv.Address())
	c.token = slices.Clone(c.token)
	if c.token[0] != "-module" {
		t.Fatalf("cluster token flags %q do not start with -module", c.token)
	}
	c.token[1] = srv.ClientModule
	c.startKeyserver(t, 0, extra...)
	if out := c.keyservers[0].proc.out.String(); !strings.Contains(out, "p11-kit-client.so") {
		t.Fatalf("the keyserver did not open p11-kit-client.so:\n%s", out)
	}
	// The edge lost its connection with the first keyserver and dials
	// again after its backoff.
	deadline := time.Now().Add(15 * time.Second)
	for {
		conn, err := tls.Dial("tcp", c.edgeAddr, c.clientConfig(clusterECDSA))
		if err == nil {
			conn.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no handshake through the edge within 15 s of the keyserver's start: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return c, srv
}

// TestP11KitChain runs the whole chain through p11-kit remoting: `keyserver
// keys list`, then TLS 1.3 and 1.2 handshakes with ECDSA and RSA keys
// (PSS, PKCS #1 v1.5 and RSA key exchange) through an edge, each key
// operation done by SoftHSM behind `p11-kit server`.
func TestP11KitChain(t *testing.T) {
	c, _ := startP11KitCluster(t, false)

	out, err := run(t, c.env, "keyserver", append([]string{"keys", "list"}, c.token...)...)
	if err != nil || !strings.Contains(out, clusterECDSA) || !strings.Contains(out, clusterRSA) {
		t.Fatalf("keyserver keys list through p11-kit: %v\n%s", err, out)
	}

	for _, tt := range []struct {
		name   string
		server string
		edit   func(*tls.Config)
		want   uint16 // negotiated version
		kex    bool   // RSA key exchange (a decryption)
	}{
		{"TLS 1.3 ECDSA", clusterECDSA, func(*tls.Config) {}, tls.VersionTLS13, false},
		{"TLS 1.3 RSA-PSS", clusterRSA, func(*tls.Config) {}, tls.VersionTLS13, false},
		{"TLS 1.2 ECDHE-ECDSA", clusterECDSA, func(cfg *tls.Config) { cfg.MaxVersion = tls.VersionTLS12 }, tls.VersionTLS12, false},
		{"TLS 1.2 ECDHE-RSA PKCS #1 v1.5", clusterRSA, func(cfg *tls.Config) {
			cfg.MaxVersion = tls.VersionTLS12
			cfg.CipherSuites = []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256}
		}, tls.VersionTLS12, false},
		{"TLS 1.2 RSA key exchange", clusterRSA, func(cfg *tls.Config) {
			cfg.MaxVersion = tls.VersionTLS12
			cfg.CipherSuites = []uint16{tls.TLS_RSA_WITH_AES_128_GCM_SHA256}
		}, tls.VersionTLS12, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := c.clientConfig(tt.server)
			tt.edit(cfg)
			conn, err := tls.Dial("tcp", c.edgeAddr, cfg)
			if err != nil {
				t.Fatalf("handshake through p11-kit: %v\n%s", err, c.keyservers[0].proc.out.String())
			}
			defer conn.Close()
			st := conn.ConnectionState()
			if st.Version != tt.want {
				t.Errorf("version %x, want %x", st.Version, tt.want)
			}
			if kex := st.CipherSuite == tls.TLS_RSA_WITH_AES_128_GCM_SHA256; kex != tt.kex {
				t.Errorf("cipher suite %s", tls.CipherSuiteName(st.CipherSuite))
			}
		})
	}
	if ok, failed := c.signs(t, 0); ok < 5 || failed > 0 {
		t.Errorf("the keyserver answered %d Sign requests, %d failed; want 5 and 0", ok, failed)
	}
}

// keyserverSigner returns a connection to the cluster's keyserver, as its
// edge makes, and a function that asks it for one ECDSA signature with
// deadline d and returns the status code and how long the call took.
func keyserverSigner(t *testing.T, c *cluster) (*grpc.ClientConn, func(d time.Duration) (codes.Code, time.Duration)) {
	t.Helper()
	clientTLS, err := link.ClientMTLSConfig(c.link.edgeCert, c.link.edgeKey, c.link.caFile, c.link.serverName)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("passthrough:///"+c.keyservers[0].addr, grpc.WithTransportCredentials(credentials.NewTLS(clientTLS)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	client := keylessv1.NewKeylessServiceClient(conn)
	keyID, err := link.KeyIDOf(readCertPEM(t, filepath.Join(c.certsDir, clusterECDSA+".pem")).PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return conn, func(d time.Duration) (codes.Code, time.Duration) {
		digest := make([]byte, 32)
		rand.Read(digest)
		ctx, cancel := context.WithTimeout(context.Background(), d)
		defer cancel()
		start := time.Now()
		_, err := client.Sign(ctx, &keylessv1.SignRequest{KeyId: keyID[:], Algorithm: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA256, Digest: digest})
		return status.Code(err), time.Since(start)
	}
}

// healthWatch follows the keyserver's gRPC health (Watch on the whole
// server) and records each status with the time it arrived.
type healthWatch struct {
	mu      sync.Mutex
	changes []healthChange
	cond    chan struct{} // closed and replaced on each change
}

type healthChange struct {
	status healthpb.HealthCheckResponse_ServingStatus
	at     time.Time
}

func watchKeyserverHealth(t *testing.T, conn *grpc.ClientConn) *healthWatch {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w := &healthWatch{cond: make(chan struct{})}
	stream, err := healthpb.NewHealthClient(conn).Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			resp, err := stream.Recv()
			if err != nil {
				return
			}
			w.mu.Lock()
			w.changes = append(w.changes, healthChange{resp.GetStatus(), time.Now()})
			close(w.cond)
			w.cond = make(chan struct{})
			w.mu.Unlock()
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return w
}

// waitFor waits until the last status is want and returns when it arrived.
func (w *healthWatch) waitFor(t *testing.T, want healthpb.HealthCheckResponse_ServingStatus, within time.Duration) time.Time {
	t.Helper()
	deadline := time.After(within)
	for {
		w.mu.Lock()
		n := len(w.changes)
		var last healthChange
		if n > 0 {
			last = w.changes[n-1]
		}
		cond := w.cond
		w.mu.Unlock()
		if n > 0 && last.status == want {
			return last.at
		}
		select {
		case <-cond:
		case <-deadline:
			t.Fatalf("gRPC health did not become %v within %v (last: %v)", want, within, last.status)
		}
	}
}

// TestP11KitApplianceGone kills `p11-kit server` and its connections, as
// when a network HSM goes away, under a load of full handshakes through
// the edge. The keyserver answers UNAVAILABLE at once (no call waits for
// its deadline), reports NOT_SERVING over gRPC health, and recovers by
// itself when the server is started again, without a restart, although
// its health interval (2 s) is longer than the recovery: the recovery time
// after the server's return is printed, for outages of 4 s and (with
// KEYLESS_LONG_OUTAGE=1) 30 s.
func TestP11KitApplianceGone(t *testing.T) {
	c, srv := startP11KitCluster(t, false, "-health-interval", "2s", "-metrics-listen", "127.0.0.1:0")
	metrics := c.keyservers[0].proc.waitFor(t, keyserverMetricsAddr)[1]
	conn, sign := keyserverSigner(t, c)
	health := watchKeyserverHealth(t, conn)
	health.waitFor(t, healthpb.HealthCheckResponse_SERVING, 10*time.Second)

	l := startLoad(c.edgeAddr, 4, c.clientConfig(clusterECDSA), c.clientConfig(clusterRSA))
	halted := false
	defer func() {
		if !halted {
			l.halt()
		}
	}()
	l.waitOK(t, 40)

	outages := []time.Duration{4 * time.Second}
	if os.Getenv("KEYLESS_LONG_OUTAGE") == "1" {
		outages = append(outages, 30*time.Second)
	}
	for _, d := range outages {
		failedBefore, slowBefore := l.failed.Load(), l.slow.Load()
		down := time.Now()
		srv.Stop(t)
		notServing := health.waitFor(t, healthpb.HealthCheckResponse_NOT_SERVING, 10*time.Second)
		t.Logf("outage of %v: NOT_SERVING %v after the server died", d, notServing.Sub(down).Round(time.Millisecond))
		var slowest time.Duration
		for range 10 {
			code, took := sign(5 * time.Second)
			if code != codes.Unavailable {
				t.Errorf("Sign() while the HSM is away = %v, want Unavailable", code)
			}
			slowest = max(slowest, took)
		}
		if slowest > time.Second {
			t.Errorf("a Sign() while the HSM is away took %v; want an answer at once", slowest)
		}
		time.Sleep(d - time.Since(down))
		failed := l.failed.Load() - failedBefore
		srv.Start(t)
		up := time.Now()
		serving := health.waitFor(t, healthpb.HealthCheckResponse_SERVING, 30*time.Second)
		if code, _ := sign(5 * time.Second); code != codes.OK {
			t.Errorf("Sign() once SERVING again = %v", code)
		}
		l.waitOK(t, 40)
		handshakes := time.Since(up)
		t.Logf("outage of %v: SERVING %v after the p11-kit server listened again (handshakes through the edge within %v); "+
			"slowest Sign() while away %v; %d handshakes failed meanwhile, %d took over 1 s",
			d, serving.Sub(up).Round(time.Millisecond), handshakes.Round(time.Millisecond), slowest.Round(time.Millisecond),
			failed, l.slow.Load()-slowBefore)
	}
	l.halt()
	halted = true
	// Calls that p11-kit's client left stuck for good when its server died
	// gave their call slots back shortly after the reconnection: none is
	// in use once the load has stopped.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		v, ok := metricValue(scrape(t, metrics), "keyless_keyserver_hsm_sessions_in_use")
		if ok && v == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("keyless_keyserver_hsm_sessions_in_use = %v 10 s after the load stopped, want 0", v)
			break
		}
	}
	ks := c.keyservers[0].proc.out.String()
	if !strings.Contains(ks, "reconnected to token") {
		t.Errorf("no reconnection in the keyserver's log:\n%s", ks)
	}
	t.Logf("keyserver log lines about calls p11-kit left stuck: %d", strings.Count(ks, "their call slots are given back"))
}

var keyserverMetricsAddr = regexp.MustCompile(`keyserver ready: .*metrics=(\S+)`)

// TestP11KitSlowAppliance delays every answer of the p11-kit server by
// 400 ms while 24 Sign calls with a 300 ms deadline arrive at once at a
// keyserver that runs 2 operations in the HSM at a time and queues 4: each
// call ends by its deadline (DeadlineExceeded), or at once when the queue
// is full (ResourceExhausted) or no HSM session is free (Unavailable); the
// keyserver signs again once the answers are quick, and its goroutines
// return to where they were.
func TestP11KitSlowAppliance(t *testing.T) {
	c, srv := startP11KitCluster(t, true, "-max-concurrent", "2", "-max-queued", "4", "-max-sessions", "4",
		"-session-wait", "200ms", "-metrics-listen", "127.0.0.1:0")
	_, sign := keyserverSigner(t, c)
	metrics := c.keyservers[0].proc.waitFor(t, keyserverMetricsAddr)[1]
	for range 5 {
		if code, _ := sign(5 * time.Second); code != codes.OK {
			t.Fatalf("Sign() before the delay = %v", code)
		}
	}
	goroutines := func() float64 {
		v, ok := metricValue(scrape(t, metrics), "go_goroutines")
		if !ok {
			t.Fatal("no go_goroutines in the keyserver's metrics")
		}
		return v
	}
	before := goroutines()

	srv.DelayAnswers(t, 400*time.Millisecond)
	const deadline = 300 * time.Millisecond
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		codesOf = map[codes.Code]int{}
		slowest time.Duration
	)
	for range 24 {
		wg.Go(func() {
			code, took := sign(deadline)
			mu.Lock()
			defer mu.Unlock()
			codesOf[code]++
			slowest = max(slowest, took)
		})
	}
	wg.Wait()
	t.Logf("24 Sign calls with a %v deadline against 400 ms answers: %v; slowest returned after %v", deadline, codesOf, slowest.Round(time.Millisecond))
	for code := range codesOf {
		switch code {
		case codes.DeadlineExceeded, codes.ResourceExhausted, codes.Unavailable:
		default:
			t.Errorf("Sign() on a slow appliance answered %v", code)
		}
	}
	if slowest > deadline+time.Second {
		t.Errorf("a Sign() returned %v after it began, far past its %v deadline", slowest, deadline)
	}

	srv.DelayAnswers(t, 0)
	end := time.Now().Add(20 * time.Second)
	for {
		code, _ := sign(2 * time.Second)
		if code == codes.OK {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("Sign() after the delay ended = %v for 20 s", code)
		}
		time.Sleep(100 * time.Millisecond)
	}
	var after float64
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		// A few goroutines of slack: the scrape's own connection, gRPC's
		// per-stream ones coming and going.
		if after = goroutines(); after <= before+5 || time.Now().After(end) {
			break
		}
	}
	t.Logf("keyserver goroutines: %v before, %v after", before, after)
	if after > before+5 {
		t.Errorf("the keyserver has %v goroutines after the slow spell, %v before", after, before)
	}
}
