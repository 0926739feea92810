package e2e

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyless-tls/keyless/internal/bench"
	"github.com/keyless-tls/keyless/link"
	"github.com/keyless-tls/keyless/tlscore"
)

// faultProxy relays TCP connections from 127.0.0.1 to one address, without
// delay, and records every read it makes in each direction. It can
// blackhole its connections: what either side sends is then read and
// dropped, and nothing is closed, as on a path whose packets are lost.
// Put a [bench.Relay] in front of it for the round trip. Everything stops
// with the test.
type faultProxy struct {
	target   string
	ln       net.Listener
	accepted atomic.Int64 // connections, so link TCP + TLS handshakes

	mu         sync.Mutex
	blackholed bool
	conns      []net.Conn
	reads      []proxyRead
	links      []*proxyLink
}

// proxyLink is one relayed connection.
type proxyLink struct {
	accepted time.Time
	// edgeClosed is when the edge closed the connection while the proxy
	// was blackholed: its keepalive gave up.
	edgeClosed time.Time
}

// proxyRead is one read of the proxy: n bytes at at, from the edge (up)
// or from the keyserver.
type proxyRead struct {
	at time.Time
	n  int
	up bool
}

func startFaultProxy(t *testing.T, target string) *faultProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &faultProxy{target: target, ln: ln}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.accepted.Add(1)
			wg.Go(func() { p.relay(c) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
		wg.Wait()
	})
	return p
}

func (p *faultProxy) addr() string { return p.ln.Addr().String() }

func (p *faultProxy) relay(edge net.Conn) {
	defer edge.Close()
	l := &proxyLink{accepted: time.Now()}
	ks, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	defer ks.Close()
	p.mu.Lock()
	p.conns = append(p.conns, edge, ks)
	p.links = append(p.links, l)
	p.mu.Unlock()
	var wg sync.WaitGroup
	wg.Go(func() { p.pipe(l, ks, edge, true) })
	wg.Go(func() { p.pipe(l, edge, ks, false) })
	wg.Wait()
}

// pipe copies src to dst for l unless the proxy is blackholed, recording
// each read; when either side ends, both are closed.
func (p *faultProxy) pipe(l *proxyLink, dst, src net.Conn, up bool) {
	defer dst.Close()
	defer src.Close()
	b := make([]byte, 32<<10)
	for {
		n, err := src.Read(b)
		p.mu.Lock()
		if n > 0 {
			p.reads = append(p.reads, proxyRead{at: time.Now(), n: n, up: up})
		}
		drop := p.blackholed
		if err != nil && up && drop && l.edgeClosed.IsZero() {
			l.edgeClosed = time.Now()
		}
		p.mu.Unlock()
		if err != nil {
			return
		}
		if !drop {
			if _, err := dst.Write(b[:n]); err != nil {
				return
			}
		}
	}
}

func (p *faultProxy) blackhole() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.blackholed = true
}

// readsBetween returns the reads in [from, to) in one direction.
func (p *faultProxy) readsBetween(from, to time.Time, up bool) []proxyRead {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []proxyRead
	for _, r := range p.reads {
		if r.up == up && !r.at.Before(from) && r.at.Before(to) {
			out = append(out, r)
		}
	}
	return out
}

// closedByEdge returns when the edge had closed every connection accepted
// before since (the last close), or the zero time while one is still
// open.
func (p *faultProxy) closedByEdge(since time.Time) time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	var last time.Time
	for _, l := range p.links {
		if !l.accepted.Before(since) {
			continue
		}
		if l.edgeClosed.IsZero() {
			return time.Time{}
		}
		if l.edgeClosed.After(last) {
			last = l.edgeClosed
		}
	}
	return last
}

// linkEdge describes an in-process edge (tlscore, as cmd/edge wires it) for
// the link tests.
type linkEdge struct {
	link        *linkPKI
	certs       string // directory of certificates
	defaultCert string
	rsaKex      []string
	addrs       []string // keyserver addresses
	keepalive   time.Duration
	metrics     *tlscore.Metrics
}

// start starts the edge and returns its address; it stops with the test.
func (e linkEdge) start(t *testing.T) string {
	t.Helper()
	clientTLS, err := link.ClientMTLSConfig(e.link.edgeCert, e.link.edgeKey, e.link.caFile, e.link.serverName)
	if err != nil {
		t.Fatal(err)
	}
	client, err := tlscore.Dial(tlscore.ClientConfig{Addresses: e.addrs, TLS: clientTLS, KeepaliveInterval: e.keepalive,
		Metrics: e.metrics, ReconnectBackoff: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	store, err := tlscore.NewCertStore(tlscore.CertStoreConfig{Client: client, Default: e.defaultCert})
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Load(t.Context(), e.certs); err != nil {
		t.Fatal(err)
	}
	edgeTLS, err := tlscore.NewServerTLSConfig(tlscore.ServerConfig{Certificates: store, RSAKeyExchange: e.rsaKex, Metrics: e.metrics})
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

// farPath puts a relay adding rtt and a faultProxy between an edge and the
// keyserver at addr, and returns the proxy and the address to give the
// edge.
func farPath(t *testing.T, addr string, rtt time.Duration) (*faultProxy, string) {
	t.Helper()
	p := startFaultProxy(t, addr)
	relay, err := bench.StartRelay(t.Context(), bench.RelayConfig{Target: p.addr(), RTT: rtt})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { relay.Close() })
	return p, relay.Addr()
}

// p50Handshake makes n full handshakes one after another and returns the
// median time.
func p50Handshake(t *testing.T, addr string, cfg *tls.Config, n int) time.Duration {
	t.Helper()
	var ds []time.Duration
	for range n {
		d, err := timedHandshake(t.Context(), addr, cfg)
		if err != nil {
			t.Fatalf("handshake with the edge at %s: %v", addr, err)
		}
		ds = append(ds, d)
	}
	slices.Sort(ds)
	return ds[len(ds)/2]
}

// TestDistantLinkNoSecondRoundTrip: at 80 ms RTT, with keyserver processes
// and their keepalive policy, after the link is up a handshake costs the
// link no connection: not after idling longer than the keepalive interval
// (the pings cross the path as TCP segments every interval and the
// keyserver's enforcement accepts them), and not after the keyserver's
// -max-connection-age GOAWAY (the edge connects again by itself, off the
// request path). Stream rotation is covered by tlscore's
// TestStreamRotationWaitsForNothing. Timings are logged, not asserted.
func TestDistantLinkNoSecondRoundTrip(t *testing.T) {
	c := startCluster(t, clusterOptions{keyservers: 1})
	c.keyservers = append(c.keyservers, &clusterKeyserver{addr: "127.0.0.1:0"})
	const maxAge = 5 * time.Second
	c.startKeyserver(t, 1, "-max-connection-age", maxAge.String())
	const keepalive = 10 * time.Second // the shortest the edge and the keyserver allow
	hello := c.clientConfig(clusterECDSA)
	edge := func(addr string) string {
		return linkEdge{link: c.link, certs: c.certsDir, defaultCert: clusterECDSA, addrs: []string{addr}, keepalive: keepalive}.start(t)
	}
	nearProxy, nearAddr := farPath(t, c.keyservers[0].addr, 0)
	farProxy, farAddr := farPath(t, c.keyservers[0].addr, linkRTT)
	near, far := edge(nearAddr), edge(farAddr)

	nearP50, farP50 := p50Handshake(t, near, hello, 15), p50Handshake(t, far, hello, 15)
	t.Logf("TLS 1.3 ECDSA handshake at concurrency 1: p50 %v at RTT 0, %v at RTT %v (+%v)", nearP50, farP50, linkRTT, farP50-nearP50)
	if n, m := nearProxy.accepted.Load(), farProxy.accepted.Load(); n != 1 || m != 1 {
		t.Errorf("15 handshakes on each edge made %d and %d link connections; want 1 each", n, m)
	}

	// Idle for more than two keepalive intervals.
	idleFrom := time.Now()
	time.Sleep(2*keepalive + 5*time.Second)
	idleTo := time.Now()
	up, down := farProxy.readsBetween(idleFrom, idleTo, true), farProxy.readsBetween(idleFrom, idleTo, false)
	sizes := func(rs []proxyRead) []int {
		var out []int
		for _, r := range rs {
			out = append(out, r.n)
		}
		return out
	}
	t.Logf("idle %v: the edge sent segments of %v bytes, the keyserver %v", idleTo.Sub(idleFrom).Round(time.Second), sizes(up), sizes(down))
	if len(up) < 2 || len(down) < 2 {
		t.Errorf("over %v of idle link with -keepalive %v, %d segments went to the keyserver and %d came back; want at least 2 each (pings and their acks)",
			idleTo.Sub(idleFrom).Round(time.Second), keepalive, len(up), len(down))
	}
	d, err := timedHandshake(t.Context(), far, hello)
	if err != nil {
		t.Fatalf("handshake after the idle period: %v", err)
	}
	t.Logf("first handshake after %v idle: %v", idleTo.Sub(idleFrom).Round(time.Second), d)
	if n := farProxy.accepted.Load(); n != 1 {
		t.Errorf("the idle link was connected %d times; want 1 (kept by its keepalives, not refused by the keyserver)", n)
	}

	// The keyserver ends each connection at -max-connection-age.
	agedProxy, agedAddr := farPath(t, c.keyservers[1].addr, linkRTT)
	aged := edge(agedAddr)
	if _, err := timedHandshake(t.Context(), aged, hello); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(3 * maxAge); agedProxy.accepted.Load() < 2; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no new link connection within %v of a %v -max-connection-age, with no handshake to make one", 3*maxAge, maxAge)
		}
	}
	time.Sleep(4 * linkRTT) // the new connection's TLS handshake and SETTINGS
	d, err = timedHandshake(t.Context(), aged, hello)
	if err != nil {
		t.Fatalf("handshake after the keyserver's GOAWAY: %v", err)
	}
	t.Logf("first handshake after the keyserver's GOAWAY and the edge's reconnection: %v", d)
	if n := agedProxy.accepted.Load(); n != 2 {
		t.Errorf("the handshake after the GOAWAY saw %d link connections; want 2 (the reconnection happened before it)", n)
	}
}

// TestDistantKeyserverGoesSilent: two keyservers far away (80 ms, then
// 300 ms), light load, and one keyserver's path blackholed (nothing
// arrives, nothing is closed). No handshake may fail: operations on the
// silent keyserver's stream are sent again to the other once the stream
// has been silent for max(500 ms, 2 RTT). Logged: how many operations were
// sent again, when the edge stopped sending, and when its keepalive
// dropped its connections.
func TestDistantKeyserverGoesSilent(t *testing.T) {
	c := startCluster(t, clusterOptions{keyservers: 2, rsa: true})
	for _, rtt := range []time.Duration{80 * time.Millisecond, 300 * time.Millisecond} {
		t.Run(rtt.String(), func(t *testing.T) {
			const keepalive = 10 * time.Second
			p0, a0 := farPath(t, c.keyservers[0].addr, rtt)
			p1, a1 := farPath(t, c.keyservers[1].addr, rtt)
			reg := prometheus.NewRegistry()
			edge := linkEdge{link: c.link, certs: c.certsDir, defaultCert: clusterECDSA, rsaKex: []string{clusterRSA},
				addrs: []string{a0, a1}, keepalive: keepalive, metrics: tlscore.NewMetrics(reg)}.start(t)
			rsa12 := c.clientConfig(clusterRSA)
			rsa12.MaxVersion = tls.VersionTLS12
			const clients = 4
			l := startLoad(edge, clients, c.clientConfig(clusterECDSA), c.clientConfig(clusterRSA), rsa12)
			halt := sync.OnceFunc(l.halt)
			defer halt()
			l.waitOK(t, 40)
			// Both keyservers answer before the fault.
			for deadline := time.Now().Add(30 * time.Second); len(p0.readsBetween(time.Time{}, time.Now(), false)) < 20 || len(p1.readsBetween(time.Time{}, time.Now(), false)) < 20; time.Sleep(50 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("the load did not reach both keyservers")
				}
			}
			okBefore, failedBefore := l.ok.Load(), l.failed.Load()
			silentAt := time.Now()
			p1.blackhole()
			// The edge's connections to it: the link's, and the health
			// watch's.
			for deadline := silentAt.Add(keepalive + 3*tlscore.DefaultCallTimeout + 10*time.Second); p1.closedByEdge(silentAt).IsZero(); time.Sleep(50 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("the edge did not drop its connections to the silent keyserver within %v", deadline.Sub(silentAt))
				}
			}
			dropped := p1.closedByEdge(silentAt).Sub(silentAt)
			time.Sleep(time.Second)
			halt()
			retries := sumCounter(t, reg, "keyless_edge_keyserver_call_retries_total", "keyserver", a1)
			// What the edge sent into the silent path: operations (a message
			// of one to a few operations, ~170 bytes each), keepalive pings
			// (39 bytes), RST_STREAM (35) and, once a connection is dropped,
			// the ClientHello of the next (~1.5 KB).
			var lastOp time.Duration
			var sent []string
			opMessages := 0
			for _, r := range p1.readsBetween(silentAt, time.Now(), true) {
				sent = append(sent, fmt.Sprintf("%v:%d", r.at.Sub(silentAt).Round(time.Millisecond), r.n))
				if r.n > 100 && r.n < 1024 {
					lastOp = r.at.Sub(silentAt)
					opMessages++
				}
			}
			t.Logf("sent into the silent path (time after it went silent:bytes): %v", sent)
			ok, failed := l.ok.Load()-okBefore, l.failed.Load()-failedBefore
			t.Logf("RTT %v, one keyserver silent: %d handshakes ok, %d failed, %d over 1 s; %v operations sent again to the other keyserver; "+
				"the last operation reached the silent path %v after it went silent; the edge's keepalive dropped its connections after %v",
				rtt, ok, failed, l.slow.Load(), retries, lastOp.Round(time.Millisecond), dropped.Round(time.Millisecond))
			if failed != 0 {
				t.Errorf("%d handshakes failed while one of two keyservers was silent; want 0 (first: %s)", failed, l.firstErrors())
			}
			if opMessages > clients {
				t.Errorf("%d messages of operations went into the silent path; want at most %d, one per client: once a stream to it stalls, it gets no more", opMessages, clients)
			}
			if retries < 1 {
				t.Errorf("no operation was sent again after the keyserver went silent; the load did not reach it, or its stream was not found stalled")
			}
			if ok < 20 {
				t.Errorf("only %d handshakes succeeded while one keyserver was silent", ok)
			}
		})
	}
}

// sumCounter returns the sum of the counter name's series whose label is
// value.
func sumCounter(t *testing.T, reg *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() == label && lp.GetValue() == value {
					sum += m.GetCounter().GetValue()
				}
			}
		}
	}
	return sum
}
