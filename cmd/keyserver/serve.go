package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"

	"github.com/keyless-tls/keyless/hsm"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
	"github.com/keyless-tls/keyless/signer"
	"github.com/keyless-tls/keyless/tlscore"
)

// maxRequestSize bounds every gRPC request. The largest legitimate request,
// a Decrypt for an RSA-4096 key or an Ed25519 Sign, is under 1 KiB.
const maxRequestSize = 16 << 10

type serveFlags struct {
	hsm           hsmFlags
	listen        string
	tlsCert       string
	tlsKey        string
	clientCA      string
	maxConcurrent int
	maxQueued     int
	healthEvery   time.Duration
	grace         time.Duration
	logLevel      string
	logJSON       bool
}

func serve(ctx context.Context, args []string, stderr io.Writer) error {
	var f serveFlags
	fs := flag.NewFlagSet("keyserver serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	f.hsm.register(fs)
	fs.StringVar(&f.listen, "listen", "127.0.0.1:7443", "address of the gRPC listener")
	fs.StringVar(&f.tlsCert, "tls-cert", "", "PEM certificate chain of the keyserver (required)")
	fs.StringVar(&f.tlsKey, "tls-key", "", "PEM private key of the keyserver's TLS certificate (required)")
	fs.StringVar(&f.clientCA, "client-ca", "", "PEM CA certificates that issue edge client certificates (required)")
	fs.IntVar(&f.maxConcurrent, "max-concurrent", 4, "key operations running in the HSM at once; more wait in a queue")
	fs.IntVar(&f.maxQueued, "max-queued", 1024, "key operations waiting for the HSM before new ones are refused")
	fs.DurationVar(&f.healthEvery, "health-interval", 2*time.Second, "how often the HSM's health is checked")
	fs.DurationVar(&f.grace, "grace", 10*time.Second, "on shutdown, how long in-flight operations may take to finish")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: trace, debug, info, warn or error")
	fs.BoolVar(&f.logJSON, "log-json", false, "log as JSON lines")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("serve: unexpected arguments %q", fs.Args())
	}
	logger, err := newLogger("keyserver", f.logLevel, f.logJSON, stderr)
	if err != nil {
		return err
	}
	for name, v := range map[string]string{"-tls-cert": f.tlsCert, "-tls-key": f.tlsKey, "-client-ca": f.clientCA} {
		if v == "" {
			return fmt.Errorf("serve: %s is required", name)
		}
	}
	tlsConfig, err := tlscore.ServerMTLSConfig(f.tlsCert, f.tlsKey, f.clientCA)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	hcfg, err := f.hsm.config(logger)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	module, err := hsm.Open(hcfg)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	defer module.Close()

	svc, err := signer.NewService(signer.Config{
		Keys:          module,
		MaxConcurrent: f.maxConcurrent,
		MaxQueued:     f.maxQueued,
		Logger:        logger.Named("signer"),
	})
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	gs := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(tlsConfig)),
		grpc.MaxRecvMsgSize(maxRequestSize),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	keylessv1.RegisterKeylessServiceServer(gs, svc)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)

	ln, err := net.Listen("tcp", f.listen)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	keys, err := module.Keys(ctx)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	go signer.WatchHealth(watchCtx, module, hs, f.healthEvery)

	logger.Info("keyserver ready", "listen", ln.Addr().String(), "module", hcfg.ModulePath,
		"keys", len(keys), "max_concurrent", f.maxConcurrent, "max_queued", f.maxQueued)
	errc := make(chan error, 1)
	go func() { errc <- gs.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	logger.Info("shutting down: finishing in-flight operations", "grace", f.grace)
	hs.Shutdown()
	stopped := make(chan struct{})
	go func() { gs.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(f.grace):
		logger.Warn("grace period over: closing remaining connections")
		gs.Stop()
	}
	if err := <-errc; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("serve: %w", err)
	}
	logger.Info("stopped")
	return nil
}
