package signer

import (
	"fmt"
	"math"
	"sync"

	"golang.org/x/time/rate"
)

// Quota bounds what one client identity may ask of the keyserver. Each
// identity has its own counters, even when several share a quota of the
// policy (through a group). The zero value sets no limit.
type Quota struct {
	// MaxInFlight bounds the identity's requests being handled at once,
	// whether running in the HSM or waiting for it. Zero means no bound.
	MaxInFlight int
	// Rate bounds the identity's requests per second, over time, as a
	// token bucket. Zero means no bound.
	Rate float64
	// Burst is the bucket's size: how many requests may arrive at once
	// above Rate. Zero means Rate rounded up, and at least 1. It is ignored
	// without a Rate.
	Burst int
}

// Validate reports whether the quota's values are in range.
func (q Quota) Validate() error { return q.validate("Quota") }

// validate is Validate for a quota that errors call name, such as
// "Config.Quota". Errors are *[ConfigError].
func (q Quota) validate(name string) error {
	switch {
	case q.MaxInFlight < 0:
		return &ConfigError{Field: name + ".MaxInFlight", Value: q.MaxInFlight, Want: "0 (no bound) or more"}
	case q.Rate < 0 || math.IsNaN(q.Rate) || math.IsInf(q.Rate, 0):
		return &ConfigError{Field: name + ".Rate", Value: q.Rate, Want: "0 (no bound) or a positive number of requests per second"}
	case q.Burst < 0:
		return &ConfigError{Field: name + ".Burst", Value: q.Burst, Want: "0 (the rate, rounded up) or more"}
	}
	return nil
}

func (q Quota) burst() int {
	if q.Burst > 0 {
		return q.Burst
	}
	return max(1, int(math.Ceil(q.Rate)))
}

// quotas holds the per-identity counters. Identities reach it only once the
// policy has admitted them, so it holds at most one entry per identity the
// policy has ever listed. It is safe for concurrent use.
type quotas struct {
	mu sync.Mutex
	m  map[string]*identityQuota
}

type identityQuota struct {
	inFlight int
	limiter  *rate.Limiter // nil while the identity's quota has no rate
}

func newQuotas() *quotas { return &quotas{m: make(map[string]*identityQuota)} }

// acquire admits one request of identity under quota q, which is named
// name in errors, or returns a *QuotaError. After a nil error the caller
// must call release exactly once, when the request is done.
func (qs *quotas) acquire(identity, name string, q Quota) (release func(), err error) {
	if q.MaxInFlight == 0 && q.Rate == 0 {
		return func() {}, nil
	}
	qs.mu.Lock()
	defer qs.mu.Unlock()
	iq := qs.m[identity]
	if iq == nil {
		iq = &identityQuota{}
		qs.m[identity] = iq
	}
	if q.MaxInFlight > 0 && iq.inFlight >= q.MaxInFlight {
		return nil, &QuotaError{Identity: identity, Quota: name, Limit: fmt.Sprintf("at most %d %s in flight", q.MaxInFlight, plural(q.MaxInFlight, "request"))}
	}
	if q.Rate > 0 {
		// The policy may have been reloaded with other values: follow it
		// without losing the bucket's state.
		if iq.limiter == nil {
			iq.limiter = rate.NewLimiter(rate.Limit(q.Rate), q.burst())
		} else if iq.limiter.Limit() != rate.Limit(q.Rate) || iq.limiter.Burst() != q.burst() {
			iq.limiter.SetLimit(rate.Limit(q.Rate))
			iq.limiter.SetBurst(q.burst())
		}
		if !iq.limiter.Allow() {
			return nil, &QuotaError{Identity: identity, Quota: name, Limit: fmt.Sprintf("at most %g requests per second, in bursts of at most %d", q.Rate, q.burst())}
		}
	} else {
		iq.limiter = nil
	}
	iq.inFlight++
	var once sync.Once
	return func() {
		once.Do(func() {
			qs.mu.Lock()
			iq.inFlight--
			qs.mu.Unlock()
		})
	}, nil
}

// inFlight returns identity's requests in flight, for tests.
func (qs *quotas) inFlight(identity string) int {
	qs.mu.Lock()
	defer qs.mu.Unlock()
	if iq := qs.m[identity]; iq != nil {
		return iq.inFlight
	}
	return 0
}

func plural(n int, word string) string {
	if n == 1 {
		return word
	}
	return word + "s"
}
