package signer

import (
	"crypto"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// Metrics are the keyserver's Prometheus metrics. A Metrics is an
// [Auditor]: fanned out with the audit log (see [MultiAuditor]), it sees
// every request the service answers, at the same single point as the audit
// trail. It is safe for concurrent use.
//
// Labels are bounded: a key is named by its label (or key id in hex) only
// when [Metrics.SetKeys] made it known, and "unknown" otherwise, so that a
// client sending random key ids cannot create series; an identity is named
// by its policy groups (see [Policy.IdentityGroup]), never by its name or
// address.
type Metrics struct {
	ops        *prometheus.CounterVec
	latency    *prometheus.HistogramVec
	refused    *prometheus.CounterVec
	hsmUp      prometheus.Gauge
	keysLoaded prometheus.Gauge

	mu     sync.RWMutex
	keys   map[string]string // key id hex -> metric name
	policy func() *Policy
}

var _ Auditor = (*Metrics)(nil)

// NewMetrics registers the keyserver's metrics with reg and returns them.
// policy returns the policy in force (such as [Service.Policy]); nil means
// every identity is in group "none". It panics if a metric is already
// registered with reg, as prometheus.MustRegister does.
func NewMetrics(reg prometheus.Registerer, policy func() *Policy) *Metrics {
	m := &Metrics{
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "keyless", Subsystem: "keyserver", Name: "operations_total",
			Help: "Requests answered, by operation, key, signature scheme, outcome (gRPC code) and identity group.",
		}, []string{"op", "key", "scheme", "outcome", "identity_group"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "keyless", Subsystem: "keyserver", Name: "operation_duration_seconds",
			Help:    "Time from a request's arrival to its answer, by operation and outcome.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"op", "outcome"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "keyless", Subsystem: "keyserver", Name: "handshakes_refused_total",
			Help: "mTLS handshakes of edges that failed, by reason.",
		}, []string{"reason"}),
		hsmUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "keyless", Subsystem: "keyserver", Name: "hsm_up",
			Help: "1 if the last health check of the HSM succeeded, else 0.",
		}),
		keysLoaded: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "keyless", Subsystem: "keyserver", Name: "keys",
			Help: "Keys the keyserver serves.",
		}),
		keys:   map[string]string{},
		policy: policy,
	}
	reg.MustRegister(m.ops, m.latency, m.refused, m.hsmUp, m.keysLoaded)
	return m
}

// knownSchemes holds the SchemeName of every scheme the API defines.
var knownSchemes = func() map[string]bool {
	names := map[string]bool{}
	for n := range keylessv1.SignatureAlgorithm_name {
		names[SchemeName(keylessv1.SignatureAlgorithm(n))] = true
	}
	return names
}()

// Audit counts rec's request; it never fails.
func (m *Metrics) Audit(rec *AuditRecord) error {
	m.mu.RLock()
	key, ok := m.keys[rec.KeyID]
	m.mu.RUnlock()
	switch {
	case rec.Op == "list_keys", rec.Op == OpTickets: // no key
		key = ""
	case !ok:
		key = "unknown"
	}
	group := "none"
	if m.policy != nil {
		if p := m.policy(); p != nil {
			group = p.IdentityGroup(rec.Identity)
		}
	}
	scheme := rec.Scheme
	if scheme != "" && !knownSchemes[scheme] {
		// A request may carry any enum number; the audit record keeps
		// it, a label would make a series of each.
		scheme = "unknown"
	}
	m.ops.WithLabelValues(rec.Op, key, scheme, rec.Outcome, group).Inc()
	m.latency.WithLabelValues(rec.Op, rec.Outcome).Observe(float64(rec.LatencyUS) / 1e6)
	return nil
}

// SetKeys makes keys known by name to the metrics: each is named by its
// label ([Describer]) or, without one, its key id in hex. It also sets the
// keyless_keyserver_keys gauge.
func (m *Metrics) SetKeys(keys []crypto.Signer) {
	names := make(map[string]string, len(keys))
	for _, k := range keys {
		id, err := link.KeyIDOf(k.Public())
		if err != nil {
			continue
		}
		hexID := link.FormatKeyID(id)
		name := hexID
		if d, ok := k.(Describer); ok && d.Label() != "" {
			name = d.Label()
		}
		names[hexID] = name
	}
	m.mu.Lock()
	m.keys = names
	m.mu.Unlock()
	m.keysLoaded.Set(float64(len(names)))
}

// SetHSMUp sets keyless_keyserver_hsm_up from the result of a health
// check.
func (m *Metrics) SetHSMUp(err error) {
	if err != nil {
		m.hsmUp.Set(0)
	} else {
		m.hsmUp.Set(1)
	}
}

// HandshakeRefused counts a failed mTLS handshake of an edge. reason is
// one of a few fixed words (such as "untrusted_certificate"), never an
// address or a name.
func (m *Metrics) HandshakeRefused(reason string) {
	m.refused.WithLabelValues(reason).Inc()
}

// RegisterQueueMetrics registers gauges of s's HSM queue with reg: the
// operations waiting for the key store and those running in it; the
// Stream calls open, one per connected edge (per keyserver connection);
// and counters of the streams' messages and the operations they carry in
// each direction, whose quotient says how far operations share messages.
func (s *Service) RegisterQueueMetrics(reg prometheus.Registerer) {
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "keyless", Subsystem: "keyserver", Name: "streams_open",
			Help: "KeylessService.Stream calls open: edges sending key operations on a stream.",
		}, func() float64 { return float64(s.openStreams()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "keyless", Subsystem: "keyserver", Name: "stream_workers",
			Help: "Goroutines performing the operations of KeylessService.Stream calls, over all streams: started as operations need them, at most 2 × -max-concurrent per stream, each ending after a second without an operation.",
		}, func() float64 { return float64(s.workersRunning.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "keyless", Subsystem: "keyserver", Name: "hsm_queue_depth",
			Help: "Key operations waiting for a free HSM slot (see -max-concurrent, -max-queued).",
		}, func() float64 { return float64(s.limit.queueDepth()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "keyless", Subsystem: "keyserver", Name: "hsm_operations_running",
			Help: "Key operations running in the HSM.",
		}, func() float64 { return float64(s.limit.running()) }),
	)
	for _, c := range []struct {
		direction          string
		messages, payloads *atomic.Uint64
	}{
		{"received", &s.traffic.received, &s.traffic.receivedOps},
		{"sent", &s.traffic.sent, &s.traffic.sentResults},
	} {
		labels := prometheus.Labels{"direction": c.direction}
		reg.MustRegister(
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Namespace: "keyless", Subsystem: "keyserver", Name: "stream_messages_total", ConstLabels: labels,
				Help: "Messages of KeylessService.Stream calls: received from edges (operations) and sent to them (results).",
			}, func() float64 { return float64(c.messages.Load()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Namespace: "keyless", Subsystem: "keyserver", Name: "stream_operations_total", ConstLabels: labels,
				Help: "Operations carried by the messages of KeylessService.Stream calls, received (requests) and sent (results); divided by stream_messages_total, how many share a message.",
			}, func() float64 { return float64(c.payloads.Load()) }),
		)
	}
}
