package tlscore

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// certMetrics are the metrics of the certificates the edge does not serve
// and of OCSP stapling.
type certMetrics struct {
	notServed   *prometheus.GaugeVec
	ocspFetches *prometheus.CounterVec
	ocspAge     *prometheus.Desc

	mu      sync.Mutex
	stapled func() map[string]time.Time // by name: ThisUpdate of the response stapled
}

// Results of an OCSP fetch, the values of the result label of
// keyless_edge_ocsp_fetches_total.
const (
	ocspResultGood    = "good"    // verified and stapled
	ocspResultRevoked = "revoked" // verified, revoked: not stapled
	ocspResultUnknown = "unknown" // verified, status unknown: not stapled
	ocspResultError   = "error"   // not fetched, or not verified
)

func newCertMetrics(reg prometheus.Registerer) *certMetrics {
	m := &certMetrics{
		notServed: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "keyless", Subsystem: "edge", Name: "certificates_not_served",
			Help: "Certificate files in the certificate directory that the last successful load skipped, by reason: missing_key (the keyserver holds no key for it) or invalid (unreadable, unparsable or out of order). The log names each file.",
		}, []string{"reason"}),
		ocspFetches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "keyless", Subsystem: "edge", Name: "ocsp_fetches_total",
			Help: "OCSP responses fetched from responders or read from NAME.ocsp files, by result: good (verified and stapled), revoked and unknown (verified, not stapled), error (not fetched or failed verification).",
		}, []string{"result"}),
		ocspAge: prometheus.NewDesc("keyless_edge_ocsp_response_age_seconds",
			"Age (now minus thisUpdate) of the OCSP response stapled to each certificate, by name (first DNS name, else file name). A certificate with no series has no response stapled.",
			[]string{"name"}, nil),
	}
	for _, r := range []string{notServedMissingKey, notServedInvalid} {
		m.notServed.WithLabelValues(r)
	}
	for _, r := range []string{ocspResultGood, ocspResultRevoked, ocspResultUnknown, ocspResultError} {
		m.ocspFetches.WithLabelValues(r)
	}
	reg.MustRegister(m.notServed, m.ocspFetches, m)
	return m
}

// Describe and Collect make certMetrics the collector of the OCSP ages,
// computed when scraped.
func (m *certMetrics) Describe(ch chan<- *prometheus.Desc) { ch <- m.ocspAge }

func (m *certMetrics) Collect(ch chan<- prometheus.Metric) {
	m.mu.Lock()
	stapled := m.stapled
	m.mu.Unlock()
	if stapled == nil {
		return
	}
	now := time.Now()
	for name, t := range stapled() {
		ch <- prometheus.MustNewConstMetric(m.ocspAge, prometheus.GaugeValue, now.Sub(t).Seconds(), name)
	}
}

// setNotServed sets keyless_edge_certificates_not_served to skipped.
func (m *Metrics) setNotServed(skipped []skippedCert) {
	if m == nil {
		return
	}
	counts := map[string]int{notServedMissingKey: 0, notServedInvalid: 0}
	for _, sk := range skipped {
		counts[sk.reason]++
	}
	for r, n := range counts {
		m.certs.notServed.WithLabelValues(r).Set(float64(n))
	}
}

// observeOCSP counts one OCSP fetch by result.
func (m *Metrics) observeOCSP(result string) {
	if m != nil {
		m.certs.ocspFetches.WithLabelValues(result).Inc()
	}
}

// setOCSPSource makes the age gauge report what stapled returns.
func (m *Metrics) setOCSPSource(stapled func() map[string]time.Time) {
	if m == nil {
		return
	}
	m.certs.mu.Lock()
	m.certs.stapled = stapled
	m.certs.mu.Unlock()
}
