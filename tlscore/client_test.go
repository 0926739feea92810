package tlscore

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/tls"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/keyless-tls/keyless/internal/pkitest"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

func TestClientConfigValidate(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	good, err := link.ClientMTLSConfig(pki.ClientCert, pki.ClientKey, pki.CAFile, keyserverName)
	if err != nil {
		t.Fatal(err)
	}
	noCert := good.Clone()
	noCert.GetClientCertificate = nil
	tls12 := good.Clone()
	tls12.MinVersion = tls.VersionTLS12
	noName := good.Clone()
	noName.ServerName = ""

	tests := []struct {
		name    string
		cfg     ClientConfig
		wantErr string
	}{
		{"ok", ClientConfig{Addresses: []string{"ks:443"}, TLS: good}, ""},
		{"ok/several", ClientConfig{Addresses: []string{"ks1:443", "ks2:443"}, TLS: good, CallTimeout: time.Second}, ""},
		{"ok/one-address-no-server-name", ClientConfig{Addresses: []string{"ks:443"}, TLS: noName}, ""},
		{"ok/dns", ClientConfig{Addresses: []string{"dns:///keyservers.internal:443"}, TLS: good}, ""},
		{"dns-among-others", ClientConfig{Addresses: []string{"dns:///keyservers.internal:443", "ks:443"}, TLS: good}, "must be the only address"},
		{"dns-no-port", ClientConfig{Addresses: []string{"dns:///keyservers.internal"}, TLS: good}, "not host:port"},
		{"no-addresses", ClientConfig{TLS: good}, "Addresses is empty"},
		{"empty-address", ClientConfig{Addresses: []string{""}, TLS: good}, "not host:port"},
		{"no-port", ClientConfig{Addresses: []string{"ks.example.com"}, TLS: good}, "not host:port"},
		{"duplicate", ClientConfig{Addresses: []string{"ks:443", "ks:443"}, TLS: good}, "twice"},
		{"no-TLS", ClientConfig{Addresses: []string{"ks:443"}}, "TLS is nil"},
		{"no-client-certificate", ClientConfig{Addresses: []string{"ks:443"}, TLS: noCert}, "no client certificate"},
		{"TLS12", ClientConfig{Addresses: []string{"ks:443"}, TLS: tls12}, "TLS 1.3"},
		{"several-without-server-name", ClientConfig{Addresses: []string{"ks1:443", "ks2:443"}, TLS: noName}, "ServerName is required"},
		{"negative-timeout", ClientConfig{Addresses: []string{"ks:443"}, TLS: good, CallTimeout: -time.Second}, "CallTimeout"},
		{"negative-keepalive", ClientConfig{Addresses: []string{"ks:443"}, TLS: good, KeepaliveInterval: -time.Second}, "KeepaliveInterval"},
		{"negative-reconnect-backoff", ClientConfig{Addresses: []string{"ks:443"}, TLS: good, ReconnectBackoff: -time.Second}, "ReconnectBackoff"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Dial(tt.cfg)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Dial() = %v", err)
				}
				if err := c.Close(); err != nil {
					t.Errorf("Close() = %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("Dial() = %v, want an error containing %q", err, tt.wantErr)
			}
		})
	}
}

// unavailableService fails every Sign and Decrypt with Unavailable and counts
// them.
func unavailableService(next keylessv1.KeylessServiceServer, signs, decrypts *atomic.Int64) *fakeService {
	return &fakeService{
		next: next,
		sign: func(context.Context, *keylessv1.SignRequest) (*keylessv1.SignResponse, error) {
			signs.Add(1)
			return nil, status.Error(codes.Unavailable, "HSM unplugged")
		},
		decrypt: func(context.Context, *keylessv1.DecryptRequest) (*keylessv1.DecryptResponse, error) {
			decrypts.Add(1)
			return nil, status.Error(codes.Unavailable, "HSM unplugged")
		},
	}
}

func signOnce(t *testing.T, c *Client) error {
	t.Helper()
	id := mustKeyID(t, pkitest.P256Key().Public())
	alg, _ := link.AlgorithmFor(algECDSA256)
	_, err := c.Sign(t.Context(), id, alg, digest(crypto.SHA256), nil)
	return err
}

// TestClientSignRetry checks that a Sign or Decrypt answered Unavailable is
// retried once, on the other keyserver when there is one.
func TestClientSignRetry(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	real := newSignerService(t, []crypto.Signer{pkitest.P256Key(), pkitest.RSAKey()}, nil)
	var badSigns, badDecrypts, badLists, goodLists atomic.Int64
	badService := unavailableService(real, &badSigns, &badDecrypts)
	badService.lists = &badLists
	bad := startKeyserver(t, pki, badService)
	good := startKeyserver(t, pki, &fakeService{next: real, lists: &goodLists})

	t.Run("two-keyservers", func(t *testing.T) {
		c := dialTestClient(t, pki, ClientConfig{Addresses: []string{"bad:1", "good:1"}}, map[string]*testKeyserver{"bad:1": bad, "good:1": good})
		// Until both keyservers are connected, round-robin has only one
		// to retry on: wait until each has answered a ListKeys.
		for deadline := time.Now().Add(10 * time.Second); badLists.Load() == 0 || goodLists.Load() == 0; {
			if time.Now().After(deadline) {
				t.Fatalf("round-robin did not reach both keyservers (ListKeys: bad %d, good %d)", badLists.Load(), goodLists.Load())
			}
			if _, err := c.ListKeys(t.Context()); err != nil {
				t.Fatalf("ListKeys() = %v", err)
			}
		}
		badSigns.Store(0)
		// The client has a stream on each keyserver and uses them in turn,
		// so it reaches the bad one at once; every call must still succeed,
		// by the retry on the other. A stream whose keyserver answered
		// UNAVAILABLE takes no new operations: its replacement may land on
		// either keyserver, so the bad one is tried again only sometimes.
		for i := range 50 {
			if err := signOnce(t, c); err != nil {
				t.Fatalf("Sign() call %d = %v; want the retry on the other keyserver to succeed", i, err)
			}
		}
		if badSigns.Load() < 1 {
			t.Errorf("the unavailable keyserver got %d Sign attempts; the client should have reached it", badSigns.Load())
		}
	})
	t.Run("one-keyserver", func(t *testing.T) {
		c := dialTestClient(t, pki, ClientConfig{}, map[string]*testKeyserver{"bad:1": bad})
		badSigns.Store(0)
		badDecrypts.Store(0)
		if err := signOnce(t, c); status.Code(err) != codes.Unavailable {
			t.Errorf("Sign() = %v, want code Unavailable", err)
		}
		if n := badSigns.Load(); n != 2 {
			t.Errorf("Sign attempts = %d, want 2 (one retry)", n)
		}
		_, err := c.Decrypt(t.Context(), mustKeyID(t, pkitest.RSAKey().Public()), make([]byte, 256), nil)
		if status.Code(err) != codes.Unavailable {
			t.Errorf("Decrypt() = %v, want code Unavailable", err)
		}
		if n := badDecrypts.Load(); n != 2 {
			t.Errorf("Decrypt attempts = %d, want 2 (one retry)", n)
		}
	})
}

// TestClientDeadline checks that every call carries a deadline: the call
// timeout, or the caller's if sooner.
func TestClientDeadline(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	real := newSignerService(t, []crypto.Signer{pkitest.P256Key()}, nil)
	var seen atomic.Int64 // the deadline the keyserver saw, as time left
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	ks := startKeyserver(t, pki, &fakeService{next: real, sign: func(ctx context.Context, _ *keylessv1.SignRequest) (*keylessv1.SignResponse, error) {
		d, ok := ctx.Deadline()
		if ok {
			seen.Store(int64(time.Until(d)))
		} else {
			seen.Store(-1)
		}
		<-release // never answers in time
		return nil, status.Error(codes.Internal, "too late")
	}})
	const callTimeout = 300 * time.Millisecond
	c := dialTestClient(t, pki, ClientConfig{CallTimeout: callTimeout}, map[string]*testKeyserver{"ks:1": ks})
	if c.CallTimeout() != callTimeout {
		t.Errorf("CallTimeout() = %v, want %v", c.CallTimeout(), callTimeout)
	}
	// Connect first, so that the timings below measure the call only.
	if _, err := c.ListKeys(t.Context()); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name        string
		ctxTimeout  time.Duration // 0: no deadline on the caller's context
		wantTimeout time.Duration
	}{
		{"call-timeout", 0, callTimeout},
		{"caller-sooner", 100 * time.Millisecond, 100 * time.Millisecond},
		{"caller-later", 5 * time.Second, callTimeout},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			seen.Store(0)
			start := time.Now() // before the caller's deadline starts
			ctx := t.Context()
			if tt.ctxTimeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tt.ctxTimeout)
				defer cancel()
			}
			alg, _ := link.AlgorithmFor(algECDSA256)
			_, err := c.Sign(ctx, mustKeyID(t, pkitest.P256Key().Public()), alg, digest(crypto.SHA256), nil)
			elapsed := time.Since(start)
			if status.Code(err) != codes.DeadlineExceeded {
				t.Errorf("Sign() = %v, want code DeadlineExceeded", err)
			}
			if elapsed < tt.wantTimeout || elapsed > tt.wantTimeout+time.Second {
				t.Errorf("Sign() failed after %v, want about %v", elapsed, tt.wantTimeout)
			}
			for wait := time.Now().Add(2 * time.Second); seen.Load() == 0 && time.Now().Before(wait); {
				time.Sleep(time.Millisecond) // the handler may still be on its way
			}
			if left := time.Duration(seen.Load()); left <= 0 || left > tt.wantTimeout {
				t.Errorf("the keyserver saw %v left before the deadline, want (0, %v]", left, tt.wantTimeout)
			}
		})
	}
}

// TestClientDecryptLength refuses a premaster of the wrong size.
func TestClientDecryptLength(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	real := newSignerService(t, []crypto.Signer{pkitest.RSAKey()}, nil)
	for _, n := range []int{0, 47, 49} {
		ks := startKeyserver(t, pki, &fakeService{next: real, decrypt: func(context.Context, *keylessv1.DecryptRequest) (*keylessv1.DecryptResponse, error) {
			return &keylessv1.DecryptResponse{Premaster: make([]byte, n)}, nil
		}})
		c := dialTestClient(t, pki, ClientConfig{}, map[string]*testKeyserver{"ks:1": ks})
		_, err := c.Decrypt(t.Context(), mustKeyID(t, pkitest.RSAKey().Public()), make([]byte, 256), nil)
		if err == nil || !strings.Contains(err.Error(), "premaster secret; want 48") {
			t.Errorf("Decrypt() with a %d-byte answer = %v, want a length error", n, err)
		}
	}
}

// TestClientOddRequestContext sends, among ordinary operations on the same
// stream, ones whose request context is not UTF-8 or too long. Protobuf
// would refuse to encode them, and with them every operation of their
// message; the client cuts them to what the keyserver takes instead, and
// every operation succeeds.
func TestClientOddRequestContext(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	ks := startKeyserver(t, pki, newSignerService(t, []crypto.Signer{pkitest.P256Key()}, nil))
	c := dialTestClient(t, pki, ClientConfig{}, map[string]*testKeyserver{"ks:1": ks})
	alg, _ := link.AlgorithmFor(algECDSA256)
	id := mustKeyID(t, pkitest.P256Key().Public())
	odd := []*keylessv1.RequestContext{
		{ServerName: "\xff.wild.example.com"},
		{ServerName: strings.Repeat("é", 200), ClientAddress: "\xc3"},
		{ConnectionId: strings.Repeat("c", 1000)},
	}
	var wg sync.WaitGroup
	for i := range 60 {
		wg.Go(func() {
			rc := &keylessv1.RequestContext{ServerName: "ok.example.com"}
			if i%4 == 0 {
				rc = odd[i/4%len(odd)]
			}
			d := digest(crypto.SHA256)
			sig, err := c.Sign(t.Context(), id, alg, d, rc)
			if err != nil {
				t.Errorf("Sign(context %q) = %v", rc, err)
				return
			}
			if !ecdsa.VerifyASN1(pkitest.P256Key().Public().(*ecdsa.PublicKey), d, sig) {
				t.Errorf("Sign(context %q): the signature does not verify", rc)
			}
		})
	}
	wg.Wait()
}

func TestClientClose(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	ks := startKeyserver(t, pki, newSignerService(t, []crypto.Signer{pkitest.P256Key()}, nil))
	c := dialTestClient(t, pki, ClientConfig{}, map[string]*testKeyserver{"ks:1": ks})
	if err := signOnce(t, c); err != nil {
		t.Fatalf("Sign() = %v", err)
	}
	for i := range 2 {
		if err := c.Close(); err != nil {
			t.Errorf("Close() #%d = %v", i+1, err)
		}
	}
	if err := signOnce(t, c); status.Code(err) != codes.Canceled {
		t.Errorf("Sign() after Close = %v, want code Canceled", err)
	}
}

// TestClientMutualTLS checks that the keyserver link fails with a keyserver
// certificate from another CA or for another name, and with a client
// certificate the keyserver does not trust.
func TestClientMutualTLS(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	other := pkitest.NewMTLS(t, keyserverName, edgeIdentity) // another CA
	svc := newSignerService(t, []crypto.Signer{pkitest.P256Key()}, nil)
	tests := []struct {
		name     string
		server   *pkitest.MTLS // whose server certificate and client CA
		client   *pkitest.MTLS // whose client certificate and CA
		hostName string
		wantOK   bool
	}{
		{"ok", pki, pki, keyserverName, true},
		{"server-from-other-CA", other, pki, keyserverName, false},
		{"wrong-server-name", pki, pki, "other.test", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ks := startKeyserver(t, tt.server, svc)
			tlsCfg, err := link.ClientMTLSConfig(tt.client.ClientCert, tt.client.ClientKey, tt.client.CAFile, tt.hostName)
			if err != nil {
				t.Fatal(err)
			}
			c, err := Dial(ClientConfig{Addresses: []string{"ks:1"}, TLS: tlsCfg, CallTimeout: time.Second, Dialer: bufDialer(ks)})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_, err = c.ListKeys(t.Context())
			if tt.wantOK != (err == nil) {
				t.Errorf("ListKeys() = %v, want success %t", err, tt.wantOK)
			}
			if !tt.wantOK && status.Code(err) != codes.Unavailable {
				t.Errorf("ListKeys() = %v, want code Unavailable", err)
			}
		})
	}
}

// TestClientHealthCheck checks that a keyserver whose health service reports
// NOT_SERVING gets no calls.
func TestClientHealthCheck(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	real := newSignerService(t, []crypto.Signer{pkitest.P256Key()}, nil)
	var sickSigns, unused atomic.Int64
	sick := startKeyserverWithHealth(t, pki, unavailableService(real, &sickSigns, &unused), healthpb.HealthCheckResponse_NOT_SERVING)
	good := startKeyserver(t, pki, real)
	c := dialTestClient(t, pki, ClientConfig{Addresses: []string{"sick:1", "good:1"}}, map[string]*testKeyserver{"sick:1": sick, "good:1": good})
	for i := range 10 {
		if err := signOnce(t, c); err != nil {
			t.Fatalf("Sign() call %d = %v", i, err)
		}
	}
	if n := sickSigns.Load(); n != 0 {
		t.Errorf("the NOT_SERVING keyserver got %d Sign calls, want 0", n)
	}
}
