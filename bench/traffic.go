package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// streamTraffic is what the keyserver's stream counters say: the messages
// of its Stream calls in each direction and the operations (received) or
// results (sent) they carried, since it started.
type streamTraffic struct {
	received, receivedOps, sent, sentResults float64
}

// trafficSeries maps the keyserver's metric series to the fields of a
// streamTraffic.
var trafficSeries = map[string]func(*streamTraffic) *float64{
	`keyless_keyserver_stream_messages_total{direction="received"}`:   func(t *streamTraffic) *float64 { return &t.received },
	`keyless_keyserver_stream_operations_total{direction="received"}`: func(t *streamTraffic) *float64 { return &t.receivedOps },
	`keyless_keyserver_stream_messages_total{direction="sent"}`:       func(t *streamTraffic) *float64 { return &t.sent },
	`keyless_keyserver_stream_operations_total{direction="sent"}`:     func(t *streamTraffic) *float64 { return &t.sentResults },
}

// parseTraffic reads the stream counters from a Prometheus text
// exposition. It fails unless all four are there.
func parseTraffic(r io.Reader) (streamTraffic, error) {
	var t streamTraffic
	found := 0
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		series, value, ok := strings.Cut(sc.Text(), " ")
		field, known := trafficSeries[series]
		if !ok || !known {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err != nil {
			return t, fmt.Errorf("bench: metric %s: %w", series, err)
		}
		*field(&t) = v
		found++
	}
	if err := sc.Err(); err != nil {
		return t, err
	}
	if found != len(trafficSeries) {
		return t, fmt.Errorf("bench: the keyserver's metrics have %d of the %d stream counters", found, len(trafficSeries))
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
