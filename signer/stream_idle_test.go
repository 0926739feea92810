package signer

import (
	"crypto"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// streamWorkers returns the running and ever-started workers of the
// service's one open stream, or -1, -1 when none is open.
func streamWorkers(svc *Service) (running, spawned int) {
	if s := openStreamOf(svc); s != nil {
		return s.startedWorkers()
	}
	return -1, -1
}

// TestStreamWorkersEndWhenIdle: after a burst has started every worker a
// stream may have, the workers end once idle for Config.workerIdle, within
// a bound; the stream then still performs operations, starting workers
// again, which end again.
func TestStreamWorkersEndWhenIdle(t *testing.T) {
	const idle = 50 * time.Millisecond
	key := newBlockingKey(t, testP256Key())
	ts := newTestServer(t, Config{Keys: &testStore{keys: []crypto.Signer{key}}, MaxConcurrent: 2, workerIdle: idle})
	st := openStream(t, ts.client)

	ops := p256SignOps(t, 10)
	sendOps(t, st, ops...)
	key.waitEntered(t)
	key.waitEntered(t)
	waitUntil(t, "4 workers", func() bool { n, _ := streamWorkers(ts.svc); return n == 4 })
	if n := ts.svc.workersRunning.Load(); n != 4 {
		t.Errorf("keyless_keyserver_stream_workers counts %d workers, want 4", n)
	}
	key.unblock()
	for _, r := range receiveResults(t, st, len(ops)) {
		checkP256Result(t, r)
	}
	// A worker ends idle after its timer, plus scheduling: well within a
	// second even under -race on a busy machine.
	const bound = idle + time.Second
	start := time.Now()
	waitUntil(t, "the workers to end", func() bool { n, _ := streamWorkers(ts.svc); return n == 0 })
	if took := time.Since(start); took > bound {
		t.Errorf("workers ended %v after the burst, want within %v", took, bound)
	}
	waitUntil(t, "the stream_workers gauge to reach 0", func() bool { return ts.svc.workersRunning.Load() == 0 })
	_, spawnedBefore := streamWorkers(ts.svc)

	// The idle stream still works, and its workers go away again.
	sendOps(t, st, signOp(20, p256SignRequest(t)), signOp(21, p256SignRequest(t)))
	got := receiveResults(t, st, 2)
	checkP256Result(t, got[20])
	checkP256Result(t, got[21])
	if _, spawned := streamWorkers(ts.svc); spawned <= spawnedBefore {
		t.Errorf("after the idle gap: %d workers ever started, want more than %d", spawned, spawnedBefore)
	}
	waitUntil(t, "the workers to end again", func() bool { n, _ := streamWorkers(ts.svc); return n == 0 })
}

// TestStreamWorkersRetireRace sends operations from several goroutines
// with gaps of up to a millisecond, against a worker idle time of a few
// microseconds, so that
// workers end and start all the time, often while the reader queues an
// operation: every operation still gets exactly one result, and every
// signature verifies.
func TestStreamWorkersRetireRace(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t), MaxConcurrent: 2, MaxQueued: 10000, workerIdle: 5 * time.Microsecond})
	st := openStream(t, ts.client)
	req := p256SignRequest(t)
	const senders, perSender = 4, 100
	var (
		mu sync.Mutex
		wg sync.WaitGroup
	)
	for g := range senders {
		wg.Go(func() {
			for i := range perSender {
				time.Sleep(time.Duration(rand.IntN(1000)) * time.Microsecond)
				mu.Lock()
				err := st.Send(&keylessv1.StreamRequest{Operations: []*keylessv1.Operation{signOp(uint64(g*perSender+i), req)}})
				mu.Unlock()
				if err != nil {
					t.Errorf("Send() = %v", err)
					return
				}
			}
		})
	}
	got := receiveResults(t, st, senders*perSender)
	wg.Wait()
	for id := range uint64(senders * perSender) {
		checkP256Result(t, got[id])
	}
	_, spawned := streamWorkers(ts.svc)
	t.Logf("%d workers started for %d operations", spawned, senders*perSender)
	if spawned < 10 {
		t.Errorf("%d workers ever started; the test wants workers to end and start again often", spawned)
	}
}

// BenchmarkStreamWorkerIdle measures a stream under steady load (64
// P-256 signatures in flight on one stream, in-memory key, the keyserver's
// wiring over bufconn) with workers that end after the default idle time,
// and with workers that never end (the behaviour before they did), one
// after the other in the same run. It reports each side's ns/op, their
// ratio (idle-ratio: the first over the second; 1 means no cost) and the
// workers started per operation with the default idle time (0 means no
// goroutine is started per operation; each round opens a new stream,
// whose first workers count). ns/op is both sides together.
func BenchmarkStreamWorkerIdle(b *testing.B) {
	const inFlight = 64
	type side struct {
		name    string
		svc     *Service
		client  keylessv1.KeylessServiceClient
		elapsed time.Duration
	}
	sides := []*side{{name: "idle-1s"}, {name: "never"}}
	for _, s := range sides {
		idle := streamWorkerIdle
		if s.name == "never" {
			idle = 24 * time.Hour
		}
		s.svc = newBenchService(b, func(c *Config) { c.workerIdle = idle })
		s.client = newBenchClientOf(b, s.svc)
	}
	req := benchSignRequest(b)
	run := func(s *side, n int) (spawned int) {
		s.elapsed += streamClosedLoop(b, s.client, req, n, inFlight)
		_, spawned = streamWorkers(s.svc)
		return spawned
	}
	// Warm both up, then alternate in rounds so that both see the same
	// machine.
	for _, s := range sides {
		run(s, 2*inFlight)
		s.elapsed = 0
	}
	const rounds = 4
	var spawned int
	b.ResetTimer()
	for r := range rounds {
		per := b.N / rounds
		if r == rounds-1 {
			per = b.N - per*(rounds-1)
		}
		if per == 0 {
			continue
		}
		for _, s := range sides {
			sp := run(s, per)
			if s.name == "idle-1s" {
				spawned += sp
			}
		}
	}
	b.StopTimer()
	idleNs := float64(sides[0].elapsed.Nanoseconds()) / float64(b.N)
	neverNs := float64(sides[1].elapsed.Nanoseconds()) / float64(b.N)
	b.ReportMetric(idleNs, "ns/op-idle-1s")
	b.ReportMetric(neverNs, "ns/op-never")
	b.ReportMetric(idleNs/neverNs, "idle-ratio")
	b.ReportMetric(float64(spawned)/float64(b.N), "workers-started/op")
}

// streamClosedLoop performs n signatures of req on a new stream of client,
// inFlight at a time (each result received is replaced by a new
// operation), and returns the time they took. The first result's
// signature is verified.
func streamClosedLoop(b *testing.B, client keylessv1.KeylessServiceClient, req *keylessv1.SignRequest, n, inFlight int) time.Duration {
	b.Helper()
	st, err := client.Stream(b.Context())
	if err != nil {
		b.Fatalf("Stream() = %v", err)
	}
	defer st.CloseSend()
	var sent uint64
	send := func(k int) {
		ops := make([]*keylessv1.Operation, k)
		for i := range ops {
			sent++
			ops[i] = signOp(sent, req)
		}
		if err := st.Send(&keylessv1.StreamRequest{Operations: ops}); err != nil {
			b.Fatalf("Send() = %v", err)
		}
	}
	start := time.Now()
	send(min(inFlight, n))
	for done := 0; done < n; {
		resp, err := st.Recv()
		if err != nil {
			b.Fatalf("Recv() = %v", err)
		}
		rs := resp.GetResults()
		if done == 0 {
			checkBenchSignature(b, req, rs[0])
		}
		done += len(rs)
		if more := min(len(rs), n-int(sent)); more > 0 {
			send(more)
		}
	}
	return time.Since(start)
}

// checkBenchSignature checks that r is a signature of req that verifies
// with the test P-256 key.
func checkBenchSignature(b *testing.B, req *keylessv1.SignRequest, r *keylessv1.OperationResult) {
	b.Helper()
	if e := r.GetError(); e != nil {
		b.Fatalf("operation %d = %s", r.GetId(), e.GetMessage())
	}
	alg, _ := link.AlgorithmFor(req.GetAlgorithm())
	if err := verifySignature(testP256Key().Public(), alg, req.GetDigest(), r.GetSign().GetSignature()); err != nil {
		b.Fatalf("operation %d: signature: %v", r.GetId(), err)
	}
}
