package bench

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"time"
)

// Result is what one load run measured: operations completed inside the
// measurement window, their rate and latency percentiles. Child processes
// print it as JSON on stdout.
type Result struct {
	// Name says what was measured, as "keyops/ecdsa-p256-sign".
	Name string `json:"name"`
	// Concurrency is the number of workers (closed loop: each starts its
	// next operation when the previous one ends).
	Concurrency int `json:"concurrency"`
	// Ops and Errors count the operations that ended inside the window.
	Ops    int64 `json:"ops"`
	Errors int64 `json:"errors"`
	// Seconds is the length of the window.
	Seconds float64 `json:"seconds"`
	// OpsPerSec is Ops / Seconds.
	OpsPerSec float64 `json:"ops_per_sec"`
	// P50us and P99us are latency percentiles of the successful
	// operations, in microseconds.
	P50us float64 `json:"p50_us"`
	P99us float64 `json:"p99_us"`
	// EmptyP50us and EmptyP99us are the latency of an empty gRPC call (the
	// health check) on the same connection, measured right after the run,
	// one call at a time; zero when not measured.
	EmptyP50us float64 `json:"empty_p50_us,omitempty"`
	EmptyP99us float64 `json:"empty_p99_us,omitempty"`
	// OpsPerRequest and ResultsPerResponse are how many operations the
	// keyserver's Stream calls received per message, and results it sent
	// per message, over the whole run (warm-up included), from its
	// metrics; zero when not measured (baselines, and the edge's resumed
	// handshakes, which send nothing).
	OpsPerRequest      float64 `json:"ops_per_request_msg,omitempty"`
	ResultsPerResponse float64 `json:"results_per_response_msg,omitempty"`
	// LinkRTTms and LinkWindow are the relay's round-trip time (keyops
	// -link-rtt) and the client's flow-control window (-link-window);
	// LinkMaxUp and LinkMaxDown the most bytes the relay held at once
	// towards the keyserver and back: what flow control let into the
	// path. Zero when there was no relay.
	LinkRTTms   float64 `json:"link_rtt_ms,omitempty"`
	LinkWindow  int     `json:"link_window,omitempty"`
	LinkMaxUp   int64   `json:"link_max_inflight_up,omitempty"`
	LinkMaxDown int64   `json:"link_max_inflight_down,omitempty"`
	// FramesPerOp is, for the key-operation client, the HTTP/2 frames of
	// its connection per operation over the measurement window, by
	// direction and type ("out DATA" towards the keyserver, "in PING"
	// from it); nil when not measured.
	FramesPerOp map[string]float64 `json:"frames_per_op,omitempty"`
	// EdgeShed and EdgeCallErrors are, for handshakes through the link
	// edge, the handshakes it refused before their key operation reached
	// the keyserver, and its failed keyserver calls by gRPC code, over the
	// run (warm-up included), from its metrics; set by the orchestrator.
	EdgeShed       int64            `json:"edge_shed,omitempty"`
	EdgeCallErrors map[string]int64 `json:"edge_keyserver_call_errors,omitempty"`
	// EdgeCallMeanMs and KeyserverOpMeanMs are, for link handshakes, the
	// mean time of the edge's keyserver calls (link and keyserver) and of
	// the keyserver's operations from arrival to answer (its HSM queue and
	// the HSM), over the run; HSMQueue and EdgeInFlight are the mean and
	// largest of the keyserver's HSM queue and the edge's key operations
	// in flight, read every 100 ms while the run measures. Set by the
	// orchestrator from the metrics; zero when not read.
	EdgeCallMeanMs    float64    `json:"edge_call_mean_ms,omitempty"`
	KeyserverOpMeanMs float64    `json:"keyserver_op_mean_ms,omitempty"`
	HSMQueue          [2]float64 `json:"hsm_queue_mean_max,omitzero"`
	EdgeInFlight      [2]float64 `json:"edge_in_flight_mean_max,omitzero"`
	// DrainMs and DrainOps are, for link handshakes, how long the keyserver
	// went on working after the load ended (its HSM queue and running
	// operations back to 0, no operation answered for 300 ms) and how many
	// operations it answered meanwhile: work for handshakes already gone,
	// which the next run waits out. Set by the orchestrator.
	DrainMs  float64 `json:"keyserver_drain_ms,omitempty"`
	DrainOps int64   `json:"keyserver_drain_ops,omitempty"`
	// FirstError is the first error seen, if any.
	FirstError string `json:"first_error,omitempty"`
	// CPU is the CPU time used during the window per counted operation,
	// in microseconds, by each watched process and by the rest of the
	// machine ("other"); MachineBusy is the fraction of all CPUs that was
	// busy. Linux only; empty elsewhere.
	CPU         map[string]float64 `json:"cpu_us_per_op,omitempty"`
	MachineBusy float64            `json:"machine_busy,omitempty"`

	// rep is the repetition of the figure the run belongs to (the
	// orchestrator's count): runs of one repetition were measured one
	// after the other.
	rep int
}

// Percentile returns the p-th percentile (0 < p <= 100) of sorted, by the
// nearest-rank method: the smallest value such that at least p% of the
// values are less than or equal to it. It returns 0 for an empty slice.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	rank = min(max(rank, 1), len(sorted))
	return sorted[rank-1]
}

// micros converts a duration to microseconds, rounded to 0.1 µs.
func micros(d time.Duration) float64 {
	return math.Round(float64(d)/float64(time.Microsecond)*10) / 10
}

// Op is one operation of a load run. worker is the worker's index, from 0
// to concurrency-1; a worker calls its Op sequentially.
type Op func(ctx context.Context, worker int) error

// Load describes a closed-loop load: Concurrency workers each call Op in a
// loop. Operations ending in the first Warmup are not counted; the run then
// measures for Duration and stops. Every operation is bounded by
// OpTimeout.
type Load struct {
	Name        string
	Concurrency int
	Warmup      time.Duration
	Duration    time.Duration
	OpTimeout   time.Duration
	Op          Op
	// Pause is how long each worker sleeps before each operation, outside
	// its latency: every operation then follows an idle gap, as a key
	// operation through a keyserver follows its request's round trip.
	Pause time.Duration
	// Watch names processes (by pid) whose CPU time is measured over the
	// window; see Result.CPU.
	Watch map[string]int
	// AtWindow, if set, is called when the measurement window starts
	// (end false) and when it ends (end true), for counters that are
	// read over the same window as the rate; a run that ends early does
	// not call it at the end.
	AtWindow func(end bool)
}

// Validate reports whether the load can run.
func (l *Load) Validate() error {
	switch {
	case l.Concurrency < 1:
		return fmt.Errorf("bench: concurrency %d; want at least 1", l.Concurrency)
	case l.Warmup < 0:
		return fmt.Errorf("bench: warm-up %v; want 0 or more", l.Warmup)
	case l.Pause < 0:
		return fmt.Errorf("bench: pause %v; want 0 or more", l.Pause)
	case l.Duration <= 0:
		return fmt.Errorf("bench: duration %v; want more than 0", l.Duration)
	case l.Op == nil:
		return errors.New("bench: no operation")
	}
	return nil
}

// maxErrors ends a run early: a load that fails this often measures
// nothing useful.
const maxErrors = 1000

// Run runs the load and returns what it measured. It returns an error only
// when the load cannot run; failed operations are counted in
// Result.Errors. ctx ends the run early.
func (l *Load) Run(ctx context.Context) (Result, error) {
	if err := l.Validate(); err != nil {
		return Result{}, err
	}
	timeout := l.OpTimeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	start := time.Now()
	t0 := start.Add(l.Warmup)
	t1 := t0.Add(l.Duration)
	ctx, cancel := context.WithDeadline(ctx, t1.Add(timeout))
	defer cancel()

	type worker struct {
		lat      []time.Duration
		ops, bad int64
		first    error
	}
	workers := make([]worker, l.Concurrency)
	// Preallocate for a plausible rate so appends rarely grow.
	guess := int(min(200_000, 20_000*l.Duration.Seconds()+1000) / float64(l.Concurrency))
	var wg sync.WaitGroup
	var cpu0, cpu1 cpuSample
	if l.Watch != nil || l.AtWindow != nil {
		wg.Go(func() {
			sleepUntil := func(t time.Time) bool {
				timer := time.NewTimer(time.Until(t))
				defer timer.Stop()
				select {
				case <-timer.C:
					return true
				case <-ctx.Done():
					return false
				}
			}
			sample := func(end bool) cpuSample {
				if l.AtWindow != nil {
					l.AtWindow(end)
				}
				if l.Watch == nil {
					return cpuSample{}
				}
				return sampleCPU(l.Watch)
			}
			if sleepUntil(t0) {
				cpu0 = sample(false)
			}
			if sleepUntil(t1) {
				cpu1 = sample(true)
			}
		})
	}
	for i := range workers {
		w := &workers[i]
		w.lat = make([]time.Duration, 0, guess)
		wg.Go(func() {
			for ctx.Err() == nil {
				if l.Pause > 0 {
					time.Sleep(l.Pause)
				}
				s := time.Now()
				if !s.Before(t1) {
					return
				}
				octx, ocancel := context.WithTimeout(ctx, timeout)
				err := l.Op(octx, i)
				ocancel()
				e := time.Now()
				if e.Before(t0) || e.After(t1) {
					continue
				}
				if err != nil {
					w.bad++
					if w.first == nil {
						w.first = err
					}
					if w.bad > maxErrors/int64(l.Concurrency)+1 {
						cancel()
						return
					}
					continue
				}
				w.ops++
				w.lat = append(w.lat, e.Sub(s))
			}
		})
	}
	wg.Wait()
	window := l.Duration
	if now := time.Now(); now.Before(t1) {
		// Ended early (errors or ctx): measure what ran.
		window = max(now.Sub(t0), time.Millisecond)
	}
	r := Result{Name: l.Name, Concurrency: l.Concurrency, Seconds: window.Seconds()}
	var all []time.Duration
	for i := range workers {
		w := &workers[i]
		r.Ops += w.ops
		r.Errors += w.bad
		if w.first != nil && r.FirstError == "" {
			r.FirstError = w.first.Error()
		}
		all = append(all, w.lat...)
	}
	slices.Sort(all)
	if l.Watch != nil && window == l.Duration && cpu1.total > 0 {
		r.CPU, r.MachineBusy = cpuPerOp(cpu0, cpu1, r.Ops)
	}
	r.OpsPerSec = math.Round(float64(r.Ops)/window.Seconds()*10) / 10
	r.P50us = micros(Percentile(all, 50))
	r.P99us = micros(Percentile(all, 99))
	if r.Ops == 0 && r.FirstError == "" {
		r.FirstError = "no operation ended inside the measurement window"
	}
	if err := ctx.Err(); err != nil && r.Errors == 0 && time.Now().Before(t1) {
		return r, fmt.Errorf("bench: %s: %w", l.Name, err)
	}
	return r, nil
}
