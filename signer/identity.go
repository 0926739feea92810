package signer

import (
	"context"
	"crypto/x509"
	"fmt"
	"strings"
	"sync/atomic"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// verifiedLeaf returns the verified leaf certificate of p (nil if the
// connection has none: no TLS, or a certificate that crypto/tls did not
// verify).
//
// Only VerifiedChains is trusted: PeerCertificates holds whatever the client
// sent, verified or not.
func verifiedLeaf(p *peer.Peer) *x509.Certificate {
	if p == nil {
		return nil
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.VerifiedChains) == 0 || len(info.State.VerifiedChains[0]) == 0 {
		return nil
	}
	return info.State.VerifiedChains[0][0]
}

// identityResult is what identify finds for one verified leaf certificate
// under one policy. It is immutable.
type identityResult struct {
	leaf *x509.Certificate
	pol  *Policy
	addr string // the peer's network address
	// identity is the listed identity when ok; otherwise the denied name,
	// or the first name of the certificate (or ""), and reason says why it
	// is refused.
	identity string
	ok       bool
	reason   string
}

// connIdentity caches, for one connection, the caller's identity, so that
// the certificate's names are not gathered and looked up in the policy at
// every request. The stats handler puts one in each connection's context
// (TagConn), so it lives and dies with the connection and holds one entry.
// The entry is used only for the same leaf certificate and the same
// policy: a policy reload ([Service.SetPolicy] stores a new *Policy) makes
// the next request of every connection look its identity up again in the
// policy now in force. The entry holds the policy and the certificate, so
// neither address can be reused while it is cached. It is safe for
// concurrent use: requests on the connection race to store equal results.
type connIdentity struct {
	last atomic.Pointer[identityResult]
}

type connIdentityKey struct{}

// lookupIdentity identifies leaf under pol.
func lookupIdentity(p *peer.Peer, leaf *x509.Certificate, pol *Policy) *identityResult {
	r := &identityResult{leaf: leaf, pol: pol}
	if p != nil && p.Addr != nil {
		r.addr = p.Addr.String()
	}
	if leaf == nil {
		r.reason = "the connection has no verified client certificate"
		return r
	}
	r.identity, r.ok, r.reason = pol.admit(CertificateNames(leaf))
	return r
}

// identify returns the caller's identity under pol: the first name of its
// verified client certificate that the policy lists. It records in c what
// it found, and returns a *PermissionError when there is no certificate or
// no listed name.
func identify(ctx context.Context, pol *Policy, c *call) (string, error) {
	c.identified = true
	p, _ := peer.FromContext(ctx)
	leaf := verifiedLeaf(p)
	cache, _ := ctx.Value(connIdentityKey{}).(*connIdentity)
	var r *identityResult
	if cache != nil && leaf != nil {
		if r = cache.last.Load(); r != nil && (r.leaf != leaf || r.pol != pol) {
			r = nil
		}
	}
	if r == nil {
		r = lookupIdentity(p, leaf, pol)
		if cache != nil && leaf != nil {
			cache.last.Store(r)
		}
	}
	c.edgeAddress = r.addr
	c.identity = r.identity
	if !r.ok {
		return "", &PermissionError{Reason: r.reason}
	}
	return r.identity, nil
}

func notListed(names []string) string {
	if len(names) == 0 {
		return "the client certificate has no DNS or URI name, so it matches no identity of the policy"
	}
	return fmt.Sprintf("no name of the client certificate (%s) is an identity of the policy", strings.Join(names, ", "))
}
