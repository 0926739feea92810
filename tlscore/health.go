package tlscore

import (
	"context"
	"crypto/tls"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// States of a keyserver, as the edge sees it.
const (
	ksUnknown = ""        // nothing heard yet
	ksReady   = "ready"   // connected, and reporting SERVING
	ksFailing = "failing" // reporting NOT_SERVING, or failing the link handshake
	ksGone    = "gone"    // no connection: refused, unreachable or lost
)

// keyserverHealth follows the state of each keyserver of a static list
// over a connection of its own (see watch), on which it watches the
// keyserver's health service for KeylessService: the state the balancer
// of the Client's calls also goes by, but per keyserver. It logs each
// change of state once (ready, failing, gone, and back when a keyserver
// that was failing or gone is ready again) and sets
// keyless_edge_keyserver_up. It is safe for concurrent use; a nil
// *keyserverHealth does nothing.
type keyserverHealth struct {
	logger  hclog.Logger
	metrics *Metrics
	closing atomic.Bool // the Client is closing: lost connections are expected

	addrs []string

	mu     sync.Mutex
	states map[string]*keyserverState
}

// keyserverState is one keyserver's state.
type keyserverState struct {
	state     string
	since     time.Time // of state
	wasReady  bool      // it has been ready once
	lastError string    // the latest reason it is failing or gone
	conns     uint64    // connections made to it so far
}

// lostGrace is how long after a health connection ends its keyserver is
// reported gone, unless a new connection to it was made meanwhile. A
// keyserver that ends connections at its -max-connection-age (a GOAWAY)
// is connected again within that time and was never gone; one that
// refuses connections is reported gone at once, by the failed dial.
const lostGrace = time.Second

func newKeyserverHealth(logger hclog.Logger, m *Metrics, addrs []string) *keyserverHealth {
	h := &keyserverHealth{logger: logger, metrics: m, addrs: addrs, states: map[string]*keyserverState{}}
	for _, a := range addrs {
		h.states[a] = &keyserverState{}
		if m != nil {
			m.keyserverUp.WithLabelValues(a).Set(0)
		}
	}
	return h
}

// set moves keyserver ks to state, logging the change, with reason for
// failing and gone.
func (h *keyserverHealth) set(ks, state, reason string) {
	if h == nil || ks == "" || ks == "none" {
		return
	}
	if state == ksGone && h.closing.Load() {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	s := h.states[ks]
	if s == nil {
		s = &keyserverState{}
		h.states[ks] = s
	}
	if s.state == state {
		return
	}
	prev, since := s.state, s.since
	s.state, s.since = state, time.Now()
	if h.metrics != nil {
		up := 0.0
		if state == ksReady {
			up = 1
		}
		h.metrics.keyserverUp.WithLabelValues(ks).Set(up)
	}
	switch state {
	case ksReady:
		if s.wasReady {
			h.logger.Info("keyserver back", "keyserver", ks, "was", prev, "for", time.Since(since).Round(time.Millisecond), "last_error", s.lastError)
		} else {
			h.logger.Info("keyserver ready", "keyserver", ks)
		}
		s.wasReady = true
	case ksFailing:
		s.lastError = reason
		h.logger.Warn("keyserver failing", "keyserver", ks, "reason", reason)
	case ksGone:
		s.lastError = reason
		if prev == ksUnknown {
			h.logger.Warn("keyserver gone: not reachable", "keyserver", ks, "reason", reason)
		} else {
			h.logger.Warn("keyserver gone", "keyserver", ks, "reason", reason)
		}
	}
}

// dialled records a new connection to ks and returns its number.
func (h *keyserverHealth) dialled(ks string) uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := h.states[ks]
	if s == nil {
		s = &keyserverState{}
		h.states[ks] = s
	}
	s.conns++
	return s.conns
}

// lost records that connection number conn to ks ended for reason: ks is
// gone unless another connection to it is made within lostGrace.
func (h *keyserverHealth) lost(ks string, conn uint64, reason string) {
	time.AfterFunc(lostGrace, func() {
		h.mu.Lock()
		s := h.states[ks]
		newer := s != nil && s.conns != conn
		h.mu.Unlock()
		if !newer {
			h.set(ks, ksGone, reason)
		}
	})
}

// connected records a link handshake with ks: one that fails makes it
// failing; one that succeeds says nothing until its health is known.
func (h *keyserverHealth) connected(ks string, err error) {
	if err != nil {
		h.set(ks, ksFailing, "mutual-TLS handshake failed: "+err.Error())
	}
}

// watchRetry bounds the wait between two health watches of a keyserver.
const watchRetry = 2 * time.Second

// watch starts following each keyserver until ctx ends: a connection per
// keyserver, made with opts, the client TLS configuration tlsCfg and
// dial, carries a Watch of the health service.
func (h *keyserverHealth) watch(ctx context.Context, tlsCfg *tls.Config, dial func(context.Context, string) (net.Conn, error), opts []grpc.DialOption) {
	creds := &linkCredentials{TransportCredentials: credentials.NewTLS(tlsCfg), state: &handshakeState{}, health: h}
	healthDial := func(ctx context.Context, addr string) (net.Conn, error) {
		c, err := dial(ctx, addr)
		if err != nil {
			if ctx.Err() == nil {
				h.set(addr, ksGone, err.Error())
			}
			return nil, err
		}
		return &healthConn{namedConn: namedConn{Conn: c, addr: keyserverAddr(addr)}, health: h, n: h.dialled(addr)}, nil
	}
	opts = append(opts, grpc.WithTransportCredentials(creds), grpc.WithContextDialer(healthDial))
	for _, addr := range h.addrs {
		conn, err := grpc.NewClient("passthrough:///"+addr, opts...)
		if err != nil {
			h.logger.Error("cannot follow the keyserver's health", "keyserver", addr, "error", err)
			continue
		}
		go func() {
			defer conn.Close()
			h.watchOne(ctx, addr, conn)
		}()
	}
}

// watchOne watches the health of the keyserver addr on conn until ctx
// ends.
func (h *keyserverHealth) watchOne(ctx context.Context, addr string, conn *grpc.ClientConn) {
	client := healthpb.NewHealthClient(conn)
	req := &healthpb.HealthCheckRequest{Service: keylessv1.KeylessService_ServiceDesc.ServiceName}
	wait := 100 * time.Millisecond
	for ctx.Err() == nil {
		// The watch ends when the connection leaves READY: on a GOAWAY (a
		// keyserver shutting down gracefully waits for its streams to end)
		// as on a broken connection.
		sctx, cancel := context.WithCancel(ctx)
		go func() {
			defer cancel()
			s := conn.GetState()
			for ; s != connectivity.Ready; s = conn.GetState() {
				if !conn.WaitForStateChange(sctx, s) {
					return
				}
			}
			conn.WaitForStateChange(sctx, connectivity.Ready)
		}()
		stream, err := client.Watch(sctx, req, grpc.WaitForReady(true))
		for err == nil {
			var resp *healthpb.HealthCheckResponse
			if resp, err = stream.Recv(); err == nil {
				wait = 100 * time.Millisecond
				if st := resp.GetStatus(); st == healthpb.HealthCheckResponse_SERVING {
					h.set(addr, ksReady, "")
				} else {
					h.set(addr, ksFailing, "its health service reports "+st.String())
				}
			}
		}
		cancel()
		if ctx.Err() != nil {
			return
		}
		if status.Code(err) == codes.Unimplemented {
			// A keyserver without a health service: connected is ready,
			// until the connection changes.
			h.set(addr, ksReady, "")
			conn.WaitForStateChange(ctx, connectivity.Ready)
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
		}
		wait = min(2*wait, watchRetry)
	}
}

// state returns ks's state ("" if unknown), for tests.
func (h *keyserverHealth) state(ks string) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	if s := h.states[ks]; s != nil {
		return s.state
	}
	return ksUnknown
}

// healthConn is a connection of keyserverHealth's that tells it when it
// ends.
type healthConn struct {
	namedConn
	health *keyserverHealth
	n      uint64 // the connection's number, from keyserverHealth.dialled
	once   sync.Once
}

// handshakeFailed is called when the link handshake on c failed: that is
// reported as failing, and closing c then is not news.
func (c *healthConn) handshakeFailed() { c.once.Do(func() {}) }

func (c *healthConn) lost(reason string) {
	c.once.Do(func() { c.health.lost(string(c.addr), c.n, reason) })
}

func (c *healthConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil {
		c.lost("connection lost: " + err.Error())
	}
	return n, err
}

func (c *healthConn) Close() error {
	c.lost("connection closed")
	return c.Conn.Close()
}

// RemoteAddr is the configured address, as for namedConn.
func (c *healthConn) RemoteAddr() net.Addr { return c.addr }
