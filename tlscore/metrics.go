package tlscore

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"path"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyless-tls/keyless/internal/hostname"
	"google.golang.org/grpc"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// Metrics are the edge's Prometheus metrics: TLS handshakes (see
// [WithMetrics]), handshakes shed and key operations in flight
// ([ServerConfig.Metrics]), keyserver calls ([ClientConfig.Metrics]), loaded
// certificates ([CertStoreConfig.Metrics]) and failed origin requests
// ([ProxyConfig.Metrics], [WithMetrics] for [ServeTCP]). A nil *Metrics records
// nothing. It is safe for concurrent use.
//
// Labels are bounded: a keyserver is named by its configured address, a
// certificate by its first DNS name (or file name), a route by its
// configured name, and no label carries a client's address or server name.
type Metrics struct {
	handshakes   *prometheus.CounterVec
	shed         *prometheus.CounterVec
	keyOps       prometheus.Gauge
	callLatency  *prometheus.HistogramVec
	callErrors   *prometheus.CounterVec
	certsLoaded  prometheus.Gauge
	certsExpiry  *prometheus.GaugeVec
	expiryMu     sync.Mutex
	expiryLabels map[string]bool
	originErrors *prometheus.CounterVec

	certs *certMetrics // certificates not served and OCSP stapling

	// Requests (see observeRequest) and keyserver health (see health.go).
	requests        *prometheus.CounterVec
	requestDuration *prometheus.HistogramVec
	keyserverUp     *prometheus.GaugeVec
	callRetries     *prometheus.CounterVec
	// certStore names requests' server names and TLS 1.3 resumptions' key
	// types; set by NewServerTLSConfig.
	certStore atomic.Pointer[CertStore]
}

// NewMetrics registers the edge's metrics with reg and returns them. It
// panics if a metric is already registered with reg, as
// prometheus.MustRegister does.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		handshakes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "keyless", Subsystem: "edge", Name: "handshakes_total",
			Help: "TLS handshakes with clients, by TLS version (1.2, 1.3, unknown), key type of the certificate chosen (none if no certificate was chosen, as in a failure before the choice; for a TLS 1.3 resumption, which chooses none, the type of the certificates that serve the name, or mixed if they differ), resumption and outcome (ok, timeout, client_closed, error).",
		}, []string{"version", "key_type", "resumed", "outcome"}),
		shed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "keyless", Subsystem: "edge", Name: "handshakes_shed_total",
			Help: "Handshakes refused at their key operation, before it reached a keyserver, by reason: key_operations (the edge had as many key operations in flight as it allows) or client_rate (the client was over its rate of full handshakes). Each is also counted in keyless_edge_handshakes_total with outcome error.",
		}, []string{"reason"}),
		keyOps: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "keyless", Subsystem: "edge", Name: "key_operations_in_flight",
			Help: "Key operations of handshakes in flight, counted against the edge's bound on them.",
		}),
		callLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "keyless", Subsystem: "edge", Name: "keyserver_call_duration_seconds",
			Help:    "Duration of keyserver calls, retries included, by method and keyserver (configured address; none if no keyserver was reached).",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"method", "keyserver"}),
		callErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "keyless", Subsystem: "edge", Name: "keyserver_call_errors_total",
			Help: "Failed keyserver calls, by method, keyserver and gRPC code.",
		}, []string{"method", "keyserver", "code"}),
		certsLoaded: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "keyless", Subsystem: "edge", Name: "certificates_loaded",
			Help: "Certificates the edge serves, from its last successful load.",
		}),
		certsExpiry: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "keyless", Subsystem: "edge", Name: "certificate_expiry_timestamp_seconds",
			Help: "NotAfter of each loaded certificate, in Unix seconds, by name (first DNS name, else file name; the earliest if several certificates share it).",
		}, []string{"name"}),
		expiryLabels: map[string]bool{},
		originErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "keyless", Subsystem: "edge", Name: "origin_errors_total",
			Help: "Requests (HTTP) and connections (TCP mode) whose origin failed, by route name (as configured; tcp in TCP mode; none for no_route) and reason: unreachable (502, connecting failed), timeout (504, connecting or the response headers took too long), failed (502, any other failure) or no_route (421, no route for the host name).",
		}, []string{"route", "reason"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "keyless", Subsystem: "edge", Name: "http_requests_total",
			Help: "HTTP requests served, by server name (a name or wildcard of a loaded certificate that covers the SNI; other for anything else), status class (1xx to 5xx) and protocol (1.0, 1.1, 2).",
		}, []string{"server_name", "code", "protocol"}),
		requestDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "keyless", Subsystem: "edge", Name: "http_request_duration_seconds",
			Help:    "Duration of HTTP requests, from their headers to the end of the response, by server name (as in keyless_edge_http_requests_total).",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"server_name"}),
		keyserverUp: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "keyless", Subsystem: "edge", Name: "keyserver_up",
			Help: "1 while a keyserver is ready (connected, and its health service reports SERVING), else 0, by keyserver (configured address; static -keyserver lists only).",
		}, []string{"keyserver"}),
		callRetries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "keyless", Subsystem: "edge", Name: "keyserver_call_retries_total",
			Help: "Key operations that failed on a keyserver and were tried again on another, by the keyserver that failed and gRPC code; the retry's own outcome is counted in keyless_edge_keyserver_call_errors_total and keyless_edge_keyserver_call_duration_seconds.",
		}, []string{"keyserver", "code"}),
	}
	for _, reason := range []string{shedKeyOperations, shedClientRate} {
		m.shed.WithLabelValues(reason)
	}
	reg.MustRegister(m.handshakes, m.shed, m.keyOps, m.callLatency, m.callErrors, m.certsLoaded, m.certsExpiry, m.originErrors,
		m.requests, m.requestDuration, m.keyserverUp, m.callRetries)
	m.certs = newCertMetrics(reg)
	return m
}

// observeHandshake counts one handshake of c. keyType is the key type of
// the certificate chosen, "" if none was; err is the handshake's result.
func (m *Metrics) observeHandshake(c *tls.Conn, keyType string, err error) {
	if m == nil {
		return
	}
	cs := c.ConnectionState()
	version := "unknown"
	switch cs.Version {
	case tls.VersionTLS12:
		version = "1.2"
	case tls.VersionTLS13:
		version = "1.3"
	}
	if keyType == "" && err == nil && cs.DidResume {
		keyType = m.resumedKeyType(cs.ServerName)
	}
	if keyType == "" {
		keyType = "none"
	}
	resumed := "false"
	if err == nil && cs.DidResume {
		resumed = "true"
	}
	m.handshakes.WithLabelValues(version, keyType, resumed, handshakeOutcome(err)).Inc()
}

// observeShed counts one handshake refused for reason.
func (m *Metrics) observeShed(reason string) {
	if m == nil {
		return
	}
	m.shed.WithLabelValues(reason).Inc()
}

// keyOperationStarted and keyOperationEnded track the key operations in
// flight.
func (m *Metrics) keyOperationStarted() {
	if m != nil {
		m.keyOps.Inc()
	}
}

func (m *Metrics) keyOperationEnded() {
	if m != nil {
		m.keyOps.Dec()
	}
}

// handshakeOutcome classifies a handshake error into a few fixed words.
func handshakeOutcome(err error) string {
	var ne net.Error
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed):
		return "client_closed"
	default:
		return "error"
	}
}

// keyTypeOf names the type of a certificate's key: rsa, ecdsa_p256,
// ecdsa_p384, ecdsa_p521, ed25519 or other.
func keyTypeOf(c *tls.Certificate) string {
	if c == nil || c.Leaf == nil {
		return "other"
	}
	switch k := c.Leaf.PublicKey.(type) {
	case *rsa.PublicKey:
		return "rsa"
	case *ecdsa.PublicKey:
		switch k.Curve.Params().BitSize {
		case 256:
			return "ecdsa_p256"
		case 384:
			return "ecdsa_p384"
		case 521:
			return "ecdsa_p521"
		}
	case ed25519.PublicKey:
		return "ed25519"
	}
	return "other"
}

// setCertificates sets the certificate gauges to entries, removing the
// series of certificates no longer loaded.
func (m *Metrics) setCertificates(entries []*certEntry) {
	if m == nil {
		return
	}
	expiry := make(map[string]time.Time, len(entries))
	for _, e := range entries {
		name := filepath.Base(e.file)
		if len(e.cert.Leaf.DNSNames) > 0 {
			name = e.cert.Leaf.DNSNames[0]
		}
		if t, ok := expiry[name]; !ok || e.cert.Leaf.NotAfter.Before(t) {
			expiry[name] = e.cert.Leaf.NotAfter
		}
	}
	m.expiryMu.Lock()
	defer m.expiryMu.Unlock()
	for name, t := range expiry {
		m.certsExpiry.WithLabelValues(name).Set(float64(t.Unix()))
	}
	for name := range m.expiryLabels {
		if _, ok := expiry[name]; !ok {
			m.certsExpiry.DeleteLabelValues(name)
			delete(m.expiryLabels, name)
		}
	}
	for name := range expiry {
		m.expiryLabels[name] = true
	}
	m.certsLoaded.Set(float64(len(entries)))
}

// unaryInterceptor returns a gRPC client interceptor that times each call
// and counts its errors, by method and keyserver. keyserver maps the
// address of the connection that served the call to a label.
func (m *Metrics) unaryInterceptor(keyserver func(net.Addr) string) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		var p peer.Peer
		start := time.Now()
		err := invoker(ctx, method, req, reply, cc, append(opts, grpc.Peer(&p))...)
		method = path.Base(method)
		ks := keyserver(p.Addr)
		m.callLatency.WithLabelValues(method, ks).Observe(time.Since(start).Seconds())
		if err != nil {
			m.callErrors.WithLabelValues(method, ks, status.Code(err).String()).Inc()
		}
		return err
	}
}

// observeCall records one operation sent on a stream, as the interceptor
// records a unary call.
func (m *Metrics) observeCall(method, keyserver string, start time.Time, err error) {
	m.callLatency.WithLabelValues(method, keyserver).Observe(time.Since(start).Seconds())
	if err != nil {
		m.callErrors.WithLabelValues(method, keyserver, status.Code(err).String()).Inc()
	}
}

// keyserverAddr is the remote address of a keyserver connection: the
// address as configured, so that metrics name keyservers by it rather than
// by whatever it resolved to.
type keyserverAddr string

func (a keyserverAddr) Network() string { return "tcp" }
func (a keyserverAddr) String() string  { return string(a) }

// namedDialer returns dial with its connections named by the address
// dialed (see namedConn).
func namedDialer(dial func(context.Context, string) (net.Conn, error)) func(context.Context, string) (net.Conn, error) {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		c, err := dial(ctx, addr)
		if err != nil {
			return nil, err
		}
		return &namedConn{Conn: c, addr: keyserverAddr(addr)}, nil
	}
}

// namedConn is a keyserver connection whose RemoteAddr is the configured
// address.
type namedConn struct {
	net.Conn
	addr keyserverAddr
}

func (c *namedConn) RemoteAddr() net.Addr { return c.addr }

// observeOriginError counts one request whose origin failed (or that had
// no route), by route name and reason.
func (m *Metrics) observeOriginError(route, reason string) {
	if m != nil {
		m.originErrors.WithLabelValues(route, reason).Inc()
	}
}

// useCertificates makes m name requests' server names and TLS 1.3
// resumptions' key types after the certificates of certs.
func (m *Metrics) useCertificates(certs *CertStore) {
	if m != nil && certs != nil {
		m.certStore.Store(certs)
	}
}

// resumedKeyType returns the key type label of a TLS 1.3 resumption for
// serverName. crypto/tls chooses no certificate then, and does not say
// which one the resumed session used, so it is the type of the
// certificates that would serve the name, or "mixed" if they differ (a
// name with both an RSA and an ECDSA certificate).
func (m *Metrics) resumedKeyType(serverName string) string {
	certs := m.certStore.Load()
	if certs == nil {
		return ""
	}
	set := certs.set.Load()
	if set == nil {
		return ""
	}
	kt := ""
	for _, e := range set.serving(serverName) {
		switch t := keyTypeOf(&e.cert); {
		case kt == "":
			kt = t
		case kt != t:
			return "mixed"
		}
	}
	return kt
}

// serverNameLabel returns the metrics label of a request's server name:
// the name, or the wildcard, of a loaded certificate that covers it, else
// "other", so that clients cannot make new series.
func (m *Metrics) serverNameLabel(serverName string) string {
	certs := m.certStore.Load()
	if certs == nil || serverName == "" {
		return "other"
	}
	set := certs.set.Load()
	if set == nil {
		return "other"
	}
	name := hostname.Normalize(serverName)
	if len(set.exact[name]) > 0 {
		return name
	}
	if parent, ok := hostname.Parent(name); ok && len(set.wildcard[parent]) > 0 {
		return "*." + parent
	}
	return "other"
}

// observeRequest counts one HTTP request answered with status after d.
func (m *Metrics) observeRequest(r *http.Request, status int, d time.Duration) {
	if m == nil {
		return
	}
	name := "other"
	if r.TLS != nil {
		name = m.serverNameLabel(r.TLS.ServerName)
	}
	class := "other"
	if status >= 100 && status < 600 {
		class = strconv.Itoa(status/100) + "xx"
	}
	proto := "other"
	switch {
	case r.ProtoMajor == 2:
		proto = "2"
	case r.ProtoMajor == 1 && r.ProtoMinor <= 1:
		proto = "1." + strconv.Itoa(r.ProtoMinor)
	}
	m.requests.WithLabelValues(name, class, proto).Inc()
	m.requestDuration.WithLabelValues(name).Observe(d.Seconds())
}
