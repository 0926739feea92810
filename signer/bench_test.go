package signer

import (
	"context"
	"crypto"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/test/bufconn"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// newBenchService returns a Service as cmd/keyserver wires one: an audit
// log (here to io.Discard) fanned out with the metrics, a quota and a
// limiter, over in-memory keys. tweaks change its Config.
func newBenchService(b *testing.B, tweaks ...func(*Config)) *Service {
	b.Helper()
	var svc *Service
	metrics := NewMetrics(prometheus.NewRegistry(), func() *Policy { return svc.Policy() })
	keys := newTestMemoryStore(b)
	cfg := Config{
		Keys:          keys,
		Policy:        testPolicy(b),
		Quota:         Quota{MaxInFlight: 256},
		Audit:         MultiAuditor(NewAuditLog(io.Discard), metrics),
		MaxConcurrent: 4,
		MaxQueued:     1024,
	}
	for _, tweak := range tweaks {
		tweak(&cfg)
	}
	svc, err := NewService(cfg)
	if err != nil {
		b.Fatalf("NewService() = %v", err)
	}
	ks, _ := keys.Keys(b.Context())
	metrics.SetKeys(ks)
	return svc
}

// newBenchClient serves a Service as cmd/keyserver wires one (mutual TLS,
// the stats handler, an audit log, here to io.Discard, fanned out with the
// metrics, a limiter) over bufconn, and returns a client with testIdentity's
// certificate.
func newBenchClient(b *testing.B, opts ...grpc.ServerOption) keylessv1.KeylessServiceClient {
	b.Helper()
	return newBenchClientOf(b, newBenchService(b), opts...)
}

// newBenchClientOf is newBenchClient for the Service svc.
func newBenchClientOf(b *testing.B, svc *Service, opts ...grpc.ServerOption) keylessv1.KeylessServiceClient {
	b.Helper()
	lis := bufconn.Listen(1 << 20)
	opts = append(append(link.ServerOptions(), grpc.Creds(credentials.NewTLS(thePKI().serverTLS())),
		grpc.StatsHandler(svc.StatsHandler())), opts...)
	srv := grpc.NewServer(opts...)
	keylessv1.RegisterKeylessServiceServer(srv, svc)
	go func() { _ = srv.Serve(lis) }()
	b.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(credentials.NewTLS(thePKI().clientTLS(testIdentity))))
	if err != nil {
		b.Fatalf("grpc.NewClient() = %v", err)
	}
	b.Cleanup(func() { _ = conn.Close() })
	return keylessv1.NewKeylessServiceClient(conn)
}

// reportCPU reports the CPU time the process used per operation since
// start (user and system, every goroutine), as cpu-ns/op: on a busy
// machine it varies far less than the wall-clock ns/op.
func reportCPU(b *testing.B) func() {
	b.Helper()
	start := processCPU()
	return func() { b.ReportMetric(float64(processCPU()-start)/float64(b.N), "cpu-ns/op") }
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func benchSignRequest(b *testing.B) *keylessv1.SignRequest {
	b.Helper()
	return &keylessv1.SignRequest{
		KeyId:     mustKeyID(b, testP256Key().Public()),
		Algorithm: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA256,
		Digest:    testDigest(crypto.SHA256, "bench"),
		Context:   &keylessv1.RequestContext{ServerName: "www.example.com", ClientAddress: "203.0.113.9:443", ConnectionId: "conn-7"},
	}
}

// BenchmarkServiceSign measures one ECDSA P-256 Sign with an in-memory key
// through the whole keyserver path: client, gRPC over mutual TLS, stats
// handler, identity, policy, quota, limiter, audit log and metrics. Both
// ends run in the benchmark's process.
func BenchmarkServiceSign(b *testing.B) {
	client := newBenchClient(b)
	req := benchSignRequest(b)
	ctx := b.Context()
	if _, err := client.Sign(ctx, req); err != nil {
		b.Fatalf("Sign() = %v", err)
	}
	b.ReportAllocs()
	defer reportCPU(b)()
	for b.Loop() {
		if _, err := client.Sign(ctx, req); err != nil {
			b.Fatalf("Sign() = %v", err)
		}
	}
}

// BenchmarkServiceSignParallel is BenchmarkServiceSign with concurrent
// callers on the one connection, as an edge makes them.
func BenchmarkServiceSignParallel(b *testing.B) {
	client := newBenchClient(b)
	req := benchSignRequest(b)
	ctx := b.Context()
	b.ReportAllocs()
	b.SetParallelism(4)
	defer reportCPU(b)()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := client.Sign(ctx, req); err != nil {
				b.Errorf("Sign() = %v", err)
				return
			}
		}
	})
}

// BenchmarkServiceSignHandler measures the service's own per-request work:
// the Sign handler called directly, as gRPC calls it after the stats
// handler tagged the connection and the RPC, with the audit log and
// metrics.
func BenchmarkServiceSignHandler(b *testing.B) {
	svc := newBenchService(b)
	sh := svc.StatsHandler()
	ctx := sh.TagConn(edgeContext(b.Context(), testIdentity), &stats.ConnTagInfo{})
	req := benchSignRequest(b)
	info := &stats.RPCTagInfo{FullMethodName: keylessv1.KeylessService_Sign_FullMethodName}
	b.ReportAllocs()
	defer reportCPU(b)()
	for b.Loop() {
		rctx := sh.TagRPC(ctx, info)
		if _, err := svc.Sign(rctx, req); err != nil {
			b.Fatalf("Sign() = %v", err)
		}
		sh.HandleRPC(rctx, &stats.End{})
	}
}
