package signer_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"log"
	"net"
	"os"
	"os/signal"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
	"github.com/keyless-tls/keyless/signer"
)

// ExampleNewService serves the KeylessService over an in-memory key store,
// with a policy, an audit trail on standard error and a health service that
// follows the store. A keyserver would use an HSM-backed store (package hsm)
// and mTLS credentials that check the policy's allow-list in the handshake
// (grpc.Creds(creds.ServerCredentials(svc.CheckPeer, logger, obs)), package
// link) instead.
func ExampleNewService() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		log.Fatal(err)
	}
	keys, err := signer.NewMemoryStore(key)
	if err != nil {
		log.Fatal(err)
	}
	policy, err := signer.ParsePolicy("policy.yaml", []byte(`
rules:
  - name: edges
    identities: [spiffe://example.com/edge/1]
    keys: ["*"]
    operations: [sign]
    schemes: [default]
`))
	if err != nil {
		log.Fatal(err)
	}
	logger := hclog.New(&hclog.LoggerOptions{Name: "keyserver", Level: hclog.Info})
	svc, err := signer.NewService(signer.Config{
		Keys:          keys,
		Policy:        policy,
		Quota:         signer.Quota{MaxInFlight: 32},
		Audit:         signer.NewAuditLog(os.Stderr),
		MaxConcurrent: 2,  // an HSM is fastest with few callers
		MaxQueued:     64, // beyond this, fail fast with ResourceExhausted
		Logger:        logger.Named("signer"),
	})
	if err != nil {
		log.Fatal(err)
	}

	srv := grpc.NewServer(append(link.ServerOptions(), grpc.StatsHandler(svc.StatsHandler()))...)
	keylessv1.RegisterKeylessServiceServer(srv, svc)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	go signer.WatchHealth(ctx, keys, hs, 5*time.Second)

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		<-ctx.Done()
		srv.GracefulStop()
	}()
	if err := srv.Serve(lis); err != nil {
		log.Fatal(err)
	}
}
