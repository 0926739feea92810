package tlscore

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/internal/pkitest"
)

// TestHandshakeRateLimit: a client gets HandshakeBurst full handshakes at
// once and then HandshakesPerClient per second; one over fails before any
// key operation, naming the rate; resumptions, TLS 1.2 ones included (whose
// GetCertificate call comes first), are free.
func TestHandshakeRateLimit(t *testing.T) {
	for _, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		t.Run(tls.VersionName(version), func(t *testing.T) {
			t.Parallel()
			env := newTestEnv(t, envOptions{})
			// One more handshake every 4 s: the steps below take far less.
			sc, err := NewServerTLSConfig(ServerConfig{Certificates: env.newStore(t, CertStoreConfig{}), HandshakesPerClient: 0.25, HandshakeBurst: 2})
			if err != nil {
				t.Fatal(err)
			}
			fresh := env.clientConfig("p256.example.com", version, version)
			resuming := env.clientConfig("p256.example.com", version, version)
			resuming.ClientSessionCache = tls.NewLRUClientSessionCache(1)
			step := func(what string, cc *tls.Config, wantOK, wantResumed bool) {
				t.Helper()
				signs0, _ := env.ks.ops.counts()
				r := pkitest.Handshake(t, sc, cc, nil)
				signs, _ := env.ks.ops.counts()
				ok := r.ClientErr == nil && r.ServerErr == nil
				if ok != wantOK || r.State.DidResume != wantResumed || (signs-signs0 == 1) != (wantOK && !wantResumed) {
					t.Fatalf("%s: errors client %v, server %v, resumed %t, %d signatures; want success %t, resumed %t",
						what, r.ClientErr, r.ServerErr, r.State.DidResume, signs-signs0, wantOK, wantResumed)
				}
				if !wantOK && !strings.Contains(r.ServerErr.Error(), "over its rate of full handshakes") {
					t.Errorf("%s: server error %v; want the rate named", what, r.ServerErr)
				}
			}
			step("first full handshake", resuming, true, false)
			step("second full handshake", fresh, true, false)
			for i := range 3 {
				step(fmt.Sprintf("resumption %d", i), resuming, true, true)
			}
			step("third full handshake", fresh, false, false)
			time.Sleep(4100 * time.Millisecond) // one handshake's allowance back
			step("full handshake after the wait", fresh, true, false)
		})
	}
}

func TestHandshakeLimiterClients(t *testing.T) {
	l := newHandshakeLimiter(1, 1, nil)
	addr := func(s string) net.Addr { return net.TCPAddrFromAddrPort(netipMustParse(t, s)) }
	for _, tt := range []struct {
		addr string
		want bool
	}{
		{"192.0.2.1:1000", true},
		{"192.0.2.1:2000", false},          // the same client, another port
		{"[::ffff:192.0.2.1]:3000", false}, // the same, IPv4-mapped
		{"192.0.2.2:1000", true},           // another client
		{"[2001:db8:0:100::1]:443", true},
		{"[2001:db8:0:1ff::2]:443", false}, // the same /56
		{"[2001:db8:0:200::1]:443", true},  // another /56
	} {
		if got := l.allow(addr(tt.addr)); got != tt.want {
			t.Errorf("allow(%s) = %t, want %t", tt.addr, got, tt.want)
		}
	}
	if !l.allow(&net.UnixAddr{Name: "/sock", Net: "unix"}) {
		t.Error("a non-IP address was limited")
	}
}

func netipMustParse(t *testing.T, s string) netip.AddrPort {
	t.Helper()
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		t.Fatal(err)
	}
	return ap
}
