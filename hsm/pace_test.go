package hsm

import (
	"testing"
	"time"
)

// TestPaceDue checks that a fallback decryption's answer is due at a time
// set by the key's history, not by its own duration, unless it is slower
// than every recent one.
func TestPaceDue(t *testing.T) {
	var p pace
	if got := p.due(800 * time.Microsecond); got != 900*time.Microsecond {
		t.Fatalf("first due(800µs) = %v, want 900µs", got)
	}
	// A fast (say valid) and a slow (say invalid) decryption right after
	// are answered at the same time.
	fast, slow := p.due(700*time.Microsecond), p.due(790*time.Microsecond)
	if d := (fast - slow).Abs(); d > fast/100 {
		t.Errorf("due(700µs) = %v, due(790µs) = %v: want the same, within the decay", fast, slow)
	}
	if fast < 790*time.Microsecond {
		t.Errorf("due(700µs) = %v: want after any recent duration", fast)
	}
	// A slower one raises the mark for those that follow.
	if got := p.due(2 * time.Millisecond); got != 2250*time.Microsecond {
		t.Errorf("due(2ms) = %v, want 2.25ms", got)
	}
	// The mark decays: after many quick decryptions it comes back down.
	var got time.Duration
	for range 2000 {
		got = p.due(500 * time.Microsecond)
	}
	if got != 562500*time.Nanosecond {
		t.Errorf("after 2000 decryptions of 500µs, due = %v, want 562.5µs", got)
	}
}
