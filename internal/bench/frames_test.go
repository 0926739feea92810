package bench

import (
	"bytes"
	"context"
	"maps"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// TestFrameScanner: frames written by http2.Framer after the client
// preface are found whatever the split of the bytes, payloads skipped.
func TestFrameScanner(t *testing.T) {
	var buf bytes.Buffer
	buf.WriteString(http2.ClientPreface)
	fr := http2.NewFramer(&buf, nil)
	fr.WriteSettings()
	fr.WriteData(1, false, bytes.Repeat([]byte{0}, 300)) // a payload that holds header-like bytes
	fr.WritePing(false, [8]byte{0, 0, 9, 1})
	fr.WriteWindowUpdate(0, 1000)
	fr.WriteData(3, true, []byte("x"))
	want := map[string]int64{"out SETTINGS": 1, "out DATA": 2, "out PING": 1, "out WINDOW_UPDATE": 1}
	for _, step := range []int{1, 2, 7, 9, 10, 1000} {
		c := &frameCounts{}
		s := frameScanner{skip: len(http2.ClientPreface)}
		b := buf.Bytes()
		for len(b) > 0 {
			n := min(step, len(b))
			s.scan(b[:n], func(ft http2.FrameType) { c.add(true, ft) })
			b = b[n:]
		}
		if got := c.snapshot(); !maps.Equal(map[string]int64(got), want) {
			t.Errorf("chunks of %d bytes: frames %v, want %v", step, got, want)
		}
	}
}

func TestPerOp(t *testing.T) {
	a := frameSnapshot{"out DATA": 10, "in DATA": 10, "in SETTINGS": 2}
	b := frameSnapshot{"out DATA": 110, "in DATA": 60, "in SETTINGS": 2, "out PING": 3}
	got := perOp(a, b, 100)
	want := map[string]float64{"out DATA": 1, "in DATA": 0.5, "out PING": 0.03, "in PING": 0,
		"out HEADERS": 0, "in HEADERS": 0, "out WINDOW_UPDATE": 0, "in WINDOW_UPDATE": 0}
	if !maps.Equal(got, want) {
		t.Errorf("perOp = %v, want %v", got, want)
	}
	if got := perOp(a, b, 0); got != nil {
		t.Errorf("perOp with no operation = %v, want nil", got)
	}
}

// TestLoadRunAtWindow: AtWindow is called at the window's start and end,
// and the calls counted between them are the operations counted, give or
// take those in flight at each edge.
func TestLoadRunAtWindow(t *testing.T) {
	var calls atomic.Int64
	var marks []bool
	var at [2]int64
	l := &Load{Name: "sleep", Concurrency: 1, Warmup: 30 * time.Millisecond, Duration: 200 * time.Millisecond,
		Op: func(ctx context.Context, w int) error {
			time.Sleep(2 * time.Millisecond)
			calls.Add(1)
			return nil
		},
		AtWindow: func(end bool) {
			marks = append(marks, end)
			at[len(marks)-1] = calls.Load()
		}}
	r, err := l.Run(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(marks, []bool{false, true}) {
		t.Fatalf("AtWindow calls = %v, want [false true]", marks)
	}
	if d := at[1] - at[0] - r.Ops; d < -1 || d > 1 {
		t.Errorf("calls between the marks %d, operations counted %d; want within one", at[1]-at[0], r.Ops)
	}
}
