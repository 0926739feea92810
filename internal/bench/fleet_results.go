package bench

import (
	"fmt"
	"math"
	"strings"
)

// fleetPerLink is the keyserver's cost per idle fleet link: the
// difference between the snapshots with and without the links, divided by
// their number.
type fleetPerLink struct {
	heapKiB, stackKiB, goroutines float64
}

func (f *FleetResult) perLink() fleetPerLink {
	if f.Links < 1 {
		return fleetPerLink{}
	}
	n := float64(f.Links)
	return fleetPerLink{
		heapKiB:  round1((f.Idle.HeapLive - f.Base.HeapLive) / n / 1024),
		stackKiB: round1((f.Idle.StackUsed - f.Base.StackUsed) / n / 1024),
		// To 0.01: a goroutine or two of the process's own come and go.
		goroutines: math.Round((f.Idle.Goroutines-f.Base.Goroutines)/n*100) / 100,
	}
}

// Goroutines the keyserver keeps for an idle link as cmd/edge makes it,
// two connections: gRPC's reader, writer and keepalive goroutines of each
// (6), the health Watch stream on each (2: gRPC's health checking on the
// link, the edge's own watch on the other), and the Stream's handler and
// reader (2). Stream workers are not among them: they end when idle.
const fleetGoroutinesPerIdleLink = 10

// fleetMaxWorkersIdle bounds the time the stream workers may take to end
// after the last operation: their idle time (streamWorkerIdle, one
// second) and the time to notice.
const fleetMaxWorkersIdle = 2.5

// fleetRows returns a row per key operation of the fleet scenario: the
// fleet's figures with one link's as the baseline.
func (r *Results) fleetRows() []Row {
	var rows []Row
	for _, op := range fleetOps {
		for _, n := range r.concurrencies("fleet", op, fleetSideFleet) {
			k := r.at(fleetKey(fleetSideFleet, op, n))
			row := Row{Name: fmt.Sprintf("fleet/%s/c%d", op, n), Kind: "fleet", Concurrency: n,
				OpsPerSec: k.OpsPerSec, P50us: k.P50us, P99us: k.P99us, Errors: k.Errors, Note: k.FirstError,
				CPU: k.CPU, MachineBusy: k.MachineBusy, OpsPerRequest: k.OpsPerRequest, ResultsPerResponse: k.ResultsPerResponse}
			if b, ok := r.get(fleetKey(fleetSideSingle, op, n)); ok {
				row.withBaseline(k, b, fmt.Sprintf("one link, %d in flight", n))
				row.RatioRange = r.ratioRange(fleetKey(fleetSideFleet, op, n), fleetKey(fleetSideSingle, op, n))
				row.Errors += b.Errors
				if row.Note == "" {
					row.Note = b.FirstError
				}
			}
			if row.Note == "" {
				row.Note = fmt.Sprintf("%d links, each an edge's connections, stream and identity, one operation in flight on each", n)
			}
			rows = append(rows, row)
		}
	}
	return rows
}

// fleetTargets checks W4 of issue 18 against the fleet scenario's
// results.
func (r *Results) fleetTargets() []Row {
	var rows []Row
	check := func(name string, value float64, unit, want string, met bool, note string) {
		rows = append(rows, Row{Name: "W4/" + name, Kind: "target", Value: ptr(value), Unit: unit, Want: want, Met: ptr(met), Note: note})
	}
	f := r.fleet
	limits := ""
	if f != nil {
		limits = "; keyserver limits set for the scenario: " + strings.Join(f.KeyserverFlags, " ")
	}
	for _, op := range fleetOps {
		for _, n := range r.concurrencies("fleet", op, fleetSideFleet) {
			k := r.at(fleetKey(fleetSideFleet, op, n))
			b, ok := r.get(fleetKey(fleetSideSingle, op, n))
			if !ok || b.OpsPerSec <= 0 {
				continue
			}
			v := round3(k.OpsPerSec / b.OpsPerSec)
			check("fleet-ratio/"+op, v, "ratio", ">= 0.90", v >= 0.9,
				fmt.Sprintf("%d links with one operation in flight each %.0f/s (p50 %.0f µs, p99 %.0f µs) ÷ one link with %d in flight %.0f/s (p50 %.0f µs, p99 %.0f µs)",
					n, k.OpsPerSec, k.P50us, k.P99us, n, b.OpsPerSec, b.P50us, b.P99us)+
					rangeNote(r.ratioRange(fleetKey(fleetSideFleet, op, n), fleetKey(fleetSideSingle, op, n)))+
					fleetCostNote(k, b)+limits)
		}
	}
	if f == nil || f.Links < 1 {
		return rows
	}
	m := f.perLink()
	check("heap-per-idle-link", m.heapKiB, "KiB", "<= 64", m.heapKiB <= 64,
		fmt.Sprintf("keyserver go_gc_heap_live_bytes %.1f MiB with %d idle links (two connections each, as cmd/edge makes: the link with its stream, and the health watch) − %.1f MiB without, after %d and %d GCs driven by operations on another link; goroutine stacks %.1f KiB per link (not heap)",
			f.Idle.HeapLive/(1<<20), f.Links, f.Base.HeapLive/(1<<20), f.Idle.GCCycles, f.Base.GCCycles, m.stackKiB))
	check("goroutines-per-idle-link", m.goroutines, "goroutines", fmt.Sprintf("<= %d", fleetGoroutinesPerIdleLink), m.goroutines <= fleetGoroutinesPerIdleLink,
		fmt.Sprintf("keyserver go_goroutines %.0f with %d idle links − %.0f without, stream workers %.0f: per connection (two) gRPC's reader, writer and keepalive and a health Watch, and the Stream's handler and reader",
			f.Idle.Goroutines, f.Links, f.Base.Goroutines, f.Idle.StreamWorkers))
	if f.After.StreamsOpen > 0 {
		v := f.After.StreamWorkers
		met := v == 0 && f.After.WorkersIdleAfter >= 0 && f.After.WorkersIdleAfter <= fleetMaxWorkersIdle
		check("idle-stream-workers", v, "workers", fmt.Sprintf("0 within %.1f s", fleetMaxWorkersIdle), met,
			fmt.Sprintf("keyless_keyserver_stream_workers after the loads with %.0f streams open: 0 reached %.1f s after the last operation (-1: not within %v)",
				f.After.StreamsOpen, f.After.WorkersIdleAfter, fleetWorkersWait))
	}
	return rows
}

// fleetCostNote compares what an operation cost on the links (k) and on
// the one link (b): CPU per operation of the keyserver and of the load
// generator, and operations and results per stream message.
func fleetCostNote(k, b Result) string {
	var note string
	if k.CPU != nil && b.CPU != nil {
		note = fmt.Sprintf("; CPU µs/op keyserver %.0f vs %.0f, load generator %.0f vs %.0f, rest of the machine %.0f vs %.0f",
			k.CPU["keyserver"], b.CPU["keyserver"], k.CPU["client"], b.CPU["client"], k.CPU["other"], b.CPU["other"])
	}
	if k.OpsPerRequest > 0 && b.OpsPerRequest > 0 {
		note += fmt.Sprintf("; operations per message in/out %.1f/%.1f vs %.1f/%.1f", k.OpsPerRequest, k.ResultsPerResponse, b.OpsPerRequest, b.ResultsPerResponse)
	}
	return note
}
