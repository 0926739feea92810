package e2e

import (
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/internal/bench"
	"github.com/keyless-tls/keyless/link"
	"github.com/keyless-tls/keyless/tlscore"
)

// linkRTT is the round trip the relay adds between the edge and the
// keyserver in TestHandshakesOverDistantLink.
const linkRTT = 80 * time.Millisecond

// startDistantEdge starts an edge on the shared chain's keyserver whose
// link goes through a relay adding rtt, with the edge's default call
// deadline and window, and returns its address. Everything stops with the
// test.
func startDistantEdge(t *testing.T, c *chain, rtt time.Duration) string {
	t.Helper()
	relay, err := bench.StartRelay(t.Context(), bench.RelayConfig{Target: c.ksAddr, RTT: rtt})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { relay.Close() })
	clientTLS, err := link.ClientMTLSConfig(c.link.edgeCert, c.link.edgeKey, c.link.caFile, c.link.serverName)
	if err != nil {
		t.Fatal(err)
	}
	client, err := tlscore.Dial(tlscore.ClientConfig{Addresses: []string{relay.Addr()}, TLS: clientTLS})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	store, err := tlscore.NewCertStore(tlscore.CertStoreConfig{Client: client, Default: nameECDSA})
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Load(t.Context(), c.certs); err != nil {
		t.Fatal(err)
	}
	edgeTLS, err := tlscore.NewServerTLSConfig(tlscore.ServerConfig{Certificates: store, RSAKeyExchange: []string{nameRSA}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		tlscore.ServeHTTP(ctx, ln, edgeTLS, http.HandlerFunc(echoTLS), time.Second, nil)
	}()
	t.Cleanup(func() { stop(); <-done })
	return ln.Addr().String()
}

// timedHandshake makes one full TLS handshake with the edge at addr (no
// session cache, so never a resumption) and returns how long it took.
func timedHandshake(ctx context.Context, addr string, cfg *tls.Config) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	start := time.Now()
	conn, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return 0, err
	}
	took := time.Since(start)
	conn.Close()
	return took, nil
}

// TestHandshakesOverDistantLink runs real TLS handshakes through an edge
// whose keyserver link goes through a relay adding 80 ms, then 300 ms, of
// round trip: none may fail, over every kind of key operation, at
// concurrency 64 (80 ms) and 16 (300 ms), and at concurrency 1 the p50 is
// logged next to the same edge code at RTT 0.
func TestHandshakesOverDistantLink(t *testing.T) {
	c := sharedChain(t)
	near := startDistantEdge(t, c, 0)
	kinds := []*tls.Config{
		{ServerName: nameECDSA, RootCAs: c.webCA.pool(), MinVersion: tls.VersionTLS13},
		{ServerName: nameRSA, RootCAs: c.webCA.pool(), MinVersion: tls.VersionTLS13},
		{ServerName: nameRSA, RootCAs: c.webCA.pool(), MaxVersion: tls.VersionTLS12,
			CipherSuites: []uint16{tls.TLS_RSA_WITH_AES_128_GCM_SHA256}},
		{ServerName: nameP384, RootCAs: c.webCA.pool(), MaxVersion: tls.VersionTLS12},
	}
	nearP50 := p50Handshake(t, near, kinds[0], 15)
	for _, tc := range []struct {
		rtt           time.Duration
		workers, each int
	}{
		{linkRTT, 64, 6},
		{300 * time.Millisecond, 16, 4},
	} {
		t.Run(tc.rtt.String(), func(t *testing.T) {
			far := startDistantEdge(t, c, tc.rtt)

			// Concurrency 1: one extra round trip per full handshake, logged.
			farP50 := p50Handshake(t, far, kinds[0], 15)
			t.Logf("TLS 1.3 ECDSA handshake at concurrency 1: p50 %v at RTT 0, %v at RTT %v (+%v)", nearP50, farP50, tc.rtt, farP50-nearP50)
			if farP50 < tc.rtt {
				// A lower bound, not a timing target: a full handshake waits for
				// the keyserver, so faster means the relay was not on the path.
				t.Errorf("p50 through the relay %v is below its RTT %v: the link bypassed the relay", farP50, tc.rtt)
			}

			// Concurrency tc.workers: every handshake succeeds within the
			// edge's deadline.
			signs, decrypts := c.ops()
			var failed atomic.Int64
			var firstErr sync.Once
			var wg sync.WaitGroup
			start := time.Now()
			for w := range tc.workers {
				wg.Go(func() {
					for i := range tc.each {
						if _, err := timedHandshake(t.Context(), far, kinds[(w+i)%len(kinds)]); err != nil {
							failed.Add(1)
							firstErr.Do(func() { t.Errorf("handshake through the relay: %v", err) })
						}
					}
				})
			}
			wg.Wait()
			s2, d2 := c.ops()
			n := int64(tc.workers * tc.each)
			t.Logf("%d handshakes at concurrency %d through RTT %v in %v: %d failed; %d signs and %d decrypts at the keyserver",
				n, tc.workers, tc.rtt, time.Since(start).Round(time.Millisecond), failed.Load(), s2-signs, d2-decrypts)
			if f := failed.Load(); f != 0 {
				t.Errorf("%d of %d handshakes failed at concurrency %d through RTT %v; want 0", f, n, tc.workers, tc.rtt)
			}
			if got := (s2 - signs) + (d2 - decrypts); got != n {
				t.Errorf("the keyserver saw %d key operations for %d full handshakes; want one each", got, n)
			}
		})
	}
}
