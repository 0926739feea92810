package link

import (
	"crypto/x509"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// connRegistry holds a keyserver's established connections with the client
// certificate chain each was authenticated with, so that a connection ends
// when its credentials do: when a certificate of the chain expires (a
// timer) or a reload loads a CRL that revokes it ([connRegistry.closeIf]).
// It is safe for concurrent use.
type connRegistry struct {
	mu     sync.Mutex
	conns  map[*trackedConn]struct{}
	logger hclog.Logger
	closed func(reason string) // nil: not counted
}

func newConnRegistry() *connRegistry {
	return &connRegistry{conns: make(map[*trackedConn]struct{}), logger: hclog.NewNullLogger()}
}

func (r *connRegistry) setObserver(logger hclog.Logger, closed func(reason string)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.logger, r.closed = logger, closed
}

// trackedConn is an established connection of the registry.
type trackedConn struct {
	net.Conn
	chain []*x509.Certificate
	reg   *connRegistry
	timer *time.Timer
	once  sync.Once
}

// add registers conn, authenticated with chain (leaf first), and arms its
// expiry. It returns the connection gRPC should use.
func (r *connRegistry) add(conn net.Conn, chain []*x509.Certificate) net.Conn {
	tc := &trackedConn{Conn: conn, chain: chain, reg: r}
	notAfter := chain[0].NotAfter
	for _, c := range chain[1:] {
		if c.NotAfter.Before(notAfter) {
			notAfter = c.NotAfter
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.conns[tc] = struct{}{}
	tc.timer = time.AfterFunc(time.Until(notAfter), func() { r.end(tc, "expired") })
	return tc
}

// end closes tc for reason, once.
func (r *connRegistry) end(tc *trackedConn, reason string) {
	r.mu.Lock()
	logger, closed := r.logger, r.closed
	r.mu.Unlock()
	logger.Warn("closing an edge's connection: its client certificate "+reason, "remote_address", tc.RemoteAddr().String(),
		"presented_names", boundedNames(presentedNames(tc.chain[0])), "serial", tc.chain[0].SerialNumber.String())
	if closed != nil {
		closed(reason)
	}
	tc.Close()
}

// closeIf closes, for reason, every connection whose chain revoked reports,
// and returns how many it closed.
func (r *connRegistry) closeIf(revoked func([]*x509.Certificate) bool, reason string) int {
	r.mu.Lock()
	var victims []*trackedConn
	for tc := range r.conns {
		if revoked(tc.chain) {
			victims = append(victims, tc)
		}
	}
	r.mu.Unlock()
	for _, tc := range victims {
		r.end(tc, reason)
	}
	return len(victims)
}

// Close closes the connection and forgets it.
func (tc *trackedConn) Close() error {
	tc.once.Do(func() {
		tc.reg.mu.Lock()
		defer tc.reg.mu.Unlock()
		tc.timer.Stop()
		delete(tc.reg.conns, tc)
	})
	return tc.Conn.Close()
}
