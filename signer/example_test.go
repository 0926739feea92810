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

	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
	"github.com/keyless-tls/keyless/signer"
)

// ExampleNewService serves the KeylessService over an in-memory key store,
// with a health service that follows the store. A keyserver would use an
// HSM-backed store (package hsm) and mTLS credentials
// (grpc.Creds(credentials.NewTLS(cfg))) instead.
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
	logger := hclog.New(&hclog.LoggerOptions{Name: "keyserver", Level: hclog.Info})
	svc, err := signer.NewService(signer.Config{
		Keys:          keys,
		MaxConcurrent: 2,  // an HSM is fastest with few callers
		MaxQueued:     64, // beyond this, fail fast with ResourceExhausted
		Logger:        logger.Named("signer"),
	})
	if err != nil {
		log.Fatal(err)
	}

	srv := grpc.NewServer()
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
