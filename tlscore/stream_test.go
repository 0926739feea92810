package tlscore

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	"github.com/keyless-tls/keyless/internal/pkitest"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// signVerified signs a fresh digest and verifies the signature.
func signVerified(t *testing.T, c *Client, i int) error {
	t.Helper()
	alg, _ := link.AlgorithmFor(algECDSA256)
	d := digest(crypto.SHA256)
	d[0], d[1] = byte(i), byte(i>>8)
	sig, err := c.Sign(t.Context(), mustKeyID(t, pkitest.P256Key().Public()), alg, d, nil)
	if err != nil {
		return err
	}
	if !ecdsa.VerifyASN1(&pkitest.P256Key().PublicKey, d, sig) {
		t.Errorf("signature %d does not verify", i)
	}
	return nil
}

// TestClientStreamBatches: concurrent operations share one stream, several
// to a message, and each gets its own verified answer.
func TestClientStreamBatches(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	ks := startKeyserver(t, pki, newSignerService(t, []crypto.Signer{pkitest.P256Key()}, nil))
	c := dialTestClient(t, pki, ClientConfig{}, map[string]*testKeyserver{"ks:1": ks})
	const workers, each = 32, 40
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				if err := signVerified(t, c, w*each+i); err != nil {
					t.Errorf("Sign() = %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	ks.ops.mu.Lock()
	defer ks.ops.mu.Unlock()
	if len(ks.ops.signs) != workers*each {
		t.Fatalf("keyserver got %d sign operations, want %d", len(ks.ops.signs), workers*each)
	}
	if ks.ops.messages >= len(ks.ops.signs) {
		t.Errorf("%d operations came in %d messages; want several per message under concurrency", len(ks.ops.signs), ks.ops.messages)
	}
	t.Logf("%d operations in %d messages", len(ks.ops.signs), ks.ops.messages)
}

// TestClientStreamUnaryFallback: a keyserver without Stream is called with
// the unary RPCs, and the client stops trying streams.
func TestClientStreamUnaryFallback(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	var lists atomic.Int64
	fake := &fakeService{next: newSignerService(t, []crypto.Signer{pkitest.P256Key(), pkitest.RSAKey()}, nil), noStream: true, lists: &lists}
	ks := startKeyserver(t, pki, fake)
	c := dialTestClient(t, pki, ClientConfig{}, map[string]*testKeyserver{"ks:1": ks})
	for i := range 5 {
		if err := signVerified(t, c, i); err != nil {
			t.Fatalf("Sign() %d = %v", i, err)
		}
	}
	pms, err := c.Decrypt(t.Context(), mustKeyID(t, pkitest.RSAKey().Public()), make([]byte, 256), nil)
	if err != nil || len(pms) != link.PremasterLen {
		t.Fatalf("Decrypt() = %d bytes, %v", len(pms), err)
	}
	if !c.streams.unary.Load() {
		t.Error("the client still uses streams")
	}
	if s, d := ks.ops.counts(); s != 5 || d != 1 {
		t.Errorf("keyserver got %d signs and %d decrypts, want 5 and 1", s, d)
	}
}

// TestClientStreamFailover: operations pending on a keyserver that goes
// away are sent again to the other one and succeed.
func TestClientStreamFailover(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	real := newSignerService(t, []crypto.Signer{pkitest.P256Key()}, nil)
	entered := make(chan struct{}, 100)
	hang := make(chan struct{})
	t.Cleanup(func() { close(hang) })
	var lists atomic.Int64
	dying := startKeyserver(t, pki, &fakeService{next: real, lists: &lists, sign: func(ctx context.Context, _ *keylessv1.SignRequest) (*keylessv1.SignResponse, error) {
		entered <- struct{}{}
		<-hang
		return nil, status.Error(codes.Internal, "never")
	}})
	var goodLists atomic.Int64
	good := startKeyserver(t, pki, &fakeService{next: real, lists: &goodLists})
	c := dialTestClient(t, pki, ClientConfig{Addresses: []string{"dying:1", "good:1"}}, map[string]*testKeyserver{"dying:1": dying, "good:1": good})
	// Connect to both before the first stream opens, so that the two
	// streams go one to each keyserver.
	for deadline := time.Now().Add(10 * time.Second); lists.Load() == 0 || goodLists.Load() == 0; {
		if time.Now().After(deadline) {
			t.Fatal("the client did not reach both keyservers")
		}
		if _, err := c.ListKeys(t.Context()); err != nil {
			t.Fatal(err)
		}
	}

	// Send operations until one hangs on the dying keyserver.
	errc := make(chan error, 100)
	n := 0
	for hung := false; !hung; n++ {
		go func(i int) { errc <- signVerified(t, c, i) }(n)
		select {
		case <-entered:
			hung = true
		case <-time.After(20 * time.Millisecond):
		}
		if n > 50 {
			t.Fatal("no operation reached the dying keyserver")
		}
	}
	dying.srv.Stop()
	for i := range n {
		select {
		case err := <-errc:
			if err != nil {
				t.Errorf("Sign() %d = %v; want it answered by the other keyserver", i, err)
			}
		case <-time.After(DefaultCallTimeout):
			t.Fatal("an operation pending on the stopped keyserver was not sent again in time")
		}
	}
}

// TestClientStreamRotation: streams older than streamMaxAge are replaced
// without failing an operation.
func TestClientStreamRotation(t *testing.T) {
	old := streamMaxAge
	streamMaxAge = 20 * time.Millisecond
	t.Cleanup(func() { streamMaxAge = old })
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	var streams atomic.Int64
	real := newSignerService(t, []crypto.Signer{pkitest.P256Key()}, nil)
	ks := startKeyserver(t, pki, &countingStreams{KeylessServiceServer: real, n: &streams})
	c := dialTestClient(t, pki, ClientConfig{}, map[string]*testKeyserver{"ks:1": ks})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := 0; i < 1000 && streams.Load() < 4; i++ {
				if err := signVerified(t, c, w*1000+i); err != nil {
					t.Errorf("Sign() = %v", err)
					return
				}
				time.Sleep(time.Millisecond)
			}
		})
	}
	wg.Wait()
	if streams.Load() < 4 {
		t.Errorf("%d streams opened; want the stream replaced every 20 ms", streams.Load())
	}
}

// countingStreams counts Stream calls.
type countingStreams struct {
	keylessv1.KeylessServiceServer
	n *atomic.Int64
}

func (s *countingStreams) Stream(stream keylessv1.KeylessService_StreamServer) error {
	s.n.Add(1)
	return s.KeylessServiceServer.Stream(stream)
}

// TestLinkWindowsAreStatic: operations sent one at a time cost one frame
// each way and no flow-control chatter. With gRPC's default dynamic windows
// nearly every message would also bring a bandwidth-delay PING, its ack and
// a WINDOW_UPDATE (see link.DefaultWindowSize).
func TestLinkWindowsAreStatic(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	ks := startKeyserver(t, pki, newSignerService(t, []crypto.Signer{pkitest.P256Key()}, nil))
	c := dialTestClient(t, pki, ClientConfig{}, map[string]*testKeyserver{"ks:1": ks})
	const ops = 40
	for i := range ops {
		if err := signVerified(t, c, i); err != nil {
			t.Fatalf("Sign() %d = %v", i, err)
		}
	}
	pingsIn, pingsOut := ks.frames.Get(http2.FramePing)
	updatesIn, updatesOut := ks.frames.Get(http2.FrameWindowUpdate)
	dataIn, dataOut := ks.frames.Get(http2.FrameData)
	t.Logf("keyserver read %d DATA, %d PING, %d WINDOW_UPDATE frames and wrote %d, %d, %d", dataIn, pingsIn, updatesIn, dataOut, pingsOut, updatesOut)
	if pingsIn+pingsOut > 0 {
		t.Errorf("%d operations brought %d PING frames from the edge and %d to it; want none", ops, pingsIn, pingsOut)
	}
	if updatesIn+updatesOut > 2 {
		t.Errorf("%d operations brought %d WINDOW_UPDATE frames from the edge and %d to it; want at most 2", ops, updatesIn, updatesOut)
	}
	if dataIn < ops || dataOut < ops {
		t.Errorf("the keyserver read %d and wrote %d DATA frames for %d operations sent one at a time; the count is wrong", dataIn, dataOut, ops)
	}
}

// TestClientSurvivesMaxConnectionAge: a keyserver that ends every
// connection after a short age (gRPC's MaxConnectionAge: a GOAWAY, then a
// grace) makes the client reconnect, and no operation fails: streams move
// to the new connection as they age, and an operation whose stream ends
// with its connection is sent again.
func TestClientSurvivesMaxConnectionAge(t *testing.T) {
	old := streamMaxAge
	streamMaxAge = 100 * time.Millisecond
	t.Cleanup(func() { streamMaxAge = old })
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	conns := &connCounter{}
	ks := startKeyserverWithHealth(t, pki, newSignerService(t, []crypto.Signer{pkitest.P256Key()}, nil), healthpb.HealthCheckResponse_SERVING,
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionAge: 300 * time.Millisecond, MaxConnectionAgeGrace: time.Second}),
		grpc.StatsHandler(conns))
	c := dialTestClient(t, pki, ClientConfig{}, map[string]*testKeyserver{"ks:1": ks})
	var wg sync.WaitGroup
	var failed atomic.Int64
	for w := range 4 {
		wg.Go(func() {
			for i := 0; conns.n.Load() < 4 && i < 100000; i++ {
				if err := signVerified(t, c, w*100000+i); err != nil {
					if failed.Add(1) == 1 {
						t.Errorf("Sign() = %v", err)
					}
				}
				time.Sleep(time.Millisecond)
			}
		})
	}
	wg.Wait()
	if n := conns.n.Load(); n < 4 {
		t.Errorf("the client opened %d connections; want a new one after each 300 ms", n)
	}
	if n := failed.Load(); n != 0 {
		t.Errorf("%d operations failed across connection ages", n)
	}
}

// connCounter is a stats handler that counts the connections a server
// accepted.
type connCounter struct{ n atomic.Int64 }

func (c *connCounter) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context   { return ctx }
func (c *connCounter) HandleRPC(context.Context, stats.RPCStats)                         {}
func (c *connCounter) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (c *connCounter) HandleConn(_ context.Context, s stats.ConnStats) {
	if _, ok := s.(*stats.ConnBegin); ok {
		c.n.Add(1)
	}
}
