package signer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// Limits of the Stream RPC.
const (
	// maxResultDelay bounds how long a result waits in the keyserver for
	// others to share its message (see serverStream.hold).
	maxResultDelay = 2 * time.Millisecond

	// maxStreamInFlight bounds the operations of one stream received and
	// not yet answered. Beyond it the service stops reading the stream, so
	// the client is held back by HTTP/2 flow control: a stream never queues
	// more than this in the keyserver.
	//
	// It is as many as an edge keeps in flight by default (its
	// -max-key-operations), so that an edge's operations are read as they
	// arrive: an operation's deadline counts from when it is read, and one
	// left unread in the connection's buffer would get its full time again
	// once read, and be performed for an edge that has given up on it. Read
	// at once, an operation queued past its deadline is answered
	// DEADLINE_EXCEEDED without reaching the HSM, so an overloaded keyserver
	// spends the HSM on operations that are still awaited.
	maxStreamInFlight = 1024

	// streamWorkerIdle is how long a stream's worker waits for an
	// operation before it ends. Under steady load a worker never waits
	// that long, so workers are not started and ended per operation; an
	// idle stream is back to its reader and handler goroutines after it.
	streamWorkerIdle = time.Second
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
// Stream finishes the operations it received before Drain, sends their
// results and ends with Unavailable; operations it receives after Drain
// returns are not started (their result never comes, so the client knows
// to send them elsewhere), and new streams end at once. Unary calls are
// not affected: the gRPC server's GracefulStop lets them finish. It is
// safe to call more than once.
func (s *Service) Drain() {
	s.streamsMu.Lock()
	defer s.streamsMu.Unlock()
	s.draining = true
	for st := range s.streams {
		st.mu.Lock()
		st.closing = true
		st.mu.Unlock()
		st.signal()
	}
}

// Stream implements KeylessService.Stream. A stream's operations go
// through the same checks, limiter, quotas and audit trail as Sign and
// Decrypt, on worker goroutines started as operations need them up to
// twice Config.MaxConcurrent (so that the key store is kept at its bound
// while other workers check requests and write audit records); a worker
// that has had nothing to do for a second ends, so an idle stream costs
// two goroutines, its handler and its reader. Results are sent by the
// workers themselves, each message carrying every result ready at that
// moment; while more operations are unfinished than the key store
// performs at once, a result waits up to 2 ms for others, so that under
// load results share messages (see serverStream.hold). A Stream beyond
// Config.MaxStreamsPerIdentity of its caller's ends at once with
// ResourceExhausted.
func (s *Service) Stream(stream grpc.BidiStreamingServer[keylessv1.StreamRequest, keylessv1.StreamResponse]) error {
	st := &serverStream{
		s:      s,
		stream: stream,
		ctx:    stream.Context(),
		jobs:   make(chan *streamJob, maxStreamInFlight),
		slots:  make(chan struct{}, maxStreamInFlight),
		wake:   make(chan struct{}, 1),
	}
	st.timer = time.AfterFunc(time.Hour, st.flushHeld)
	st.timer.Stop()
	defer st.timer.Stop()
	// The identity the streams are counted under; a caller the policy does
	// not list is counted under "" (its operations are refused one by one).
	identity, _ := identify(st.ctx, s.policy.Load(), &call{})
	s.streamsMu.Lock()
	if s.draining {
		s.streamsMu.Unlock()
		return errDraining
	}
	if n := s.streamsOf[identity]; s.maxStreamsPerIdentity > 0 && n >= s.maxStreamsPerIdentity {
		s.streamsMu.Unlock()
		return status.Errorf(codes.ResourceExhausted, "identity %q has %d streams open, the most one identity may have on this keyserver; close one first", identity, n)
	}
	s.streams[st] = struct{}{}
	s.streamsOf[identity]++
	s.streamsMu.Unlock()
	defer func() {
		s.streamsMu.Lock()
		delete(s.streams, st)
		if s.streamsOf[identity]--; s.streamsOf[identity] == 0 {
			delete(s.streamsOf, identity)
		}
		s.streamsMu.Unlock()
	}()
	return st.serve()
}

// openStreams returns the number of Stream calls open.
func (s *Service) openStreams() int {
	s.streamsMu.Lock()
	defer s.streamsMu.Unlock()
	return len(s.streams)
}

// streamTraffic counts the messages of the Stream calls in each direction
// and the operations (or results) they carry: their quotients say how far
// operations share messages. It is safe for concurrent use.
type streamTraffic struct {
	received, receivedOps atomic.Uint64 // StreamRequest messages, operations
	sent, sentResults     atomic.Uint64 // StreamResponse messages, results
}

// serverStream is the keyserver's side of one Stream call (the edge's side
// is tlscore's clientStream).
type serverStream struct {
	s      *Service
	stream grpc.BidiStreamingServer[keylessv1.StreamRequest, keylessv1.StreamResponse]
	ctx    context.Context

	// jobs holds the operations received, for the workers. Its buffer
	// is allocated with the stream and kept while it is open, idle or
	// not, so its elements are pointers: 8 bytes each, not a streamJob's
	// 48.
	jobs  chan *streamJob
	slots chan struct{} // one per operation in flight
	wake  chan struct{} // tells serve that a Send failed or the stream drained (signal)

	// The workers, started by the reader as operations need them, at
	// most s.streamWorkers at once; each ends after s.workerIdle without
	// an operation (see work), so an idle stream costs two goroutines.
	workers sync.WaitGroup
	started int          // workers running (guarded by mu)
	spawned int          // workers started over the stream's life (guarded by mu)
	busy    atomic.Int32 // workers performing an operation

	mu       sync.Mutex
	inFlight int  // operations handed to the workers and not yet sent back
	closing  bool // draining: the reader drops what it receives
	// out holds results not yet sent: for the worker that is sending
	// (sending is set), or waiting for more (see hold) until the timer,
	// armed when timerArmed, fires and sets due. spare is a slice to reuse
	// for out.
	out, spare []*keylessv1.OperationResult
	sending    bool
	timer      *time.Timer
	timerArmed bool
	due        bool  // the results in out have waited long enough
	sendErr    error // the first Send that failed; nothing is sent after it
}

// startedWorkers returns the number of workers running, and the number
// started over the stream's life.
func (st *serverStream) startedWorkers() (running, spawned int) {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.started, st.spawned
}

// streamJob is one operation as received.
type streamJob struct {
	op      *keylessv1.Operation
	arrived time.Time
	refused error // answer this instead of performing the operation
}

// serve runs the stream: a reader goroutine receives and dispatches, and
// the workers perform and send (see deliver), until the client closes its
// side (then nil, once everything received is answered), the stream
// breaks, or the service drains.
func (st *serverStream) serve() error {
	readDone := make(chan error, 1)
	go func() { readDone <- st.read() }()
	var (
		readErr     error
		workersDone chan struct{} // closed when the workers have ended, once reading has
	)
	for {
		select {
		case readErr = <-readDone:
			readDone = nil
			// The reader starts no more workers, and has closed jobs.
			workersDone = make(chan struct{})
			go func() { st.workers.Wait(); close(workersDone) }()
		case <-workersDone:
			// Reading has ended and every received operation has been
			// performed and its result sent.
			if err := st.failed(); err != nil {
				return err
			}
			if errors.Is(readErr, io.EOF) {
				return nil
			}
			return readErr
		case <-st.wake:
			if err := st.failed(); err != nil {
				return err
			}
			if st.drained() {
				return errDraining
			}
		}
	}
}

// deliver queues the result of an operation and sends every queued
// result, as few messages as will hold them, unless another worker is
// sending (its next message takes them) or the results should wait for
// more (see hold).
func (st *serverStream) deliver(r *keylessv1.OperationResult) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.out = append(st.out, r)
	st.flushLocked()
}

// hold reports whether the queued results should wait for others. While
// more of the stream's operations are unfinished (running or queued) than
// the key store performs at once (Config.MaxConcurrent, or half of
// defaultStreamWorkers without a bound), more results come soon, and
// sending each alone would cost a message and a wake-up on both sides.
// Otherwise, when a message is full and while draining, results go at
// once: an operation sent alone, or the last of a burst, never waits. The
// caller holds st.mu.
func (st *serverStream) hold() bool {
	keyStoreSlots := st.s.streamWorkers / 2
	return !st.closing &&
		len(st.out) < link.MaxStreamOperations &&
		st.inFlight-len(st.out) > keyStoreSlots
}

// flushLocked sends the queued results unless a Send is in progress (its
// worker sends them next) or they should wait (see hold) and the timer has
// not said they waited long enough. The caller holds st.mu.
func (st *serverStream) flushLocked() {
	if st.sending {
		return
	}
	st.sending = true
	for len(st.out) > 0 && st.sendErr == nil {
		if !st.due && st.hold() {
			if !st.timerArmed {
				st.timerArmed = true
				st.timer.Reset(st.s.resultDelay)
			}
			break
		}
		st.due = false
		if st.timerArmed {
			st.timerArmed = false
			st.timer.Stop()
		}
		batch := st.out
		st.out = st.spare[:0]
		st.mu.Unlock()
		var err error
		for i := 0; i < len(batch) && err == nil; i += link.MaxStreamOperations {
			results := batch[i:min(i+link.MaxStreamOperations, len(batch))]
			if err = st.stream.Send(&keylessv1.StreamResponse{Results: results}); err == nil {
				st.s.traffic.sent.Add(1)
				st.s.traffic.sentResults.Add(uint64(len(results)))
			}
		}
		for range batch {
			<-st.slots
		}
		clear(batch)
		st.mu.Lock()
		st.spare = batch[:0]
		st.inFlight -= len(batch)
		if err != nil {
			st.sendErr = err
		}
		if err != nil || (st.closing && st.inFlight == 0) {
			st.signal()
		}
	}
	st.sending = false
}

// flushHeld runs on the stream's timer, the service's resultDelay after a
// result began to wait: the results that wait go now or, if a worker is
// sending, in its next message.
func (st *serverStream) flushHeld() {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.timerArmed = false
	st.due = len(st.out) > 0
	st.flushLocked()
}

// signal wakes serve to check whether a Send failed or the stream drained.
func (st *serverStream) signal() {
	select {
	case st.wake <- struct{}{}:
	default:
	}
}

// failed returns the error of a Send that failed, if any.
func (st *serverStream) failed() error {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.sendErr
}

// drained reports whether the stream is draining and has nothing left in
// flight.
func (st *serverStream) drained() bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.closing && st.inFlight == 0
}

// read receives operations and hands them to the workers until the stream
// ends, waiting while maxStreamInFlight are in flight. It returns io.EOF
// when the client closed its side.
func (st *serverStream) read() error {
	defer close(st.jobs)
	for {
		req, err := st.stream.Recv()
		if err != nil {
			return err
		}
		arrived := time.Now()
		ops := req.GetOperations()
		st.s.traffic.received.Add(1)
		st.s.traffic.receivedOps.Add(uint64(len(ops)))
		var refused error
		if len(ops) > link.MaxStreamOperations {
			refused = &ValidationError{"operations", fmt.Sprintf("a StreamRequest carries at most %d operations; this one carried %d", link.MaxStreamOperations, len(ops))}
		}
		for _, op := range ops {
			select {
			case st.slots <- struct{}{}:
			case <-st.ctx.Done():
				return st.ctx.Err()
			}
			st.mu.Lock()
			if st.closing {
				st.mu.Unlock()
				<-st.slots
				continue
			}
			st.inFlight++
			// Start a worker unless one is free for this operation. The
			// job is queued under mu, where a worker decides to end (see
			// retire), so that it never ends with a job left and none to
			// take it; the send does not block, as jobs holds as many as
			// slots.
			if st.started < st.s.streamWorkers && int(st.busy.Load())+len(st.jobs) >= st.started {
				st.started++
				st.spawned++
				st.s.workersRunning.Add(1)
				st.workers.Go(st.work)
			}
			st.jobs <- &streamJob{op: op, arrived: arrived, refused: refused}
			st.mu.Unlock()
		}
	}
}

// work performs operations until reading has ended or none has come for
// s.workerIdle. The idle timer is armed only when no job is waiting, so a
// busy worker does not touch it.
func (st *serverStream) work() {
	defer st.s.workersRunning.Add(-1)
	var idle *time.Timer
	for {
		var (
			j  *streamJob
			ok bool
		)
		select {
		case j, ok = <-st.jobs:
		default:
			if idle == nil {
				idle = time.NewTimer(st.s.workerIdle)
				defer idle.Stop()
			} else {
				idle.Reset(st.s.workerIdle)
			}
			select {
			case j, ok = <-st.jobs:
			case <-idle.C:
				if st.retire() {
					return
				}
				continue
			}
		}
		if !ok {
			return
		}
		st.busy.Add(1)
		st.deliver(st.perform(j))
		st.busy.Add(-1)
	}
}

// retire ends an idle worker's count, unless a job has been queued since
// its timer fired (the reader queues jobs and counts workers under mu).
func (st *serverStream) retire() bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	if len(st.jobs) > 0 {
		return false
	}
	st.started--
	return true
}

// perform answers one operation as the unary call would.
func (st *serverStream) perform(j *streamJob) *keylessv1.OperationResult {
	timeout := link.DefaultOperationTimeout
	if ms := j.op.GetTimeoutMs(); ms > 0 {
		timeout = min(time.Duration(ms)*time.Millisecond, link.MaxOperationTimeout)
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
