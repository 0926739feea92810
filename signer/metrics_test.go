package signer

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"strings"
	"testing"

	"github.com/keyless-tls/keyless/link"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestMetricsLabelsAreBounded(t *testing.T) {
	p := mustPolicy(t, `
groups:
  edges: [spiffe://x/edge/1, spiffe://x/edge/2]
rules:
  - name: web
    identities: [group:edges, spiffe://x/lonely]
    keys: ["*"]
    operations: [sign]
    schemes: [default]
`)
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg, func() *Policy { return p })
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := link.KeyIDOf(key.Public())
	m.SetKeys([]crypto.Signer{key})
	recs := []*AuditRecord{
		{Identity: "spiffe://x/edge/1", KeyID: link.FormatKeyID(id), Op: OpSign, Scheme: "ecdsa_sha256", Outcome: "OK", LatencyUS: 900},
		{Identity: "spiffe://x/lonely", KeyID: strings.Repeat("ab", 32), Op: OpSign, Outcome: "NotFound"},
		{Identity: "spiffe://x/intruder", Op: OpSign, Outcome: "PermissionDenied"},
		// Schemes the API does not define share one series.
		{Identity: "spiffe://x/edge/1", KeyID: link.FormatKeyID(id), Op: OpSign, Scheme: "77", Outcome: "InvalidArgument"},
		{Identity: "spiffe://x/edge/1", KeyID: link.FormatKeyID(id), Op: OpSign, Scheme: "78", Outcome: "InvalidArgument"},
	}
	for _, r := range recs {
		if err := m.Audit(r); err != nil {
			t.Fatal(err)
		}
	}
	for _, tt := range []struct{ key, outcome, group string }{
		{link.FormatKeyID(id), "OK", "edges"},
		{"unknown", "NotFound", "none"},
		{"unknown", "PermissionDenied", "unlisted"},
	} {
		scheme := ""
		if tt.outcome == "OK" {
			scheme = "ecdsa_sha256"
		}
		if got := testutil.ToFloat64(m.ops.WithLabelValues(OpSign, tt.key, scheme, tt.outcome, tt.group)); got != 1 {
			t.Errorf("operations_total{key=%q,outcome=%q,identity_group=%q} = %v, want 1", tt.key, tt.outcome, tt.group, got)
		}
	}
	if got := testutil.ToFloat64(m.ops.WithLabelValues(OpSign, link.FormatKeyID(id), "unknown", "InvalidArgument", "edges")); got != 2 {
		t.Errorf("operations_total{scheme=\"unknown\"} = %v, want 2", got)
	}
	if got := testutil.ToFloat64(m.keysLoaded); got != 1 {
		t.Errorf("keys = %v, want 1", got)
	}
	if n, err := testutil.GatherAndCount(reg, "keyless_keyserver_operations_total"); err != nil || n != 4 {
		t.Errorf("operations_total has %d series (%v), want 4", n, err)
	}
}
