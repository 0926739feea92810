package tlscore

import (
	"crypto"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Reasons a handshake is shed, as the reason label of
// keyless_edge_handshakes_shed_total.
const (
	shedKeyOperations = "key_operations" // ServerConfig.MaxKeyOperations reached
	shedClientRate    = "client_rate"    // the client is over HandshakesPerClient
)

// keyOpSlots bounds the key operations in flight at once. It never queues:
// an operation that finds every slot taken is refused. It is safe for
// concurrent use.
type keyOpSlots struct {
	max     int64
	used    atomic.Int64
	metrics *Metrics
}

// acquire takes a slot if one is free, and reports whether it did.
func (s *keyOpSlots) acquire() bool {
	if s.used.Add(1) > s.max {
		s.used.Add(-1)
		return false
	}
	s.metrics.keyOperationStarted()
	return true
}

// release gives back a slot taken by acquire.
func (s *keyOpSlots) release() {
	s.used.Add(-1)
	s.metrics.keyOperationEnded()
}

// keyGuard admits each key operation of a handshake, or refuses it before
// it reaches the keyserver: when the edge already has as many key
// operations in flight as it allows (slots), or when the client is over its
// rate of full handshakes (limit). Either may be nil, for no such check.
// Refusing at once, rather than queueing, keeps a flood from holding
// handshakes open and from building a backlog that the keyservers would
// still work through after the clients have gone. It is safe for
// concurrent use.
type keyGuard struct {
	slots   *keyOpSlots
	limit   *handshakeLimiter
	metrics *Metrics
	logger  hclog.Logger

	// Refusals since each reason was last logged.
	slotsShed, rateShed shedLog
}

// shedLogInterval is the least time between two log lines about refusals
// for one reason: a flood must not turn into a flood of log lines.
const shedLogInterval = time.Minute

// shedLog counts refusals for one reason between log lines.
type shedLog struct {
	last  atomic.Int64 // when the last line was logged, in Unix nanoseconds
	count atomic.Int64 // refusals not logged yet
}

// shed counts one refusal for reason, and logs a warning with what it
// counted if none was logged for that reason within shedLogInterval.
func (g *keyGuard) shed(reason string, l *shedLog, msg string, args ...any) {
	g.metrics.observeShed(reason)
	l.count.Add(1)
	now := time.Now().UnixNano()
	last := l.last.Load()
	if last != 0 && now-last < int64(shedLogInterval) || !l.last.CompareAndSwap(last, now) {
		return
	}
	g.logger.Warn(msg, append(args, "reason", reason, "refused", l.count.Swap(0), "next_report_after", shedLogInterval)...)
}

// admit reports whether the client at addr may make a key operation now;
// if it returns nil, the caller must call done when the operation ends.
// The error says which bound refused it.
func (g *keyGuard) admit(addr net.Addr) error {
	if g.slots != nil && !g.slots.acquire() {
		g.shed(shedKeyOperations, &g.slotsShed, "refusing new handshakes: the edge has as many key operations in flight as it allows",
			"max_key_operations", g.slots.max)
		return fmt.Errorf("tlscore: the edge has %d key operations in flight, the most it allows; handshake refused", g.slots.max)
	}
	if g.limit != nil && !g.limit.allow(addr) {
		if g.slots != nil {
			g.slots.release()
		}
		g.shed(shedClientRate, &g.rateShed, "refusing new handshakes of clients over their rate of full handshakes",
			"handshakes_per_client", float64(g.limit.rate), "handshake_burst", g.limit.burst)
		return fmt.Errorf("tlscore: client %s is over its rate of full handshakes (%g per second); try again later", addr, float64(g.limit.rate))
	}
	return nil
}

// done ends an operation that admit let through.
func (g *keyGuard) done() {
	if g.slots != nil {
		g.slots.release()
	}
}

// guard returns key, which stays a crypto.Decrypter if it is one, with
// each use first admitted for the client at addr: an operation refused
// fails at once, naming the bound, without reaching the keyserver.
func (g *keyGuard) guard(key crypto.Signer, addr net.Addr) crypto.Signer {
	k := guardedKey{Signer: key, g: g, addr: addr}
	if d, ok := key.(crypto.Decrypter); ok {
		return guardedDecrypter{k, d}
	}
	return k
}

type guardedKey struct {
	crypto.Signer
	g    *keyGuard
	addr net.Addr
}

func (k guardedKey) Sign(rand io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := k.g.admit(k.addr); err != nil {
		return nil, err
	}
	defer k.g.done()
	return k.Signer.Sign(rand, digest, opts)
}

type guardedDecrypter struct {
	guardedKey
	d crypto.Decrypter
}

func (k guardedDecrypter) Decrypt(rand io.Reader, msg []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	if err := k.g.admit(k.addr); err != nil {
		return nil, err
	}
	defer k.g.done()
	return k.d.Decrypt(rand, msg, opts)
}
