package tlscore

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyless-tls/keyless/internal/pkitest"
	"github.com/keyless-tls/keyless/link"
)

// TestClientLinkHandshakeError checks that a call that reaches no keyserver
// because the link's handshake failed is a *LinkHandshakeError that keeps
// the call's status and the TLS error, and that calls failing for other
// reasons, or after a handshake succeeded again, are not.
func TestClientLinkHandshakeError(t *testing.T) {
	edgePKI, otherPKI := pkitest.NewMTLS(t, keyserverName, edgeIdentity), pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	real := newSignerService(t, []crypto.Signer{pkitest.P256Key()}, nil)
	var signs, decrypts atomic.Int64
	// untrusted has a certificate from a CA the edge does not trust;
	// trusted's signs fail with Unavailable, as with an unplugged HSM.
	untrusted := startKeyserver(t, otherPKI, real)
	trusted := startKeyserver(t, edgePKI, unavailableService(real, &signs, &decrypts))
	// Each connection goes to untrusted until useTrusted is set.
	var useTrusted atomic.Bool
	c, err := Dial(ClientConfig{Addresses: []string{keyserverName + ":7443"}, TLS: mustClientTLS(t, edgePKI), ReconnectBackoff: 20 * time.Millisecond,
		Dialer: func(ctx context.Context, _ string) (net.Conn, error) {
			if useTrusted.Load() {
				return trusted.lis.DialContext(ctx)
			}
			return untrusted.lis.DialContext(ctx)
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	_, err = c.ListKeys(t.Context())
	var hs *LinkHandshakeError
	if !errors.As(err, &hs) {
		t.Fatalf("ListKeys from an untrusted keyserver = %v, want a *LinkHandshakeError", err)
	}
	if code := status.Code(err); code != codes.Unavailable && code != codes.DeadlineExceeded {
		t.Errorf("status.Code(%v) = %v, want Unavailable or DeadlineExceeded", err, code)
	}
	var unknownCA x509.UnknownAuthorityError
	if !errors.As(err, &unknownCA) {
		t.Errorf("ListKeys error %v does not wrap the certificate's verification error", err)
	}
	if err := signOnce(t, c); !errors.As(err, &hs) {
		t.Errorf("Sign from an untrusted keyserver = %v, want a *LinkHandshakeError", err)
	}

	// A trusted keyserver: the handshake succeeds, and the Unavailable of
	// its signs is the keyserver's own, not the link's.
	useTrusted.Store(true)
	for deadline := time.Now().Add(10 * time.Second); ; {
		_, err := c.ListKeys(t.Context())
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ListKeys from the trusted keyserver still fails: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	err = signOnce(t, c)
	if status.Code(err) != codes.Unavailable || errors.As(err, &hs) {
		t.Errorf("Sign answered Unavailable by the keyserver = %v, want Unavailable and no *LinkHandshakeError", err)
	}
	if signs.Load() == 0 {
		t.Errorf("the trusted keyserver saw no Sign")
	}
}

// TestClientUnreachableIsNotHandshakeError checks that a keyserver nobody
// listens for gives Unavailable without a *LinkHandshakeError: waiting may
// mend it.
func TestClientUnreachableIsNotHandshakeError(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	c, err := Dial(ClientConfig{Addresses: []string{keyserverName + ":7443"}, TLS: mustClientTLS(t, pki),
		Dialer: func(context.Context, string) (net.Conn, error) { return nil, errors.New("connection refused") }})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = c.ListKeys(t.Context())
	var hs *LinkHandshakeError
	if status.Code(err) != codes.Unavailable || errors.As(err, &hs) {
		t.Errorf("ListKeys from no keyserver = %v, want Unavailable and no *LinkHandshakeError", err)
	}
}

// mustClientTLS returns the edge's side of the link for pki.
func mustClientTLS(t *testing.T, pki *pkitest.MTLS) *tls.Config {
	t.Helper()
	cfg, err := link.ClientMTLSConfig(pki.ClientCert, pki.ClientKey, pki.CAFile, keyserverName)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}
