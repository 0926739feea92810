package tlscore

import (
	"context"
	"crypto"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"

	"github.com/keyless-tls/keyless/internal/pkitest"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// faultyPath stands between a client and a keyserver's in-memory listener
// and can stop the path as a network does: paused holds back what the
// keyserver sends (the client's reads wait) while what the client sends
// still arrives; blackholed also swallows what the client sends, as a
// path whose packets are dropped, without closing anything. It counts the
// connections made through it.
type faultyPath struct {
	ks    *testKeyserver
	dials atomic.Int64

	mu         sync.Mutex
	paused     bool
	blackholed bool
	resumed    chan struct{} // closed when paused or blackholed ends
	swallowed  int64         // bytes the client wrote into the blackhole
}

func newFaultyPath(ks *testKeyserver) *faultyPath {
	return &faultyPath{ks: ks, resumed: make(chan struct{})}
}

func (f *faultyPath) dial(ctx context.Context) (net.Conn, error) {
	c, err := f.ks.lis.DialContext(ctx)
	if err != nil {
		return nil, err
	}
	f.dials.Add(1)
	return &faultyConn{Conn: c, path: f, closed: make(chan struct{})}, nil
}

// set changes the path's state; pausing or blackholing holds reads until
// the path is set clear again.
func (f *faultyPath) set(paused, blackholed bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.paused, f.blackholed = paused, blackholed
	if !paused && !blackholed {
		close(f.resumed)
		f.resumed = make(chan struct{})
	}
}

// holding returns a channel closed when reads may go on, or nil if they
// may now.
func (f *faultyPath) holding() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.paused || f.blackholed {
		return f.resumed
	}
	return nil
}

type faultyConn struct {
	net.Conn
	path   *faultyPath
	closed chan struct{}
	once   sync.Once
}

// Read waits while the path holds the keyserver's bytes back. The bytes
// wait in the in-memory pipe, so nothing is lost when a pause ends.
func (c *faultyConn) Read(p []byte) (int, error) {
	for {
		ch := c.path.holding()
		if ch == nil {
			return c.Conn.Read(p)
		}
		select {
		case <-ch:
		case <-c.closed:
			return 0, net.ErrClosed
		}
	}
}

// Write swallows the client's bytes while the path is blackholed.
func (c *faultyConn) Write(p []byte) (int, error) {
	c.path.mu.Lock()
	if c.path.blackholed {
		c.path.swallowed += int64(len(p))
		c.path.mu.Unlock()
		return len(p), nil
	}
	c.path.mu.Unlock()
	return c.Conn.Write(p)
}

func (c *faultyConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// dialFaultyClient returns a Client for the keyservers behind paths, keyed
// by the address the client is given for each.
func dialFaultyClient(t *testing.T, pki *pkitest.MTLS, cfg ClientConfig, paths map[string]*faultyPath) *Client {
	t.Helper()
	tlsCfg, err := link.ClientMTLSConfig(pki.ClientCert, pki.ClientKey, pki.CAFile, keyserverName)
	if err != nil {
		t.Fatal(err)
	}
	cfg.TLS = tlsCfg
	if cfg.Addresses == nil {
		for a := range paths {
			cfg.Addresses = append(cfg.Addresses, a)
		}
	}
	cfg.Dialer = func(ctx context.Context, addr string) (net.Conn, error) { return paths[addr].dial(ctx) }
	c, err := Dial(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestStreamRotationWaitsForNothing: when a stream has reached
// streamMaxAge, the operation that finds it too old goes out on a new
// stream at once: it reaches the keyserver while nothing the keyserver
// sends reaches the client, so opening the stream cost no round trip.
func TestStreamRotationWaitsForNothing(t *testing.T) {
	old := streamMaxAge
	streamMaxAge = 50 * time.Millisecond
	t.Cleanup(func() { streamMaxAge = old })
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	var streams atomic.Int64
	ks := startKeyserver(t, pki, &countingStreams{KeylessServiceServer: newSignerService(t, []crypto.Signer{pkitest.P256Key()}, nil), n: &streams})
	path := newFaultyPath(ks)
	c := dialFaultyClient(t, pki, ClientConfig{}, map[string]*faultyPath{"ks:1": path})
	if err := signVerified(t, c, 0); err != nil {
		t.Fatalf("Sign() = %v", err)
	}
	time.Sleep(2 * streamMaxAge) // the stream is now too old for new operations

	path.set(true, false)
	before, _ := ks.ops.counts()
	errc := make(chan error, 1)
	go func() { errc <- signVerified(t, c, 1) }()
	waitFor(t, "the operation reached the keyserver while its answers were held back (else the new stream waited for one)", func() bool {
		n, _ := ks.ops.counts()
		return n > before
	})
	if n := streams.Load(); n != 2 {
		t.Errorf("the keyserver saw %d streams; want 2, the first and its replacement", n)
	}
	path.set(false, false)
	if err := <-errc; err != nil {
		t.Errorf("Sign() on the new stream = %v", err)
	}
	if n := path.dials.Load(); n != 1 {
		t.Errorf("the client made %d connections; want 1", n)
	}
}

// TestReconnectAfterGoAwayOffRequestPath: a keyserver's GOAWAY at
// MaxConnectionAge on an idle link makes the client connect again by
// itself, before any call needs it; the next operation then makes no
// connection (no TCP and link TLS handshake on the request path).
func TestReconnectAfterGoAwayOffRequestPath(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	conns := &connCounter{}
	ks := startKeyserverWithHealth(t, pki, newSignerService(t, []crypto.Signer{pkitest.P256Key()}, nil), healthpb.HealthCheckResponse_SERVING,
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionAge: time.Second, MaxConnectionAgeGrace: time.Minute}),
		grpc.StatsHandler(conns))
	path := newFaultyPath(ks)
	c := dialFaultyClient(t, pki, ClientConfig{}, map[string]*faultyPath{"ks:1": path})
	if err := signVerified(t, c, 0); err != nil {
		t.Fatalf("Sign() = %v", err)
	}
	// Idle: no call until the keyserver has accepted a second connection
	// and the channel is ready on it.
	waitFor(t, "the client connected again after the keyserver's GOAWAY, with no call", func() bool {
		return conns.n.Load() == 2 && c.conn.GetState() == connectivity.Ready
	})
	dials := path.dials.Load()
	for i := range 3 {
		if err := signVerified(t, c, 1+i); err != nil {
			t.Fatalf("Sign() after the GOAWAY = %v", err)
		}
	}
	if n := path.dials.Load(); n != dials {
		t.Errorf("operations after the reconnection made %d more connections; want 0", n-dials)
	}
	t.Logf("connections: %d dialled, %d accepted", path.dials.Load(), conns.n.Load())
}

// TestClientStreamStallFailsOver: a keyserver whose path stops carrying
// anything, without a reset or a close, stalls its stream: the operations
// waiting on it are sent again to the other keyserver within their
// deadline, none fails, and the silent keyserver gets no operation after
// that (it is suspect for suspectFor).
func TestClientStreamStallFailsOver(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	real := newSignerService(t, []crypto.Signer{pkitest.P256Key()}, nil)
	var farLists, nearLists atomic.Int64
	far := newFaultyPath(startKeyserver(t, pki, &fakeService{next: real, lists: &farLists}))
	near := newFaultyPath(startKeyserver(t, pki, &fakeService{next: real, lists: &nearLists}))
	m := NewMetrics(prometheus.NewRegistry())
	c := dialFaultyClient(t, pki, ClientConfig{Addresses: []string{"far:1", "near:1"}, Metrics: m},
		map[string]*faultyPath{"far:1": far, "near:1": near})
	// Both connected before the first stream opens, so that the two
	// streams go one to each keyserver.
	waitFor(t, "the client reached both keyservers", func() bool {
		if _, err := c.ListKeys(t.Context()); err != nil {
			t.Fatal(err)
		}
		return farLists.Load() > 0 && nearLists.Load() > 0
	})
	for i := range 10 {
		if err := signVerified(t, c, i); err != nil {
			t.Fatalf("Sign() = %v", err)
		}
	}
	if n, _ := far.ks.ops.counts(); n == 0 {
		t.Fatal("no operation reached the first keyserver before its path was cut")
	}

	far.set(false, true)
	const workers, each = 4, 10
	run := func(base int) (failed int64, took time.Duration) {
		start := time.Now()
		var wg sync.WaitGroup
		var n atomic.Int64
		for w := range workers {
			wg.Go(func() {
				for i := range each {
					if err := signVerified(t, c, base+w*each+i); err != nil {
						if n.Add(1) == 1 {
							t.Errorf("Sign() with one keyserver silent = %v", err)
						}
					}
				}
			})
		}
		wg.Wait()
		return n.Load(), time.Since(start)
	}
	retried := func() float64 { return testutil.ToFloat64(m.callRetries.WithLabelValues("far:1", "Unavailable")) }
	failed, took := run(100)
	afterStall := retried()
	t.Logf("%d operations at concurrency %d with far silent: %d failed, %v retried on near, in %v", workers*each, workers, failed, afterStall, took)
	if failed != 0 {
		t.Errorf("%d operations failed with one keyserver silent and the other healthy; want 0", failed)
	}
	if afterStall < 1 || afterStall > workers {
		t.Errorf("%v operations were retried after the silent keyserver; want 1 to %d (those in flight when its stream stalled)", afterStall, workers)
	}

	failed, took = run(200)
	t.Logf("%d more operations: %d failed, in %v", workers*each, failed, took)
	if failed != 0 {
		t.Errorf("%d operations failed once the silent keyserver was suspect; want 0", failed)
	}
	if n := retried(); n != afterStall {
		t.Errorf("%v more operations went to the silent keyserver after its stream stalled; want 0", n-afterStall)
	}
}

// TestHealthIgnoresGoAway: a keyserver that ends connections at its
// MaxConnectionAge stays ready for the health watch (no "gone" and "back"
// lines, keyless_edge_keyserver_up stays 1): the watch connects again
// within lostGrace.
func TestHealthIgnoresGoAway(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	conns := &connCounter{}
	ks := startKeyserverWithHealth(t, pki, newSignerService(t, []crypto.Signer{pkitest.P256Key()}, nil), healthpb.HealthCheckResponse_SERVING,
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionAge: 500 * time.Millisecond, MaxConnectionAgeGrace: time.Second}),
		grpc.StatsHandler(conns))
	path := newFaultyPath(ks)
	logger, logs := newTestLogger()
	c := dialFaultyClient(t, pki, ClientConfig{Metrics: NewMetrics(prometheus.NewRegistry()), Logger: logger}, map[string]*faultyPath{"ks:1": path})
	if err := signVerified(t, c, 0); err != nil {
		t.Fatalf("Sign() = %v", err)
	}
	// The edge's connection and the health watch's, each renewed a few
	// times.
	waitFor(t, "the keyserver's connections were renewed a few times", func() bool { return conns.n.Load() >= 8 })
	time.Sleep(lostGrace + 200*time.Millisecond)
	if st := c.health.state("ks:1"); st != ksReady {
		t.Errorf("keyserver state %q after its connections were renewed; want %q", st, ksReady)
	}
	if out := logs.String(); strings.Contains(out, "keyserver gone") || strings.Contains(out, "keyserver back") {
		t.Errorf("connections renewed at MaxConnectionAge were logged as the keyserver going away:\n%s", out)
	}
}

// TestSlowKeyserversStillAnswer: keyservers that turn slow but keep
// answering (800 ms per operation, against a measured round trip of about
// a millisecond) stall their streams, but an operation's second attempt is
// not watched, so it waits for its answer within the deadline instead of
// failing.
func TestSlowKeyserversStillAnswer(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	real := newSignerService(t, []crypto.Signer{pkitest.P256Key()}, nil)
	var slow atomic.Bool
	var lists atomic.Int64
	svc := &fakeService{next: real, lists: &lists, sign: func(ctx context.Context, req *keylessv1.SignRequest) (*keylessv1.SignResponse, error) {
		if slow.Load() {
			select {
			case <-time.After(800 * time.Millisecond):
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		return real.Sign(ctx, req)
	}}
	a, b := newFaultyPath(startKeyserver(t, pki, svc)), newFaultyPath(startKeyserver(t, pki, svc))
	c := dialFaultyClient(t, pki, ClientConfig{Addresses: []string{"a:1", "b:1"}}, map[string]*faultyPath{"a:1": a, "b:1": b})
	waitFor(t, "the client reached both keyservers", func() bool {
		if _, err := c.ListKeys(t.Context()); err != nil {
			t.Fatal(err)
		}
		return lists.Load() >= 4
	})
	for i := range 10 {
		if err := signVerified(t, c, i); err != nil {
			t.Fatalf("Sign() = %v", err)
		}
	}
	slow.Store(true)
	for i := range 3 {
		start := time.Now()
		if err := signVerified(t, c, 100+i); err != nil {
			t.Errorf("Sign() %d from slow keyservers = %v; want the answer", i, err)
		}
		t.Logf("Sign() %d took %v", i, time.Since(start).Round(time.Millisecond))
	}
}
