package link

import (
	"crypto/tls"
	"errors"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/time/rate"
)

// Rates of the refusal log.
const (
	refusalLogPerSource   = 1  // lines per second per source address
	refusalLogSourceBurst = 5  // lines a source may log at once
	refusalLogTotal       = 50 // lines per second from all sources
	refusalLogSources     = 4096
)

// refusalLog logs refused handshakes, bounded in size and rate: whoever
// can reach the keyserver's port can make it refuse handshakes, and the
// log must not become a way to fill a disk. It is safe for concurrent use.
type refusalLog struct {
	logger hclog.Logger
	obs    HandshakeObserver
	total  *rate.Limiter

	mu      sync.Mutex
	sources map[string]*refusalSource
}

// refusalSource is the log's state for one source address.
type refusalSource struct {
	limiter    *rate.Limiter
	suppressed int // refusals not logged since the last line
}

func newRefusalLog(logger hclog.Logger, obs HandshakeObserver) *refusalLog {
	return &refusalLog{
		logger:  logger,
		obs:     obs,
		total:   rate.NewLimiter(refusalLogTotal, refusalLogTotal),
		sources: make(map[string]*refusalSource),
	}
}

// record counts and, within the rates, logs the refused handshake of a
// connection from addr.
func (r *refusalLog) record(addr net.Addr, err error) {
	reason := refusalReason(err)
	if r.obs.Refused != nil {
		r.obs.Refused(reason)
	}
	remote, source := "unknown", "unknown"
	if addr != nil {
		remote = addr.String()
		source = remote
		if host, _, err := net.SplitHostPort(remote); err == nil {
			source = host
		}
	}
	if reason == "closed_early" {
		r.logger.Debug("connection closed before the TLS handshake", "remote_address", remote)
		return
	}
	suppressed, ok := r.allow(source, time.Now())
	if !ok {
		if r.obs.LogSuppressed != nil {
			r.obs.LogSuppressed()
		}
		return
	}
	var (
		refused *ClientRefusedError
		verr    *tls.CertificateVerificationError
		names   []string
		why     = err
	)
	switch {
	case errors.As(err, &refused):
		names, why = refused.Names, refused.Err
	case errors.As(err, &verr) && len(verr.UnverifiedCertificates) > 0:
		names = presentedNames(verr.UnverifiedCertificates[0])
	}
	args := []any{"remote_address", remote, "presented_names", boundedNames(names), "reason", cut(why.Error(), maxLoggedReason)}
	if suppressed > 0 {
		args = append(args, "suppressed_since_last", suppressed)
	}
	r.logger.Warn("client refused in the TLS handshake", args...)
}

// allow reports whether a refusal from source may be logged at now, and
// how many of its refusals were not logged since its last line.
func (r *refusalLog) allow(source string, now time.Time) (suppressed int, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.sources[source]
	if s == nil {
		if len(r.sources) >= refusalLogSources {
			// Forget every source rather than grow: a source forgotten
			// gets a fresh burst, still within the total rate.
			clear(r.sources)
		}
		s = &refusalSource{limiter: rate.NewLimiter(refusalLogPerSource, refusalLogSourceBurst)}
		r.sources[source] = s
	}
	if !s.limiter.AllowN(now, 1) || !r.total.AllowN(now, 1) {
		s.suppressed++
		return 0, false
	}
	suppressed, s.suppressed = s.suppressed, 0
	return suppressed, true
}
