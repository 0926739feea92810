package tlscore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// The client sends Sign and Decrypt as operations on KeylessService.Stream:
// a few long-lived streams per Client, on which whatever operations are
// pending when the stream's sender is free go out in one message, and
// results come back batched the same way. Compared with a unary call per
// operation this saves the per-call HTTP/2 stream, headers and goroutines
// on both sides (see BENCHMARKS.md). Keyservers that do not implement
// Stream (UNIMPLEMENTED) are called with the unary RPCs instead.

// streamMaxAge is how long a stream takes new operations. An older stream
// is replaced by a new one, which the balancer places on any keyserver that
// is ready, so that streams spread again over keyservers that came back or
// were added; the old one closes once its last result has arrived.
var streamMaxAge = 30 * time.Second

// streamQueue bounds the operations waiting for a stream's sender.
const streamQueue = 1024

// A stream whose results stop coming while operations wait on it is taken
// for a path or keyserver that stopped answering: it is ended, its
// operations are sent again on a stream to another keyserver within their
// deadline, and its keyserver gets no new streams for suspectFor. A stream
// is stalled when an operation has waited stallRTTs round trips of its
// keyserver (its fastest recent operation), and at least stallMin, with no
// result at all arriving on the stream meanwhile; with no round trip
// measured yet, half of what remains of the operation's deadline. Two
// round trips leave one for the retry within a deadline of
// rttDeadlineFactor. A busy keyserver still returns results on the stream,
// so load alone does not stall it. Only a Client that can reach more than
// one keyserver does this: with one, the operation could only wait on the
// same connection again.
const (
	stallRTTs = 2
	stallMin  = 500 * time.Millisecond
)

// suspectFor is how long a keyserver whose stream stalled gets no new
// streams, unless a result from it arrives sooner. Short, so that a
// keyserver taken for silent by mistake (a pause of the edge's own
// process, say) is used again soon; one that is really silent stalls the
// next stream it gets, and is suspect again, until keepalive drops its
// connection.
const suspectFor = 5 * time.Second

// opStreams is the Client's set of streams, used round-robin.
type opStreams struct {
	c     *Client
	slots []streamSlot
	next  atomic.Uint32
	// unary is set once a keyserver answered Stream with UNIMPLEMENTED.
	unary atomic.Bool

	// failover turns on stall detection: the Client may reach several
	// keyservers.
	failover bool

	mu sync.Mutex
	// rtts estimates each keyserver's round trip, by metrics label.
	rtts map[string]*rttEstimator
	// suspects maps keyservers whose stream stalled to when they may have
	// streams again.
	suspects map[string]time.Time
	// anySuspect is len(suspects) > 0, read without mu on each result.
	anySuspect atomic.Bool
}

type streamSlot struct {
	mu sync.Mutex
	st *clientStream
}

// errUseUnary means the keyserver does not implement Stream.
var errUseUnary = errors.New("tlscore: the keyserver does not implement Stream")

// errStreamClosed means a stream takes no new operations; do picks
// another without counting an attempt.
var errStreamClosed = errors.New("tlscore: stream closed")

func newOpStreams(c *Client, n int) *opStreams {
	return &opStreams{c: c, slots: make([]streamSlot, n), rtts: map[string]*rttEstimator{}, suspects: map[string]time.Time{}}
}

// rtt returns the round-trip estimator of keyserver ks.
func (p *opStreams) rtt(ks string) *rttEstimator {
	p.mu.Lock()
	defer p.mu.Unlock()
	e := p.rtts[ks]
	if e == nil {
		e = &rttEstimator{}
		p.rtts[ks] = e
	}
	return e
}

// farthest returns the longest of the keyservers' round-trip estimates, 0
// if none has one. p may be nil.
func (p *opStreams) farthest() time.Duration {
	if p == nil {
		return 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	var d time.Duration
	for _, e := range p.rtts {
		d = max(d, e.get())
	}
	return d
}

// stallAfter returns how long an operation sent now on a stream to a
// keyserver whose round trip is rtt may wait with no result arriving on
// that stream before the stream counts as stalled, or 0 when streams are
// not watched.
func (p *opStreams) stallAfter(ctx context.Context, rtt *rttEstimator) time.Duration {
	if !p.failover {
		return 0
	}
	if r := rtt.get(); r > 0 {
		return max(stallMin, stallRTTs*r)
	}
	if d, ok := ctx.Deadline(); ok {
		return max(stallMin, time.Until(d)/2)
	}
	return 0
}

// suspect keeps new streams away from keyserver ks for suspectFor.
func (p *opStreams) suspect(ks string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.suspects[ks] = time.Now().Add(suspectFor)
	p.anySuspect.Store(true)
}

// suspected reports whether keyserver ks is suspect.
func (p *opStreams) suspected(ks string) bool {
	if !p.anySuspect.Load() {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	until, ok := p.suspects[ks]
	if ok && time.Now().After(until) {
		delete(p.suspects, ks)
		p.anySuspect.Store(len(p.suspects) > 0)
		return false
	}
	return ok
}

// answered clears the suspicion of keyserver ks: a result came from it.
func (p *opStreams) answered(ks string) {
	if !p.anySuspect.Load() {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.suspects, ks)
	p.anySuspect.Store(len(p.suspects) > 0)
}

// do performs op on a stream and returns its result and the keyserver that
// answered. Like the unary calls' retry policy, it tries a second stream,
// preferably on another keyserver, when the first ended before answering
// or answered UNAVAILABLE. It returns errUseUnary when the keyserver does
// not implement Stream.
func (p *opStreams) do(ctx context.Context, op *keylessv1.Operation) (*keylessv1.OperationResult, string, error) {
	var (
		tried   *clientStream
		lastErr error
		ks      = "none"
	)
	// A stream may stop taking operations between pick and do; such a
	// pick does not count as an attempt, up to a few times.
	for attempts, picks := 0, 0; attempts < 2 && picks < 5; picks++ {
		st, err := p.pick(ctx, tried)
		if err != nil {
			if lastErr == nil || ctx.Err() != nil {
				lastErr = err
			}
			break
		}
		ks = st.keyserver
		// Only the first attempt is watched for a stall: the second has
		// no third to go to, and waiting for its answer (a keyserver that
		// is slow, not silent) beats failing it early.
		r, err := st.do(ctx, op, attempts == 0)
		switch {
		case errors.Is(err, errStreamClosed):
			continue
		case status.Code(err) == codes.Unimplemented:
			p.unary.Store(true)
			return nil, ks, errUseUnary
		case err == nil && r.GetError().GetCode() == uint32(codes.Unavailable):
			// The keyserver cannot use its HSM now: take new operations to a
			// keyserver that can.
			st.retire()
			lastErr = status.Error(codes.Unavailable, r.GetError().GetMessage())
		case err == nil:
			return r, ks, nil
		case ctx.Err() != nil:
			return nil, ks, err
		default:
			lastErr = err
		}
		if attempts == 0 && p.c.metrics != nil {
			p.c.metrics.callRetries.WithLabelValues(ks, status.Code(lastErr).String()).Inc()
		}
		tried = st
		attempts++
	}
	if lastErr == nil {
		lastErr = status.Error(codes.Unavailable, "no keyserver stream took the operation")
	}
	return nil, ks, lastErr
}

// pick returns a stream that is open, waiting for ctx at most. For a retry
// (avoid set) it prefers an open stream to another keyserver than avoid's,
// then any other open stream; otherwise it takes the next slot in turn,
// replacing its stream if that one no longer takes operations. A new stream
// that lands on a suspect keyserver (or, for a retry, on avoid's) is
// replaced by another, which the balancer places on the next keyserver, a
// few times.
func (p *opStreams) pick(ctx context.Context, avoid *clientStream) (*clientStream, error) {
	n := len(p.slots)
	i := int(p.next.Add(1) % uint32(n))
	if avoid != nil {
		var fallback *clientStream
		for k := range n {
			slot := &p.slots[(i+k)%n]
			slot.mu.Lock()
			st := slot.st
			slot.mu.Unlock()
			if st == nil || st == avoid || !st.usable() {
				continue
			}
			if st.opened() && st.keyserver != avoid.keyserver && !p.suspected(st.keyserver) {
				return st.wait(ctx)
			}
			if fallback == nil {
				fallback = st
			}
		}
		if fallback != nil && !p.failover {
			return fallback.wait(ctx)
		}
	}
	slot := &p.slots[i]
	for tries := 0; ; tries++ {
		slot.mu.Lock()
		st := slot.st
		// A stream to a suspect keyserver takes no new operations either:
		// its own stall would only be found later.
		if st == nil || st == avoid || !st.usable() || (st.opened() && p.suspected(st.keyserver)) {
			if st != nil {
				st.retire()
			}
			st = p.c.openStream()
			slot.st = st
		}
		slot.mu.Unlock()
		st, err := st.wait(ctx)
		if err != nil || !p.failover || tries >= 2*n {
			return st, err
		}
		if !p.suspected(st.keyserver) && (avoid == nil || st.keyserver != avoid.keyserver) {
			return st, nil
		}
		// Any stream but this one: the next goes to another keyserver.
		st.retire()
	}
}

// close ends every stream.
func (p *opStreams) close() {
	for i := range p.slots {
		slot := &p.slots[i]
		slot.mu.Lock()
		if slot.st != nil {
			slot.st.cancel()
		}
		slot.mu.Unlock()
	}
}

// clientStream is the edge's side of one KeylessService.Stream call (the
// keyserver's side is signer's serverStream). A sender goroutine batches
// queued operations into messages; a receiver goroutine hands each result
// to the operation waiting for it.
type clientStream struct {
	ctx     context.Context // the stream's; cancel ends it
	cancel  context.CancelFunc
	born    time.Time
	streams *opStreams

	ready     chan struct{} // closed once the stream is open or failed to open
	openErr   error
	stream    grpc.BidiStreamingClient[keylessv1.StreamRequest, keylessv1.StreamResponse]
	keyserver string        // metrics label of the keyserver
	rtt       *rttEstimator // the keyserver's round trip

	queue chan *keylessv1.Operation // to the sender

	mu      sync.Mutex
	pending map[uint64]*pendingOp // sent or queued, not yet answered
	nextID  uint64
	err     error // why the stream ended; nil while it is open
	retired bool  // takes no new operations, closes when pending is empty
	// lastResult is when the latest result message arrived.
	lastResult time.Time
}

// pendingOp is an operation waiting for its result.
type pendingOp struct {
	// done receives the result, or nil if the stream ended first.
	done chan *keylessv1.OperationResult
}

// openStream starts opening a stream; it is usable once ready is closed.
func (c *Client) openStream() *clientStream {
	ctx, cancel := context.WithCancel(c.streamsCtx)
	st := &clientStream{
		ctx:       ctx,
		cancel:    cancel,
		born:      time.Now(),
		streams:   c.streams,
		ready:     make(chan struct{}),
		keyserver: "none",
		queue:     make(chan *keylessv1.Operation, streamQueue),
		pending:   make(map[uint64]*pendingOp),
	}
	go func() {
		s, err := c.api.Stream(ctx)
		if err != nil {
			st.openErr = err
			st.fail(err)
			close(st.ready)
			return
		}
		st.stream = s
		if pr, ok := peer.FromContext(s.Context()); ok {
			st.keyserver = c.keyserverLabel(pr.Addr)
		}
		st.rtt = c.streams.rtt(st.keyserver)
		close(st.ready)
		go st.send()
		st.receive()
	}()
	return st
}

// wait waits until st is open, or ctx ends.
func (st *clientStream) wait(ctx context.Context) (*clientStream, error) {
	select {
	case <-st.ready:
		if st.openErr != nil {
			return nil, st.openErr
		}
		return st, nil
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
}

// opened reports whether st is open (or failed to open) without waiting.
func (st *clientStream) opened() bool {
	select {
	case <-st.ready:
		return true
	default:
		return false
	}
}

// usable reports whether st takes new operations.
func (st *clientStream) usable() bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.err == nil && !st.retired && time.Since(st.born) < streamMaxAge
}

// retire makes st take no new operations; it closes once the pending ones
// are answered.
func (st *clientStream) retire() {
	st.mu.Lock()
	st.retired = true
	idle := len(st.pending) == 0
	st.mu.Unlock()
	if idle {
		st.cancel()
	}
}

// do sends op on st and waits for its result or ctx; with watch, it ends
// st as stalled if no result arrives on st for too long (see stallMin).
// The error is errStreamClosed if st takes no new operations, the stream's
// error (as a status) if it ended before the result came, or ctx's.
func (st *clientStream) do(ctx context.Context, op *keylessv1.Operation, watch bool) (*keylessv1.OperationResult, error) {
	p := &pendingOp{done: make(chan *keylessv1.OperationResult, 1)}
	st.mu.Lock()
	if st.err != nil || st.retired {
		st.mu.Unlock()
		return nil, errStreamClosed
	}
	st.nextID++
	id := st.nextID
	st.pending[id] = p
	st.mu.Unlock()

	// A copy, so that a retry on another stream does not share it with
	// this stream's sender.
	select {
	case st.queue <- &keylessv1.Operation{Id: id, TimeoutMs: timeoutMs(ctx), Request: op.GetRequest()}:
	case <-ctx.Done():
		st.forget(id)
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	sent := time.Now()
	// A nil stalled never fires: the stream is not watched.
	var stalled <-chan time.Time
	var stallAfter time.Duration
	if watch {
		stallAfter = st.streams.stallAfter(ctx, st.rtt)
	}
	if stallAfter > 0 {
		timer := time.NewTimer(stallAfter)
		defer timer.Stop()
		stalled = timer.C
	}
	for {
		select {
		case r := <-p.done:
			return st.result(r, sent)
		case <-stalled:
			if wait := st.silentFor(sent, stallAfter); wait > 0 {
				stalled = time.After(wait)
				continue
			}
			st.stall(stallAfter)
			return st.result(<-p.done, sent)
		case <-ctx.Done():
			st.forget(id)
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
}

// result is what do returns for r, the result of an operation sent at
// sent, or nil if the stream ended first.
func (st *clientStream) result(r *keylessv1.OperationResult, sent time.Time) (*keylessv1.OperationResult, error) {
	if r == nil {
		return nil, st.endErr()
	}
	st.rtt.observe(time.Since(sent))
	return r, nil
}

// silentFor returns how much longer than now an operation sent at sent
// must wait for st to count as stalled: after has to pass with no result
// arriving on st since sent. It is 0 or less once st is stalled.
func (st *clientStream) silentFor(sent time.Time, after time.Duration) time.Duration {
	st.mu.Lock()
	defer st.mu.Unlock()
	since := sent
	if st.lastResult.After(since) {
		since = st.lastResult
	}
	return after - time.Since(since)
}

// stall ends st, which returned no result for after while operations
// waited: each pending operation gets st's error, an UNAVAILABLE that
// opStreams.do retries on another keyserver, and st's keyserver is
// suspect.
func (st *clientStream) stall(after time.Duration) {
	st.streams.suspect(st.keyserver)
	if st.fail(status.Errorf(codes.Unavailable, "no result from keyserver %s for %v while operations waited", st.keyserver, after.Round(time.Millisecond))) {
		st.streams.c.logger.Warn("keyserver stream stalled: sending its operations to another keyserver", "keyserver", st.keyserver,
			"silent_for", after.Round(time.Millisecond), "suspect_for", suspectFor)
	}
}

// timeoutMs is what remains of ctx's deadline, in whole milliseconds
// rounded up (at least 1); 0 (the keyserver's default) without a deadline.
func timeoutMs(ctx context.Context) uint32 {
	d, ok := ctx.Deadline()
	if !ok {
		return 0
	}
	ms := (time.Until(d) + time.Millisecond - 1) / time.Millisecond
	return uint32(min(max(ms, 1), link.MaxOperationTimeout/time.Millisecond))
}

// forget drops an operation whose caller gave up.
func (st *clientStream) forget(id uint64) {
	st.mu.Lock()
	delete(st.pending, id)
	idle := st.retired && len(st.pending) == 0
	st.mu.Unlock()
	if idle {
		st.cancel()
	}
}

// endErr is the error of operations that were pending when st ended.
func (st *clientStream) endErr() error {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.err
}

// send sends queued operations, as many per message as are queued (up to
// link.MaxStreamOperations), until the stream ends. An operation that
// finds the sender idle does not wait for others beyond a yield of the
// processor: at concurrency 1 each goes at once.
func (st *clientStream) send() {
	batch := make([]*keylessv1.Operation, 0, link.MaxStreamOperations)
	for {
		select {
		case op := <-st.queue:
			batch = append(batch[:0], op)
			// Let the goroutines ready to run first, typically callers
			// woken by the same result message, queue their operations
			// for this message too.
			runtime.Gosched()
		more:
			for len(batch) < link.MaxStreamOperations {
				select {
				case op := <-st.queue:
					batch = append(batch, op)
				default:
					break more
				}
			}
			err := st.stream.Send(&keylessv1.StreamRequest{Operations: batch})
			clear(batch)
			if err != nil {
				// The real error comes from Recv.
				if errors.Is(err, io.EOF) {
					return
				}
				st.fail(err)
				return
			}
		case <-st.ctx.Done():
			return
		}
	}
}

// receive hands results to their operations until the stream ends.
func (st *clientStream) receive() {
	for {
		resp, err := st.stream.Recv()
		if err != nil {
			st.fail(err)
			return
		}
		st.streams.answered(st.keyserver)
		st.mu.Lock()
		st.lastResult = time.Now()
		for _, r := range resp.GetResults() {
			if p, ok := st.pending[r.GetId()]; ok {
				delete(st.pending, r.GetId())
				p.done <- r
			}
		}
		idle := st.retired && len(st.pending) == 0
		st.mu.Unlock()
		if idle {
			st.cancel()
		}
	}
}

// fail ends st with err: every pending operation gets a nil result and
// then st.err, a status error (UNAVAILABLE when the keyserver closed the
// stream without one). It reports whether this call ended st, rather than
// an earlier one.
func (st *clientStream) fail(err error) bool {
	if errors.Is(err, io.EOF) {
		err = status.Error(codes.Unavailable, "the keyserver closed the stream")
	} else if _, ok := status.FromError(err); !ok {
		err = status.Error(codes.Unavailable, err.Error())
	}
	st.mu.Lock()
	first := st.err == nil
	if first {
		st.err = fmt.Errorf("keyserver stream: %w", err)
	}
	for id, p := range st.pending {
		delete(st.pending, id)
		p.done <- nil
	}
	st.mu.Unlock()
	st.cancel()
	return first
}
