package link

import (
	"net"
	"sync"
	"time"
)

// Defaults of a keyserver's listener ([LimitListener]).
const (
	// DefaultHandshakeTimeout bounds a connection's TLS handshake
	// (grpc.ConnectionTimeout); gRPC's own default is 120 s, long enough
	// for a few hundred stalled connections to hold a keyserver's sockets
	// and delay its shutdown.
	DefaultHandshakeTimeout = 5 * time.Second
	// DefaultMaxConnections bounds a keyserver's connections in all. An
	// edge keeps two connections per keyserver.
	DefaultMaxConnections = 10000
	// DefaultMaxConnectionsPerSource bounds the connections from one IP
	// address. An edge opens two per keyserver (calls, and a health watch); edges behind one NAT share the bound.
	DefaultMaxConnectionsPerSource = 64
)

// Listener is a net.Listener that bounds its open connections, in all and
// per source IP address, and can close them all at once. A connection over
// a bound is accepted and closed at once, so that the kernel's queue does
// not fill up, and reported to the Refused callback. It is safe for
// concurrent use.
type Listener struct {
	net.Listener
	max, perSource int
	refused        func(reason string) // nil: not reported

	mu       sync.Mutex
	open     map[*limitedConn]struct{}
	bySource map[string]int
}

// LimitListener returns a [Listener] over ln that keeps at most max
// connections open and at most perSource from one IP address; 0 means no
// bound. refused, if not nil, is called with "max_connections" or
// "max_connections_per_source" for each connection closed at accept.
func LimitListener(ln net.Listener, max, perSource int, refused func(reason string)) *Listener {
	return &Listener{Listener: ln, max: max, perSource: perSource, refused: refused,
		open: make(map[*limitedConn]struct{}), bySource: make(map[string]int)}
}

// Accept returns the next connection within the bounds.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		source := c.RemoteAddr().String()
		if host, _, err := net.SplitHostPort(source); err == nil {
			source = host
		}
		if reason := l.admit(source); reason != "" {
			c.Close()
			if l.refused != nil {
				l.refused(reason)
			}
			continue
		}
		lc := &limitedConn{Conn: c, l: l, source: source}
		l.mu.Lock()
		l.open[lc] = struct{}{}
		l.mu.Unlock()
		return lc, nil
	}
}

// admit counts a new connection from source, or returns why it is refused.
func (l *Listener) admit(source string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.max > 0 && len(l.open) >= l.max:
		return "max_connections"
	case l.perSource > 0 && l.bySource[source] >= l.perSource:
		return "max_connections_per_source"
	}
	l.bySource[source]++
	return ""
}

// Open returns the number of open connections.
func (l *Listener) Open() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.open)
}

// CloseConnections closes every open connection, in its TLS handshake or
// established: a keyserver's last step of shutdown after its grace period.
func (l *Listener) CloseConnections() {
	l.mu.Lock()
	conns := make([]*limitedConn, 0, len(l.open))
	for c := range l.open {
		conns = append(conns, c)
	}
	l.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

// limitedConn is an open connection of a Listener.
type limitedConn struct {
	net.Conn
	l      *Listener
	source string
	once   sync.Once
}

func (c *limitedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		defer c.l.mu.Unlock()
		delete(c.l.open, c)
		if c.l.bySource[c.source]--; c.l.bySource[c.source] <= 0 {
			delete(c.l.bySource, c.source)
		}
	})
	return c.Conn.Close()
}
