package bench

import (
	"cmp"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"time"
)

// runKey names one load run: a group ("keyops", "handshake", "resume"),
// what ran (a key operation or handshake kind), on which side ("inproc" or
// "keyless" for key operations; "hsm", "soft" or "keyless" for TLS
// servers), at which concurrency.
type runKey struct {
	group, what, side string
	n                 int
}

// MemResult is the edge memory scenario's outcome for one protocol.
type MemResult struct {
	Conns               int64
	HeapKiBPerConn      float64 // HeapInuse delta
	HeapAllocKiBPerConn float64 // HeapAlloc delta
	StackKiBPerConn     float64 // StackInuse delta (goroutine stacks, not heap)
	Base, Loaded        MemSnapshot
}

// Results collects what the runs measured. It is not safe for concurrent
// use.
type Results struct {
	runs  map[runKey][]Result // repetitions, in order
	mem   map[string]MemResult
	fleet *FleetResult // the fleet scenario's snapshots (fleet_results.go)
	// link is the shape of the link scenarios, nil when none ran; their
	// runs are group "link" (handshakes) and "linkops" (key operations),
	// what linkWhat(item, rtt).
	link *linkShape
}

func newResults() *Results {
	return &Results{runs: make(map[runKey][]Result), mem: make(map[string]MemResult)}
}

func keyopsKey(side, op string, n int) runKey { return runKey{"keyops", op, side, n} }

func handshakeKey(group, kind, server string, n int) runKey {
	if group == "resume" {
		kind = resumeName(kind)
	}
	return runKey{group, kind, server, n}
}

// resumeName is a resume kind's name in scenario and row names: "tls13"
// for "resume-tls13".
func resumeName(kind string) string { return strings.TrimPrefix(kind, "resume-") }

func resumeNames() []string {
	out := make([]string, len(resumeKinds))
	for i, k := range resumeKinds {
		out[i] = resumeName(k)
	}
	return out
}

// add records one repetition of a run.
func (r *Results) add(k runKey, res Result) { r.runs[k] = append(r.runs[k], res) }

// get returns the run k: of several repetitions, the one with the median
// rate (the lower middle one of an even number).
func (r *Results) get(k runKey) (Result, bool) {
	reps := r.runs[k]
	if len(reps) == 0 {
		return Result{}, false
	}
	sorted := slices.Clone(reps)
	slices.SortStableFunc(sorted, func(a, b Result) int { return cmp.Compare(a.OpsPerSec, b.OpsPerSec) })
	return sorted[(len(sorted)-1)/2], true
}

// ratioRange returns the lowest and highest ratio of keyless run k to
// baseline run b over the repetitions in which both ran, each pair
// measured one after the other: how far the machine's noise moves a single
// run's ratio. It returns nil with fewer than two such pairs.
func (r *Results) ratioRange(k, b runKey) []float64 {
	base := make(map[int]float64)
	for _, res := range r.runs[b] {
		base[res.rep] = res.OpsPerSec
	}
	lo, hi, n := math.Inf(1), math.Inf(-1), 0
	for _, res := range r.runs[k] {
		if bo := base[res.rep]; bo > 0 {
			v := res.OpsPerSec / bo
			lo, hi, n = min(lo, v), max(hi, v), n+1
		}
	}
	if n < 2 {
		return nil
	}
	return []float64{round3(lo), round3(hi)}
}

// at is get without the second result.
func (r *Results) at(k runKey) Result {
	res, _ := r.get(k)
	return res
}

func (r *Results) addMem(proto string, base, loaded MemSnapshot) {
	n := loaded.Conns - base.Conns
	m := MemResult{Conns: n, Base: base, Loaded: loaded}
	if n > 0 {
		per := func(a, b uint64) float64 { return round1((float64(b) - float64(a)) / float64(n) / 1024) }
		m.HeapKiBPerConn = per(base.HeapInuse, loaded.HeapInuse)
		m.HeapAllocKiBPerConn = per(base.HeapAlloc, loaded.HeapAlloc)
		m.StackKiBPerConn = per(base.StackInuse, loaded.StackInuse)
	}
	r.mem[proto] = m
}

// concurrencies returns the concurrencies measured for group/what/side,
// in increasing order.
func (r *Results) concurrencies(group, what, side string) []int {
	var out []int
	for k := range r.runs {
		if k.group == group && k.what == what && k.side == side {
			out = append(out, k.n)
		}
	}
	slices.Sort(out)
	return out
}

// best returns the run of group/what/side with the highest rate.
func (r *Results) best(group, what, side string) (Result, bool) {
	var b Result
	found := false
	for _, n := range r.concurrencies(group, what, side) {
		res := r.at(runKey{group, what, side, n})
		if !found || res.OpsPerSec > b.OpsPerSec {
			b, found = res, true
		}
	}
	return b, found
}

// Row is one line of the results: a figure with its baseline and their
// ratio, a link figure, a memory figure, a reported ratio or a target
// check. WriteJSONFile writes a list
// of Rows.
type Row struct {
	// Name identifies the figure, as "keyops/ecdsa-p256-sign/c8",
	// "handshake/tls13-rsa/c32", "resume/tls13/c8",
	// "link/tls13-rsa/rtt80/c1024", "link/keyops/ecdsa-p256-sign/rtt0/c1",
	// "edgemem/http1", "reported/…" or a target's, "W1/tls13-rsa".
	Name string `json:"name"`
	// Kind is "keyops", "handshake", "resume", "link", "link-keyops",
	// "memory", "reported" (a ratio kept as a figure, not judged) or
	// "target" (an issue's target, judged in Met).
	Kind        string `json:"kind"`
	Concurrency int    `json:"concurrency,omitempty"`
	// OpsPerSec, P50us and P99us are keyless's figures: through the
	// keyserver (key operations) or the edge and keyserver (handshakes).
	OpsPerSec float64 `json:"ops_per_sec"`
	P50us     float64 `json:"p50_us"`
	P99us     float64 `json:"p99_us"`
	Errors    int64   `json:"errors,omitempty"`
	// Baseline is the baseline's rate: the same SoftHSM key in-process
	// (key operations and full handshakes) or a software-key server
	// (resumption). Null when there is none.
	Baseline      *float64 `json:"baseline"`
	BaselineName  string   `json:"baseline_name,omitempty"`
	BaselineP50us float64  `json:"baseline_p50_us,omitempty"`
	BaselineP99us float64  `json:"baseline_p99_us,omitempty"`
	// Ratio is OpsPerSec / Baseline.
	Ratio *float64 `json:"ratio"`
	// RatioRange is the lowest and highest ratio of one repetition's
	// keyless run to the baseline run measured next to it, with -repeat 2
	// or more: the spread the machine's noise gives a single run's ratio.
	// Absent from a best row whose sides are at different concurrencies
	// (their runs were not measured together).
	RatioRange []float64 `json:"ratio_range,omitempty"`
	// SoftKey and SoftKeyRatio are a crypto/tls server with a software
	// key, for full handshakes.
	SoftKey      *float64 `json:"soft_key_ops_per_sec,omitempty"`
	SoftKeyRatio *float64 `json:"soft_key_ratio,omitempty"`
	// EmptyCallP50us is the empty gRPC call on the keyops connection.
	EmptyCallP50us float64 `json:"empty_call_p50_us,omitempty"`
	// PausedBaselineP50us is, at concurrency 1, the baseline's p50 when
	// each operation follows an idle gap as long as the empty call (as
	// through a keyserver), a diagnostic of the latency target.
	PausedBaselineP50us float64 `json:"baseline_paused_p50_us,omitempty"`
	// CPU and BaselineCPU are the CPU microseconds per operation of each
	// process of the keyless and the baseline runs ("other" is the rest of
	// the machine), and CPURatio the baseline's total over keyless's,
	// "other" left out: the throughput ratio to expect when both are
	// bound by the same CPUs, which the rest of the machine disturbs less
	// than it disturbs the measured rates. A diagnostic, not a target.
	CPU         map[string]float64 `json:"cpu_us_per_op,omitempty"`
	BaselineCPU map[string]float64 `json:"baseline_cpu_us_per_op,omitempty"`
	CPURatio    *float64           `json:"cpu_ratio,omitempty"`
	// OpsPerRequest and ResultsPerResponse are how many operations shared
	// each message the keyserver received on its streams, and results each
	// message it sent, during the keyless run: 1 when each travels alone.
	// Zero when not measured.
	OpsPerRequest      float64 `json:"ops_per_request_msg,omitempty"`
	ResultsPerResponse float64 `json:"results_per_response_msg,omitempty"`
	// MachineBusy is the fraction of the machine's CPUs busy during the
	// keyless run, by anything.
	MachineBusy float64 `json:"machine_busy,omitempty"`
	// RTTms is the round-trip time the relay added, for link rows.
	RTTms *float64 `json:"rtt_ms,omitempty"`
	// EdgeShed and KeyserverCallErrors are, for link handshakes, the
	// handshakes the edge refused before their key operation left it and
	// its failed keyserver calls by gRPC code, over the run (warm-up
	// included).
	EdgeShed            int64            `json:"edge_shed,omitempty"`
	KeyserverCallErrors map[string]int64 `json:"keyserver_call_errors,omitempty"`
	// EdgeCallMeanMs, KeyserverOpMeanMs, HSMQueue and EdgeInFlight say
	// where a link handshake's time went; see Result.
	EdgeCallMeanMs    float64    `json:"edge_call_mean_ms,omitempty"`
	KeyserverOpMeanMs float64    `json:"keyserver_op_mean_ms,omitempty"`
	HSMQueue          [2]float64 `json:"hsm_queue_mean_max,omitzero"`
	EdgeInFlight      [2]float64 `json:"edge_in_flight_mean_max,omitzero"`
	// DrainMs and DrainOps: see Result.
	DrainMs  float64 `json:"keyserver_drain_ms,omitempty"`
	DrainOps int64   `json:"keyserver_drain_ops,omitempty"`
	// RelayMaxInflight is the most bytes the relay held at once during a
	// link run, towards the keyserver and back: what flow control let into
	// the path.
	RelayMaxInflight []int64 `json:"relay_max_inflight_bytes,omitempty"`
	// FramesPerOp is, for link key operations, the HTTP/2 frames of the
	// client's connection per operation by direction and type ("out DATA"
	// towards the keyserver).
	FramesPerOp map[string]float64 `json:"frames_per_op,omitempty"`
	// Value, Unit, Want and Met are memory figures and target checks.
	Value *float64 `json:"value,omitempty"`
	Unit  string   `json:"unit,omitempty"`
	Want  string   `json:"want,omitempty"`
	Met   *bool    `json:"met,omitempty"`
	Note  string   `json:"note,omitempty"`
}

func ptr[T any](v T) *T { return &v }

// cpuTotal sums the CPU per operation of the watched processes, leaving
// out the rest of the machine.
func cpuTotal(m map[string]float64) float64 {
	var t float64
	for k, v := range m {
		if k != "other" {
			t += v
		}
	}
	return t
}

// withBaseline fills row's baseline fields from b.
func (row *Row) withBaseline(k, b Result, name string) {
	row.Baseline, row.BaselineName, row.BaselineP50us, row.BaselineP99us = ptr(b.OpsPerSec), name, b.P50us, b.P99us
	row.Ratio = ratio(k.OpsPerSec, b.OpsPerSec)
	row.BaselineCPU = b.CPU
	if kc, bc := cpuTotal(k.CPU), cpuTotal(b.CPU); kc > 0 && bc > 0 {
		row.CPURatio = ptr(round3(bc / kc))
	}
}

func round1(v float64) float64 { return math.Round(v*10) / 10 }
func round3(v float64) float64 { return math.Round(v*1000) / 1000 }

func ratio(a, b float64) *float64 {
	if b <= 0 {
		return nil
	}
	return ptr(round3(a / b))
}

// baselineNames describe the baselines in rows.
const (
	baselineInproc = "inproc-softhsm"
	baselineHSMTLS = "crypto/tls+inproc-softhsm"
	baselineSoft   = "crypto/tls+software-key"
)

// Rows returns every figure, then the target checks, in table order.
func (r *Results) Rows() []Row {
	var rows []Row
	for _, op := range keyOps {
		for _, n := range r.concurrencies("keyops", op, "keyless") {
			k := r.at(keyopsKey("keyless", op, n))
			row := Row{Name: fmt.Sprintf("keyops/%s/c%d", op, n), Kind: "keyops", Concurrency: n,
				OpsPerSec: k.OpsPerSec, P50us: k.P50us, P99us: k.P99us, Errors: k.Errors, EmptyCallP50us: k.EmptyP50us,
				Note: k.FirstError, CPU: k.CPU, MachineBusy: k.MachineBusy,
				OpsPerRequest: k.OpsPerRequest, ResultsPerResponse: k.ResultsPerResponse}
			if p, ok := r.get(keyopsKey("inproc-paused", op, n)); ok {
				row.PausedBaselineP50us = p.P50us
			}
			if b, ok := r.get(keyopsKey("inproc", op, n)); ok {
				row.withBaseline(k, b, baselineInproc)
				row.RatioRange = r.ratioRange(keyopsKey("keyless", op, n), keyopsKey("inproc", op, n))
				row.Errors += b.Errors
				if row.Note == "" {
					row.Note = b.FirstError
				}
			}
			rows = append(rows, row)
		}
		kb, ok1 := r.best("keyops", op, "keyless")
		ib, ok2 := r.best("keyops", op, "inproc")
		if ok1 && ok2 {
			row := Row{Name: fmt.Sprintf("keyops/%s/best", op), Kind: "keyops", Concurrency: kb.Concurrency,
				OpsPerSec: kb.OpsPerSec, P50us: kb.P50us, P99us: kb.P99us, CPU: kb.CPU, MachineBusy: kb.MachineBusy,
				OpsPerRequest: kb.OpsPerRequest, ResultsPerResponse: kb.ResultsPerResponse,
				Note: fmt.Sprintf("keyless best at c%d, in-process best at c%d", kb.Concurrency, ib.Concurrency)}
			row.withBaseline(kb, ib, fmt.Sprintf("%s c%d", baselineInproc, ib.Concurrency))
			if kb.Concurrency == ib.Concurrency {
				row.RatioRange = r.ratioRange(keyopsKey("keyless", op, kb.Concurrency), keyopsKey("inproc", op, ib.Concurrency))
			}
			rows = append(rows, row)
		}
	}
	for _, kind := range handshakeKinds {
		for _, n := range r.concurrencies("handshake", kind, "keyless") {
			rows = append(rows, r.tlsRow("handshake", kind, n, "hsm", baselineHSMTLS))
		}
	}
	for _, kind := range resumeNames() {
		for _, n := range r.concurrencies("resume", kind, "keyless") {
			rows = append(rows, r.tlsRow("resume", kind, n, "soft", baselineSoft))
		}
	}
	rows = append(rows, r.linkRows()...)
	for _, proto := range memProtos {
		if m, ok := r.mem[proto]; ok {
			rows = append(rows, Row{Name: "edgemem/" + proto, Kind: "memory", Concurrency: int(m.Conns),
				Value: ptr(m.HeapKiBPerConn), Unit: "KiB heap in use per idle connection",
				Note: fmt.Sprintf("%d idle TLS 1.3 connections; heap alloc %.1f KiB/conn; goroutine stacks %.1f KiB/conn (not heap)",
					m.Conns, m.HeapAllocKiBPerConn, m.StackKiBPerConn)})
		}
	}
	rows = append(rows, r.fleetRows()...)
	rows = append(rows, r.Reported()...)
	return append(rows, r.Targets()...)
}

// linkRows returns the link scenarios' rows: handshakes by kind, RTT and
// concurrency, then key operations likewise.
func (r *Results) linkRows() []Row {
	if r.link == nil {
		return nil
	}
	var rows []Row
	add := func(group, kind, prefix, item string) {
		for _, rtt := range r.link.all() {
			what := linkWhat(item, rtt)
			for _, n := range r.concurrencies(group, what, "keyless") {
				k := r.at(runKey{group, what, "keyless", n})
				row := Row{Name: fmt.Sprintf("%s%s/c%d", prefix, what, n), Kind: kind, Concurrency: n,
					OpsPerSec: k.OpsPerSec, P50us: k.P50us, P99us: k.P99us, Errors: k.Errors, Note: k.FirstError,
					RTTms: ptr(k.LinkRTTms), EdgeShed: k.EdgeShed, KeyserverCallErrors: k.EdgeCallErrors,
					EmptyCallP50us: k.EmptyP50us, FramesPerOp: k.FramesPerOp,
					DrainMs: k.DrainMs, DrainOps: k.DrainOps,
					EdgeCallMeanMs: k.EdgeCallMeanMs, KeyserverOpMeanMs: k.KeyserverOpMeanMs, HSMQueue: k.HSMQueue, EdgeInFlight: k.EdgeInFlight,
					CPU: k.CPU, MachineBusy: k.MachineBusy, OpsPerRequest: k.OpsPerRequest, ResultsPerResponse: k.ResultsPerResponse}
				if k.LinkMaxUp > 0 || k.LinkMaxDown > 0 {
					row.RelayMaxInflight = []int64{k.LinkMaxUp, k.LinkMaxDown}
				}
				rows = append(rows, row)
			}
		}
	}
	for _, kind := range linkKinds {
		add("link", "link", "link/", kind)
	}
	for _, op := range linkOps {
		add("linkops", "link-keyops", "link/keyops/", op)
	}
	return rows
}

func (r *Results) tlsRow(group, kind string, n int, baseSide, baseName string) Row {
	k := r.at(runKey{group, kind, "keyless", n})
	row := Row{Name: fmt.Sprintf("%s/%s/c%d", group, kind, n), Kind: group, Concurrency: n,
		OpsPerSec: k.OpsPerSec, P50us: k.P50us, P99us: k.P99us, Errors: k.Errors, Note: k.FirstError,
		CPU: k.CPU, MachineBusy: k.MachineBusy, OpsPerRequest: k.OpsPerRequest, ResultsPerResponse: k.ResultsPerResponse}
	if b, ok := r.get(runKey{group, kind, baseSide, n}); ok {
		row.withBaseline(k, b, baseName)
		row.RatioRange = r.ratioRange(runKey{group, kind, "keyless", n}, runKey{group, kind, baseSide, n})
		if row.Note == "" {
			row.Note = b.FirstError
		}
	}
	if baseSide != "soft" {
		if s, ok := r.get(runKey{group, kind, "soft", n}); ok {
			row.SoftKey, row.SoftKeyRatio = ptr(s.OpsPerSec), ratio(k.OpsPerSec, s.OpsPerSec)
		}
	}
	return row
}

// rangeNote describes a ratioRange for a target's note, or is empty.
func rangeNote(rr []float64) string {
	if len(rr) != 2 {
		return ""
	}
	return fmt.Sprintf("; one repetition's ratio %.2f–%.2f", rr[0], rr[1])
}

// Reported returns the ratios that were the targets of an earlier round
// (key operations and handshakes against in-process SoftHSM, the latency
// over an empty call), kept as figures: on two shared CPUs they measure
// CPU sharing as much as keyless, so they are not judged. Want says what
// that round asked for.
func (r *Results) Reported() []Row {
	var rows []Row
	check := func(name string, value float64, unit, want string, _ bool, note string) {
		rows = append(rows, Row{Name: "reported/" + name, Kind: "reported", Value: ptr(value), Unit: unit, Want: want, Note: note})
	}
	for _, op := range keyOps {
		kb, ok1 := r.best("keyops", op, "keyless")
		ib, ok2 := r.best("keyops", op, "inproc")
		if ok1 && ok2 && ib.OpsPerSec > 0 {
			want := 0.95
			if op == OpECDSASign {
				want = 0.85
			}
			v := round3(kb.OpsPerSec / ib.OpsPerSec)
			note := fmt.Sprintf("keyless %.0f/s (c%d) ÷ in-process %.0f/s (c%d)", kb.OpsPerSec, kb.Concurrency, ib.OpsPerSec, ib.Concurrency)
			if kb.Concurrency == ib.Concurrency {
				note += rangeNote(r.ratioRange(keyopsKey("keyless", op, kb.Concurrency), keyopsKey("inproc", op, ib.Concurrency)))
			}
			check("keyops-best-ratio/"+op, v, "ratio", fmt.Sprintf(">= %.2f", want), v >= want, note)
		}
		if cs := r.concurrencies("keyops", op, "keyless"); ok1 && len(cs) > 1 && kb.OpsPerSec > 0 {
			top := cs[len(cs)-1]
			k := r.at(keyopsKey("keyless", op, top))
			v := round3(k.OpsPerSec / kb.OpsPerSec)
			check(fmt.Sprintf("keyops-c%d-vs-best/%s", top, op), v, "ratio", ">= 0.90", v >= 0.9,
				fmt.Sprintf("keyless %.0f/s at c%d ÷ %.0f/s at c%d", k.OpsPerSec, top, kb.OpsPerSec, kb.Concurrency))
		}
		k1, ok1 := r.get(keyopsKey("keyless", op, 1))
		i1, ok2 := r.get(keyopsKey("inproc", op, 1))
		if ok1 && ok2 && k1.EmptyP50us > 0 {
			excess := round1(k1.P50us - i1.P50us - k1.EmptyP50us)
			note := fmt.Sprintf("keyless p50 %.0f µs − in-process p50 %.0f µs = %.0f µs; empty gRPC call p50 %.0f µs",
				k1.P50us, i1.P50us, k1.P50us-i1.P50us, k1.EmptyP50us)
			if p, ok := r.get(keyopsKey("inproc-paused", op, 1)); ok {
				note += fmt.Sprintf("; in-process p50 after an idle gap as long as the empty call %.0f µs, keyless over it %.0f µs",
					p.P50us, k1.P50us-p.P50us-k1.EmptyP50us)
			}
			check("latency-c1/"+op, excess, "µs over the empty call", "<= 100", excess <= 100, note)
		}
	}
	for _, kind := range handshakeKinds {
		cs := r.concurrencies("handshake", kind, "keyless")
		if len(cs) == 0 {
			continue
		}
		top := cs[len(cs)-1]
		k := r.at(runKey{"handshake", kind, "keyless", top})
		b, ok := r.get(runKey{"handshake", kind, "hsm", top})
		if !ok || b.OpsPerSec <= 0 {
			continue
		}
		want := 0.95
		if strings.Contains(kind, "ecdsa") {
			want = 0.9
		}
		v := round3(k.OpsPerSec / b.OpsPerSec)
		check(fmt.Sprintf("handshake-c%d-ratio/%s", top, kind), v, "ratio", fmt.Sprintf(">= %.2f", want), v >= want,
			fmt.Sprintf("edge+keyserver %.0f/s ÷ in-process SoftHSM server %.0f/s", k.OpsPerSec, b.OpsPerSec)+
				rangeNote(r.ratioRange(runKey{"handshake", kind, "keyless", top}, runKey{"handshake", kind, "hsm", top})))
	}
	return rows
}

// Targets checks the link targets of the issue against the results, per
// handshake kind measured: W1, the rate at the highest concurrency and the
// farthest RTT over the rate at the next concurrency down and the nearest
// RTT; W2, the p50 at concurrency 1 at the farthest RTT over the nearest
// one's plus one round trip (as measured by the link's empty call, when
// the link key operations ran; else the RTT set); W3, no failed
// handshake at the highest concurrency at the farthest RTT and at each
// further one.
func (r *Results) Targets() []Row {
	var rows []Row
	check := func(name string, value float64, unit, want string, met bool, note string) {
		rows = append(rows, Row{Name: name, Kind: "target", Value: ptr(value), Unit: unit, Want: want, Met: ptr(met), Note: note})
	}
	if r.link == nil {
		return append(rows, r.fleetTargets()...)
	}
	s := r.link
	near, far, top, base := s.near(), s.farthest(), s.top(), s.base()
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	for _, kind := range linkKinds {
		at := func(rtt time.Duration, n int) (Result, bool) {
			return r.get(runKey{"link", linkWhat(kind, rtt), "keyless", n})
		}
		if f, ok1 := at(far, top); ok1 {
			if b, ok2 := at(near, base); ok2 && b.OpsPerSec > 0 && near != far {
				v := round3(f.OpsPerSec / b.OpsPerSec)
				note := fmt.Sprintf("%.0f handshakes/s at RTT %v c%d ÷ %.0f/s at RTT %v c%d; p50 %.0f ms and %.0f ms; other processes' CPU %.0f and %.0f µs per handshake",
					f.OpsPerSec, far, top, b.OpsPerSec, near, base, f.P50us/1000, b.P50us/1000, f.CPU["other"], b.CPU["other"])
				if fc, bc := cpuTotal(f.CPU), cpuTotal(b.CPU); fc > 0 && bc > 0 {
					// Both runs are CPU-bound on the same CPUs: the ratio
					// of CPU per handshake is the rate ratio the two would
					// have with the machine to themselves.
					note += fmt.Sprintf("; CPU of edge, keyserver, load generator and relay %.0f and %.0f µs per handshake, a CPU ratio of %.2f", fc, bc, bc/fc)
				}
				if z, ok := at(near, top); ok && z.OpsPerSec > 0 && near != far {
					note += fmt.Sprintf("; the distance alone (RTT %v ÷ RTT %v, both c%d) %.2f", far, near, top, f.OpsPerSec/z.OpsPerSec)
				}
				check("W1/"+kind, v, "ratio", ">= 0.90", v >= 0.9, note)
			}
		}
		f1, ok1 := at(far, 1)
		n1, ok2 := at(near, 1)
		if ok1 && ok2 && near != far && f1.Ops > 0 && n1.Ops > 0 {
			// One round trip is what the relay really adds, measured by the
			// empty call on the link at both RTTs when that ran: its
			// timers wake late on idle CPUs, which is the harness's
			// error, not a second round trip.
			rtt, how := ms(far-near), "the RTT set"
			fe, ne := r.linkEmpty(far), r.linkEmpty(near)
			if fe > 0 && ne > 0 {
				rtt, how = (fe-ne)/1000, fmt.Sprintf("the round trip the relay added, from the empty call's p50 %.2f and %.2f ms", fe/1000, ne/1000)
			}
			v := round3(f1.P50us/1000 - (n1.P50us/1000 + rtt))
			note := fmt.Sprintf("c1 p50 %.2f ms at RTT %v − (%.2f ms at RTT %v + %.2f ms, %s); with the RTT set, %.2f ms; keyserver call mean %.2f and %.2f ms",
				f1.P50us/1000, far, n1.P50us/1000, near, rtt, how, f1.P50us/1000-n1.P50us/1000-ms(far-near), f1.EdgeCallMeanMs, n1.EdgeCallMeanMs)
			if fc, nc := cpuTotal(f1.CPU), cpuTotal(n1.CPU); fc > 0 && nc > 0 {
				note += fmt.Sprintf("; CPU of edge, keyserver, load generator and relay %.0f and %.0f µs per handshake", fc, nc)
			}
			check("W2/"+kind, v, "ms over one round trip", "<= 2", v <= 2, note)
		}
		for _, rtt := range s.w3() {
			k, ok := at(rtt, top)
			if !ok {
				continue
			}
			note := fmt.Sprintf("%d of %d handshakes failed at RTT %v c%d (%.0f/s, p50 %.0f ms, p99 %.0f ms); edge shed %d; keyserver call errors %s; mean call %.0f ms at the edge, %.0f ms in the keyserver; HSM queue mean %.0f",
				k.Errors, k.Ops+k.Errors, rtt, top, k.OpsPerSec, k.P50us/1000, k.P99us/1000, k.EdgeShed, codesStr(k.EdgeCallErrors),
				k.EdgeCallMeanMs, k.KeyserverOpMeanMs, k.HSMQueue[0])
			if k.DrainOps > 0 {
				note += fmt.Sprintf("; after the load ended the keyserver answered %d more operations in %.0f ms", k.DrainOps, k.DrainMs)
			}
			if k.FirstError != "" {
				note += "; first: " + k.FirstError
			}
			if z, ok := at(near, top); ok && rtt != near {
				// Failures at the same concurrency without the distance
				// are overload, not distance.
				note += fmt.Sprintf("; at RTT %v c%d: %d failed (%.0f/s, p99 %.0f ms)", near, top, z.Errors, z.OpsPerSec, z.P99us/1000)
			}
			check("W3/"+kind+"/"+rttName(rtt), float64(k.Errors), "failed handshakes", "0", k.Errors == 0 && k.Ops > 0, note)
		}
	}
	rows = append(rows, r.fleetTargets()...)
	return rows
}

// linkEmpty returns the empty call's p50 on the link key operations'
// connection at concurrency 1 at rtt, in µs (of the first operation that
// has one), or 0.
func (r *Results) linkEmpty(rtt time.Duration) float64 {
	for _, op := range linkOps {
		if k, ok := r.get(runKey{"linkops", linkWhat(op, rtt), "keyless", 1}); ok && k.EmptyP50us > 0 {
			return k.EmptyP50us
		}
	}
	return 0
}

// codesStr shows failed calls by code, as "DeadlineExceeded 3", or "none".
func codesStr(m map[string]int64) string {
	if len(m) == 0 {
		return "none"
	}
	var parts []string
	for _, c := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%s %d", c, m[c]))
	}
	return strings.Join(parts, ", ")
}
