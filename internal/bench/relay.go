package bench

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// RelayConfig configures a [Relay].
type RelayConfig struct {
	// Target is the host:port every accepted connection is forwarded to.
	Target string
	// RTT is the round-trip time the relay adds at first: each direction
	// holds every byte for RTT/2 before writing it on. Zero forwards at
	// once (the relay still costs its copies). [Relay.SetRTT] changes it.
	RTT time.Duration
	// Bandwidth caps each direction of each connection, in bytes per
	// second; zero means no cap.
	Bandwidth int64
}

// Validate reports a configuration the relay cannot run with.
func (c RelayConfig) Validate() error {
	switch {
	case c.Target == "":
		return errors.New("bench: relay: no target address")
	case c.RTT < 0:
		return fmt.Errorf("bench: relay: RTT %v is negative", c.RTT)
	case c.Bandwidth < 0:
		return fmt.Errorf("bench: relay: bandwidth %d bytes/s is negative", c.Bandwidth)
	}
	if _, _, err := net.SplitHostPort(c.Target); err != nil {
		return fmt.Errorf("bench: relay: target %q: %w", c.Target, err)
	}
	return nil
}

// relayQueueChunks bounds the chunks one direction holds in flight; a
// reader that fills it waits, so that the relay's memory stays bounded
// (at most relayQueueChunks × relayChunk bytes per direction) and a sender
// faster than the delay sees TCP back-pressure, as it would on a long path.
const (
	relayQueueChunks = 4096
	relayChunk       = 32 << 10
)

// Relay is a TCP proxy on 127.0.0.1 that adds a delay, and
// optionally a bandwidth cap, to each direction of every connection: the
// user-space stand-in for a long network path, since netem is not
// available everywhere. It stops when the context given to [StartRelay]
// ends or when Close is called, whichever comes first, and closes every
// connection it relays. Its RTT can be changed while it runs
// ([Relay.SetRTT]), so that runs at several distances share one relay and
// the connections through it. It is safe for concurrent use.
type Relay struct {
	cfg    RelayConfig
	rtt    atomic.Int64 // the round trip added, in nanoseconds
	ln     net.Listener
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once

	mu    sync.Mutex
	conns map[net.Conn]struct{}

	// maxUp and maxDown are the most bytes held in the relay at once in
	// each direction (client to target, target to client), over all
	// connections: what the endpoints' flow control let through.
	inUp, inDown, maxUp, maxDown atomic.Int64
}

// StartRelay listens on 127.0.0.1 (a free port) and relays every
// connection to cfg.Target until ctx ends or Close is called. It returns
// an error for an invalid cfg or when it cannot listen.
func StartRelay(ctx context.Context, cfg RelayConfig) (*Relay, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("bench: relay: %w", err)
	}
	r := &Relay{cfg: cfg, ln: ln, conns: map[net.Conn]struct{}{}}
	r.rtt.Store(int64(cfg.RTT))
	r.ctx, r.cancel = context.WithCancel(ctx)
	r.wg.Go(r.accept)
	go func() {
		<-r.ctx.Done()
		r.shut()
	}()
	return r, nil
}

// Addr returns the relay's listening address, host:port.
func (r *Relay) Addr() string { return r.ln.Addr().String() }

// SetRTT changes the round-trip time the relay adds, for every connection,
// open or new. It applies to bytes read after the call; bytes already held
// keep the delay they were read with, and bytes always leave in the order
// they came, so a shorter RTT takes effect once the older bytes are out.
// It returns an error, and changes nothing, for a negative rtt.
func (r *Relay) SetRTT(rtt time.Duration) error {
	if rtt < 0 {
		return fmt.Errorf("bench: relay: RTT %v is negative", rtt)
	}
	r.rtt.Store(int64(rtt))
	return nil
}

// RTT returns the round-trip time the relay adds now.
func (r *Relay) RTT() time.Duration { return time.Duration(r.rtt.Load()) }

// ResetMaxInFlight starts MaxInFlight's count again from what is held now,
// so that one run's figure is not another's.
func (r *Relay) ResetMaxInFlight() {
	r.maxUp.Store(r.inUp.Load())
	r.maxDown.Store(r.inDown.Load())
}

// MaxInFlight returns the most bytes the relay held at once in each
// direction: up (towards the target) and down (back to the clients).
func (r *Relay) MaxInFlight() (up, down int64) { return r.maxUp.Load(), r.maxDown.Load() }

// Close stops the relay, closes every connection it relays and waits for
// its goroutines. It may be called more than once.
func (r *Relay) Close() error {
	r.cancel()
	r.shut()
	r.wg.Wait()
	return nil
}

// shut closes the listener and every relayed connection, once.
func (r *Relay) shut() {
	r.once.Do(func() {
		r.ln.Close()
		r.mu.Lock()
		for c := range r.conns {
			c.Close()
		}
		r.conns = nil
		r.mu.Unlock()
	})
}

// track records c so that shut closes it, or closes it at once and
// returns false if the relay is shutting down.
func (r *Relay) track(c net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.conns == nil {
		c.Close()
		return false
	}
	r.conns[c] = struct{}{}
	return true
}

func (r *Relay) untrack(c net.Conn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.conns != nil {
		delete(r.conns, c)
	}
	c.Close()
}

func (r *Relay) accept() {
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return // closed by shut
		}
		if !r.track(c) {
			return
		}
		r.wg.Go(func() { r.relay(c) })
	}
}

// relay connects to the target and copies both ways until both
// directions end; a direction that ends half-closes the other side.
func (r *Relay) relay(client net.Conn) {
	defer r.untrack(client)
	var d net.Dialer
	target, err := d.DialContext(r.ctx, "tcp", r.cfg.Target)
	if err != nil {
		return
	}
	if !r.track(target) {
		return
	}
	defer r.untrack(target)
	var wg sync.WaitGroup
	wg.Go(func() { r.pipe(target, client, &r.inUp, &r.maxUp) })
	wg.Go(func() { r.pipe(client, target, &r.inDown, &r.maxDown) })
	wg.Wait()
}

// chunk is bytes read from one side, due to be written at due.
type chunk struct {
	b   []byte
	due time.Time
}

// pipe copies src to dst, holding each chunk for half the relay's RTT at
// the time it was read, and pacing writes to the bandwidth cap. in and max
// count the bytes held.
func (r *Relay) pipe(dst, src net.Conn, in, max *atomic.Int64) {
	q := make(chan chunk, relayQueueChunks)
	go func() {
		defer close(q)
		for {
			b := make([]byte, relayChunk)
			n, err := src.Read(b)
			if n > 0 {
				held := in.Add(int64(n))
				for m := max.Load(); held > m && !max.CompareAndSwap(m, held); m = max.Load() {
				}
				select {
				case q <- chunk{b: b[:n], due: time.Now().Add(r.RTT() / 2)}:
				case <-r.ctx.Done():
					in.Add(-int64(n))
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	var next time.Time // the earliest the bandwidth cap lets the next write start
	timer := time.NewTimer(0)
	<-timer.C
	defer timer.Stop()
	failed := false
	for c := range q {
		at := c.due
		if next.After(at) {
			at = next
		}
		if wait := time.Until(at); wait > 0 && !failed {
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-r.ctx.Done():
				failed = true
			}
		}
		if !failed {
			if _, err := dst.Write(c.b); err != nil {
				failed = true
			}
		}
		in.Add(-int64(len(c.b)))
		if r.cfg.Bandwidth > 0 {
			start := time.Now()
			if next.After(start) {
				start = next
			}
			next = start.Add(time.Duration(int64(len(c.b)) * int64(time.Second) / r.cfg.Bandwidth))
		}
		if failed {
			// Unblock the reader: the other side is gone.
			src.Close()
		}
	}
	if failed {
		return
	}
	// src ended: pass the end on once everything read before it is written.
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	} else {
		dst.Close()
	}
}

// relayFlags put a [Relay] between a client and its keyserver.
type relayFlags struct {
	on        bool
	rtt       time.Duration
	bandwidth int64
}

func (f *relayFlags) register(fs *flag.FlagSet) {
	fs.BoolVar(&f.on, "link-relay", false, "put the relay in even at -link-rtt 0, to compare runs through the same relay")
	fs.DurationVar(&f.rtt, "link-rtt", 0, "put a relay on 127.0.0.1 between client and keyserver that delays each direction by half this round-trip time (0: no relay)")
	fs.Int64Var(&f.bandwidth, "link-bandwidth", 0, "with -link-rtt, cap each direction of the relay to this many bytes per second (0: no cap)")
}

// start starts a relay to addr if -link-relay, -link-rtt or
// -link-bandwidth is set and returns the
// address to dial: the relay's, or addr itself. The relay stops with ctx.
func (f *relayFlags) start(ctx context.Context, addr string) (string, *Relay, error) {
	if f.rtt < 0 {
		return "", nil, fmt.Errorf("bench: -link-rtt %v: must not be negative", f.rtt)
	}
	if f.bandwidth < 0 {
		return "", nil, fmt.Errorf("bench: -link-bandwidth %d: must not be negative", f.bandwidth)
	}
	if !f.on && f.rtt == 0 && f.bandwidth == 0 {
		return addr, nil, nil
	}
	r, err := StartRelay(ctx, RelayConfig{Target: addr, RTT: f.rtt, Bandwidth: f.bandwidth})
	if err != nil {
		return "", nil, err
	}
	return r.Addr(), r, nil
}
