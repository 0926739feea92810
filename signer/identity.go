package signer

import (
	"context"
	"crypto/x509"
	"fmt"
	"strings"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// peerOf returns the verified leaf certificate of the gRPC peer in ctx (nil
// if the connection has none: no TLS, or a certificate that crypto/tls did
// not verify) and the peer's network address.
//
// Only VerifiedChains is trusted: PeerCertificates holds whatever the client
// sent, verified or not.
func peerOf(ctx context.Context) (leaf *x509.Certificate, addr string) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, ""
	}
	if p.Addr != nil {
		addr = p.Addr.String()
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.VerifiedChains) == 0 || len(info.State.VerifiedChains[0]) == 0 {
		return nil, addr
	}
	return info.State.VerifiedChains[0][0], addr
}

// identify returns the caller's identity under pol: the first name of its
// verified client certificate that the policy lists. It records in c what
// it found, and returns a *PermissionError when there is no certificate or
// no listed name.
func identify(ctx context.Context, pol *Policy, c *call) (string, error) {
	c.identified = true
	leaf, addr := peerOf(ctx)
	c.edgeAddress = addr
	if leaf == nil {
		return "", &PermissionError{Reason: "the connection has no verified client certificate"}
	}
	names := CertificateNames(leaf)
	id, ok := pol.Identify(names)
	if !ok {
		if len(names) > 0 {
			c.identity = names[0]
		}
		return "", &PermissionError{Reason: notListed(names)}
	}
	c.identity = id
	return id, nil
}

func notListed(names []string) string {
	if len(names) == 0 {
		return "the client certificate has no DNS or URI name, so it matches no identity of the policy"
	}
	return fmt.Sprintf("no name of the client certificate (%s) is an identity of the policy", strings.Join(names, ", "))
}
