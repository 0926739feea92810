package hsm

import (
	"context"
	"runtime"
	"slices"
	"sync"
	"time"
)

// paceWindow is how many of a key's recent fallback decryptions set the
// time of the next answer, and paceRank which of them, counted from the
// longest: the fourth longest of 256, so that a single stall (a garbage
// collection, a busy CPU) does not slow the answers that follow.
const (
	paceWindow = 256
	paceRank   = 4
)

// pace makes the fallback decryptions of one key (CKM_RSA_PKCS, whose
// padding check is the token's, and may take longer for one kind of
// ciphertext than for another) answer after the same time whatever the
// ciphertext: each waits until its start plus a quarter more than the
// paceRank-th longest of the key's last paceWindow decryptions, valid and
// invalid alike. So the time of an answer depends on the key's history and
// load, not on the ciphertext, unless a decryption takes longer than nearly
// all its recent ones and the margin. It is safe for concurrent use.
type pace struct {
	mu     sync.Mutex
	recent [paceWindow]time.Duration // a ring of durations
	next   int
}

// paceSpin is how long before an answer is due its wait stops sleeping and
// spins: a timer may fire a millisecond or more late (with the kernel's
// timer slack, or a coarse poller timeout), and its lateness can depend on
// how long it was set for, which depends on the decryption's own time.
const paceSpin = 3 * time.Millisecond

// wait records a decryption that began at start and has just ended, and
// waits until its answer is due, or ctx ends.
func (p *pace) wait(ctx context.Context, start time.Time) {
	due := start.Add(p.due(time.Since(start)))
	if d := time.Until(due) - paceSpin; d > 0 {
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		}
	}
	for time.Now().Before(due) && ctx.Err() == nil {
		runtime.Gosched()
	}
}

// due returns when, after its start, the answer of a decryption that took
// d is due: a time set by the decryptions before it, not by d (unless d is
// longer). Then it records d for those that follow.
func (p *pace) due(d time.Duration) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	sorted := p.recent
	slices.Sort(sorted[:])
	high := sorted[paceWindow-paceRank]
	p.recent[p.next] = d
	p.next = (p.next + 1) % paceWindow
	return max(d, high+high/4)
}
