package tlscore

import (
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/time/rate"
)

// maxRateLimitedClients bounds the clients a handshakeLimiter tracks. Beyond
// it, clients it does not know yet are not limited (see allow).
const maxRateLimitedClients = 1 << 16

// handshakeLimiter limits the full handshakes of each client: each costs a
// keyserver operation before the client has proved anything, so one client
// could otherwise spend the keyservers' and HSM's capacity. A client is an
// IPv4 address or an IPv6 /56, the least a network usually hands a
// customer. It is safe for concurrent use.
type handshakeLimiter struct {
	rate   rate.Limit
	burst  int
	logger hclog.Logger

	mu         sync.Mutex
	clients    map[netip.Prefix]*clientBucket
	lastSweep  time.Time
	lastWarned time.Time // that the table was full
}

type clientBucket struct {
	limiter *rate.Limiter
	seen    time.Time
}

func newHandshakeLimiter(perSecond float64, burst int, logger hclog.Logger) *handshakeLimiter {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	return &handshakeLimiter{rate: rate.Limit(perSecond), burst: burst, logger: logger, clients: make(map[netip.Prefix]*clientBucket)}
}

// allow reports whether the client at addr may make a full handshake now,
// and takes one from its allowance if so. Addresses that are not IP
// addresses are not limited, nor, while maxRateLimitedClients are tracked,
// clients not tracked yet: the limiter is a first line against a few
// clients, not a defence against a distributed attack, and should not turn
// into a denial of service itself.
func (l *handshakeLimiter) allow(addr net.Addr) bool {
	client, ok := clientOf(addr)
	if !ok {
		return true
	}
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.lastSweep) > time.Second {
		l.sweep(now)
	}
	b := l.clients[client]
	if b == nil {
		if len(l.clients) >= maxRateLimitedClients {
			if now.Sub(l.lastWarned) > time.Minute {
				l.lastWarned = now
				l.logger.Warn("the handshake limiter tracks as many clients as it may; new clients are not limited until some are forgotten",
					"clients", len(l.clients), "forgotten_after", l.refill())
			}
			return true
		}
		b = &clientBucket{limiter: rate.NewLimiter(l.rate, l.burst)}
		l.clients[client] = b
	}
	b.seen = now
	return b.limiter.AllowN(now, 1)
}

// sweep forgets clients whose allowance has refilled: tracking them again
// starts them full, as they are.
func (l *handshakeLimiter) sweep(now time.Time) {
	refill := l.refill()
	for c, b := range l.clients {
		if now.Sub(b.seen) > refill {
			delete(l.clients, c)
		}
	}
	l.lastSweep = now
}

// refill is how long an empty allowance takes to fill up.
func (l *handshakeLimiter) refill() time.Duration {
	return time.Duration(float64(l.burst) / float64(l.rate) * float64(time.Second))
}

// clientOf returns the client an address belongs to: the IPv4 address, or
// the IPv6 /56.
func clientOf(addr net.Addr) (netip.Prefix, bool) {
	tcp, ok := addr.(*net.TCPAddr)
	if !ok {
		return netip.Prefix{}, false
	}
	ip, ok := netip.AddrFromSlice(tcp.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ip = ip.Unmap()
	bits := 32
	if ip.Is6() {
		bits = 56
	}
	p, err := ip.Prefix(bits)
	return p, err == nil
}
