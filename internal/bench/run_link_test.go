package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

const ms = time.Millisecond

func TestLinkShape(t *testing.T) {
	s := linkShape{rtts: []time.Duration{20 * ms, 0, 80 * ms}, far: []time.Duration{300 * ms, 80 * ms}, conc: []int{1, 1024, 32}}
	if s.near() != 0 || s.farthest() != 80*ms || s.top() != 1024 || s.base() != 32 {
		t.Errorf("near, farthest, top, base = %v, %v, %d, %d; want 0, 80ms, 1024, 32", s.near(), s.farthest(), s.top(), s.base())
	}
	if got, want := s.all(), []time.Duration{0, 20 * ms, 80 * ms, 300 * ms}; !slices.Equal(got, want) {
		t.Errorf("all() = %v, want %v", got, want)
	}
	if got, want := s.w3(), []time.Duration{80 * ms, 300 * ms}; !slices.Equal(got, want) {
		t.Errorf("w3() = %v, want %v", got, want)
	}
	if b := (linkShape{rtts: []time.Duration{0}, conc: []int{64}}).base(); b != 64 {
		t.Errorf("base() of one concurrency = %d, want it", b)
	}
	for d, want := range map[time.Duration]string{0: "rtt0", 80 * ms: "rtt80", 1500 * time.Microsecond: "rtt1.5"} {
		if got := rttName(d); got != want {
			t.Errorf("rttName(%v) = %q, want %q", d, got, want)
		}
	}
}

func TestParseRunFlagsLink(t *testing.T) {
	c, err := parseRunFlags(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(c.LinkRTTs, []time.Duration{0, 20 * ms, 80 * ms}) || !slices.Equal(c.LinkFarRTTs, []time.Duration{300 * ms}) ||
		!equalInts(c.LinkConcurrency, []int{1, 32, 1024}) || c.LinkWarmup != time.Second || c.LinkDuration != 3*time.Second {
		t.Errorf("link defaults = %v, %v, %v, %v, %v", c.LinkRTTs, c.LinkFarRTTs, c.LinkConcurrency, c.LinkWarmup, c.LinkDuration)
	}
	c, err = parseRunFlags([]string{"-link-rtts", "0, 40ms", "-link-far-rtts", "", "-link-concurrency", "1,256"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(c.LinkRTTs, []time.Duration{0, 40 * ms}) || len(c.LinkFarRTTs) != 0 || !equalInts(c.LinkConcurrency, []int{1, 256}) {
		t.Errorf("parsed link flags = %v, %v, %v", c.LinkRTTs, c.LinkFarRTTs, c.LinkConcurrency)
	}
	for _, bad := range [][]string{
		{"-link-rtts", ""}, {"-link-rtts", "80"}, {"-link-rtts", "-1ms"}, {"-link-far-rtts", "x"},
		{"-link-concurrency", "0"}, {"-link-duration", "0s"}, {"-link-warmup", "-1s"},
	} {
		if _, err := parseRunFlags(bad, io.Discard); err == nil {
			t.Errorf("parseRunFlags(%q) = nil error, want one", bad)
		}
	}
}

func TestLinkPlan(t *testing.T) {
	o := &orchestrator{cfg: &RunConfig{}}
	if p := o.linkPlan(); !slices.Equal(p.kinds, linkKinds) || !slices.Equal(p.ops, linkOps) {
		t.Errorf("linkPlan() with no selection = %q, %q; want every kind and operation", p.kinds, p.ops)
	}
	o.cfg.Scenarios = []string{"link/tls13-rsa", "link/keyops/ecdsa"}
	if p := o.linkPlan(); !slices.Equal(p.kinds, []string{HandshakeTLS13RSA}) || !slices.Equal(p.ops, []string{OpECDSASign}) {
		t.Errorf("linkPlan() = %q, %q", p.kinds, p.ops)
	}
	o.cfg.Scenarios = []string{"keyops"}
	if p := o.linkPlan(); !p.empty() {
		t.Errorf("linkPlan() with keyops selected = %q, %q; want empty", p.kinds, p.ops)
	}
}

// linkTestResults makes link results in which every target is met for
// TLS 1.3 ECDSA, and W1, W2 and W3 at 300 ms are missed for TLS 1.3 RSA.
func linkTestResults() *Results {
	r := newResults()
	r.link = &linkShape{rtts: []time.Duration{0, 80 * ms}, far: []time.Duration{300 * ms}, conc: []int{1, 32, 1024}}
	add := func(kind string, rtt time.Duration, n int, ops, p50 float64, errs int64) {
		r.add(runKey{"link", linkWhat(kind, rtt), "keyless", n}, Result{Concurrency: n, OpsPerSec: ops, Ops: int64(ops * 2),
			P50us: p50, P99us: 2 * p50, Errors: errs, LinkRTTms: float64(rtt) / float64(ms)})
	}
	add(HandshakeTLS13ECDSA, 0, 1, 900, 1000, 0)
	add(HandshakeTLS13ECDSA, 0, 32, 2000, 16000, 0)
	add(HandshakeTLS13ECDSA, 80*ms, 1, 12, 81500, 0)
	add(HandshakeTLS13ECDSA, 80*ms, 1024, 1900, 500000, 0)
	add(HandshakeTLS13ECDSA, 300*ms, 1024, 1800, 560000, 0)
	add(HandshakeTLS13RSA, 0, 1, 300, 3000, 0)
	add(HandshakeTLS13RSA, 0, 32, 400, 80000, 0)
	add(HandshakeTLS13RSA, 80*ms, 1, 12, 86000, 0)
	add(HandshakeTLS13RSA, 80*ms, 1024, 200, 2100000, 0)
	add(HandshakeTLS13RSA, 300*ms, 1024, 150, 2500000, 40)
	r.runs[runKey{"link", linkWhat(HandshakeTLS13ECDSA, 0), "keyless", 32}][0].CPU = map[string]float64{"edge": 500, "keyserver": 300, "other": 200}
	r.runs[runKey{"link", linkWhat(HandshakeTLS13ECDSA, 80*ms), "keyless", 1024}][0].CPU = map[string]float64{"edge": 600, "keyserver": 400, "other": 50}
	k := r.runs[runKey{"link", linkWhat(HandshakeTLS13RSA, 300*ms), "keyless", 1024}]
	k[0].EdgeShed, k[0].EdgeCallErrors, k[0].FirstError = 0, map[string]int64{"DeadlineExceeded": 40}, "remote error: tls: internal error"
	r.add(runKey{"linkops", linkWhat(OpECDSASign, 0), "keyless", 1}, Result{Concurrency: 1, OpsPerSec: 2000, P50us: 450, Ops: 4000, EmptyP50us: 300})
	r.add(runKey{"linkops", linkWhat(OpECDSASign, 80*ms), "keyless", 1}, Result{Concurrency: 1, OpsPerSec: 12, P50us: 80500, Ops: 24,
		LinkRTTms: 80, LinkMaxUp: 1500, LinkMaxDown: 1400, EmptyP50us: 80300,
		FramesPerOp: map[string]float64{"out DATA": 1, "in DATA": 1.02, "out WINDOW_UPDATE": 0, "in PING": 0}})
	return r
}

func TestLinkTargets(t *testing.T) {
	rows := linkTestResults().Rows()
	byName := map[string]Row{}
	for _, r := range rows {
		byName[r.Name] = r
		if r.Kind == "target" && !strings.HasPrefix(r.Name, "W") {
			t.Errorf("target row %s does not name a W target", r.Name)
		}
	}
	for _, tt := range []struct {
		name  string
		value float64
		met   bool
	}{
		{"W1/tls13-ecdsa", 0.95, true}, // 1900 ÷ 2000
		{"W1/tls13-rsa", 0.5, false},   // 200 ÷ 400
		{"W2/tls13-ecdsa", 0.5, true},  // 81.5 − (1 + 80)
		{"W2/tls13-rsa", 3, false},     // 86 − (3 + 80)
		{"W3/tls13-ecdsa/rtt80", 0, true},
		{"W3/tls13-ecdsa/rtt300", 0, true},
		{"W3/tls13-rsa/rtt80", 0, true},
		{"W3/tls13-rsa/rtt300", 40, false},
	} {
		r, ok := byName[tt.name]
		if !ok {
			t.Errorf("no row %s", tt.name)
			continue
		}
		if r.Kind != "target" || r.Value == nil || *r.Value != tt.value || r.Met == nil || *r.Met != tt.met {
			t.Errorf("%s = kind %q, value %v, met %v; want target, %v, %t", tt.name, r.Kind, r.Value, r.Met, tt.value, tt.met)
		}
	}
	for _, name := range []string{"W1/tls12-rsa-kex", "W2/tls12-rsa-kex", "W3/tls12-rsa-kex/rtt80"} {
		if _, ok := byName[name]; ok {
			t.Errorf("row %s present for a kind that did not run", name)
		}
	}
	if note := byName["W3/tls13-rsa/rtt300"].Note; !strings.Contains(note, "40 of 340 handshakes failed") || !strings.Contains(note, "DeadlineExceeded 40") {
		t.Errorf("W3 note = %q; want the failures and the keyserver call errors by code", note)
	}
	if note := byName["W2/tls13-ecdsa"].Note; !strings.Contains(note, "+ 80.00 ms, the round trip the relay added, from the empty call's p50 80.30 and 0.30 ms") {
		t.Errorf("W2 note = %q; want the empty call's round trip", note)
	}
	// Without the link key operations, one round trip is the RTT set.
	bare := linkTestResults()
	for k := range bare.runs {
		if k.group == "linkops" {
			delete(bare.runs, k)
		}
	}
	for _, row := range bare.Targets() {
		if row.Name == "W2/tls13-rsa" && (!strings.Contains(row.Note, "+ 80.00 ms, the RTT set") || *row.Value != 3) {
			t.Errorf("W2 without the link's empty call = %v, %q; want 3 against the RTT set", *row.Value, row.Note)
		}
	}
	if note := byName["W1/tls13-ecdsa"].Note; !strings.Contains(note, "CPU of edge, keyserver, load generator and relay 1000 and 800 µs per handshake, a CPU ratio of 0.80") {
		t.Errorf("W1 note = %q; want the CPU per handshake of both runs and their ratio", note)
	}
	if r := byName["link/tls13-rsa/rtt300/c1024"]; r.Kind != "link" || r.RTTms == nil || *r.RTTms != 300 || r.Errors != 40 {
		t.Errorf("link row = %+v", r)
	}
	if r := byName["link/tls13-ecdsa/rtt0/c1"]; r.RTTms == nil || *r.RTTms != 0 {
		t.Errorf("RTT 0 link row = %+v; want rtt_ms 0 present", r)
	}
	ops := byName["link/keyops/ecdsa-p256-sign/rtt80/c1"]
	if ops.Kind != "link-keyops" || ops.FramesPerOp["out DATA"] != 1 || !slices.Equal(ops.RelayMaxInflight, []int64{1500, 1400}) {
		t.Errorf("link key operation row = %+v", ops)
	}

	var b bytes.Buffer
	PrintTable(&b, rows)
	out := b.String()
	for _, want := range []string{"LINK: full handshakes", "LINK KEY OPERATIONS", "link/tls13-rsa/rtt300/c1024", "TARGET SUMMARY",
		"W1: 1 of 2 met; missed: tls13-rsa 0.5 (want >= 0.90)", "W3: 3 of 4 met; missed: tls13-rsa/rtt300 40 (want 0)",
		"1.00 0.00 0.00 0.00", "1.5 1.4"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	if strings.Index(out, "TARGET SUMMARY") < strings.Index(out, "TARGETS") {
		t.Errorf("the summary is not after the targets:\n%s", out)
	}
	data, err := json.Marshal(rows)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(data), `"rtt_ms":0}`) || !strings.Contains(string(data), `"frames_per_op":{`) {
		t.Errorf("JSON lacks rtt_ms 0 or frames_per_op: %s", data)
	}
}

func TestParseEdge(t *testing.T) {
	text := `# TYPE keyless_edge_handshakes_shed_total counter
keyless_edge_handshakes_shed_total{reason="client_rate"} 0
keyless_edge_handshakes_shed_total{reason="key_operations"} 5
# TYPE keyless_edge_keyserver_call_errors_total counter
keyless_edge_keyserver_call_errors_total{code="DeadlineExceeded",keyserver="a",method="sign"} 3
keyless_edge_keyserver_call_errors_total{code="DeadlineExceeded",keyserver="a",method="decrypt"} 1
keyless_edge_keyserver_call_errors_total{code="Unavailable",keyserver="a",method="sign"} 2
# TYPE keyless_edge_keyserver_call_duration_seconds histogram
keyless_edge_keyserver_call_duration_seconds_bucket{keyserver="a",method="Sign",le="+Inf"} 10
keyless_edge_keyserver_call_duration_seconds_sum{keyserver="a",method="Sign"} 1.5
keyless_edge_keyserver_call_duration_seconds_count{keyserver="a",method="Sign"} 10
keyless_edge_keyserver_call_duration_seconds_bucket{keyserver="a",method="Decrypt",le="+Inf"} 10
keyless_edge_keyserver_call_duration_seconds_sum{keyserver="a",method="Decrypt"} 0.5
keyless_edge_keyserver_call_duration_seconds_count{keyserver="a",method="Decrypt"} 10
keyless_edge_keyserver_call_duration_seconds_bucket{keyserver="a",method="ListKeys",le="+Inf"} 1
keyless_edge_keyserver_call_duration_seconds_sum{keyserver="a",method="ListKeys"} 30
keyless_edge_keyserver_call_duration_seconds_count{keyserver="a",method="ListKeys"} 1
# TYPE keyless_edge_key_operations_in_flight gauge
keyless_edge_key_operations_in_flight 7
`
	after, err := parseEdge(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	if after.inFlight != 7 {
		t.Errorf("in flight = %v, want 7", after.inFlight)
	}
	before := edgeCounters{shed: map[string]float64{"key_operations": 2}, callErrors: map[string]float64{"Unavailable": 2},
		callSum: 0.2, callCount: 4}
	var r Result
	r.edgeDelta(before, after)
	if r.EdgeShed != 3 || len(r.EdgeCallErrors) != 1 || r.EdgeCallErrors["DeadlineExceeded"] != 4 {
		t.Errorf("edgeDelta = shed %d, call errors %v; want 3, DeadlineExceeded 4", r.EdgeShed, r.EdgeCallErrors)
	}
	if r.EdgeCallMeanMs != 112.5 { // (2 − 0.2) s ÷ 16 calls; ListKeys left out
		t.Errorf("EdgeCallMeanMs = %v, want 112.5", r.EdgeCallMeanMs)
	}
	if _, err := parseEdge(strings.NewReader("# TYPE other counter\nother 1\n")); err == nil {
		t.Error("parseEdge without the shed counter = nil error, want one")
	}
}

func TestParseKeyserverTime(t *testing.T) {
	text := `# TYPE keyless_keyserver_operation_duration_seconds histogram
keyless_keyserver_operation_duration_seconds_bucket{op="sign",outcome="OK",le="+Inf"} 100
keyless_keyserver_operation_duration_seconds_sum{op="sign",outcome="OK"} 3
keyless_keyserver_operation_duration_seconds_count{op="sign",outcome="OK"} 100
keyless_keyserver_operation_duration_seconds_bucket{op="list_keys",outcome="OK",le="+Inf"} 1
keyless_keyserver_operation_duration_seconds_sum{op="list_keys",outcome="OK"} 30
keyless_keyserver_operation_duration_seconds_count{op="list_keys",outcome="OK"} 1
# TYPE keyless_keyserver_hsm_queue_depth gauge
keyless_keyserver_hsm_queue_depth 42
`
	after, err := parseKeyserverTime(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	if after.queue != 42 || after.opCount != 100 {
		t.Errorf("parseKeyserverTime = %+v", after)
	}
	var r Result
	r.keyserverDelta(keyserverTime{opSum: 1, opCount: 50}, after)
	if r.KeyserverOpMeanMs != 40 {
		t.Errorf("KeyserverOpMeanMs = %v, want 40 ((3 − 1) s ÷ 50; list_keys left out)", r.KeyserverOpMeanMs)
	}
	if _, err := parseKeyserverTime(strings.NewReader("# TYPE other counter\nother 1\n")); err == nil {
		t.Error("parseKeyserverTime without the duration histogram = nil error, want one")
	}
	if m, x := meanMax([]float64{1, 2, 6}); m != 3 || x != 6 {
		t.Errorf("meanMax = %v, %v; want 3, 6", m, x)
	}
}

// TestMeasureLink checks the order of the link runs: kind by kind, each at
// every RTT (every concurrency at the full RTTs, the highest at the far
// ones), the relay set before each RTT's runs; then each key operation at
// every concurrency at the nearest and farthest full RTTs; and
// the relay back at -link-rtt at the end.
func TestMeasureLink(t *testing.T) {
	relay := newTestRelay(t, RelayConfig{Target: "127.0.0.1:9", RTT: 5 * ms})
	o := &orchestrator{cfg: &RunConfig{Repeat: 1, LinkRTT: 5 * ms}, stderr: io.Discard, results: newResults()}
	o.srv.relay = relay
	var got []string
	run := func(what string) linkRun {
		return func(_ context.Context, item string, n int, rtt time.Duration) error {
			if relay.RTT() != rtt {
				t.Errorf("%s %s c%d at %v: the relay's RTT is %v", what, item, n, rtt, relay.RTT())
			}
			got = append(got, fmt.Sprintf("%s/%s/%s/c%d", what, item, rttName(rtt), n))
			return nil
		}
	}
	p := linkPlan{kinds: []string{"a", "b"}, ops: []string{"x"},
		shape: linkShape{rtts: []time.Duration{0, 80 * ms}, far: []time.Duration{300 * ms}, conc: []int{1, 32}}}
	if errs := o.measureLink(t.Context(), p, run("hs"), run("ops")); len(errs) != 0 {
		t.Fatalf("measureLink() = %v", errs)
	}
	var want []string
	for _, k := range []string{"a", "b"} {
		want = append(want, "hs/"+k+"/rtt0/c1", "hs/"+k+"/rtt0/c32", "hs/"+k+"/rtt80/c1", "hs/"+k+"/rtt80/c32", "hs/"+k+"/rtt300/c32")
	}
	want = append(want, "ops/x/rtt0/c1", "ops/x/rtt0/c32", "ops/x/rtt80/c1", "ops/x/rtt80/c32")
	if !slices.Equal(got, want) {
		t.Errorf("runs:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if relay.RTT() != 5*ms {
		t.Errorf("relay RTT after the link scenarios = %v, want -link-rtt's 5ms", relay.RTT())
	}
}

// TestWaitDrained: the wait ends once the keyserver's queue and running
// operations are 0 and its operation count stays put, and counts the
// operations it answered meanwhile.
func TestWaitDrained(t *testing.T) {
	var polls atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		n := polls.Add(1)
		ops, queue := min(n, 4)*10, max(3-n, 0) // busy for three readings, then idle
		fmt.Fprintf(w, "# TYPE keyless_keyserver_operation_duration_seconds histogram\n"+
			"keyless_keyserver_operation_duration_seconds_bucket{op=\"sign\",outcome=\"OK\",le=\"+Inf\"} %d\n"+
			"keyless_keyserver_operation_duration_seconds_sum{op=\"sign\",outcome=\"OK\"} 1\n"+
			"keyless_keyserver_operation_duration_seconds_count{op=\"sign\",outcome=\"OK\"} %d\n"+
			"# TYPE keyless_keyserver_hsm_queue_depth gauge\nkeyless_keyserver_hsm_queue_depth %d\n"+
			"# TYPE keyless_keyserver_hsm_operations_running gauge\nkeyless_keyserver_hsm_operations_running 0\n", ops, ops, queue)
	}))
	defer srv.Close()
	d, n, err := waitDrained(t.Context(), strings.TrimPrefix(srv.URL, "http://"), keyserverTime{opCount: 5})
	if err != nil {
		t.Fatal(err)
	}
	if n != 35 || d <= 0 || polls.Load() < 7 {
		t.Errorf("waitDrained = %v, %v operations after %d readings; want 35 operations (40 − 5), seven readings or more", d, n, polls.Load())
	}
}
