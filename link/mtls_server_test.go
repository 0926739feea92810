package link

import (
	"context"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/keyless-tls/keyless/internal/pkitest"
)

// TestServerCredentials checks the keyserver's handshake: a client is
// admitted when its certificate chains to the CA and the check accepts it,
// and every refused handshake is logged once with the names presented.
func TestServerCredentials(t *testing.T) {
	pki, other := pkitest.NewMTLS(t, keyserverName, edgeIdentity), pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	creds, err := LoadMTLSCredentials(pki.ServerCert, pki.ServerKey, pki.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	logger := hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Trace})
	check := func(leaf *x509.Certificate) error {
		for _, n := range leaf.DNSNames {
			if n == edgeIdentity {
				return nil
			}
		}
		return errors.New("not on the allow-list")
	}
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer(grpc.Creds(creds.ServerCredentials(check, logger, HandshakeObserver{})))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)

	issueClient := func(p *pkitest.MTLS, names ...string) (certFile, keyFile string) {
		k := pkitest.MustECDSA(elliptic.P256())
		return pkitest.WriteFile(t, t.TempDir(), "c.pem", pkitest.CertPEM(p.CA.Issue(t, k.Public(), pkitest.LeafOptions{Client: true, Names: names}))),
			pkitest.WriteFile(t, t.TempDir(), "c.key", pkitest.KeyPEM(t, k))
	}
	call := func(certFile, keyFile string) error {
		t.Helper()
		cfg, err := ClientMTLSConfig(certFile, keyFile, pki.CAFile, keyserverName)
		if err != nil {
			t.Fatal(err)
		}
		conn, err := grpc.NewClient("passthrough:///bufnet",
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
			grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(t.Context(), defaultTestTimeout)
		defer cancel()
		_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
		return err
	}

	type client struct{ cert, key string }
	unlistedCert, unlistedKey := issueClient(pki, "stranger.test", "spiffe://test/edge/x")
	otherCert, otherKey := issueClient(other, edgeIdentity)
	tests := []struct {
		name   string
		client client
		reason string // "" when admitted
	}{
		{"listed", client{pki.ClientCert, pki.ClientKey}, ""},
		{"unlisted", client{unlistedCert, unlistedKey}, "not on the allow-list"},
		{"other CA", client{otherCert, otherKey}, "certificate signed by unknown authority"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			const line = "client refused in the TLS handshake"
			before := strings.Count(logs.String(), line)
			err := call(tt.client.cert, tt.client.key)
			if tt.reason != "" {
				// The client may see the refusal before the server has
				// logged it.
				for deadline := time.Now().Add(defaultTestTimeout); strings.Count(logs.String(), line) == before && time.Now().Before(deadline); {
					time.Sleep(5 * time.Millisecond)
				}
				time.Sleep(50 * time.Millisecond) // a second line would come now
			}
			refusals := strings.Count(logs.String(), line) - before
			if tt.reason == "" {
				if err != nil || refusals != 0 {
					t.Fatalf("Check() = %v with %d refusals logged, want success", err, refusals)
				}
				return
			}
			if status.Code(err) != codes.Unavailable {
				t.Errorf("Check() = %v, want Unavailable", err)
			}
			if refusals != 1 {
				t.Errorf("%d refusals logged, want exactly 1:\n%s", refusals, logs.String())
			}
			if !strings.Contains(logs.String(), tt.reason) {
				t.Errorf("log does not give the reason %q:\n%s", tt.reason, logs.String())
			}
			if !strings.Contains(logs.String(), "remote_address=") {
				t.Errorf("log does not give the remote address:\n%s", logs.String())
			}
		})
	}
	// The presented names of the unlisted and other-CA clients (the test
	// CA writes every name as a DNS name).
	for _, want := range []string{`presented_names="stranger.test,spiffe://test/edge/x"`, "presented_names=" + edgeIdentity} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log does not contain %q:\n%s", want, logs.String())
		}
	}

	// After Reload the check still applies.
	if err := creds.Reload(); err != nil {
		t.Fatal(err)
	}
	if err := call(pki.ClientCert, pki.ClientKey); err != nil {
		t.Errorf("Check() after Reload = %v", err)
	}
	c, k := issueClient(pki, "stranger.test")
	if err := call(c, k); status.Code(err) != codes.Unavailable {
		t.Errorf("Check() of an unlisted client after Reload = %v", err)
	}
}

// TestServerCredentialsNoCertificate checks that a client without a
// certificate is refused and logged with no names.
func TestServerCredentialsNoCertificate(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	creds, err := LoadMTLSCredentials(pki.ServerCert, pki.ServerKey, pki.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	tc := creds.ServerCredentials(nil, hclog.New(&hclog.LoggerOptions{Output: logs}), HandshakeObserver{})
	server, client := net.Pipe()
	go func() {
		cfg := &tls.Config{RootCAs: pki.CA.Pool, ServerName: keyserverName, MinVersion: tls.VersionTLS13}
		_, _, _ = credentials.NewTLS(cfg).ClientHandshake(t.Context(), keyserverName, client)
		client.Close()
	}()
	if _, _, err := tc.ServerHandshake(server); err == nil {
		t.Fatal("ServerHandshake() without a client certificate succeeded")
	}
	if got := logs.String(); strings.Count(got, "client refused") != 1 || !strings.Contains(got, `presented_names="(none)"`) {
		t.Errorf("log = %q", got)
	}
	if tc.Clone() == nil || tc.Info().SecurityProtocol != "tls" {
		t.Error("Clone() or Info() of the credentials is wrong")
	}
}

// TestRefusalLogBounded checks that refused handshakes of certificates
// with hundreds of names add little to the log: a few names, each cut, per
// line, and lines limited in rate per source.
func TestRefusalLogBounded(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	creds, err := LoadMTLSCredentials(pki.ServerCert, pki.ServerKey, pki.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for i := range 251 {
		names = append(names, fmt.Sprintf("%s-%03d.refused.test", strings.Repeat("n", 180), i))
	}
	k := pkitest.MustECDSA(elliptic.P256())
	selfCA := pkitest.NewCA(t, "Self")
	issued := pki.CA.Issue(t, k.Public(), pkitest.LeafOptions{Client: true, Names: names})
	self := selfCA.Issue(t, k.Public(), pkitest.LeafOptions{Client: true, Names: names})
	var refused, suppressed atomic.Int64
	logs := &syncBuffer{}
	tc := creds.ServerCredentials(func(leaf *x509.Certificate) error {
		return fmt.Errorf("no name of the client certificate (%s) is an identity", strings.Join(leaf.DNSNames, ", "))
	}, hclog.New(&hclog.LoggerOptions{Output: logs}), HandshakeObserver{
		Refused:       func(string) { refused.Add(1) },
		LogSuppressed: func() { suppressed.Add(1) },
	})
	const attempts = 200
	for i := range 2 * attempts {
		leaf := issued
		if i%2 == 1 {
			leaf = self
		}
		cert := tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: k}
		server, client := net.Pipe()
		go func() {
			cfg := &tls.Config{RootCAs: pki.CA.Pool, ServerName: keyserverName, MinVersion: tls.VersionTLS13,
				GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }}
			_, _, _ = credentials.NewTLS(cfg).ClientHandshake(t.Context(), keyserverName, client)
			client.Close()
		}()
		if _, _, err := tc.ServerHandshake(server); err == nil {
			t.Fatal("ServerHandshake() of a refused certificate succeeded")
		}
		server.Close()
		if i == 1 {
			// The first two lines: one of each kind, each bounded.
			for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
				if len(line) > 1024 {
					t.Errorf("a refusal's log line has %d bytes, want at most 1024: %s", len(line), line)
				}
				if !strings.Contains(line, "and 247 more") {
					t.Errorf("log line does not say how many names it left out: %s", line)
				}
			}
		}
	}
	if got := len(logs.String()); got > 200<<10/4 {
		t.Errorf("%d refused handshakes logged %d bytes, want well under 200 KiB", 2*attempts, got)
	}
	if refused.Load() != 2*attempts || suppressed.Load() == 0 {
		t.Errorf("observed %d refusals, %d suppressed lines; want %d and some", refused.Load(), suppressed.Load(), 2*attempts)
	}
	t.Logf("%d refused handshakes: %d bytes of log, %d lines suppressed", 2*attempts, len(logs.String()), suppressed.Load())
}
