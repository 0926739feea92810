package tlscore

import (
	"context"
	"testing"
	"time"
)

// TestRTTEstimator: the estimate is the shortest operation of the last one
// to two windows, so it follows a path that grows longer, and lapses when
// nothing succeeds.
func TestRTTEstimator(t *testing.T) {
	now := time.Unix(1000, 0)
	e := &rttEstimator{now: func() time.Time { return now }}
	step := func(d time.Duration) { now = now.Add(d) }
	if got := e.get(); got != 0 {
		t.Fatalf("get() with no observation = %v, want 0", got)
	}
	e.observe(90 * time.Millisecond)
	e.observe(81 * time.Millisecond)
	e.observe(300 * time.Millisecond) // queued behind others: not the path
	if got := e.get(); got != 81*time.Millisecond {
		t.Errorf("get() = %v, want the shortest, 81ms", got)
	}
	// The path grows longer: the old minimum still counts for one window.
	step(rttWindow + time.Second)
	e.observe(301 * time.Millisecond)
	if got := e.get(); got != 81*time.Millisecond {
		t.Errorf("get() one window later = %v, want 81ms still", got)
	}
	step(rttWindow)
	e.observe(305 * time.Millisecond)
	if got := e.get(); got != 301*time.Millisecond {
		t.Errorf("get() two windows later = %v, want 301ms", got)
	}
	// Nothing succeeds for two windows: no estimate.
	step(3 * rttWindow)
	if got := e.get(); got != 0 {
		t.Errorf("get() after three idle windows = %v, want 0", got)
	}
	e.observe(0)
	e.observe(-time.Second)
	if got := e.get(); got != 0 {
		t.Errorf("get() after non-positive observations = %v, want 0", got)
	}
}

// TestCallDeadlineFollowsRTT: a call's deadline is the configured timeout
// on a short path and four round trips on a long one, and never later
// than the caller's own deadline.
func TestCallDeadlineFollowsRTT(t *testing.T) {
	tests := []struct {
		name    string
		timeout time.Duration
		rtt     time.Duration // 0: no observation
		far     time.Duration // one keyserver's own round trip; 0: none
		want    time.Duration
	}{
		{"no estimate", 2 * time.Second, 0, 0, 2 * time.Second},
		{"short path", 2 * time.Second, 80 * time.Millisecond, 0, 2 * time.Second},
		{"long path", 2 * time.Second, 700 * time.Millisecond, 0, 2800 * time.Millisecond},
		{"small timeout", 100 * time.Millisecond, 50 * time.Millisecond, 0, 200 * time.Millisecond},
		{"one keyserver far", 2 * time.Second, 10 * time.Millisecond, 700 * time.Millisecond, 2800 * time.Millisecond},
		{"one keyserver near", 2 * time.Second, 10 * time.Millisecond, 10 * time.Millisecond, 2 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &Client{timeout: tt.timeout}
			c.rtt.observe(tt.rtt)
			c.streams = newOpStreams(c, 2)
			c.streams.rtt("near:1").observe(tt.rtt)
			c.streams.rtt("far:1").observe(tt.far)
			before := time.Now()
			ctx, cancel := c.callContext(t.Context())
			defer cancel()
			dl, ok := ctx.Deadline()
			if !ok {
				t.Fatal("callContext() has no deadline")
			}
			if got := dl.Sub(before); got < tt.want || got > tt.want+time.Second {
				t.Errorf("callContext() deadline in %v, want %v", got, tt.want)
			}
			// A caller's sooner deadline wins.
			short, stop := context.WithTimeout(t.Context(), 10*time.Millisecond)
			defer stop()
			ctx2, cancel2 := c.callContext(short)
			defer cancel2()
			if dl2, _ := ctx2.Deadline(); dl2.Sub(before) > 10*time.Millisecond+time.Second/2 {
				t.Errorf("callContext() with a caller deadline in 10ms has its deadline in %v", dl2.Sub(before))
			}
		})
	}
}
