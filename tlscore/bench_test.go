package tlscore

import (
	"crypto"
	"crypto/ecdsa"
	"fmt"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/keyless-tls/keyless/internal/pkitest"
	"github.com/keyless-tls/keyless/link"
)

// BenchmarkClientSign measures an ECDSA P-256 signature with an in-memory
// key through tlscore.Client and the real keyserver service, both in this
// process, over mutual TLS on an in-memory connection: on streams, as the
// edge sends operations, and, as the baseline measured in the same run in
// alternating rounds, as one unary call each (a keyserver without Stream).
// It reports the CPU time per operation of each (client and keyserver
// together, every goroutine), stream-cpu/unary-cpu: the share of the
// unary cost the stream keeps, and the stream's request and response
// messages per operation: below 1 when operations share messages. On a
// shared machine CPU time varies far less than wall time.
func BenchmarkClientSign(b *testing.B) {
	for _, workers := range []int{1, 16} {
		b.Run(fmt.Sprintf("workers=%d", workers), func(b *testing.B) {
			pki := pkitest.NewMTLS(b, keyserverName, edgeIdentity)
			real := newSignerService(b, []crypto.Signer{pkitest.P256Key()}, nil)
			streamKS := startKeyserver(b, pki, real)
			unaryKS := startKeyserver(b, pki, &fakeService{next: real, noStream: true})
			stream := dialTestClient(b, pki, ClientConfig{}, map[string]*testKeyserver{"ks:1": streamKS})
			unary := dialTestClient(b, pki, ClientConfig{}, map[string]*testKeyserver{"ks:1": unaryKS})
			id := mustKeyID(b, pkitest.P256Key().Public())
			alg, _ := link.AlgorithmFor(algECDSA256)
			d := digest(crypto.SHA256)
			sign := func(c *Client) []byte {
				sig, err := c.Sign(b.Context(), id, alg, d, nil)
				if err != nil {
					b.Errorf("Sign() = %v", err)
				}
				return sig
			}
			// Warm up both (connections, the unary fallback, stacks) and
			// check their signatures; the measured rounds do not verify.
			for range 50 {
				for _, c := range []*Client{stream, unary} {
					if sig := sign(c); !ecdsa.VerifyASN1(&pkitest.P256Key().PublicKey, d, sig) {
						b.Fatalf("Sign() = %x; want a signature that verifies", sig)
					}
				}
			}
			if !unary.streams.unary.Load() || stream.streams.unary.Load() {
				b.Fatal("the clients do not use the intended calls")
			}

			const round = 256
			var streamCPU, unaryCPU time.Duration
			var n int
			reqs0, resps0 := streamKS.frames.Get(http2.FrameData)
			for b.Loop() {
				// Each iteration is one round of each, so that both see
				// the same machine.
				unaryCPU += cpuOf(workers, round, func() { sign(unary) })
				streamCPU += cpuOf(workers, round, func() { sign(stream) })
				n += round
			}
			b.ReportMetric(float64(streamCPU.Nanoseconds())/float64(n), "stream-cpu-ns/op")
			b.ReportMetric(float64(unaryCPU.Nanoseconds())/float64(n), "unary-cpu-ns/op")
			b.ReportMetric(float64(streamCPU)/float64(unaryCPU), "stream/unary-cpu")
			// Each stream message is one DATA frame: how many operations
			// share a message.
			reqs, resps := streamKS.frames.Get(http2.FrameData)
			b.ReportMetric(float64(reqs-reqs0)/float64(n), "stream-requests/op")
			b.ReportMetric(float64(resps-resps0)/float64(n), "stream-responses/op")
		})
	}
}

// cpuOf runs op n times over workers goroutines and returns the process's
// CPU time meanwhile.
func cpuOf(workers, n int, op func()) time.Duration {
	start := processCPU()
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := w; i < n; i += workers {
				op()
			}
		})
	}
	wg.Wait()
	return processCPU() - start
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkStallWatch measures what watching streams for a stall costs: two
// clients over the same two in-process keyservers, one with the watch (as
// any Client of several keyservers has it) and, as the baseline measured in
// the same run in alternating rounds, one without. It reports the CPU time
// per operation of each (clients and keyservers together) and
// watch/nowatch-cpu.
func BenchmarkStallWatch(b *testing.B) {
	for _, workers := range []int{1, 16} {
		b.Run(fmt.Sprintf("workers=%d", workers), func(b *testing.B) {
			pki := pkitest.NewMTLS(b, keyserverName, edgeIdentity)
			real := newSignerService(b, []crypto.Signer{pkitest.P256Key()}, nil)
			servers := map[string]*testKeyserver{"a:1": startKeyserver(b, pki, real), "b:1": startKeyserver(b, pki, real)}
			watched := dialTestClient(b, pki, ClientConfig{Addresses: []string{"a:1", "b:1"}}, servers)
			plain := dialTestClient(b, pki, ClientConfig{Addresses: []string{"a:1", "b:1"}}, servers)
			plain.streams.failover = false
			id := mustKeyID(b, pkitest.P256Key().Public())
			alg, _ := link.AlgorithmFor(algECDSA256)
			d := digest(crypto.SHA256)
			sign := func(c *Client) []byte {
				sig, err := c.Sign(b.Context(), id, alg, d, nil)
				if err != nil {
					b.Errorf("Sign() = %v", err)
				}
				return sig
			}
			for range 50 {
				for _, c := range []*Client{watched, plain} {
					if sig := sign(c); !ecdsa.VerifyASN1(&pkitest.P256Key().PublicKey, d, sig) {
						b.Fatalf("Sign() = %x; want a signature that verifies", sig)
					}
				}
			}
			const round = 256
			var watchCPU, plainCPU time.Duration
			var n int
			for b.Loop() {
				plainCPU += cpuOf(workers, round, func() { sign(plain) })
				watchCPU += cpuOf(workers, round, func() { sign(watched) })
				n += round
			}
			b.ReportMetric(float64(watchCPU.Nanoseconds())/float64(n), "watch-cpu-ns/op")
			b.ReportMetric(float64(plainCPU.Nanoseconds())/float64(n), "nowatch-cpu-ns/op")
			b.ReportMetric(float64(watchCPU)/float64(plainCPU), "watch/nowatch-cpu")
		})
	}
}
