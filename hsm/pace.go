package hsm

import (
	"context"
	"sync"
	"time"
)

// paceDecay is how much of its high-water mark a pace keeps at each
// sample: after a slow spell, the mark comes down by half in about 140
// decryptions.
const paceDecay = 0.995

// pace makes the fallback decryptions of one key (CKM_RSA_PKCS, whose
// padding check is the token's, and may take longer for one kind of
// ciphertext than for another) answer after the same time whatever the
// ciphertext: each waits until its start plus an eighth more than a
// decaying high-water mark of the durations of the key's recent
// decryptions, valid and invalid alike. So the time of an answer depends on
// the key's history and load, not on the ciphertext, unless a decryption
// takes longer than all its recent ones and the margin. It is safe for
// concurrent use.
type pace struct {
	mu   sync.Mutex
	high time.Duration
}

// wait records a decryption that began at start and has just ended, and
// waits until its answer is due, or ctx ends.
func (p *pace) wait(ctx context.Context, start time.Time) {
	t := time.NewTimer(time.Until(start.Add(p.due(time.Since(start)))))
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// due records a decryption that took d and returns when, after its start,
// its answer is due.
func (p *pace) due(d time.Duration) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.high = max(d, time.Duration(float64(p.high)*paceDecay))
	return p.high + p.high/8
}
