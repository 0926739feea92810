package bench

import (
	"context"
	"maps"
	"slices"
	"sync/atomic"
	"testing"
	"time"
)

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
