package tlscore_test

import (
	"context"
	"net"
	"os"
	"os/signal"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/keyless-tls/keyless/link"
	"github.com/keyless-tls/keyless/tlscore"
)

// An edge: connect to the keyservers, load the certificates, build the TLS
// configuration and serve HTTPS in front of an origin until interrupted.
func ExampleNewServerTLSConfig() {
	logger := hclog.New(&hclog.LoggerOptions{Name: "edge"})
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	mtls, err := link.ClientMTLSConfig("edge.pem", "edge.key", "keyserver-ca.pem", "keyserver.internal")
	if err != nil {
		logger.Error("keyserver credentials", "error", err)
		return
	}
	client, err := tlscore.Dial(tlscore.ClientConfig{
		Addresses:   []string{"10.0.0.1:6443", "10.0.0.2:6443"},
		TLS:         mtls,
		CallTimeout: 2 * time.Second,
		Logger:      logger,
	})
	if err != nil {
		logger.Error("keyserver client", "error", err)
		return
	}
	defer client.Close()

	store, err := tlscore.NewCertStore(tlscore.CertStoreConfig{Client: client, Default: "default.pem", Logger: logger})
	if err != nil {
		logger.Error("certificate store", "error", err)
		return
	}
	if err := store.Load(ctx, "/etc/edge/certs"); err != nil {
		logger.Error("certificates", "error", err)
		return
	}
	tlsConfig, err := tlscore.NewServerTLSConfig(tlscore.ServerConfig{
		Certificates:   store,
		RSAKeyExchange: []string{"legacy.example.com"},
		Logger:         logger,
	})
	if err != nil {
		logger.Error("TLS config", "error", err)
		return
	}

	www, _ := tlscore.ParseOrigin("http://127.0.0.1:8080")
	api, _ := tlscore.ParseOrigin("http://127.0.0.1:9090/v1")
	proxy, err := tlscore.NewProxy(tlscore.ProxyConfig{
		Routes: []tlscore.Route{
			{Hosts: []string{"api.example.com"}, Origin: api, HostHeader: "api.internal"},
			{Origin: www}, // every other host name
		},
		Logger: logger,
	})
	if err != nil {
		logger.Error("routes", "error", err)
		return
	}
	ln, err := net.Listen("tcp", ":443")
	if err != nil {
		logger.Error("listen", "error", err)
		return
	}
	if err := tlscore.ServeHTTP(ctx, ln, tlsConfig, proxy, 30*time.Second, logger); err != nil {
		logger.Error("serve", "error", err)
	}
}

// A keyserver's gRPC listener with mutual TLS 1.3.
func ExampleServerMTLSConfig() {
	cfg, err := link.ServerMTLSConfig("keyserver.pem", "keyserver.key", "edge-ca.pem")
	if err != nil {
		panic(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(cfg)))
	// Register signer.NewService(...) and a health server on srv, then:
	ln, err := net.Listen("tcp", "127.0.0.1:6443")
	if err != nil {
		panic(err)
	}
	go srv.Serve(ln)
	defer srv.GracefulStop()
}
