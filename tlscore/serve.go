package tlscore

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Timeouts of the edge's servers.
const (
	// handshakeTimeout bounds a TLS handshake, and for HTTP the reading of
	// the request headers that follows it.
	handshakeTimeout = 10 * time.Second
	// idleTimeout closes HTTP keep-alive connections left idle.
	idleTimeout = 2 * time.Minute
	// maxHeaderBytes bounds a request's headers (net/http's default is
	// 1 MiB).
	maxHeaderBytes = 64 << 10
	// maxHTTP2Streams bounds the requests in progress on one HTTP/2
	// connection (net/http's default is 250): each may hold a connection
	// to the origin.
	maxHTTP2Streams = 100
	// http2WriteTimeout closes an HTTP/2 connection whose client reads
	// nothing for this long while the edge has data to send.
	http2WriteTimeout = 30 * time.Second
	// DefaultTCPIdleTimeout is how long ServeTCP keeps a connection on
	// which no byte moved in either direction, and how long it waits for a
	// peer to take bytes it has to send (see WithIdleTimeout). Protocols
	// that stay quiet longer (IMAP IDLE waits up to 29 minutes; pooled
	// database connections may idle for hours) need more, or none.
	DefaultTCPIdleTimeout = time.Hour
	// originDialTimeout bounds connecting to a TCP origin.
	originDialTimeout = 10 * time.Second
)

// ServeHTTP serves HTTPS (HTTP/1.1 and HTTP/2) on ln with tlsConfig, as built
// by [NewServerTLSConfig], passing each request to h, until ctx is done. It
// then stops accepting, lets requests in progress finish for up to grace,
// and closes what remains.
//
// It returns nil after a shutdown in which every request finished in time,
// an error if grace ran out first, and an error if serving fails. It closes
// ln. HTTP/2 works with the configurations tlsConfig's GetConfigForClient
// returns as long as their NextProtos include "h2" (those of
// NewServerTLSConfig do).
//
// A TLS handshake and the request headers that follow must arrive within 10
// seconds; a key operation within it is bounded by the Client's call
// timeout. Request headers are limited to 64 KiB, an HTTP/2 connection to
// 100 requests at once, and an HTTP/2 client that reads nothing for 30
// seconds while a response waits is disconnected. logger receives
// net/http's errors (nil means none).
//
// With [WithMetrics], each handshake is counted (see [Metrics]).
func ServeHTTP(ctx context.Context, ln net.Listener, tlsConfig *tls.Config, h http.Handler, grace time.Duration, logger hclog.Logger, opts ...ServeOption) error {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	if tlsConfig == nil || h == nil || grace < 0 {
		ln.Close()
		return errors.New("tlscore: ServeHTTP needs a TLS config, a handler and a grace period of zero or more")
	}
	o := newServeOptions(opts)
	srv := &http.Server{
		Handler:           observeRequests(h, o.accessLog, o.metrics),
		TLSConfig:         tlsConfig,
		ReadHeaderTimeout: handshakeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		HTTP2: &http.HTTP2Config{
			MaxConcurrentStreams: maxHTTP2Streams,
			WriteByteTimeout:     http2WriteTimeout,
			// A connection silent this long is checked with a PING, and
			// closed if the PING is not answered.
			SendPingTimeout: idleTimeout / 2,
			PingTimeout:     handshakeTimeout,
		},
		ErrorLog: stdLogger(logger.Named("http"), hclog.Warn),
		// Requests must outlive ctx for the graceful shutdown; they keep
		// its values.
		BaseContext: func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
		// Requests find their connection's handshake (key id, keyserver)
		// for the access log.
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if oc := observedConnOf(c); oc != nil {
				return context.WithValue(ctx, connInfoKey{}, oc)
			}
			return ctx
		},
	}
	config := tlsConfig.Clone()
	if len(config.NextProtos) == 0 {
		config.NextProtos = slices.Clone(defaultNextProtos)
	}
	tln := &tlsListener{Listener: ln, config: config, base: context.WithoutCancel(ctx), metrics: o.metrics, accessLog: o.accessLog}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(tln) }()
	select {
	case err := <-served:
		return fmt.Errorf("tlscore: serve HTTPS on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}

	logger.Info("shutting down: accepting no more connections, letting requests in progress finish", "grace", grace)
	start := time.Now()
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), grace)
	defer cancel()
	err := srv.Shutdown(sctx)
	<-served // http.ErrServerClosed, as soon as Shutdown has begun
	if err != nil {
		srv.Close()
		return fmt.Errorf("tlscore: HTTPS requests still running after the %v grace period were cut off: %w", grace, err)
	}
	logger.Info("every request finished", "after", time.Since(start).Round(time.Millisecond))
	return nil
}

// ServeTCP terminates TLS on ln with tlsConfig and relays each connection's
// bytes to a new TCP connection to originAddr, in both directions, until ctx
// is done. When one side closes its writing half, the other side's writing
// half is closed (with a TLS close_notify towards the client), so protocols
// that half-close work. The handshake must finish within 10 seconds.
//
// A connection on which no byte moved in either direction for the idle
// timeout ([DefaultTCPIdleTimeout], or [WithIdleTimeout]; zero for none) is
// closed, both sides, as is one whose client or origin takes nothing it is
// sent for as long; so is a half-closed one whose other half goes quiet.
//
// When ctx is done ServeTCP stops accepting (closing ln), waits up to grace
// for the connections in progress to end, then closes them. It returns nil if
// they all ended in time, else an error; and an error if accepting fails for
// a reason other than ctx.
//
// With [WithMetrics], each handshake is counted, and each origin that
// cannot be reached (see [Metrics]). With [WithOriginProxyProtocol], each
// origin connection begins with a PROXY protocol header naming the client.
func ServeTCP(ctx context.Context, ln net.Listener, tlsConfig *tls.Config, originAddr string, grace time.Duration, logger hclog.Logger, opts ...ServeOption) error {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	if tlsConfig == nil || originAddr == "" || grace < 0 {
		ln.Close()
		return errors.New("tlscore: ServeTCP needs a TLS config, an origin address and a grace period of zero or more")
	}
	o := newServeOptions(opts)
	if !o.idleSet {
		o.idle = DefaultTCPIdleTimeout
	}
	p := &tcpProxy{
		tlsConfig:  tlsConfig,
		origin:     originAddr,
		logger:     logger.Named("tcp"),
		conns:      make(map[net.Conn]bool),
		base:       context.WithoutCancel(ctx),
		metrics:    o.metrics,
		accessLog:  o.accessLog,
		idle:       o.idle,
		proxyProto: o.proxyProtocol,
	}
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()

	var acceptErr error
	backoff := 5 * time.Millisecond
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			if errors.Is(err, net.ErrClosed) {
				acceptErr = fmt.Errorf("tlscore: accept on %s: %w", ln.Addr(), err)
				break
			}
			// Such as EMFILE: wait a little and try again, as net/http does.
			p.logger.Warn("accept failed", "error", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		p.track(c, true)
		p.wg.Go(func() { p.serve(c) })
	}

	logger.Info("shutting down: accepting no more connections, letting connections in progress finish", "grace", grace)
	start := time.Now()
	done := make(chan struct{})
	go func() { p.wg.Wait(); close(done) }()
	timer := time.NewTimer(grace)
	defer timer.Stop()
	select {
	case <-done:
		logger.Info("every connection finished", "after", time.Since(start).Round(time.Millisecond))
		return acceptErr
	case <-timer.C:
	}
	n := p.closeAll()
	<-done
	return errors.Join(acceptErr, fmt.Errorf("tlscore: %d TCP connections still open after the %v grace period were closed", n, grace))
}

// tcpProxy is the state of one ServeTCP.
type tcpProxy struct {
	tlsConfig  *tls.Config
	origin     string
	logger     hclog.Logger
	base       context.Context // ServeTCP's ctx without its cancellation
	metrics    *Metrics
	accessLog  *AccessLog
	idle       time.Duration // see WithIdleTimeout
	proxyProto byte          // see WithOriginProxyProtocol
	wg         sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]bool // every open connection: true for a client's, false for an origin's
}

func (p *tcpProxy) track(c net.Conn, client bool) {
	p.mu.Lock()
	p.conns[c] = client
	p.mu.Unlock()
}

func (p *tcpProxy) close(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	c.Close()
}

// closeAll closes every open connection and returns how many client
// connections there were.
func (p *tcpProxy) closeAll() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for c, client := range p.conns {
		c.Close()
		if client {
			n++
		}
	}
	return n
}

func (p *tcpProxy) serve(raw net.Conn) {
	defer p.close(raw)
	start := time.Now()
	oc := &observedConn{Conn: raw}
	client := tls.Server(oc, p.tlsConfig)
	if err := handshake(p.base, client, oc, p.metrics, p.accessLog); err != nil {
		p.logger.Debug("TLS handshake failed", "client_address", raw.RemoteAddr().String(), "error", err)
		return
	}
	cs := client.ConnectionState()
	dctx, cancel := context.WithTimeout(p.base, originDialTimeout)
	var d net.Dialer
	dialStart := time.Now()
	origin, err := d.DialContext(dctx, "tcp", p.origin)
	connect := time.Since(dialStart)
	cancel()
	if err != nil {
		reason := originUnreachable
		if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
			reason = originTimeout
		}
		p.metrics.observeOriginError("tcp", reason)
		p.logger.Warn("origin unreachable", "origin", p.origin, "server_name", cs.ServerName, "error", err)
		if p.accessLog != nil {
			p.accessLog.logTCP(start, raw.RemoteAddr(), &cs, oc, p.origin, connect, err, 0, 0)
		}
		return
	}
	p.track(origin, false)
	defer p.close(origin)
	if p.proxyProto != 0 {
		if err := writeProxyHeader(origin, p.proxyProto, raw); err != nil {
			p.metrics.observeOriginError("tcp", originFailed)
			p.logger.Warn("origin failed", "origin", p.origin, "error", err)
			if p.accessLog != nil {
				p.accessLog.logTCP(start, raw.RemoteAddr(), &cs, oc, p.origin, connect, err, 0, 0)
			}
			return
		}
	}

	var up int64
	var wg sync.WaitGroup
	act := newActivity(p.idle)
	wg.Go(func() { up = act.relay(origin, client) })
	down := act.relay(client, origin)
	wg.Wait()
	if p.accessLog != nil {
		p.accessLog.logTCP(start, raw.RemoteAddr(), &cs, oc, p.origin, connect, nil, up, down)
	}
	p.logger.Debug("connection closed", "client_address", raw.RemoteAddr().String(), "server_name", cs.ServerName,
		"bytes_up", up, "bytes_down", down, "duration", time.Since(start))
}

// activity is when a byte last moved in either direction of one relayed
// connection.
type activity struct {
	idle time.Duration
	last atomic.Int64 // UnixNano
}

func newActivity(idle time.Duration) *activity {
	a := &activity{idle: idle}
	a.touch()
	return a
}

func (a *activity) touch() { a.last.Store(time.Now().UnixNano()) }

func (a *activity) quiet() bool { return time.Since(time.Unix(0, a.last.Load())) >= a.idle }

// relay copies src to dst until src ends, then closes dst's writing half. If
// the copy fails, both connections are closed so the other direction ends too;
// so it does when src has sent nothing while the whole connection was idle
// for a's timeout, or dst has taken nothing for as long.
func (a *activity) relay(dst, src net.Conn) int64 {
	var n int64
	var err error
	if a.idle > 0 {
		n, err = io.Copy(idleWriter{dst, a}, idleReader{src, a})
	} else {
		n, err = io.Copy(dst, src)
	}
	if err != nil {
		dst.Close()
		src.Close()
		return n
	}
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		if cw.CloseWrite() == nil {
			return n
		}
	}
	dst.Close()
	return n
}

// idleReader reads from c until the connection has been idle for a.idle.
type idleReader struct {
	c net.Conn
	a *activity
}

func (r idleReader) Read(p []byte) (int, error) {
	for {
		r.c.SetReadDeadline(time.Now().Add(r.a.idle))
		n, err := r.c.Read(p)
		if n > 0 {
			r.a.touch()
		}
		var ne net.Error
		if n == 0 && errors.As(err, &ne) && ne.Timeout() && !r.a.quiet() {
			continue // the other direction was busy: not idle
		}
		return n, err
	}
}

// idleWriter writes to c, failing if c takes nothing for a.idle.
type idleWriter struct {
	c net.Conn
	a *activity
}

func (w idleWriter) Write(p []byte) (int, error) {
	w.c.SetWriteDeadline(time.Now().Add(w.a.idle))
	n, err := w.c.Write(p)
	if n > 0 {
		w.a.touch()
	}
	// Not left set: a tls.Conn also writes while it reads (a TLS 1.3
	// KeyUpdate's answer), maybe long after this.
	w.c.SetWriteDeadline(time.Time{})
	return n, err
}

// ServeOption is an optional setting of [ServeHTTP] and [ServeTCP].
type ServeOption func(*serveOptions)

type serveOptions struct {
	metrics       *Metrics
	accessLog     *AccessLog
	idle          time.Duration
	idleSet       bool
	proxyProtocol byte // see WithOriginProxyProtocol
}

// WithIdleTimeout sets [ServeTCP]'s idle timeout (the default is
// [DefaultTCPIdleTimeout]); zero turns it off. [ServeHTTP] ignores it.
func WithIdleTimeout(d time.Duration) ServeOption {
	return func(o *serveOptions) { o.idle, o.idleSet = d, true }
}

func newServeOptions(opts []ServeOption) serveOptions {
	var o serveOptions
	for _, opt := range opts {
		opt(&o)
	}
	return o
}

// WithMetrics counts each TLS handshake in m's
// keyless_edge_handshakes_total, by TLS version, key type of the
// certificate served, resumption and outcome. The key type is known only
// for a tls.Config built by [NewServerTLSConfig].
func WithMetrics(m *Metrics) ServeOption {
	return func(o *serveOptions) { o.metrics = m }
}

// WithAccessLog writes a line to l for each HTTP request ([ServeHTTP]) or
// TCP connection ([ServeTCP]), and, rate-limited, for each failed TLS
// handshake. Every line has time (RFC 3339, UTC), type (http, tcp or
// handshake_error) and client (address:port). Requests and connections
// add server_name (SNI), tls_version (1.2, 1.3), cipher, resumed, alpn,
// key_id and keyserver (of the handshake's key operation; empty for a
// resumption, which makes none), bytes_in and bytes_out (bodies for HTTP,
// the relayed bytes for TCP) and duration (seconds). HTTP adds protocol,
// method, host, path, status and upstream_duration (seconds until the
// origin's response headers; null if none came); TCP adds origin, status
// (ok, origin_unreachable) and upstream_connect_duration. A failed
// handshake has server_name, reason (timeout, client_closed, error),
// error, duration and, after lines were left out by the rate limit,
// suppressed (how many).
func WithAccessLog(l *AccessLog) ServeOption {
	return func(o *serveOptions) { o.accessLog = l }
}

// observedConn is a client's connection under its *tls.Conn. The
// GetCertificate of [NewServerTLSConfig] records in it the key type of the
// certificate it chose (hello.Conn is this connection).
type observedConn struct {
	net.Conn
	keyType atomic.Pointer[string]
	// keyOp is the key operation the handshake made, if any: recorded by
	// the Client, which finds this connection in the operation's context
	// (see connContext).
	keyOp atomic.Pointer[keyOpInfo]
	// serverName is the SNI, as GetCertificate saw it: a handshake that
	// fails may end before crypto/tls records it in its state.
	serverName atomic.Pointer[string]
}

// recordKeyType notes the key type of the certificate chosen for the
// handshake on conn, if conn is an observedConn.
func recordKeyType(conn net.Conn, cert *tls.Certificate) {
	if oc, ok := conn.(*observedConn); ok {
		kt := keyTypeOf(cert)
		oc.keyType.Store(&kt)
	}
}

// handshake runs c's handshake, bounded by handshakeTimeout, counts it
// in m and logs its failure to al (each may be nil). oc is the connection
// under c.
func handshake(base context.Context, c *tls.Conn, oc *observedConn, m *Metrics, al *AccessLog) error {
	ctx, cancel := context.WithTimeout(base, handshakeTimeout)
	defer cancel()
	start := time.Now()
	err := c.HandshakeContext(ctx)
	if err != nil && al != nil {
		sni := c.ConnectionState().ServerName
		if p := oc.serverName.Load(); sni == "" && p != nil {
			sni = *p
		}
		al.logHandshakeError(start, oc.RemoteAddr(), sni, err)
	}
	if m != nil {
		var kt string
		if p := oc.keyType.Load(); p != nil {
			kt = *p
		}
		m.observeHandshake(c, kt, err)
	}
	return err
}

// tlsListener makes ServeHTTP's connections *tls.Conn values, so that
// http.Server serves them as TLS (HTTP/2 included). With metrics or an
// access log, it also
// starts each connection's handshake in a goroutine of its own, which
// counts the outcome: http.Server, which calls Handshake in its
// per-connection goroutine, then waits for that handshake and gets its
// result, since a tls.Conn runs one handshake for all callers. Accept
// itself never waits for a handshake, so a slow client stalls nobody.
type tlsListener struct {
	net.Listener
	config    *tls.Config
	base      context.Context
	metrics   *Metrics
	accessLog *AccessLog
}

func (l *tlsListener) Accept() (net.Conn, error) {
	raw, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	oc := &observedConn{Conn: raw}
	c := tls.Server(oc, l.config)
	if l.metrics != nil || l.accessLog != nil {
		go handshake(l.base, c, oc, l.metrics, l.accessLog)
	}
	return c, nil
}
