package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestPercentile(t *testing.T) {
	ms := func(n ...int) []time.Duration {
		out := make([]time.Duration, len(n))
		for i, v := range n {
			out[i] = time.Duration(v) * time.Millisecond
		}
		return out
	}
	hundred := make([]time.Duration, 100)
	for i := range hundred {
		hundred[i] = time.Duration(i+1) * time.Millisecond
	}
	tests := []struct {
		name   string
		sorted []time.Duration
		p      float64
		want   time.Duration
	}{
		{"empty", nil, 50, 0},
		{"one", ms(7), 50, 7 * time.Millisecond},
		{"one p99", ms(7), 99, 7 * time.Millisecond},
		{"median of odd", ms(1, 2, 3, 4, 5), 50, 3 * time.Millisecond},
		{"median of even", ms(1, 2, 3, 4), 50, 2 * time.Millisecond},
		{"p99 of 100", hundred, 99, 99 * time.Millisecond},
		{"p50 of 100", hundred, 50, 50 * time.Millisecond},
		{"p100", hundred, 100, 100 * time.Millisecond},
		{"p99 of 10 is the max", ms(1, 2, 3, 4, 5, 6, 7, 8, 9, 10), 99, 10 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Percentile(tt.sorted, tt.p); got != tt.want {
				t.Errorf("Percentile(%v, %v) = %v, want %v", tt.sorted, tt.p, got, tt.want)
			}
		})
	}
}

func TestLoadRun(t *testing.T) {
	var calls atomic.Int64
	l := &Load{Name: "sleep", Concurrency: 2, Warmup: 20 * time.Millisecond, Duration: 200 * time.Millisecond,
		Op: func(ctx context.Context, w int) error {
			calls.Add(1)
			time.Sleep(2 * time.Millisecond)
			return nil
		}}
	r, err := l.Run(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	// Two workers of ~2 ms operations for 200 ms: at most 200 operations.
	if r.Ops < 20 || r.Ops > 200 || r.Errors != 0 {
		t.Errorf("Run() = %d ops, %d errors; want 20 to 200 ops and no error", r.Ops, r.Errors)
	}
	if r.Ops >= calls.Load() {
		t.Errorf("Run() counted %d ops of %d calls; the warm-up must not be counted", r.Ops, calls.Load())
	}
	if r.P50us < 2000 || r.P99us < r.P50us {
		t.Errorf("Run() p50 %v µs, p99 %v µs; want p50 >= 2000 µs and p99 >= p50", r.P50us, r.P99us)
	}
	if want := float64(r.Ops) / 0.2; r.OpsPerSec < want*0.99 || r.OpsPerSec > want*1.01 {
		t.Errorf("Run() OpsPerSec = %v, want %v", r.OpsPerSec, want)
	}
	if r.Seconds != 0.2 || r.Concurrency != 2 || r.Name != "sleep" {
		t.Errorf("Run() = %+v; want name, concurrency and window of the load", r)
	}
}

// TestLoadRunPause: with a pause, each worker idles before each operation,
// and the pause is not part of the operation's latency.
func TestLoadRunPause(t *testing.T) {
	l := &Load{Name: "pause", Concurrency: 1, Duration: 200 * time.Millisecond, Pause: 20 * time.Millisecond,
		Op: func(ctx context.Context, w int) error { return nil }}
	r, err := l.Run(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	// One worker, 20 ms idle before each instant operation, for 200 ms.
	if r.Ops < 1 || r.Ops > 10 {
		t.Errorf("Run() = %d ops; want 1 to 10", r.Ops)
	}
	if r.P99us >= 20000 {
		t.Errorf("Run() p99 %v µs; the 20 ms pause must not count in the latency", r.P99us)
	}
}

func TestLoadRunErrors(t *testing.T) {
	l := &Load{Name: "fail", Concurrency: 4, Duration: 5 * time.Second,
		Op: func(ctx context.Context, w int) error { return errors.New("boom") }}
	start := time.Now()
	r, err := l.Run(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if time.Since(start) > 3*time.Second {
		t.Errorf("a load that only fails ran for %v; it must stop early", time.Since(start))
	}
	if r.Ops != 0 || r.Errors == 0 || r.FirstError != "boom" {
		t.Errorf("Run() = %d ops, %d errors, first %q; want 0 ops, errors, first \"boom\"", r.Ops, r.Errors, r.FirstError)
	}
}

func TestLoadValidate(t *testing.T) {
	op := func(context.Context, int) error { return nil }
	for _, l := range []Load{
		{Concurrency: 0, Duration: time.Second, Op: op},
		{Concurrency: 1, Duration: 0, Op: op},
		{Concurrency: 1, Duration: time.Second, Warmup: -1, Op: op},
		{Concurrency: 1, Duration: time.Second, Pause: -1, Op: op},
		{Concurrency: 1, Duration: time.Second},
	} {
		if err := l.Validate(); err == nil {
			t.Errorf("Validate(%+v) = nil, want an error", l)
		}
	}
}

func TestParseRunFlags(t *testing.T) {
	t.Setenv("BENCH_OUT", "")
	c, err := parseRunFlags(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.Out != "bench-results.json" || c.Duration != 1500*time.Millisecond || c.MemConns != 5000 || len(c.Scenarios) != 0 {
		t.Errorf("defaults = %+v", c)
	}
	if !equalInts(c.KeyopsConcurrency, []int{1, 4, 64}) || !equalInts(c.HandshakeConcurrency, []int{1, 32}) {
		t.Errorf("default concurrencies = %v, %v", c.KeyopsConcurrency, c.HandshakeConcurrency)
	}

	t.Setenv("BENCH_OUT", "/tmp/x.json")
	c, err = parseRunFlags([]string{"-duration", "200ms", "-concurrency", "1", "-scenarios", "keyops/ecdsa, resume",
		"-keyserver-flags", "-max-concurrent 2", "-link-rtt", "80ms", "-link-window", "65536"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.Out != "/tmp/x.json" || c.Duration != 200*time.Millisecond || !equalInts(c.KeyopsConcurrency, []int{1}) ||
		!equalInts(c.HandshakeConcurrency, []int{1}) {
		t.Errorf("parsed = %+v", c)
	}
	if c.LinkRTT != 80*time.Millisecond || c.LinkWindow != 65536 {
		t.Errorf("LinkRTT, LinkWindow = %v, %d; want 80ms, 65536", c.LinkRTT, c.LinkWindow)
	}
	if strings.Join(c.KeyserverFlags, " ") != "-max-concurrent 2" {
		t.Errorf("KeyserverFlags = %q", c.KeyserverFlags)
	}
	for item, want := range map[string]bool{
		"keyops/ecdsa-p256-sign": true, "keyops/rsa2048-decrypt": false, "resume/tls13": true, "handshake/tls13-ecdsa": false,
	} {
		if got := c.selected(item); got != want {
			t.Errorf("selected(%q) = %t, want %t", item, got, want)
		}
	}

	for _, bad := range [][]string{
		{"-duration", "0s"}, {"-concurrency", "0"}, {"-repeat", "0"}, {"-keyops-concurrency", "a"}, {"-mem-conns", "0"}, {"extra"},
		{"-link-rtt", "-1ms"}, {"-link-window", "1000"},
	} {
		if _, err := parseRunFlags(bad, io.Discard); err == nil {
			t.Errorf("parseRunFlags(%q) = nil error, want one", bad)
		}
	}
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// testResults makes results in which the targets for ECDSA are missed and
// those for RSA signing are met.
func testResults() *Results {
	r := newResults()
	res := func(n int, ops, p50 float64, cpu map[string]float64) Result {
		return Result{Concurrency: n, OpsPerSec: ops, P50us: p50, P99us: 2 * p50, Ops: int64(ops), CPU: cpu}
	}
	r.add(keyopsKey("inproc", OpECDSASign, 1), res(1, 4000, 250, map[string]float64{"inproc": 250, "other": 5}))
	r.add(keyopsKey("inproc", OpECDSASign, 2), res(2, 8000, 250, nil))
	r.add(keyopsKey("inproc", OpECDSASign, 8), res(8, 5000, 1600, nil))
	r.add(keyopsKey("keyless", OpECDSASign, 1), Result{Concurrency: 1, OpsPerSec: 2000, P50us: 500, EmptyP50us: 100,
		CPU: map[string]float64{"client": 100, "keyserver": 400, "other": 9}})
	k8 := res(8, 6000, 1300, nil)
	k8.OpsPerRequest, k8.ResultsPerResponse = 2.7, 1.6
	r.add(keyopsKey("keyless", OpECDSASign, 8), k8)
	r.add(keyopsKey("inproc-paused", OpECDSASign, 1), res(1, 2500, 320, nil))
	r.add(keyopsKey("inproc", OpRSASign, 1), res(1, 900, 1100, nil))
	r.add(keyopsKey("inproc", OpRSASign, 8), res(8, 1000, 8000, nil))
	r.add(keyopsKey("keyless", OpRSASign, 1), Result{Concurrency: 1, OpsPerSec: 800, P50us: 1250, EmptyP50us: 100})
	r.add(keyopsKey("keyless", OpRSASign, 8), res(8, 990, 8000, nil))
	r.add(handshakeKey("handshake", HandshakeTLS13ECDSA, "hsm", 32), res(32, 3000, 10000, nil))
	r.add(handshakeKey("handshake", HandshakeTLS13ECDSA, "soft", 32), res(32, 6000, 5000, nil))
	r.add(handshakeKey("handshake", HandshakeTLS13ECDSA, "keyless", 32), res(32, 2850, 11000, nil))
	r.add(handshakeKey("resume", ResumeTLS13, "soft", 8), res(8, 9000, 800, nil))
	r.add(handshakeKey("resume", ResumeTLS13, "keyless", 8), res(8, 8000, 900, nil))
	r.addMem("http1", MemSnapshot{Conns: 0, HeapInuse: 1 << 20}, MemSnapshot{Conns: 1000, HeapInuse: 1<<20 + 1000*40*1024})
	return r
}

func TestRowsAndTargets(t *testing.T) {
	rows := testResults().Rows()
	byName := map[string]Row{}
	for _, r := range rows {
		byName[r.Name] = r
	}
	c1 := byName["keyops/ecdsa-p256-sign/c1"]
	if c1.Baseline == nil || *c1.Baseline != 4000 || c1.Ratio == nil || *c1.Ratio != 0.5 || c1.EmptyCallP50us != 100 {
		t.Errorf("c1 row = %+v", c1)
	}
	if c1.CPURatio == nil || *c1.CPURatio != 0.5 {
		t.Errorf("c1 CPU ratio = %v, want 0.5 (250 / (100+400))", c1.CPURatio)
	}
	best := byName["keyops/ecdsa-p256-sign/best"]
	if best.OpsPerSec != 6000 || *best.Baseline != 8000 || *best.Ratio != 0.75 {
		t.Errorf("best row = %+v; want 6000 ÷ 8000", best)
	}
	if r := byName["handshake/tls13-ecdsa/c32"]; *r.Ratio != 0.95 || *r.SoftKey != 6000 || *r.SoftKeyRatio != 0.475 {
		t.Errorf("handshake row = %+v", r)
	}
	if r := byName["resume/tls13/c8"]; *r.Baseline != 9000 || r.BaselineName != baselineSoft || r.SoftKey != nil {
		t.Errorf("resume row = %+v", r)
	}
	if r := byName["edgemem/http1"]; r.Value == nil || *r.Value != 40 {
		t.Errorf("memory row = %+v, want 40 KiB", r)
	}

	// The earlier round's targets are reported figures: a value and what
	// that round wanted, never judged.
	for _, tt := range []struct {
		name    string
		present bool
		value   float64
	}{
		{"reported/keyops-best-ratio/ecdsa-p256-sign", true, 0.75},
		{"reported/keyops-c8-vs-best/ecdsa-p256-sign", true, 1}, // c8 is the best
		{"reported/latency-c1/ecdsa-p256-sign", true, 150},      // 500-250-100
		{"reported/keyops-best-ratio/rsa2048-pss-sign", true, 0.99},
		{"reported/keyops-c8-vs-best/rsa2048-pss-sign", true, 1},
		{"reported/latency-c1/rsa2048-pss-sign", true, 50}, // 1250-1100-100
		{"reported/handshake-c32-ratio/tls13-ecdsa", true, 0.95},
		{"reported/edgemem/http1", false, 0}, // the memory row has it
		{"reported/keyops-best-ratio/rsa2048-decrypt", false, 0},
		{"reported/handshake-c32-ratio/tls13-rsa", false, 0},
	} {
		r, ok := byName[tt.name]
		if ok != tt.present {
			t.Errorf("%s present = %t, want %t", tt.name, ok, tt.present)
			continue
		}
		if ok && (r.Kind != "reported" || r.Met != nil || r.Value == nil || *r.Value != tt.value || r.Want == "") {
			t.Errorf("%s = kind %q, met %v, value %v, want %q; want kind reported, no met, value %v and the old want",
				tt.name, r.Kind, r.Met, r.Value, r.Want, tt.value)
		}
	}
	for _, r := range rows {
		if r.Kind == "target" {
			t.Errorf("row %s is a target; without link runs there is none", r.Name)
		}
	}
	// The paused baseline is a diagnostic: in the c1 row and the target's
	// note, never in the target's value or the baseline's best.
	if got := byName["keyops/ecdsa-p256-sign/c1"].PausedBaselineP50us; got != 320 {
		t.Errorf("ECDSA c1 paused baseline p50 = %v, want 320", got)
	}
	if note := byName["reported/latency-c1/ecdsa-p256-sign"].Note; !strings.Contains(note, "after an idle gap as long as the empty call 320 µs, keyless over it 80 µs") {
		t.Errorf("ECDSA latency target note = %q; want the paused baseline", note)
	}
	if b := byName["keyops/ecdsa-p256-sign/best"]; b.BaselineName != "inproc-softhsm c2" {
		t.Errorf("ECDSA best baseline = %q, want the in-process c2 run", b.BaselineName)
	}
}

// TestRatioRange checks that repeated figures report the spread of one
// repetition's ratio, pairing each keyless run with the baseline run of
// the same repetition, and that a run missing from one side (a failed
// run) pairs nothing.
func TestRatioRange(t *testing.T) {
	r := newResults()
	add := func(side string, n, rep int, ops float64) {
		r.add(keyopsKey(side, OpRSASign, n), Result{Concurrency: n, OpsPerSec: ops, rep: rep})
	}
	// c8: the inproc run of repetition 1 failed; pairs 0 (0.8) and 2 (1.1).
	add("inproc", 8, 0, 1000)
	add("keyless", 8, 0, 800)
	add("keyless", 8, 1, 700) // paired by position, it would give 700 ÷ 900
	add("inproc", 8, 2, 900)
	add("keyless", 8, 2, 990)
	// c64: one repetition only, no range.
	add("inproc", 64, 0, 850)
	add("keyless", 64, 0, 700)
	for _, rep := range []int{0, 1} {
		r.add(handshakeKey("handshake", HandshakeTLS13RSA, "hsm", 32), Result{Concurrency: 32, OpsPerSec: 600, rep: rep})
		r.add(handshakeKey("handshake", HandshakeTLS13RSA, "keyless", 32), Result{Concurrency: 32, OpsPerSec: 540 + 60*float64(rep), rep: rep})
	}
	byName := map[string]Row{}
	for _, row := range r.Rows() {
		byName[row.Name] = row
	}
	for name, want := range map[string][]float64{
		"keyops/rsa2048-pss-sign/c8":   {0.8, 1.1},
		"keyops/rsa2048-pss-sign/c64":  nil,
		"keyops/rsa2048-pss-sign/best": {0.8, 1.1}, // both sides' best at c8
		"handshake/tls13-rsa/c32":      {0.9, 1},
	} {
		if got := byName[name].RatioRange; !slices.Equal(got, want) {
			t.Errorf("%s: RatioRange = %v, want %v", name, got, want)
		}
	}
	for _, name := range []string{"reported/keyops-best-ratio/rsa2048-pss-sign", "reported/handshake-c32-ratio/tls13-rsa"} {
		if note := byName[name].Note; !strings.Contains(note, "one repetition's ratio") {
			t.Errorf("%s note = %q; want the range of one repetition's ratio", name, note)
		}
	}
	var table strings.Builder
	PrintTable(&table, r.Rows())
	if !strings.Contains(table.String(), "(0.80–1.10)") {
		t.Errorf("table lacks the c8 ratio range:\n%s", table.String())
	}
}

func TestJSONAndTable(t *testing.T) {
	rows := testResults().Rows()
	path := t.TempDir() + "/out.json"
	if err := WriteJSONFile(path, rows); err != nil {
		t.Fatal(err)
	}
	var got []map[string]any
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	if len(got) != len(rows) {
		t.Fatalf("JSON has %d objects, want %d", len(got), len(rows))
	}
	for _, o := range got {
		for _, f := range []string{"name", "ops_per_sec", "p50_us", "p99_us", "baseline", "ratio"} {
			if _, ok := o[f]; !ok {
				t.Errorf("JSON object %v has no %q", o["name"], f)
			}
		}
		if o["name"] == "keyops/ecdsa-p256-sign/c8" && (o["ops_per_request_msg"] != 2.7 || o["results_per_response_msg"] != 1.6) {
			t.Errorf("JSON object %v: ops_per_request_msg %v, results_per_response_msg %v; want 2.7, 1.6", o["name"], o["ops_per_request_msg"], o["results_per_response_msg"])
		}
	}

	var b bytes.Buffer
	PrintTable(&b, rows)
	out := b.String()
	for _, want := range []string{"KEY OPERATIONS", "FULL HANDSHAKES", "RESUMED HANDSHAKES", "EDGE MEMORY", "REPORTED",
		"keyops/ecdsa-p256-sign/best", "0.75", "client 100 ks 400 | other 9", "2.7 1.6"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}

func TestParseProcStat(t *testing.T) {
	// Field 2 may hold spaces and parentheses.
	line := "4242 (my (odd) prog) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 5 0 1000 0 0"
	got, err := parseProcStat(line)
	if err != nil || got != 325 {
		t.Errorf("parseProcStat() = %d, %v; want 325", got, err)
	}
	if _, err := parseProcStat("garbage"); err == nil {
		t.Error("parseProcStat(garbage) = nil error")
	}
}

func TestParseMachineStat(t *testing.T) {
	stat := "cpu  100 10 50 800 40 5 5 0 7 0\ncpu0 50 5 25 400 20 2 3 0 0 0\n"
	busy, total, err := parseMachineStat(stat)
	if err != nil || busy != 170 || total != 1010 {
		t.Errorf("parseMachineStat() = %d, %d, %v; want 170, 1010", busy, total, err)
	}
}

func TestCPUPerOp(t *testing.T) {
	a := cpuSample{procs: map[string]uint64{"ks": 100, "client": 50}, busy: 1000, total: 2000}
	b := cpuSample{procs: map[string]uint64{"ks": 200, "client": 100}, busy: 1180, total: 2200}
	got, busy := cpuPerOp(a, b, 1000)
	// 100 ticks = 1 s over 1000 ops = 1000 µs/op.
	if got["ks"] != 1000 || got["client"] != 500 || got["other"] != 300 || busy != 0.9 {
		t.Errorf("cpuPerOp() = %v, %v", got, busy)
	}
	if got, _ := cpuPerOp(a, b, 0); got != nil {
		t.Errorf("cpuPerOp(0 ops) = %v, want nil", got)
	}
}

func TestParseWatch(t *testing.T) {
	got, err := parseWatch("edge=12, keyserver=34")
	if err != nil || got["edge"] != 12 || got["keyserver"] != 34 || len(got) != 2 {
		t.Errorf("parseWatch() = %v, %v", got, err)
	}
	for _, bad := range []string{"edge", "edge=x", "=3", "a=-1"} {
		if _, err := parseWatch(bad); err == nil {
			t.Errorf("parseWatch(%q) = nil error", bad)
		}
	}
}

func TestMainUnknownMode(t *testing.T) {
	if err := Main(t.Context(), []string{"nope"}, nil, io.Discard, io.Discard); err == nil {
		t.Error("Main(nope) = nil error")
	}
	if err := Main(t.Context(), nil, nil, io.Discard, io.Discard); err == nil {
		t.Error("Main() = nil error")
	}
}

func TestResultsMedian(t *testing.T) {
	r := newResults()
	k := keyopsKey("keyless", OpECDSASign, 8)
	if _, ok := r.get(k); ok {
		t.Fatal("get() of nothing = ok")
	}
	for _, ops := range []float64{300, 100, 200} {
		r.add(k, Result{OpsPerSec: ops})
	}
	if got := r.at(k).OpsPerSec; got != 200 {
		t.Errorf("median of 300, 100, 200 = %v, want 200", got)
	}
	r.add(k, Result{OpsPerSec: 400})
	if got := r.at(k).OpsPerSec; got != 200 {
		t.Errorf("lower median of 100..400 = %v, want 200", got)
	}
}

func TestLoadRunWatch(t *testing.T) {
	l := &Load{Name: "watch", Concurrency: 1, Duration: 100 * time.Millisecond, Watch: map[string]int{},
		Op: func(ctx context.Context, w int) error {
			for i := 0; i < 10000; i++ { // some CPU
				_ = strings.Repeat("x", 8)
			}
			return nil
		}}
	r, err := l.Run(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	// The figures come from /proc, at 100 ticks per second: a short window
	// on a busy machine may see none, so only their shape is checked.
	if r.CPU != nil {
		if _, ok := r.CPU["other"]; !ok || r.MachineBusy < 0 || r.MachineBusy > 1 {
			t.Errorf("Run() with Watch = CPU %v, busy %v", r.CPU, r.MachineBusy)
		}
	}
}

// TestStreamTraffic reads the keyserver's stream counters from its
// metrics and turns two readings into operations per message.
func TestStreamTraffic(t *testing.T) {
	exposition := func(recv, recvOps, sent, sentRes int) string {
		return fmt.Sprintf(`# HELP keyless_keyserver_stream_messages_total Messages.
# TYPE keyless_keyserver_stream_messages_total counter
keyless_keyserver_stream_messages_total{direction="received"} %d
keyless_keyserver_stream_messages_total{direction="sent"} %d
# TYPE keyless_keyserver_stream_operations_total counter
keyless_keyserver_stream_operations_total{direction="received"} %d
keyless_keyserver_stream_operations_total{direction="sent"} %d
keyless_keyserver_streams_open 1
`, recv, sent, recvOps, sentRes)
	}
	before, err := parseTraffic(strings.NewReader(exposition(10, 10, 10, 10)))
	if err != nil {
		t.Fatalf("parseTraffic() = %v", err)
	}
	after, err := parseTraffic(strings.NewReader(exposition(110, 280, 190, 280)))
	if err != nil {
		t.Fatalf("parseTraffic() = %v", err)
	}
	var r Result
	r.sharing(before, after)
	if r.OpsPerRequest != 2.7 || r.ResultsPerResponse != 1.5 {
		// 270 operations in 100 messages; 270 results in 180.
		t.Errorf("sharing: %v operations per request, %v results per response; want 2.7, 1.5", r.OpsPerRequest, r.ResultsPerResponse)
	}
	var idle Result
	idle.sharing(after, after)
	if idle.OpsPerRequest != 0 || idle.ResultsPerResponse != 0 {
		t.Errorf("sharing with no messages = %v, %v; want 0, 0", idle.OpsPerRequest, idle.ResultsPerResponse)
	}

	if _, err := parseTraffic(strings.NewReader("keyless_keyserver_streams_open 1\n")); err == nil {
		t.Error("parseTraffic() of metrics without the stream counters = nil error")
	}
	if _, err := parseTraffic(strings.NewReader(`keyless_keyserver_stream_messages_total{direction="sent"} x` + "\n")); err == nil {
		t.Error("parseTraffic() of a malformed value = nil error")
	}
}
