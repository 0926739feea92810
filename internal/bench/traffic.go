package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

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

// edgeCounters is what the edge's metrics say about refusals: handshakes
// shed, by reason, and failed keyserver calls, by gRPC code, since it
// started.
type edgeCounters struct {
	shed, callErrors map[string]float64
}

// parseEdge reads the edge's refusal counters from a Prometheus text
// exposition. It fails unless the shed counter is there (the call error
// counter has no series before the first failure).
func parseEdge(r io.Reader) (edgeCounters, error) {
	c := edgeCounters{shed: map[string]float64{}, callErrors: map[string]float64{}}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(r)
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
	return c, nil
}

// scrapeEdge reads the refusal counters of the edge whose metrics
// listener is addr.
func scrapeEdge(ctx context.Context, addr string) (edgeCounters, error) {
	if addr == "" {
		return edgeCounters{}, errors.New("bench: the edge has no metrics listener")
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return edgeCounters{}, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return edgeCounters{}, fmt.Errorf("bench: edge metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return edgeCounters{}, fmt.Errorf("bench: edge metrics: %s", resp.Status)
	}
	return parseEdge(resp.Body)
}

// edgeDelta sets r's edge refusals from the counters before and after its
// run: every reason shed, and the failed calls by code (only codes that
// failed).
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
}
