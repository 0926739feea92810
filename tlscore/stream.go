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

// opStreams is the Client's set of streams, used round-robin.
type opStreams struct {
	c     *Client
	slots []streamSlot
	next  atomic.Uint32
	// unary is set once a keyserver answered Stream with UNIMPLEMENTED.
	unary atomic.Bool
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
	return &opStreams{c: c, slots: make([]streamSlot, n)}
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
		r, err := st.do(ctx, op)
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
// (avoid set) it prefers a stream other than avoid; otherwise it takes the
// next slot in turn, replacing its stream if that one no longer takes
// operations.
func (p *opStreams) pick(ctx context.Context, avoid *clientStream) (*clientStream, error) {
	n := len(p.slots)
	i := int(p.next.Add(1) % uint32(n))
	if avoid != nil {
		for k := range n {
			slot := &p.slots[(i+k)%n]
			slot.mu.Lock()
			st := slot.st
			slot.mu.Unlock()
			if st != nil && st != avoid && st.usable() {
				return st.wait(ctx)
			}
		}
	}
	slot := &p.slots[i]
	slot.mu.Lock()
	st := slot.st
	if st == nil || st == avoid || !st.usable() {
		if st != nil {
			st.retire()
		}
		st = p.c.openStream()
		slot.st = st
	}
	slot.mu.Unlock()
	return st.wait(ctx)
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
	ctx    context.Context // the stream's; cancel ends it
	cancel context.CancelFunc
	born   time.Time

	ready     chan struct{} // closed once the stream is open or failed to open
	openErr   error
	stream    grpc.BidiStreamingClient[keylessv1.StreamRequest, keylessv1.StreamResponse]
	keyserver string // metrics label of the keyserver

	queue chan *keylessv1.Operation // to the sender

	mu      sync.Mutex
	pending map[uint64]*pendingOp // sent or queued, not yet answered
	nextID  uint64
	err     error // why the stream ended; nil while it is open
	retired bool  // takes no new operations, closes when pending is empty
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

// do sends op on st and waits for its result or ctx. The error is
// errStreamClosed if st takes no new operations, the stream's error (as a
// status) if it ended before the result came, or ctx's.
func (st *clientStream) do(ctx context.Context, op *keylessv1.Operation) (*keylessv1.OperationResult, error) {
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
	select {
	case r := <-p.done:
		if r == nil {
			return nil, st.endErr()
		}
		return r, nil
	case <-ctx.Done():
		st.forget(id)
		return nil, status.FromContextError(ctx.Err()).Err()
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
		st.mu.Lock()
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
// stream without one).
func (st *clientStream) fail(err error) {
	if errors.Is(err, io.EOF) {
		err = status.Error(codes.Unavailable, "the keyserver closed the stream")
	} else if _, ok := status.FromError(err); !ok {
		err = status.Error(codes.Unavailable, err.Error())
	}
	st.mu.Lock()
	if st.err == nil {
		st.err = fmt.Errorf("keyserver stream: %w", err)
	}
	for id, p := range st.pending {
		delete(st.pending, id)
		p.done <- nil
	}
	st.mu.Unlock()
	st.cancel()
}
