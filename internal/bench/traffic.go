package bench

import (
	"context"
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
