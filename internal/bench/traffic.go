package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// streamTraffic is what the keyserver's stream counters say: the messages
// of its Stream calls in each direction and the operations (received) or
// results (sent) they carried, since it started.
type streamTraffic struct {
	received, receivedOps, sent, sentResults float64
}

// parseTraffic reads the stream counters from a Prometheus text
// exposition. It fails unless all four are there.
func parseTraffic(r io.Reader) (streamTraffic, error) {
	var t streamTraffic
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(r)
	if err != nil {
		return t, fmt.Errorf("bench: keyserver metrics: %w", err)
	}
	fields := map[string]*float64{
		"keyless_keyserver_stream_messages_total/received":   &t.received,
		"keyless_keyserver_stream_operations_total/received": &t.receivedOps,
		"keyless_keyserver_stream_messages_total/sent":       &t.sent,
		"keyless_keyserver_stream_operations_total/sent":     &t.sentResults,
	}
	found := 0
	for _, name := range []string{"keyless_keyserver_stream_messages_total", "keyless_keyserver_stream_operations_total"} {
		for _, m := range families[name].GetMetric() {
			for _, l := range m.GetLabel() {
				if f, ok := fields[name+"/"+l.GetValue()]; ok && l.GetName() == "direction" {
					*f = m.GetCounter().GetValue()
					found++
				}
			}
		}
	}
	if found != len(fields) {
		return t, fmt.Errorf("bench: the keyserver's metrics have %d of the %d stream counters", found, len(fields))
	}
	return t, nil
}

// scrapeTraffic reads the stream counters of the keyserver whose metrics
// listener is addr.
func scrapeTraffic(ctx context.Context, addr string) (streamTraffic, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return streamTraffic{}, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return streamTraffic{}, fmt.Errorf("bench: keyserver metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return streamTraffic{}, fmt.Errorf("bench: keyserver metrics: %s", resp.Status)
	}
	return parseTraffic(resp.Body)
}

// sharing sets r's operations per request message and results per
// response message from the counters before and after its run; it leaves
// them unset when no message went either way.
func (r *Result) sharing(before, after streamTraffic) {
	if d := after.received - before.received; d > 0 {
		r.OpsPerRequest = round1((after.receivedOps - before.receivedOps) / d)
	}
	if d := after.sent - before.sent; d > 0 {
		r.ResultsPerResponse = round1((after.sentResults - before.sentResults) / d)
	}
}

// edgeCounters is what the edge's metrics say about refusals and time:
// handshakes shed, by reason, failed keyserver calls, by gRPC code, and
// the keyserver calls' summed duration and count, since it started.
type edgeCounters struct {
	shed, callErrors   map[string]float64
	callSum, callCount float64
	inFlight           float64 // key operations in flight now
}

// parseEdge reads the edge's counters from a Prometheus text exposition.
// It fails unless the shed counter is there (the call error counter has no
// series before the first failure).
func parseEdge(r io.Reader) (edgeCounters, error) {
	c := edgeCounters{shed: map[string]float64{}, callErrors: map[string]float64{}}
	families, err := parseFamilies(r)
	if err != nil {
		return c, fmt.Errorf("bench: edge metrics: %w", err)
	}
	sum := func(name, label string, into map[string]float64) bool {
		f, ok := families[name]
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label {
					into[l.GetValue()] += m.GetCounter().GetValue()
				}
			}
		}
		return ok
	}
	if !sum("keyless_edge_handshakes_shed_total", "reason", c.shed) {
		return c, errors.New("bench: the edge's metrics have no keyless_edge_handshakes_shed_total")
	}
	sum("keyless_edge_keyserver_call_errors_total", "code", c.callErrors)
	c.callSum, c.callCount = histogramTotals(families["keyless_edge_keyserver_call_duration_seconds"], "method", "Sign", "Decrypt")
	c.inFlight = gaugeTotal(families["keyless_edge_key_operations_in_flight"])
	return c, nil
}

// parseFamilies parses a Prometheus text exposition.
func parseFamilies(r io.Reader) (map[string]*dto.MetricFamily, error) {
	parser := expfmt.NewTextParser(model.UTF8Validation)
	return parser.TextToMetricFamilies(r)
}

// histogramTotals returns the sum and count of the series of a histogram
// family (zero for nil) whose labels have one of the given values, or of
// every series when no label is given (as "op", "sign", "decrypt").
func histogramTotals(f *dto.MetricFamily, label string, values ...string) (sum, count float64) {
	for _, m := range f.GetMetric() {
		if label != "" && !slices.ContainsFunc(m.GetLabel(), func(l *dto.LabelPair) bool {
			return l.GetName() == label && slices.Contains(values, l.GetValue())
		}) {
			continue
		}
		sum += m.GetHistogram().GetSampleSum()
		count += float64(m.GetHistogram().GetSampleCount())
	}
	return sum, count
}

// gaugeTotal returns the sum of every series of a gauge family.
func gaugeTotal(f *dto.MetricFamily) float64 {
	var v float64
	for _, m := range f.GetMetric() {
		v += m.GetGauge().GetValue()
	}
	return v
}

// scrape reads the metrics of the listener at addr, as a Prometheus text
// exposition, and hands them to parse.
func scrape[T any](ctx context.Context, addr, what string, parse func(io.Reader) (T, error)) (T, error) {
	var zero T
	if addr == "" {
		return zero, fmt.Errorf("bench: the %s has no metrics listener", what)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return zero, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return zero, fmt.Errorf("bench: %s metrics: %w", what, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return zero, fmt.Errorf("bench: %s metrics: %s", what, resp.Status)
	}
	return parse(resp.Body)
}

// scrapeEdge reads the counters of the edge whose metrics listener is
// addr.
func scrapeEdge(ctx context.Context, addr string) (edgeCounters, error) {
	return scrape(ctx, addr, "edge", parseEdge)
}

// edgeDelta sets r's edge refusals from the counters before and after its
// run: every reason shed, and the failed calls by code (only codes that
// failed); and the keyserver calls' mean duration.
func (r *Result) edgeDelta(before, after edgeCounters) {
	r.EdgeShed = 0
	for reason, v := range after.shed {
		r.EdgeShed += int64(v - before.shed[reason])
	}
	r.EdgeCallErrors = nil
	for code, v := range after.callErrors {
		if d := int64(v - before.callErrors[code]); d > 0 {
			if r.EdgeCallErrors == nil {
				r.EdgeCallErrors = map[string]int64{}
			}
			r.EdgeCallErrors[code] = d
		}
	}
	if n := after.callCount - before.callCount; n > 0 {
		r.EdgeCallMeanMs = round1((after.callSum - before.callSum) / n * 1000)
	}
}

// keyserverTime is what the keyserver's metrics say about where its time
// goes: its operations' summed time from arrival to answer and their
// count, since it started, and the operations waiting for the HSM now.
type keyserverTime struct {
	opSum, opCount, queue, running float64
}

func parseKeyserverTime(r io.Reader) (keyserverTime, error) {
	families, err := parseFamilies(r)
	if err != nil {
		return keyserverTime{}, fmt.Errorf("bench: keyserver metrics: %w", err)
	}
	f, ok := families["keyless_keyserver_operation_duration_seconds"]
	if !ok {
		return keyserverTime{}, errors.New("bench: the keyserver's metrics have no keyless_keyserver_operation_duration_seconds")
	}
	var t keyserverTime
	// Key operations only: a list_keys or tickets call is not a
	// handshake's.
	t.opSum, t.opCount = histogramTotals(f, "op", "sign", "decrypt")
	t.queue = gaugeTotal(families["keyless_keyserver_hsm_queue_depth"])
	t.running = gaugeTotal(families["keyless_keyserver_hsm_operations_running"])
	return t, nil
}

// keyserverDelta sets r's keyserver mean operation time from the counters
// before and after its run.
func (r *Result) keyserverDelta(before, after keyserverTime) {
	if n := after.opCount - before.opCount; n > 0 {
		r.KeyserverOpMeanMs = round1((after.opSum - before.opSum) / n * 1000)
	}
}

// queueSampler reads the keyserver's HSM queue and the edge's key
// operations in flight every queueSampleEvery while a run measures.
type queueSampler struct {
	hsmQueue, edgeInFlight []float64
}

const queueSampleEvery = 100 * time.Millisecond

// run samples from start until ctx ends; a failed reading is skipped.
func (q *queueSampler) run(ctx context.Context, start time.Time, ksAddr, edgeAddr string) {
	t := time.NewTimer(time.Until(start))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if k, err := scrape(ctx, ksAddr, "keyserver", parseKeyserverTime); err == nil {
			q.hsmQueue = append(q.hsmQueue, k.queue)
		}
		if e, err := scrapeEdge(ctx, edgeAddr); err == nil {
			q.edgeInFlight = append(q.edgeInFlight, e.inFlight)
		}
		t.Reset(queueSampleEvery)
	}
}

// meanMax returns the mean and the largest of v, or zeros.
func meanMax(v []float64) (mean, most float64) {
	if len(v) == 0 {
		return 0, 0
	}
	for _, x := range v {
		mean += x
		most = max(most, x)
	}
	return round1(mean / float64(len(v))), most
}

// drainPoll and drainLimit pace and bound waitDrained.
const (
	drainPoll  = 100 * time.Millisecond
	drainLimit = 15 * time.Second
)

// waitDrained waits until the keyserver at addr has nothing waiting for or
// running in the HSM and answered no operation over the last three
// readings, or drainLimit passes, and returns how long that took and how
// many operations it answered meanwhile, starting from the reading from.
// A load that stops leaves operations in the keyserver (their edge gave
// up on them); the next run must not pay for them.
func waitDrained(ctx context.Context, addr string, from keyserverTime) (time.Duration, float64, error) {
	start := time.Now()
	last, quiet := from, 0
	for quiet < 3 {
		if time.Since(start) > drainLimit {
			return time.Since(start), last.opCount - from.opCount, fmt.Errorf("bench: the keyserver still had work %v after the load ended", drainLimit)
		}
		select {
		case <-ctx.Done():
			return time.Since(start), last.opCount - from.opCount, ctx.Err()
		case <-time.After(drainPoll):
		}
		t, err := scrape(ctx, addr, "keyserver", parseKeyserverTime)
		if err != nil {
			return time.Since(start), last.opCount - from.opCount, err
		}
		if t.queue == 0 && t.running == 0 && t.opCount == last.opCount {
			quiet++
		} else {
			quiet = 0
		}
		last = t
	}
	return time.Since(start) - 3*drainPoll, last.opCount - from.opCount, nil
}
