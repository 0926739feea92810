package signer

import (
	"bytes"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

func mustTicketKeys(t *testing.T, secret byte, period, accept time.Duration) *TicketKeys {
	t.Helper()
	tk, err := NewTicketKeys(TicketConfig{Secret: bytes.Repeat([]byte{secret}, 32), Period: period, Accept: accept})
	if err != nil {
		t.Fatalf("NewTicketKeys() = %v", err)
	}
	return tk
}

func mustKeys(t *testing.T, tk *TicketKeys, group string, now time.Time) *keylessv1.GetTicketKeysResponse {
	t.Helper()
	resp, err := tk.Keys(group, now)
	if err != nil {
		t.Fatalf("Keys(%q) = %v", group, err)
	}
	return resp
}

func TestTicketKeysDerivation(t *testing.T) {
	now := time.Date(2026, 12, 7, 10, 30, 0, 0, time.UTC)
	a := mustTicketKeys(t, 1, time.Hour, 2*time.Hour)
	b := mustTicketKeys(t, 1, time.Hour, 2*time.Hour) // a second keyserver, or after a restart
	ka, kb := mustKeys(t, a, "eu-edges", now), mustKeys(t, b, "eu-edges", now)
	if len(ka.Keys) != len(kb.Keys) {
		t.Fatalf("two keyservers: %d and %d keys", len(ka.Keys), len(kb.Keys))
	}
	for i := range ka.Keys {
		if !bytes.Equal(ka.Keys[i].Key, kb.Keys[i].Key) || len(ka.Keys[i].Key) != 32 {
			t.Errorf("key %d differs between two keyservers with the same secret, or is not 32 bytes", i)
		}
	}
	seen := map[string]string{}
	add := func(what string, k []byte) {
		t.Helper()
		if prev, dup := seen[string(k)]; dup {
			t.Errorf("%s has the same key as %s", what, prev)
		}
		seen[string(k)] = what
	}
	for i, k := range ka.Keys {
		add("eu-edges key "+string(rune('0'+i)), k.Key)
	}
	for i, k := range mustKeys(t, a, "us-edges", now).Keys {
		add("us-edges key "+string(rune('0'+i)), k.Key)
	}
	for i, k := range mustKeys(t, mustTicketKeys(t, 2, time.Hour, 2*time.Hour), "eu-edges", now).Keys {
		add("another secret's key "+string(rune('0'+i)), k.Key)
	}
	for i, k := range mustKeys(t, mustTicketKeys(t, 1, 2*time.Hour, 2*time.Hour), "eu-edges", now).Keys {
		add("another period's key "+string(rune('0'+i)), k.Key)
	}
	// The next period's key now is the current key one period later.
	later := mustKeys(t, a, "eu-edges", now.Add(time.Hour))
	if !bytes.Equal(later.Keys[1].Key, ka.Keys[0].Key) || !bytes.Equal(later.Keys[2].Key, ka.Keys[1].Key) {
		t.Error("keys do not shift by one place per period")
	}
}

func TestTicketKeysWindow(t *testing.T) {
	now := time.Date(2026, 12, 7, 10, 30, 0, 0, time.UTC)
	tk := mustTicketKeys(t, 1, time.Hour, 2*time.Hour)
	resp := mustKeys(t, tk, "g", now)
	hour := func(h int) int64 { return time.Date(2026, 12, 7, h, 0, 0, 0, time.UTC).UnixMilli() }
	// Next (11:00), current (10:00), then 09:00 (accepted until 12:00) and
	// 08:00 (until 11:00); 07:00 stopped being accepted at 10:00.
	want := []struct{ from, until, accept int64 }{
		{hour(11), hour(12), hour(14)},
		{hour(10), hour(11), hour(13)},
		{hour(9), hour(10), hour(12)},
		{hour(8), hour(9), hour(11)},
	}
	if len(resp.Keys) != len(want) {
		t.Fatalf("got %d keys, want %d", len(resp.Keys), len(want))
	}
	for i, w := range want {
		k := resp.Keys[i]
		if k.NotBeforeUnixMs != w.from || k.SealUntilUnixMs != w.until || k.AcceptUntilUnixMs != w.accept {
			t.Errorf("key %d: [%d, %d) accepted until %d, want [%d, %d) until %d", i, k.NotBeforeUnixMs, k.SealUntilUnixMs, k.AcceptUntilUnixMs, w.from, w.until, w.accept)
		}
	}
	if resp.RefreshUnixMs != hour(11) || resp.Group != "g" {
		t.Errorf("refresh %d group %q, want %d and g", resp.RefreshUnixMs, resp.Group, hour(11))
	}
}

func TestNewTicketKeysErrors(t *testing.T) {
	secret := bytes.Repeat([]byte{7}, 32)
	for _, tt := range []struct {
		cfg   TicketConfig
		field string
	}{
		{TicketConfig{Secret: secret[:31]}, "TicketConfig.Secret"},
		{TicketConfig{Secret: secret, Period: 500 * time.Millisecond}, "TicketConfig.Period"},
		{TicketConfig{Secret: secret, Accept: -time.Second}, "TicketConfig.Accept"},
		{TicketConfig{Secret: secret, Period: time.Second, Accept: time.Hour}, "TicketConfig.Accept"},
	} {
		_, err := NewTicketKeys(tt.cfg)
		var cerr *ConfigError
		if !errors.As(err, &cerr) || cerr.Field != tt.field {
			t.Errorf("NewTicketKeys(%v, %v) = %v, want a ConfigError for %s", tt.cfg.Period, tt.cfg.Accept, err, tt.field)
		}
		if err != nil && strings.Contains(err.Error(), string(secret[:4])) {
			t.Errorf("error %q quotes the secret", err)
		}
	}
	tk, err := NewTicketKeys(TicketConfig{Secret: secret})
	if err != nil || tk.Period() != DefaultTicketPeriod || tk.Accept() != DefaultTicketAccept {
		t.Errorf("NewTicketKeys(defaults) = %v, period %v, accept %v", err, tk.Period(), tk.Accept())
	}
}

const ticketPolicyYAML = `
groups:
  eu: [spiffe://test.example/edge/1, spiffe://test.example/edge/2]
rules:
  - name: keys
    identities: [group:eu, spiffe://test.example/edge/3]
    keys: ["*"]
    operations: [sign]
    schemes: [default]
  - name: eu-tickets
    identities: [group:eu]
    operations: [tickets]
`

func TestGetTicketKeys(t *testing.T) {
	tk := mustTicketKeys(t, 9, time.Hour, time.Hour)
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t), Policy: mustPolicy(t, ticketPolicyYAML), Tickets: tk})
	ctx := testContext(t, 0)

	one, err := ts.client.GetTicketKeys(ctx, &keylessv1.GetTicketKeysRequest{})
	if err != nil {
		t.Fatalf("GetTicketKeys(edge/1) = %v", err)
	}
	two, err := ts.dial(t, "spiffe://test.example/edge/2").GetTicketKeys(ctx, &keylessv1.GetTicketKeysRequest{})
	if err != nil {
		t.Fatalf("GetTicketKeys(edge/2) = %v", err)
	}
	if one.Group != "eu-tickets" || len(one.Keys) < 2 || !bytes.Equal(one.Keys[1].Key, two.Keys[1].Key) {
		t.Errorf("edges of one group: group %q, %d keys, same current key: %v", one.Group, len(one.Keys), len(two.Keys) > 1 && bytes.Equal(one.Keys[1].Key, two.Keys[1].Key))
	}

	// Identity 3 may sign but no rule gives it tickets: default deny.
	_, err = ts.dial(t, "spiffe://test.example/edge/3").GetTicketKeys(ctx, &keylessv1.GetTicketKeysRequest{})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "tickets operation") {
		t.Errorf("GetTicketKeys(edge/3) = %v, want PermissionDenied naming the tickets operation", err)
	}

	audit := ts.audit.String()
	for _, k := range append(one.Keys, two.Keys...) {
		if strings.Contains(audit, hex.EncodeToString(k.Key)) || strings.Contains(audit, string(k.Key)) {
			t.Fatal("the audit trail contains a ticket key")
		}
	}
	if strings.Count(audit, `"op":"tickets"`) != 3 || !strings.Contains(audit, `"rule":"eu-tickets"`) || !strings.Contains(audit, `"outcome":"PermissionDenied"`) {
		t.Errorf("audit trail lacks the three tickets records:\n%s", audit)
	}
	if strings.Contains(ts.logs.String(), hex.EncodeToString(one.Keys[0].Key)) {
		t.Error("the log contains a ticket key")
	}
}

func TestGetTicketKeysWithoutSecret(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t), Policy: mustPolicy(t, ticketPolicyYAML)})
	_, err := ts.client.GetTicketKeys(testContext(t, 0), &keylessv1.GetTicketKeysRequest{})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "-ticket-secret-file") {
		t.Errorf("GetTicketKeys() = %v, want Unavailable naming -ticket-secret-file", err)
	}
}

func TestParsePolicyTickets(t *testing.T) {
	p := mustPolicy(t, ticketPolicyYAML)
	if g := p.TicketGroups(); len(g) != 1 || g[0] != "eu-tickets" {
		t.Errorf("TicketGroups() = %q, want [eu-tickets]", g)
	}
	if g, err := p.authorizeTickets("spiffe://test.example/edge/2"); err != nil || g != "eu-tickets" {
		t.Errorf("authorizeTickets(edge/2) = %q, %v", g, err)
	}
	for _, tt := range []struct{ doc, want string }{
		{"rules:\n  - name: t\n    identities: [a.example]\n    keys: [\"*\"]\n    operations: [tickets]\n", "the rule allows only tickets, which uses no key"},
		{"rules:\n  - name: t\n    identities: [a.example]\n    operations: [tickets, sign]\n    schemes: [default]\n", "keys: is empty or missing"},
		{"rules:\n  - name: t\n    identities: [a.example]\n    operations: [ticket]\n", `"ticket" is not an operation; want sign, decrypt or tickets`},
		{"rules:\n  - name: t\n    identities: [a.example]\n    operations: [tickets]\n    schemes: [default]\n", "schemes would mean nothing"},
	} {
		_, err := ParsePolicy("t.yaml", []byte(tt.doc))
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ParsePolicy(%q) = %v, want an error containing %q", tt.doc, err, tt.want)
		}
	}
}

func TestMetricsTickets(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg, nil)
	if err := m.Audit(&AuditRecord{Identity: "spiffe://x/edge/1", Op: OpTickets, Outcome: "OK", Rule: "fleet"}); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(m.ops.WithLabelValues(OpTickets, "", "", "OK", "none")); got != 1 {
		t.Errorf(`operations_total{op="tickets",key=""} = %v, want 1`, got)
	}
}
