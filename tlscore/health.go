package tlscore

import (
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// States of a keyserver, as the edge sees it.
const (
	ksUnknown = ""        // nothing heard yet
	ksReady   = "ready"   // connected, and its latest operation (if any) succeeded
	ksFailing = "failing" // connected, but its operations or link handshakes fail
	ksGone    = "gone"    // no connection: refused, unreachable or closed
)

// failingAfter is how many operations in a row must fail with a code that
// may be load (DeadlineExceeded, Internal, Unknown) before a keyserver is
// called failing; one UNAVAILABLE (an HSM fault, a shutdown) is enough.
const failingAfter = 3

// keyserverHealth follows the state of each keyserver from what the Client
// sees of it: connections made and lost, link handshakes, and the outcome
// of operations. It logs each change of state once (ready, failing, gone,
// and back when a keyserver that was failing or gone is ready again) and
// sets keyless_edge_keyserver_up. It is safe for concurrent use; a nil
// *keyserverHealth does nothing.
type keyserverHealth struct {
	logger  hclog.Logger
	metrics *Metrics
	closing atomic.Bool // the Client is closing: lost connections are expected

	mu     sync.Mutex
	states map[string]*keyserverState
}

// keyserverState is one keyserver's state.
type keyserverState struct {
	state     string
	since     time.Time // of state
	wasReady  bool      // it has been ready once
	failures  int       // operations failed in a row with a load-like code
	lastError string    // the latest reason it is failing or gone
}

func newKeyserverHealth(logger hclog.Logger, m *Metrics, addrs []string) *keyserverHealth {
	h := &keyserverHealth{logger: logger, metrics: m, states: map[string]*keyserverState{}}
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
	if state != ksFailing {
		s.failures = 0
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

// connected records a link handshake with ks: a keyserver that answers it
// is ready; one that fails it is failing.
func (h *keyserverHealth) connected(ks string, err error) {
	if err != nil {
		h.set(ks, ksFailing, "mutual-TLS handshake failed: "+err.Error())
		return
	}
	h.set(ks, ksReady, "")
}

// operation records the outcome of one operation on ks.
func (h *keyserverHealth) operation(ks string, err error) {
	if h == nil {
		return
	}
	switch code := status.Code(err); code {
	case codes.Canceled:
		// The handshake ended first: says nothing of the keyserver.
	case codes.Unavailable:
		h.set(ks, ksFailing, code.String()+": "+status.Convert(err).Message())
	case codes.DeadlineExceeded, codes.Internal, codes.Unknown:
		h.mu.Lock()
		s := h.states[ks]
		n := 0
		if s != nil {
			s.failures++
			n = s.failures
		}
		h.mu.Unlock()
		if n >= failingAfter {
			h.set(ks, ksFailing, code.String()+": "+status.Convert(err).Message())
		}
	default:
		// An answer, even a refusal (NotFound, InvalidArgument), comes
		// from a keyserver that works.
		h.set(ks, ksReady, "")
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

// healthConn is a keyserver connection that tells health when it ends.
type healthConn struct {
	namedConn
	health *keyserverHealth
	once   sync.Once
}

// handshakeFailed is called when the link handshake on c failed: that is
// reported as failing, and closing c then is not news.
func (c *healthConn) handshakeFailed() { c.once.Do(func() {}) }

func (c *healthConn) lost(reason string) {
	c.once.Do(func() { c.health.set(string(c.addr), ksGone, reason) })
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
