package signer

import (
	"crypto"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

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
