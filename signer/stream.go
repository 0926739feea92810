package signer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// Limits of the Stream RPC.
const (
	// MaxStreamOperations is the most operations one StreamRequest may
	// carry; each operation of a message with more is answered
	// InvalidArgument.
	MaxStreamOperations = 64

	// DefaultOperationTimeout bounds an operation whose timeout_ms is zero.
	DefaultOperationTimeout = 2 * time.Second

	// MaxOperationTimeout caps an operation's timeout_ms.
	MaxOperationTimeout = 60 * time.Second

	// maxStreamInFlight bounds the operations of one stream received and
	// not yet answered. Beyond it the service stops reading the stream, so
	// the client is held back by HTTP/2 flow control: a stream never queues
	// more than this in the keyserver.
	maxStreamInFlight = 256
)

// Audited operations of streams (see AuditRecord.Op).
const (
	// OpStream is the record of a Stream call as a whole.
	OpStream = "stream"
	// OpUnknown is a stream operation that carries neither a sign nor a
	// decrypt request.
	OpUnknown = "unknown"
)

// errDraining ends streams while the keyserver shuts down.
var errDraining = status.Error(codes.Unavailable, "the keyserver is shutting down; send the remaining operations to another keyserver")

// Drain makes the service stop taking operations on streams: each open
// Stream finishes the operations it has started, sends their results and
// ends with Unavailable; operations that arrive meanwhile are not started
// (their result never comes, so the client knows to send them elsewhere),
// and new streams end at once. Unary calls are not affected: the gRPC
// server's GracefulStop lets them finish. It is safe to call more than once.
func (s *Service) Drain() {
	s.drainOnce.Do(func() { close(s.draining) })
}

// Stream implements KeylessService.Stream. A stream's operations run on a
// fixed set of worker goroutines that live as long as the stream (twice
// Config.MaxConcurrent, so that the key store is kept at its bound while
// other workers check requests and write audit records), and go through
// the same checks, limiter, quotas and audit trail as Sign and Decrypt.
// Results are sent as they complete, each message carrying every result
// ready at that moment.
func (s *Service) Stream(stream grpc.BidiStreamingServer[keylessv1.StreamRequest, keylessv1.StreamResponse]) error {
	select {
	case <-s.draining:
		return errDraining
	default:
	}
	st := &opStream{
		s:       s,
		stream:  stream,
		ctx:     stream.Context(),
		jobs:    make(chan streamJob, maxStreamInFlight),
		results: make(chan *keylessv1.OperationResult, maxStreamInFlight),
		slots:   make(chan struct{}, maxStreamInFlight),
	}
	return st.serve()
}

// opStream is one Stream call.
type opStream struct {
	s      *Service
	stream grpc.BidiStreamingServer[keylessv1.StreamRequest, keylessv1.StreamResponse]
	ctx    context.Context

	jobs    chan streamJob                  // received, for the workers
	results chan *keylessv1.OperationResult // done, for the writer
	slots   chan struct{}                   // one per operation in flight

	mu       sync.Mutex
	inFlight int  // operations handed to the workers and not yet sent back
	closing  bool // draining: the reader drops what it receives
}

// streamJob is one operation as received.
type streamJob struct {
	op      *keylessv1.Operation
	arrived time.Time
	refused error // answer this instead of performing the operation
}

// serve runs the stream: a reader goroutine receives and dispatches, the
// workers perform, and this goroutine sends results until the client
// closes its side (then nil, once everything received is answered), the
// stream breaks, or the service drains.
func (st *opStream) serve() error {
	readDone := make(chan error, 1)
	go func() { readDone <- st.read() }()
	workersDone := make(chan struct{})
	var wg sync.WaitGroup
	for range st.s.streamWorkers {
		wg.Go(st.work)
	}
	go func() { wg.Wait(); close(workersDone) }()

	var (
		readErr  error
		draining = st.s.draining
		batch    = make([]*keylessv1.OperationResult, 0, MaxStreamOperations)
	)
	for {
		select {
		case r := <-st.results:
			n, err := st.send(append(batch[:0], r))
			if err != nil {
				return err
			}
			if st.done(n) {
				return errDraining
			}
		case readErr = <-readDone:
			readDone = nil
		case <-workersDone:
			// Reading has ended and every received operation has been
			// performed: send what is left and end.
			for {
				select {
				case r := <-st.results:
					n, err := st.send(append(batch[:0], r))
					if err != nil {
						return err
					}
					st.done(n)
					continue
				default:
				}
				break
			}
			if errors.Is(readErr, io.EOF) {
				return nil
			}
			return readErr
		case <-draining:
			draining = nil
			st.mu.Lock()
			st.closing = true
			idle := st.inFlight == 0
			st.mu.Unlock()
			if idle {
				return errDraining
			}
		}
	}
}

// send sends batch, after adding every further result that is ready, and
// returns the number of results it sent.
func (st *opStream) send(batch []*keylessv1.OperationResult) (int, error) {
	for len(batch) < MaxStreamOperations {
		select {
		case r := <-st.results:
			batch = append(batch, r)
			continue
		default:
		}
		break
	}
	err := st.stream.Send(&keylessv1.StreamResponse{Results: batch})
	for range batch {
		<-st.slots
	}
	clear(batch)
	return len(batch), err
}

// done records that n results were sent, and reports whether the stream is
// draining and has nothing left in flight.
func (st *opStream) done(n int) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.inFlight -= n
	return st.closing && st.inFlight == 0
}

// read receives operations and hands them to the workers until the stream
// ends, waiting while maxStreamInFlight are in flight. It returns io.EOF
// when the client closed its side.
func (st *opStream) read() error {
	defer close(st.jobs)
	for {
		req, err := st.stream.Recv()
		if err != nil {
			return err
		}
		arrived := time.Now()
		ops := req.GetOperations()
		var refused error
		if len(ops) > MaxStreamOperations {
			refused = &ValidationError{"operations", fmt.Sprintf("a StreamRequest carries at most %d operations; this one carried %d", MaxStreamOperations, len(ops))}
		}
		for _, op := range ops {
			select {
			case st.slots <- struct{}{}:
			case <-st.ctx.Done():
				return st.ctx.Err()
			}
			st.mu.Lock()
			closing := st.closing
			if !closing {
				st.inFlight++
			}
			st.mu.Unlock()
			if closing {
				<-st.slots
				continue
			}
			st.jobs <- streamJob{op: op, arrived: arrived, refused: refused}
		}
	}
}

// work performs operations until reading has ended.
func (st *opStream) work() {
	for j := range st.jobs {
		st.results <- st.perform(j)
	}
}

// perform answers one operation as the unary call would.
func (st *opStream) perform(j streamJob) *keylessv1.OperationResult {
	timeout := DefaultOperationTimeout
	if ms := j.op.GetTimeoutMs(); ms > 0 {
		timeout = min(time.Duration(ms)*time.Millisecond, MaxOperationTimeout)
	}
	ctx, cancel := context.WithDeadline(st.ctx, j.arrived.Add(timeout))
	defer cancel()
	res := &keylessv1.OperationResult{Id: j.op.GetId()}
	var err error
	switch r := j.op.GetRequest().(type) {
	case *keylessv1.Operation_Sign:
		var resp *keylessv1.SignResponse
		resp, err = st.s.sign1(withCall(ctx, OpSign, j.arrived), r.Sign, j.refused)
		if err == nil {
			res.Result = &keylessv1.OperationResult_Sign{Sign: resp}
		}
	case *keylessv1.Operation_Decrypt:
		var resp *keylessv1.DecryptResponse
		resp, err = st.s.decrypt1(withCall(ctx, OpDecrypt, j.arrived), r.Decrypt, j.refused)
		if err == nil {
			res.Result = &keylessv1.OperationResult_Decrypt{Decrypt: resp}
		}
	default:
		refused := j.refused
		if refused == nil {
			refused = &ValidationError{"request", "the operation carries neither a sign nor a decrypt request"}
		}
		c, finish := st.s.begin(withCall(ctx, OpUnknown, j.arrived), OpUnknown)
		err = st.s.answer(c, finish, refused)
	}
	if err != nil {
		s := status.Convert(err)
		res.Result = &keylessv1.OperationResult_Error{Error: &keylessv1.OperationError{Code: uint32(s.Code()), Message: s.Message()}}
	}
	return res
}

// withCall returns ctx carrying a new call record for a stream operation
// op, arrived at start.
func withCall(ctx context.Context, op string, start time.Time) context.Context {
	return context.WithValue(ctx, callKey{}, &call{op: op, start: start, streamed: true})
}
