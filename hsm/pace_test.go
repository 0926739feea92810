package hsm

import (
	"testing"
	"time"
)

// TestPaceDue checks that a fallback decryption's answer is due at a time
// set by the key's recent history, not by its own duration, unless it is
// slower than that.
func TestPaceDue(t *testing.T) {
	var p pace
	// With no history, an answer is due when the decryption ends.
	if got := p.due(800 * time.Microsecond); got != 800*time.Microsecond {
		t.Fatalf("first due(800µs) = %v, want 800µs", got)
	}
	for range paceRank - 1 {
		p.due(800 * time.Microsecond)
	}
	// A fast (say valid) and a slow (say invalid) decryption are answered
	// at the same time.
	if fast, slow := p.due(700*time.Microsecond), p.due(790*time.Microsecond); fast != slow || fast != 1000*time.Microsecond {
		t.Errorf("due(700µs) = %v, due(790µs) = %v: want both 1ms", fast, slow)
	}
	// A decryption slower than that is answered when it ends; a single
	// stall does not raise the time of those that follow, a few do.
	if got := p.due(20 * time.Millisecond); got != 20*time.Millisecond {
		t.Errorf("due(20ms) = %v, want 20ms", got)
	}
	if got := p.due(500 * time.Microsecond); got != 1000*time.Microsecond {
		t.Errorf("due(500µs) after one stall = %v, want 1ms", got)
	}
	for range paceRank {
		p.due(2 * time.Millisecond)
	}
	if got := p.due(500 * time.Microsecond); got != 2500*time.Microsecond {
		t.Errorf("due(500µs) after a slow spell = %v, want 2.5ms", got)
	}
	// Once the slow ones are out of the window, the time comes back down.
	var got time.Duration
	for range paceWindow + 1 {
		got = p.due(500 * time.Microsecond)
	}
	if got != 625*time.Microsecond {
		t.Errorf("after %d decryptions of 500µs, due = %v, want 625µs", paceWindow, got)
	}
}
