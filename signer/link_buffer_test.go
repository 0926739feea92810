package signer

import (
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// newTCPBenchClient serves a bench Service over TCP on 127.0.0.1 with
// mutual TLS and the server options opts, and returns a client with
// testIdentity's certificate and the edge's dial options.
func newTCPBenchClient(b *testing.B, opts ...grpc.ServerOption) keylessv1.KeylessServiceClient {
	b.Helper()
	svc := newBenchService(b)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := grpc.NewServer(append(opts, grpc.Creds(credentials.NewTLS(thePKI().serverTLS())), grpc.StatsHandler(svc.StatsHandler()))...)
	keylessv1.RegisterKeylessServiceServer(srv, svc)
	go func() { _ = srv.Serve(ln) }()
	b.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("passthrough:///"+ln.Addr().String(),
		append(link.DialOptions(), grpc.WithTransportCredentials(credentials.NewTLS(thePKI().clientTLS(testIdentity))))...)
	if err != nil {
		b.Fatalf("grpc.NewClient() = %v", err)
	}
	b.Cleanup(func() { _ = conn.Close() })
	return keylessv1.NewKeylessServiceClient(conn)
}

// BenchmarkLinkReadBuffer measures 64 P-256 signatures in flight on one
// stream over TCP and mutual TLS with the keyserver's transport options
// (link.ServerOptions, which read frames straight from the TLS
// connection) and with gRPC's default 32 KiB read buffer added back, one
// after the other in rounds in the same run. It reports each side's ns/op
// and their ratio (buffer-ratio: link.ServerOptions over the 32 KiB
// buffer; 1 means the same, above 1 slower). ns/op is both together.
func BenchmarkLinkReadBuffer(b *testing.B) {
	const inFlight = 64
	sides := []struct {
		name    string
		client  keylessv1.KeylessServiceClient
		elapsed time.Duration
	}{
		{name: "link", client: newTCPBenchClient(b, link.ServerOptions()...)},
		{name: "read-buffer-32k", client: newTCPBenchClient(b, append(link.ServerOptions(), grpc.ReadBufferSize(32<<10))...)},
	}
	req := benchSignRequest(b)
	for i := range sides {
		streamClosedLoop(b, sides[i].client, req, 2*inFlight, inFlight)
	}
	const rounds = 4
	b.ResetTimer()
	for r := range rounds {
		per := b.N / rounds
		if r == rounds-1 {
			per = b.N - per*(rounds-1)
		}
		if per == 0 {
			continue
		}
		for i := range sides {
			sides[i].elapsed += streamClosedLoop(b, sides[i].client, req, per, inFlight)
		}
	}
	b.StopTimer()
	linkNs := float64(sides[0].elapsed.Nanoseconds()) / float64(b.N)
	bufNs := float64(sides[1].elapsed.Nanoseconds()) / float64(b.N)
	b.ReportMetric(linkNs, "ns/op-link")
	b.ReportMetric(bufNs, "ns/op-read-buffer-32k")
	b.ReportMetric(linkNs/bufNs, "buffer-ratio")
}
