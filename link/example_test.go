package link_test

import (
	"github.com/hashicorp/go-hclog"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
	"github.com/keyless-tls/keyless/signer"
	"google.golang.org/grpc"
)

// A keyserver's gRPC listener that also admits only the identities a
// policy names, and logs every refused handshake once.
func ExampleMTLSCredentials_ServerCredentials() {
	creds, err := link.LoadMTLSCredentials("keyserver.pem", "keyserver.key", "edge-ca.pem")
	if err != nil {
		panic(err)
	}
	var svc *signer.Service // signer.NewService(signer.Config{Keys: ..., Policy: ..., Audit: ...})
	logger := hclog.Default()
	srv := grpc.NewServer(append(link.ServerOptions(),
		grpc.Creds(creds.ServerCredentials(svc.CheckPeer, logger.Named("mtls"), link.HandshakeObserver{})),
		grpc.StatsHandler(svc.StatsHandler()),
	)...)
	keylessv1.RegisterKeylessServiceServer(srv, svc)
	// Serve, and call creds.Reload() (and svc.SetPolicy) on SIGHUP.
}
