package signer

import (
	"crypto/x509"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// TestRevokedCredentialRefused checks that once Config.Revoked reports a
// connection's client certificate, every request on that connection, unary
// or on a Stream opened before, is refused with Unauthenticated.
func TestRevokedCredentialRefused(t *testing.T) {
	var revoked atomic.Bool
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t), Revoked: func(c *x509.Certificate) bool {
		return revoked.Load() && !c.IsCA
	}})
	var req *keylessv1.SignRequest
	for _, tc := range signCases(t) {
		if tc.wantCode == codes.OK {
			req = tc.req
			break
		}
	}
	stream, err := ts.client.Stream(testContext(t, 0))
	if err != nil {
		t.Fatal(err)
	}
	streamSign := func() (*keylessv1.OperationResult, error) {
		op := &keylessv1.Operation{Id: 1, Request: &keylessv1.Operation_Sign{Sign: req}}
		if err := stream.Send(&keylessv1.StreamRequest{Operations: []*keylessv1.Operation{op}}); err != nil {
			return nil, err
		}
		resp, err := stream.Recv()
		if err != nil {
			return nil, err
		}
		return resp.GetResults()[0], nil
	}
	if _, err := ts.client.Sign(testContext(t, 0), req); err != nil {
		t.Fatalf("Sign() before revocation = %v", err)
	}
	if r, err := streamSign(); err != nil || r.GetError() != nil {
		t.Fatalf("stream Sign before revocation = %v, %v", r, err)
	}
	revoked.Store(true)
	if _, err := ts.client.Sign(testContext(t, 0), req); status.Code(err) != codes.Unauthenticated {
		t.Errorf("Sign() after revocation = %v, want Unauthenticated", err)
	}
	if r, err := streamSign(); err != nil || codes.Code(r.GetError().GetCode()) != codes.Unauthenticated {
		t.Errorf("stream Sign after revocation = %v, %v, want Unauthenticated", r, err)
	}
	waitUntil(t, "the refusal's audit record", func() bool { return strings.Contains(ts.audit.String(), "has been revoked") })
}

// TestExpiredCredentialRefused checks that a request whose connection's
// certificate chain has expired since the handshake is refused.
func TestExpiredCredentialRefused(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t)})
	ctx := ts.edgeContext(t, 0)
	if err := ts.svc.checkCredential(ctx, time.Now()); err != nil {
		t.Fatalf("checkCredential(now) = %v", err)
	}
	for _, later := range []time.Duration{25 * time.Hour, 365 * 24 * time.Hour} {
		if err := ts.svc.checkCredential(ctx, time.Now().Add(later)); !errors.Is(err, ErrCredentialExpired) {
			t.Errorf("checkCredential(now+%v) = %v, want ErrCredentialExpired", later, err)
		}
	}
	if got := status.Code(toStatus(ErrCredentialExpired)); got != codes.Unauthenticated {
		t.Errorf("toStatus(ErrCredentialExpired) = %v, want Unauthenticated", got)
	}
}
