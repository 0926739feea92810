package tlscore

import (
	"crypto/tls"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// TestHandshakeRateLimit: a client gets HandshakeBurst full handshakes at
// once and then HandshakesPerClient per second; one over fails before any
// key operation, naming the rate; resumptions are free.
func TestHandshakeRateLimit(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	sc, err := NewServerTLSConfig(ServerConfig{Certificates: env.newStore(t, CertStoreConfig{}), HandshakesPerClient: 0.5, HandshakeBurst: 2})
	if err != nil {
		t.Fatal(err)
	}
	cc := env.clientConfig("p256.example.com", 0, 0)
	full := func(want bool) {
		t.Helper()
		signs0, _ := env.ks.ops.counts()
		r := runHandshake(t, sc, cc, nil)
		signs, _ := env.ks.ops.counts()
		if ok := r.clientErr == nil && r.serverErr == nil; ok != want || (signs-signs0 == 1) != want {
			t.Fatalf("full handshake: errors client %v, server %v, %d signatures; want success %t", r.clientErr, r.serverErr, signs-signs0, want)
		}
		if !want && !strings.Contains(r.serverErr.Error(), "over its rate of full handshakes") {
			t.Errorf("server error %v; want the rate named", r.serverErr)
		}
	}
	full(true)
	full(true)
	full(false)

	// Resumption needs no key operation and is not counted.
	cc.ClientSessionCache = tls.NewLRUClientSessionCache(1)
	time.Sleep(2100 * time.Millisecond) // one handshake's allowance back
	full(true)
	for range 3 {
		if r := runHandshake(t, sc, cc, nil); r.clientErr != nil || !r.state.DidResume {
			t.Fatalf("resumption: %v, resumed %t", r.clientErr, r.state.DidResume)
		}
	}
}

func TestHandshakeLimiterClients(t *testing.T) {
	l := newHandshakeLimiter(1, 1)
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
