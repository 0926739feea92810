package main

import "github.com/prometheus/client_golang/prometheus"

// linkMetrics count what the keyserver does to edges' connections outside
// requests: connections closed at accept, at credential expiry or
// revocation, refusal log lines suppressed, and expired CRLs.
type linkMetrics struct {
	refused    *prometheus.CounterVec
	closed     *prometheus.CounterVec
	suppressed prometheus.Counter
}

func newLinkMetrics(reg prometheus.Registerer, expiredCRLs func() []string) *linkMetrics {
	m := &linkMetrics{
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keyless_keyserver_connections_refused_total",
			Help: "Connections closed at accept because a bound was reached, by bound (max_connections, max_connections_per_source).",
		}, []string{"reason"}),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keyless_keyserver_connections_closed_total",
			Help: "Established edge connections the keyserver closed because their client certificate expired or was revoked by a CRL, by reason.",
		}, []string{"reason"}),
		suppressed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "keyless_keyserver_handshake_refusal_logs_suppressed_total",
			Help: "Refused edge handshakes not logged because their source, or all sources, exceeded the refusal log's rate.",
		}),
	}
	reg.MustRegister(m.refused, m.closed, m.suppressed,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "keyless_keyserver_client_crls_expired",
			Help: "-client-crl CRLs whose next update is past: still used, but missing newer revocations.",
		}, func() float64 { return float64(len(expiredCRLs())) }),
	)
	return m
}

func (m *linkMetrics) connectionRefused(reason string) { m.refused.WithLabelValues(reason).Inc() }
func (m *linkMetrics) connectionClosed(reason string)  { m.closed.WithLabelValues(reason).Inc() }
func (m *linkMetrics) refusalLogSuppressed()           { m.suppressed.Inc() }
