package signer

import (
	"bytes"
	"context"
	"crypto"
	"errors"
	"fmt"
	"io"
	"maps"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

type streamClient = grpc.BidiStreamingClient[keylessv1.StreamRequest, keylessv1.StreamResponse]

// openStream opens a Stream as client.
func openStream(t *testing.T, client keylessv1.KeylessServiceClient) streamClient {
	t.Helper()
	st, err := client.Stream(testContext(t, 0))
	if err != nil {
		t.Fatalf("Stream() = %v", err)
	}
	return st
}

// sendOps sends ops in one message.
func sendOps(t *testing.T, st streamClient, ops ...*keylessv1.Operation) {
	t.Helper()
	if err := st.Send(&keylessv1.StreamRequest{Operations: ops}); err != nil {
		t.Fatalf("Send() = %v", err)
	}
}

// receiveResults receives until n results have arrived, and returns them
// by id; a second result for an id fails the test.
func receiveResults(t *testing.T, st streamClient, n int) map[uint64]*keylessv1.OperationResult {
	t.Helper()
	got := make(map[uint64]*keylessv1.OperationResult)
	for len(got) < n {
		resp, err := st.Recv()
		if err != nil {
			t.Fatalf("Recv() after %d of %d results = %v", len(got), n, err)
		}
		if len(resp.GetResults()) == 0 {
			t.Fatal("Recv() = a message with no result")
		}
		for _, r := range resp.GetResults() {
			if _, dup := got[r.GetId()]; dup {
				t.Fatalf("two results for operation %d", r.GetId())
			}
			got[r.GetId()] = r
		}
	}
	return got
}

// resultErr returns a result's error as a status error, or nil.
func resultErr(r *keylessv1.OperationResult) error {
	e := r.GetError()
	if e == nil {
		return nil
	}
	return status.Error(codes.Code(e.GetCode()), e.GetMessage())
}

func signOp(id uint64, req *keylessv1.SignRequest) *keylessv1.Operation {
	return &keylessv1.Operation{Id: id, Request: &keylessv1.Operation_Sign{Sign: req}}
}

func decryptOp(id uint64, req *keylessv1.DecryptRequest) *keylessv1.Operation {
	return &keylessv1.Operation{Id: id, Request: &keylessv1.Operation_Decrypt{Decrypt: req}}
}

// p256SignOps returns n P-256 sign operations with ids 1 to n.
func p256SignOps(t *testing.T, n int) []*keylessv1.Operation {
	t.Helper()
	var ops []*keylessv1.Operation
	for i := range n {
		ops = append(ops, signOp(uint64(1+i), p256SignRequest(t)))
	}
	return ops
}

// openStreamOf returns the service's one open stream, or nil.
func openStreamOf(svc *Service) *serverStream {
	svc.streamsMu.Lock()
	defer svc.streamsMu.Unlock()
	for s := range svc.streams {
		return s
	}
	return nil
}

// TestStreamMatchesUnary sends every sign and decrypt case of the unary
// tests in one batch and checks that each result is what the unary call
// answers: the same code and message, a signature that verifies, the
// premaster of a valid ciphertext and the implicit rejection of an invalid
// one.
func TestStreamMatchesUnary(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t), MaxConcurrent: 2})
	signs, decrypts := signCases(t), decryptCases(t)
	var ops []*keylessv1.Operation
	for i, tc := range signs {
		ops = append(ops, signOp(uint64(i), tc.req))
	}
	for i, tc := range decrypts {
		ops = append(ops, decryptOp(uint64(1000+i), tc.req))
	}
	st := openStream(t, ts.client)
	for rest := ops; len(rest) > 0; {
		n := min(len(rest), link.MaxStreamOperations)
		sendOps(t, st, rest[:n]...)
		rest = rest[n:]
	}
	got := receiveResults(t, st, len(ops))

	for i, tc := range signs {
		r := got[uint64(i)]
		_, uerr := ts.client.Sign(testContext(t, 0), tc.req)
		err := resultErr(r)
		checkStatus(t, "stream sign "+tc.name, err, tc.wantCode, tc.wantField)
		if status.Convert(err).Message() != status.Convert(uerr).Message() {
			t.Errorf("stream sign %s: message %q, unary %q", tc.name, status.Convert(err).Message(), status.Convert(uerr).Message())
		}
		if err != nil {
			continue
		}
		alg, _ := link.AlgorithmFor(tc.req.GetAlgorithm())
		if err := verifySignature(testPublicKeyByID(tc.req.GetKeyId()), alg, tc.req.GetDigest(), r.GetSign().GetSignature()); err != nil {
			t.Errorf("stream sign %s: signature: %v", tc.name, err)
		}
	}
	for i, tc := range decrypts {
		r := got[uint64(1000+i)]
		checkStatus(t, "stream decrypt "+tc.name, resultErr(r), tc.wantCode, tc.wantField)
		if tc.wantCode != codes.OK {
			continue
		}
		if pms := r.GetDecrypt().GetPremaster(); !bytes.Equal(pms, tc.want) {
			t.Errorf("stream decrypt %s = %x, want %x", tc.name, pms, tc.want)
		}
	}

	// The client closes its side: the stream ends cleanly.
	if err := st.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err != io.EOF {
		t.Errorf("Recv() after CloseSend = %v, want io.EOF", err)
	}
}

// TestStreamRefusals: a message with too many operations and an empty
// operation are refused each with a result naming the fault, and the
// stream goes on.
func TestStreamRefusals(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t)})
	st := openStream(t, ts.client)
	req := p256SignRequest(t)

	var many []*keylessv1.Operation
	for i := range link.MaxStreamOperations + 1 {
		many = append(many, signOp(uint64(i), req))
	}
	sendOps(t, st, many...)
	for id, r := range receiveResults(t, st, len(many)) {
		checkStatus(t, "operation of an oversize batch", resultErr(r), codes.InvalidArgument, "operations")
		if !strings.Contains(r.GetError().GetMessage(), "at most 64 operations; this one carried 65") {
			t.Errorf("operation %d: %q, want the limit and the count", id, r.GetError().GetMessage())
		}
	}

	sendOps(t, st, &keylessv1.Operation{Id: 7}, signOp(8, req))
	got := receiveResults(t, st, 2)
	checkStatus(t, "empty operation", resultErr(got[7]), codes.InvalidArgument, "request")
	if err := resultErr(got[8]); err != nil {
		t.Errorf("sign after refusals = %v", err)
	}

	// Every operation has its audit record: the refused ones too.
	records := auditRecords(t, ts.audit.String())
	ops := map[string]int{}
	for _, r := range records {
		ops[r.Op+" "+r.Outcome]++
	}
	if ops["sign InvalidArgument"] != len(many) || ops["unknown InvalidArgument"] != 1 || ops["sign OK"] != 1 {
		t.Errorf("audit records by op and outcome = %v", ops)
	}
}

// TestStreamIdentity: an identity the policy does not list gets
// PermissionDenied for every operation, recorded under its name; the stream
// itself is recorded when it ends.
func TestStreamIdentity(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t)})
	st := openStream(t, ts.dial(t, "spiffe://test.internal/stranger"))
	sendOps(t, st, signOp(1, p256SignRequest(t)), decryptOp(2, decryptCases(t)[0].req))
	for id, r := range receiveResults(t, st, 2) {
		checkStatus(t, "operation of an unlisted identity", resultErr(r), codes.PermissionDenied, "")
		if id == 2 && r.GetDecrypt() != nil {
			t.Error("a refused decrypt carries a premaster")
		}
	}
	if err := st.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err != io.EOF {
		t.Fatalf("Recv() = %v, want io.EOF", err)
	}
	waitUntil(t, "the stream's record", func() bool { return strings.Contains(ts.audit.String(), `"op":"stream"`) })
	for _, r := range auditRecords(t, ts.audit.String()) {
		if r.Identity != "spiffe://test.internal/stranger" {
			t.Errorf("record %s: identity %q", r.Op, r.Identity)
		}
		if r.Op != OpStream && r.Outcome != "PermissionDenied" {
			t.Errorf("record %s: outcome %s", r.Op, r.Outcome)
		}
	}
}

// TestStreamsPerIdentity: an identity may have MaxStreamsPerIdentity
// streams open over all its connections; one more ends at once with
// ResourceExhausted naming it, and closing one makes room. Other callers
// are counted apart.
func TestStreamsPerIdentity(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t), MaxStreamsPerIdentity: 2})
	req := p256SignRequest(t)
	// open opens a stream and waits for a result, so that the keyserver
	// has counted it.
	open := func(client keylessv1.KeylessServiceClient) streamClient {
		t.Helper()
		st := openStream(t, client)
		sendOps(t, st, signOp(1, req))
		receiveResults(t, st, 1)
		return st
	}
	first := open(ts.client)
	open(ts.dial(t, testIdentity)) // another connection, the same identity

	third := openStream(t, ts.client)
	// The keyserver may end the stream before this Send: then Send says
	// io.EOF and Recv gives the status.
	if err := third.Send(&keylessv1.StreamRequest{Operations: []*keylessv1.Operation{signOp(1, req)}}); err != nil && err != io.EOF {
		t.Fatalf("Send() = %v", err)
	}
	_, err := third.Recv()
	checkStatus(t, "a third stream", err, codes.ResourceExhausted, "")
	if msg := status.Convert(err).Message(); !strings.Contains(msg, testIdentity) || !strings.Contains(msg, "2 streams open") {
		t.Errorf("a third stream: %q, want the identity and the count", msg)
	}
	open(ts.dial(t, "spiffe://test.internal/stranger")) // another caller

	if err := first.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := first.Recv(); err != io.EOF {
		t.Fatalf("Recv() = %v, want io.EOF", err)
	}
	open(ts.client)
}

// TestStreamDeadline: an operation whose key does not answer in its
// timeout fails alone with DeadlineExceeded, measured from its arrival.
func TestStreamDeadline(t *testing.T) {
	slow := newBlockingKey(t, testP256Key())
	rsaReq := &keylessv1.SignRequest{
		KeyId:     mustKeyID(t, testRSAKey().Public()),
		Algorithm: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA256,
		Digest:    testDigest(crypto.SHA256, "rsa"),
	}
	store := &testStore{keys: []crypto.Signer{slow, testRSAKey()}}
	ts := newTestServer(t, Config{Keys: store, MaxConcurrent: 2})
	st := openStream(t, ts.client)
	stuck := signOp(1, p256SignRequest(t))
	stuck.TimeoutMs = 50
	start := time.Now()
	sendOps(t, st, stuck, signOp(2, rsaReq))
	got := receiveResults(t, st, 2)
	checkStatus(t, "stuck operation", resultErr(got[1]), codes.DeadlineExceeded, "")
	if err := resultErr(got[2]); err != nil {
		t.Errorf("operation beside the stuck one = %v", err)
	}
	if d := time.Since(start); d > defaultTestTimeout/2 {
		t.Errorf("the 50 ms operation failed after %v", d)
	}
}

// TestStreamDrain: Drain lets the operations a stream has started finish
// and be answered, does not start those that arrive later, and ends the
// stream with Unavailable; new streams are refused.
func TestStreamDrain(t *testing.T) {
	key := newBlockingKey(t, testP256Key())
	ts := newTestServer(t, Config{Keys: &testStore{keys: []crypto.Signer{key}}, MaxConcurrent: 2})
	st := openStream(t, ts.client)
	req := p256SignRequest(t)
	sendOps(t, st, signOp(1, req))
	key.waitEntered(t)
	ts.svc.Drain()
	ts.svc.Drain() // twice is harmless
	sendOps(t, st, signOp(2, req))
	time.Sleep(20 * time.Millisecond)
	key.unblock()

	got := receiveResults(t, st, 1)
	if err := resultErr(got[1]); err != nil || got[1].GetSign() == nil {
		t.Fatalf("operation started before Drain = %v, want its signature", err)
	}
	_, err := st.Recv()
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("Recv() after the started operation = %v, want Unavailable (and no result for the later one)", err)
	}
	if len(key.entered) != 0 {
		t.Errorf("%d operations reached the key after Drain", len(key.entered))
	}
	st2 := openStream(t, ts.client)
	if _, err := st2.Recv(); status.Code(err) != codes.Unavailable {
		t.Errorf("new stream after Drain: Recv() = %v, want Unavailable", err)
	}
}

// TestStreamConcurrent sends many operations from many goroutines on one
// stream, in messages of varying sizes, under a small limiter: each gets
// exactly one result, every signature verifies.
func TestStreamConcurrent(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t), MaxConcurrent: 2, MaxQueued: 10000})
	st := openStream(t, ts.client)
	req := p256SignRequest(t)
	const senders, perSender = 8, 150
	var (
		mu   sync.Mutex
		sent int
		wg   sync.WaitGroup
	)
	for g := range senders {
		wg.Go(func() {
			for i := 0; i < perSender; {
				n := min(1+i%7, perSender-i)
				ops := make([]*keylessv1.Operation, n)
				for k := range ops {
					ops[k] = signOp(uint64(g*perSender+i+k), req)
				}
				mu.Lock()
				err := st.Send(&keylessv1.StreamRequest{Operations: ops})
				sent += n
				mu.Unlock()
				if err != nil {
					t.Errorf("Send() = %v", err)
					return
				}
				i += n
			}
		})
	}
	got := receiveResults(t, st, senders*perSender)
	wg.Wait()
	if sent != senders*perSender {
		t.Fatalf("sent %d", sent)
	}
	alg, _ := link.AlgorithmFor(req.GetAlgorithm())
	for id, r := range got {
		if err := resultErr(r); err != nil {
			t.Fatalf("operation %d = %v", id, err)
		}
		if err := verifySignature(testP256Key().Public(), alg, req.GetDigest(), r.GetSign().GetSignature()); err != nil {
			t.Fatalf("operation %d: signature: %v", id, err)
		}
	}
}

// TestStreamClientGone: when the client cancels its stream, the service
// ends it and writes no result anywhere; operations still running finish
// in the key store and are recorded.
func TestStreamClientGone(t *testing.T) {
	key := newBlockingKey(t, testP256Key())
	ts := newTestServer(t, Config{Keys: &testStore{keys: []crypto.Signer{key}}})
	ctx, cancel := context.WithCancel(t.Context())
	st, err := ts.client.Stream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sendOps(t, st, signOp(1, p256SignRequest(t)))
	key.waitEntered(t)
	cancel()
	if _, err := st.Recv(); status.Code(err) != codes.Canceled {
		t.Fatalf("Recv() after cancel = %v", err)
	}
	key.unblock()
	waitUntil(t, "the operation's record", func() bool { return strings.Contains(ts.audit.String(), `"op":"sign"`) })
	waitUntil(t, "the stream's record", func() bool { return strings.Contains(ts.audit.String(), `"op":"stream"`) })
}

// FuzzStreamRequestProto feeds arbitrary StreamRequest messages through a
// real stream: every operation gets exactly one result, and a successful
// signature verifies.
func FuzzStreamRequestProto(f *testing.F) {
	for _, tc := range signCases(f)[:8] {
		b, _ := proto.Marshal(&keylessv1.StreamRequest{Operations: []*keylessv1.Operation{signOp(1, tc.req)}})
		f.Add(b)
	}
	b, _ := proto.Marshal(&keylessv1.StreamRequest{Operations: []*keylessv1.Operation{decryptOp(1, decryptCases(f)[0].req), {Id: 2}}})
	f.Add(b)
	f.Add([]byte{})
	ts := newTestServer(f, Config{Keys: newTestMemoryStore(f), Audit: &lastRecord{}})
	f.Fuzz(func(t *testing.T, data []byte) {
		req := &keylessv1.StreamRequest{}
		if err := proto.Unmarshal(data, req); err != nil || proto.Size(req) > link.MaxRequestSize {
			return
		}
		ids := map[uint64]int{}
		for _, op := range req.GetOperations() {
			ids[op.GetId()]++
			op.TimeoutMs = min(op.GetTimeoutMs(), 5000)
		}
		ctx, cancel := context.WithTimeout(context.Background(), defaultTestTimeout)
		defer cancel()
		st, err := ts.client.Stream(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Send(req); err != nil {
			t.Fatal(err)
		}
		if err := st.CloseSend(); err != nil {
			t.Fatal(err)
		}
		n := 0
		for {
			resp, err := st.Recv()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("Recv() = %v", err)
			}
			for _, r := range resp.GetResults() {
				n++
				if ids[r.GetId()]--; ids[r.GetId()] < 0 {
					t.Fatalf("unexpected result for operation %d", r.GetId())
				}
				if sig := r.GetSign().GetSignature(); sig != nil {
					checkFuzzSignature(t, req, r.GetId(), sig)
				}
			}
		}
		if n != len(req.GetOperations()) {
			t.Fatalf("%d results for %d operations", n, len(req.GetOperations()))
		}
	})
}

// checkFuzzSignature fails unless sig verifies for one of req's sign
// operations with the given id.
func checkFuzzSignature(t *testing.T, req *keylessv1.StreamRequest, id uint64, sig []byte) {
	t.Helper()
	for _, op := range req.GetOperations() {
		s := op.GetSign()
		if op.GetId() != id || s == nil {
			continue
		}
		alg, ok := link.AlgorithmFor(s.GetAlgorithm())
		pub := testPublicKeyByID(s.GetKeyId())
		if ok && pub != nil && verifySignature(pub, alg, s.GetDigest(), sig) == nil {
			return
		}
	}
	t.Fatalf("operation %d: a signature that verifies for none of its requests", id)
}

// TestStreamWorkersOnDemand: a stream starts workers as its operations
// need them, never more than twice MaxConcurrent, so a new stream costs
// no worker. (Workers here never idle long enough to end.)
func TestStreamWorkersOnDemand(t *testing.T) {
	key := newBlockingKey(t, testP256Key())
	ts := newTestServer(t, Config{Keys: &testStore{keys: []crypto.Signer{key}}, MaxConcurrent: 2, workerIdle: time.Hour})
	st := openStream(t, ts.client)
	started := func() int {
		if s := openStreamOf(ts.svc); s != nil {
			running, _ := s.startedWorkers()
			return running
		}
		return -1
	}
	sendOps(t, st, &keylessv1.Operation{Id: 0}) // refused at once: one worker
	receiveResults(t, st, 1)
	if n := started(); n != 1 {
		t.Fatalf("after one operation: %d workers, want 1", n)
	}
	ops := p256SignOps(t, 10)
	sendOps(t, st, ops...)
	key.waitEntered(t)
	key.waitEntered(t)
	waitUntil(t, "4 workers", func() bool { return started() == 4 })
	key.unblock()
	for id, r := range receiveResults(t, st, len(ops)) {
		if err := resultErr(r); err != nil {
			t.Errorf("operation %d = %v", id, err)
		}
	}
	if n := started(); n != 4 {
		t.Errorf("%d workers, want 2 × MaxConcurrent = 4", n)
	}
}

// TestMessagesLargerThanWindow: with the fixed flow-control windows of
// link.ServerOptions, a request larger than the window (link.MinWindowSize,
// which newTestServer sets) but within link.MaxRequestSize still arrives
// whole, as a unary call and on a stream, and is answered; the stream goes
// on.
func TestMessagesLargerThanWindow(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t)})
	big := p256SignRequest(t)
	big.Digest = make([]byte, link.MinWindowSize+link.MinWindowSize/4)
	_, err := ts.client.Sign(testContext(t, 0), big)
	checkStatus(t, "Sign() of a request larger than the window", err, codes.InvalidArgument, "digest")

	st := openStream(t, ts.client)
	sendOps(t, st, signOp(1, big), signOp(2, p256SignRequest(t)))
	sendOps(t, st, signOp(3, big))
	got := receiveResults(t, st, 3)
	checkStatus(t, "stream operation larger than the window", resultErr(got[1]), codes.InvalidArgument, "digest")
	checkStatus(t, "second stream operation larger than the window", resultErr(got[3]), codes.InvalidArgument, "digest")
	if err := resultErr(got[2]); err != nil {
		t.Errorf("operation sent with one larger than the window = %v", err)
	}
}

// TestStreamResultsShareMessages: while more of a stream's operations are
// unfinished than the key store performs at once (MaxConcurrent), results
// wait for each other; once no more are left, each goes at once.
func TestStreamResultsShareMessages(t *testing.T) {
	key := newBlockingKey(t, testP256Key())
	ts := newTestServer(t, Config{Keys: &testStore{keys: []crypto.Signer{key}}, MaxConcurrent: 2, resultDelay: time.Hour})
	reg := prometheus.NewRegistry()
	ts.svc.RegisterQueueMetrics(reg)
	st := openStream(t, ts.client)
	const n = 8
	sendOps(t, st, p256SignOps(t, n)...)
	waitUntil(t, "every operation in flight", func() bool {
		s := openStreamOf(ts.svc)
		if s == nil {
			return false
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.inFlight == n
	})

	// The first n-2 results wait until only 2 operations are unfinished,
	// then go in one message; the last two go alone.
	for range n - 2 {
		key.releaseOne(t)
	}
	for _, want := range []int{n - 2, 1, 1} {
		if want == 1 {
			key.releaseOne(t)
		}
		resp, err := st.Recv()
		if err != nil {
			t.Fatalf("Recv() = %v", err)
		}
		if got := len(resp.GetResults()); got != want {
			t.Fatalf("a message of %d results, want %d", got, want)
		}
		for _, r := range resp.GetResults() {
			checkP256Result(t, r)
		}
	}

	// An operation sent alone is answered at once.
	key.unblock()
	sendOps(t, st, signOp(n+1, p256SignRequest(t)))
	checkP256Result(t, receiveResults(t, st, 1)[n+1])

	// The traffic metrics count the two messages received (n operations,
	// then 1) and the four sent (n-2 results, 1, 1, 1). The worker counts
	// a message once its Send has returned, which may be after the client
	// has it: wait until no Send is in progress.
	waitUntil(t, "the last Send to end", func() bool {
		s := openStreamOf(ts.svc)
		s.mu.Lock()
		defer s.mu.Unlock()
		return !s.sending
	})
	want := map[string]float64{
		"keyless_keyserver_stream_messages_total/received":   2,
		"keyless_keyserver_stream_operations_total/received": n + 1,
		"keyless_keyserver_stream_messages_total/sent":       4,
		"keyless_keyserver_stream_operations_total/sent":     n + 1,
	}
	if got := trafficMetrics(t, reg); !maps.Equal(got, want) {
		t.Errorf("stream traffic metrics = %v, want %v", got, want)
	}
}

// trafficMetrics returns the stream message and operation counters
// registered with reg, keyed by metric name and direction.
func trafficMetrics(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("Gather() = %v", err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		if !strings.HasPrefix(mf.GetName(), "keyless_keyserver_stream_") {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "direction" {
					got[mf.GetName()+"/"+l.GetValue()] = m.GetCounter().GetValue()
				}
			}
		}
	}
	return got
}

// TestStreamResultWaitIsBounded: a result that waits for others is sent
// after at most the delay even if the others never finish, as when the key
// store hangs.
func TestStreamResultWaitIsBounded(t *testing.T) {
	key := newBlockingKey(t, testP256Key())
	ts := newTestServer(t, Config{Keys: &testStore{keys: []crypto.Signer{key}}, MaxConcurrent: 2})
	st := openStream(t, ts.client)
	ops := p256SignOps(t, 8)
	sendOps(t, st, ops...)
	key.waitEntered(t)
	key.releaseOne(t)
	for _, r := range receiveResults(t, st, 1) {
		checkP256Result(t, r)
	}
	key.unblock()
	for _, r := range receiveResults(t, st, len(ops)-1) {
		checkP256Result(t, r)
	}
}

// checkP256Result checks that r carries a signature of p256SignRequest's
// digest that verifies with the test P-256 key.
func checkP256Result(t *testing.T, r *keylessv1.OperationResult) {
	t.Helper()
	if r == nil {
		t.Fatal("no result")
	}
	if err := resultErr(r); err != nil {
		t.Fatalf("operation %d = %v", r.GetId(), err)
	}
	req := p256SignRequest(t)
	alg, _ := link.AlgorithmFor(req.GetAlgorithm())
	if err := verifySignature(testP256Key().Public(), alg, req.GetDigest(), r.GetSign().GetSignature()); err != nil {
		t.Errorf("operation %d: %v", r.GetId(), err)
	}
}

// TestStreamReadsOperationsAsTheyArrive: a stream reads as many
// operations as an edge keeps in flight by default (1,024), even when the
// key store performs none of them, so that each one's deadline counts from
// its arrival; those that wait past it are answered DEADLINE_EXCEEDED
// without reaching the key. (Left unread in the connection, an operation
// would get its full time again once read, and be performed for an edge
// that gave up on it.)
func TestStreamReadsOperationsAsTheyArrive(t *testing.T) {
	const inFlight = 1024 // tlscore.DefaultMaxKeyOperations
	slow := newBlockingKey(t, testP256Key())
	ts := newTestServer(t, Config{Keys: &testStore{keys: []crypto.Signer{slow}}, MaxConcurrent: 1})
	st := openStream(t, ts.client)
	const timeout = 2 * time.Second
	ops := p256SignOps(t, inFlight)
	for _, op := range ops {
		op.TimeoutMs = uint32(timeout.Milliseconds())
	}
	sent := time.Now()
	for i := 0; i < len(ops); i += link.MaxStreamOperations {
		sendOps(t, st, ops[i:min(i+link.MaxStreamOperations, len(ops))]...)
	}
	slow.waitEntered(t) // the first operation holds the key store

	// Every operation is read long before the first deadline, while the
	// key store is held.
	for read := ts.svc.traffic.receivedOps.Load(); read < inFlight; read = ts.svc.traffic.receivedOps.Load() {
		if time.Since(sent) > timeout/2 {
			t.Fatalf("the keyserver read %d of %d operations in %v while its key store was busy; want every one read as it arrives", read, len(ops), time.Since(sent))
		}
		time.Sleep(time.Millisecond)
	}

	// Every one expires: the first in the key store (its caller gets the
	// deadline; the call keeps its slot until the key returns), the others
	// in the keyserver's queue.
	for id, r := range receiveResults(t, st, len(ops)) {
		checkStatus(t, fmt.Sprintf("operation %d, past its deadline", id), resultErr(r), codes.DeadlineExceeded, "")
	}
	slow.unblock()
	if n := len(slow.entered); n != 0 {
		t.Errorf("%d operations reached the key after the first; want none (each was past its deadline)", n)
	}
}
