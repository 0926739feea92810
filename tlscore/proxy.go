package tlscore

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/keyless-tls/keyless/internal/hostname"
)

// Headers the reverse proxy sets on requests to the origin. Values a client
// sent under these names are removed first.
const (
	// HeaderServerName carries the server name (SNI) the client asked for,
	// in lower case; it is absent when the client sent none, or one that is
	// not a host name.
	HeaderServerName = "X-Keyless-Server-Name"
	// HeaderTLSVersion carries the TLS version of the client's connection,
	// such as "TLS 1.3".
	HeaderTLSVersion = "X-Keyless-TLS-Version"
)

// Defaults of [ProxyConfig].
const (
	DefaultOriginConnectTimeout  = 5 * time.Second
	DefaultOriginResponseTimeout = 60 * time.Second
	DefaultOriginIdleTimeout     = 90 * time.Second
	DefaultOriginMaxIdleConns    = 64
)

// ProxyConfig configures a [Proxy]. After it is passed to [NewProxy] it is
// not modified.
type ProxyConfig struct {
	// Routes choose the origin of each request by its host name; see
	// [Proxy]. At least one is required.
	Routes []Route
	// TrustedProxies are the peers whose X-Forwarded-For (and, with
	// Forwarded, Forwarded) values the origin receives, followed by the
	// peer's address. From any other peer those headers are replaced. The
	// zero value trusts nobody.
	TrustedProxies TrustedProxies
	// Forwarded adds an RFC 7239 Forwarded header (for, host and proto) to
	// what the origin receives.
	Forwarded bool
	// ConnectTimeout bounds connecting to an origin (zero means
	// [DefaultOriginConnectTimeout]); ResponseTimeout bounds the wait for
	// its response headers once the request is sent (zero means
	// [DefaultOriginResponseTimeout]). A request that runs out of either
	// gets 504 Gateway Timeout.
	ConnectTimeout, ResponseTimeout time.Duration
	// IdleTimeout closes a pooled connection to an origin left idle this
	// long (zero means [DefaultOriginIdleTimeout]), and MaxIdleConns bounds
	// the idle connections kept per origin (zero means
	// [DefaultOriginMaxIdleConns]; -1 keeps none).
	IdleTimeout  time.Duration
	MaxIdleConns int
	// Metrics, if not nil, counts failed origin requests (see [Metrics]).
	Metrics *Metrics
	// Logger receives failed origin requests; nil means none.
	Logger hclog.Logger
}

// Proxy is a reverse proxy, an http.Handler for [ServeHTTP], that sends each
// request to the origin of its route. It is safe for concurrent use.
//
// # Routing
//
// The route is chosen by the request's host name: its Host header (HTTP/2's
// :authority) without port, or the TLS server name if it has no Host. A route
// naming the host exactly wins over one with a wildcard ("*.example.com"
// covers one label); any other host, and an IP literal, goes to the default
// route. Without a default, such a request gets 421 Misdirected Request.
//
// # What the origin receives
//
// The request as the client sent it, path prefixed with the origin URL's
// path, with these headers set by the edge:
//
//   - Host: the client's, or the route's [Route.HostHeader].
//   - X-Forwarded-For: the client's address; appended to the values the
//     client sent if it is one of [ProxyConfig.TrustedProxies].
//   - X-Forwarded-Host: the client's Host. X-Forwarded-Proto: https.
//   - Forwarded (with [ProxyConfig.Forwarded]): for, host and proto, in
//     the same way appended only for a trusted peer.
//   - [HeaderServerName] (in lower case) and [HeaderTLSVersion].
//   - [HeaderClientSubject], when a client certificate was verified (see
//     [ClientAuthPolicy]).
//
// What a client sent under these names (X-Forwarded-For and Forwarded from
// a trusted proxy aside), under X-Real-Ip or any X-Forwarded-* or
// X-Keyless-* name, or under the same names with '_' for '-', is dropped;
// so are hop-by-hop headers. The client's address is that of its
// connection, which is the one from a PROXY protocol header when the edge
// accepts them ([ProxyProtocolListener]).
//
// # Origins
//
// Connections to origins are pooled and reused across requests and routes;
// [Proxy.SetRoutes] keeps the pool. Origins are reached directly, whatever
// proxy the environment names. Responses are streamed: each write of the
// origin is flushed to the client at once. If the origin cannot be reached
// or fails to answer, the client gets 502 Bad Gateway, or 504 Gateway
// Timeout if a timeout ran out, with a one-line body saying so; each such
// failure is logged and counted.
type Proxy struct {
	routes    atomic.Pointer[routeTable]
	trusted   TrustedProxies
	forwarded bool
	metrics   *Metrics
	logger    hclog.Logger
	rp        *httputil.ReverseProxy
}

var _ http.Handler = (*Proxy)(nil)

// NewProxy returns a Proxy for cfg. It returns an error naming the route
// and field if a route is invalid.
func NewProxy(cfg ProxyConfig) (*Proxy, error) {
	logger := cfg.Logger
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	p := &Proxy{trusted: cfg.TrustedProxies, forwarded: cfg.Forwarded, metrics: cfg.Metrics, logger: logger.Named("proxy")}
	if err := p.SetRoutes(cfg.Routes); err != nil {
		return nil, err
	}
	orDefault := func(d, def time.Duration) time.Duration {
		if d <= 0 {
			return def
		}
		return d
	}
	dialer := &net.Dialer{Timeout: orDefault(cfg.ConnectTimeout, DefaultOriginConnectTimeout), KeepAlive: 30 * time.Second}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.DialContext = dialer.DialContext
	transport.ResponseHeaderTimeout = orDefault(cfg.ResponseTimeout, DefaultOriginResponseTimeout)
	transport.IdleConnTimeout = orDefault(cfg.IdleTimeout, DefaultOriginIdleTimeout)
	switch {
	case cfg.MaxIdleConns < 0:
		transport.DisableKeepAlives = true
	case cfg.MaxIdleConns == 0:
		transport.MaxIdleConnsPerHost = DefaultOriginMaxIdleConns
	default:
		transport.MaxIdleConnsPerHost = cfg.MaxIdleConns
	}
	transport.MaxIdleConns = 0 // no bound across origins: each has its own
	// Decrypted traffic goes to the origin named, never through a proxy
	// that HTTPS_PROXY or the like happens to name.
	transport.Proxy = nil
	p.rp = &httputil.ReverseProxy{
		Rewrite:       p.rewrite,
		Transport:     timedTransport{transport}, // upstream_duration of the access log
		FlushInterval: -1,
		ErrorLog:      stdLogger(p.logger, hclog.Warn),
		ErrorHandler:  p.originFailed,
	}
	return p, nil
}

// SetRoutes replaces p's routes. Requests in progress finish on their old
// route. If routes are invalid, the error names the route and what is wrong
// with it, and the old routes stay in force.
func (p *Proxy) SetRoutes(routes []Route) error {
	t, err := newRouteTable(routes)
	if err != nil {
		return fmt.Errorf("tlscore: routes: %w", err)
	}
	p.routes.Store(t)
	return nil
}

// Routes returns the routes in force, each with its Name and normalized
// Hosts filled in.
func (p *Proxy) Routes() []Route {
	t := p.routes.Load()
	out := make([]Route, len(t.routes))
	for i, r := range t.routes {
		out[i] = *r
	}
	return out
}

// routeKey is the context key of the route a request was sent to.
type routeKey struct{}

// ServeHTTP sends r to the origin of its route.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var sni string
	if r.TLS != nil {
		sni = r.TLS.ServerName
	}
	route := p.routes.Load().lookup(requestHost(r.Host, sni))
	if route == nil {
		p.metrics.observeOriginError("none", originNoRoute)
		p.logger.Debug("no route for the request's host", "host", r.Host, "server_name", sni)
		writeProxyError(w, http.StatusMisdirectedRequest, "no origin is configured for this host name")
		return
	}
	p.rp.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), routeKey{}, route)))
}

// rewrite builds the request to the origin of pr.In's route.
func (p *Proxy) rewrite(pr *httputil.ProxyRequest) {
	route := pr.In.Context().Value(routeKey{}).(*Route)
	pr.SetURL(route.Origin)
	dropProxyHeaders(pr.Out.Header)
	pr.Out.Host = pr.In.Host
	if route.HostHeader != "" {
		pr.Out.Host = route.HostHeader
	}
	p.setForwarded(pr)
	if cs := pr.In.TLS; cs != nil {
		if cs.ServerName != "" && hostname.CheckServerName(cs.ServerName) == nil {
			pr.Out.Header.Set(HeaderServerName, hostname.Normalize(cs.ServerName))
		}
		pr.Out.Header.Set(HeaderTLSVersion, tls.VersionName(cs.Version))
		if sub := clientSubject(cs); sub != "" {
			pr.Out.Header.Set(HeaderClientSubject, sub)
		}
	}
}

// setForwarded sets X-Forwarded-For, -Host and -Proto, and Forwarded if p
// sends it, on pr.Out. The values a trusted peer sent for X-Forwarded-For
// and Forwarded are kept, with the peer appended.
func (p *Proxy) setForwarded(pr *httputil.ProxyRequest) {
	ap, err := netip.ParseAddrPort(pr.In.RemoteAddr)
	if err != nil {
		return // not a TCP peer: nothing to say about it
	}
	peer := ap.Addr().Unmap()
	trusted := p.trusted.Contains(peer)
	appendTo := func(name, v string) {
		if prior := pr.In.Header.Values(name); trusted && len(prior) > 0 {
			v = strings.Join(prior, ", ") + ", " + v
		}
		pr.Out.Header.Set(name, v)
	}
	appendTo("X-Forwarded-For", peer.String())
	pr.Out.Header.Set("X-Forwarded-Host", pr.In.Host)
	pr.Out.Header.Set("X-Forwarded-Proto", "https")
	if p.forwarded {
		appendTo("Forwarded", forwardedElement(peer, pr.In.Host, "https"))
	}
}

// Reasons of failed origin requests, as counted.
const (
	originNoRoute     = "no_route"
	originUnreachable = "unreachable"
	originTimeout     = "timeout"
	originFailed      = "failed"
)

// originFailed answers a request whose origin failed with 502 or 504.
func (p *Proxy) originFailed(w http.ResponseWriter, r *http.Request, err error) {
	route, _ := r.Context().Value(routeKey{}).(*Route)
	name, origin := "none", ""
	if route != nil {
		name, origin = route.Name, route.Origin.Host
	}
	if r.Context().Err() != nil {
		// The client went away; nothing is wrong with the origin.
		p.logger.Debug("request canceled by the client", "route", name, "method", r.Method, "host", r.Host, "path", r.URL.Path, "error", err)
		writeProxyError(w, http.StatusBadGateway, "the request was canceled")
		return
	}
	reason, status, msg := originFailed, http.StatusBadGateway, "the origin server failed to answer"
	var ne net.Error
	var op *net.OpError
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		reason, status, msg = originTimeout, http.StatusGatewayTimeout, "the origin server did not answer in time"
	case errors.As(err, &op) && op.Op == "dial":
		reason, msg = originUnreachable, "the origin server could not be reached"
	}
	p.metrics.observeOriginError(name, reason)
	p.logger.Warn("origin request failed", "route", name, "origin", origin, "reason", reason, "client_address", r.RemoteAddr,
		"method", r.Method, "host", r.Host, "path", r.URL.Path, "error", err)
	writeProxyError(w, status, msg)
}

// writeProxyError answers with status and a one-line plain-text body.
func writeProxyError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = fmt.Fprintf(w, "%d %s: %s\n", status, http.StatusText(status), msg)
}

// dropProxyHeaders removes from h what a client sent under the names of the
// headers the proxy sets, and under names that differ from them only by '_'
// for '-' (X_Forwarded_For), which CGI-style origins read as the same
// variable: Forwarded, X-Forwarded-*, X-Real-Ip and X-Keyless-*.
func dropProxyHeaders(h http.Header) {
	for name := range h {
		n := strings.ToLower(strings.ReplaceAll(name, "_", "-"))
		if n == "forwarded" || n == "x-real-ip" || strings.HasPrefix(n, "x-forwarded-") || strings.HasPrefix(n, "x-keyless-") {
			delete(h, name)
		}
	}
}

// stdLogger returns a *log.Logger for net/http's ErrorLog that writes to
// logger at level, so that nothing goes through the standard log package.
func stdLogger(logger hclog.Logger, level hclog.Level) *log.Logger {
	return log.New(logWriter{logger: logger, level: level}, "", 0)
}

// logWriter turns net/http's log lines into hclog lines. Handshake failures
// and broken client connections, which scanners and impatient clients cause
// all day, go to debug; failed key operations are logged by the Client.
type logWriter struct {
	logger hclog.Logger
	level  hclog.Level
}

func (w logWriter) Write(p []byte) (int, error) {
	msg := strings.TrimSpace(string(p))
	level := w.level
	if strings.HasPrefix(msg, "http: TLS handshake error") || strings.HasPrefix(msg, "http2: ") {
		level = hclog.Debug
	}
	w.logger.Log(level, msg)
	return len(p), nil
}
