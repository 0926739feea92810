package hsm_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math"
	"math/big"
	"net"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/test/bufconn"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
	"github.com/keyless-tls/keyless/signer"
)

// The identities of BenchmarkFairness: A floods the keyserver with
// signatures, B decrypts one premaster at a time, as an edge doing TLS_RSA
// handshakes for a few clients.
const (
	fairFlooder = "spiffe://fairness.test/edge/a"
	fairQuiet   = "spiffe://fairness.test/edge/b"
)

const fairnessPolicy = `
rules:
  - name: a-signs
    identities: [spiffe://fairness.test/edge/a]
    keys: [label:p256, label:rsa2048]
    operations: [sign]
    schemes: [default]
  - name: b-decrypts
    identities: [spiffe://fairness.test/edge/b]
    keys: [label:rsa2048]
    operations: [decrypt]
`

// Shape of BenchmarkFairness. The keyserver runs with its default
// -max-queued and -max-inflight-per-identity, and -max-concurrent 1, 2 (as
// many as SoftHSM runs at its best) or 4 (the default); the flood is the
// reported one (64 parallel signatures); A's fair share is as many
// operations as the HSM takes at once (-max-concurrent).
const (
	fairMaxQueued   = 1024
	fairMaxInFlight = 256
	fairFlood       = 64
	fairRounds      = 20 // rounds of the three phases, interleaved
	fairSamples     = 50 // B's decryptions per phase and round
	fairWarmup      = 3  // B's decryptions discarded at the start of a phase
)

// BenchmarkFairness measures how much one identity's flood of signatures
// delays another identity's decryptions, through the whole keyserver path
// (gRPC over mutual TLS, the service's checks, audit log, limiter) with
// keys in SoftHSM. B decrypts one premaster at a time, sequentially, in
// three phases: A idle ("unloaded"); A running as many signatures at once
// as the keyserver lets into the HSM ("fair": A's fair share, which keeps
// the HSM busy); A running 64 at once ("flood"). The phases are
// interleaved, fairRounds rounds of each, so that other load on the
// machine affects them alike. Each b.N iteration is one whole measurement.
//
// It reports, per phase, B's p50 and p99 latency as the client sees it and
// its three parts: to-hsm (the request's way in and its wait for an HSM
// slot), in-hsm (the decryption) and from-hsm (the answer's way out); A's
// operations waiting for the HSM (sampled after each of B's decryptions)
// and A's rate; then the
// ratios of B's p99 under the flood to its p99 unloaded and at A's fair
// share, and to the bound max(5 × unloaded, 2 × fair): at most 1 means
// the flood delays B no more than that. A queue fair between identities
// keeps flood/fair near 1; one that serves operations first come first
// served makes B wait behind A's whole backlog.
//
//	go test -run '^$' -bench Fairness ./hsm
func BenchmarkFairness(b *testing.B) {
	f := mustFixture(b)
	for _, maxConcurrent := range []int{1, 2, 4} {
		b.Run(fmt.Sprintf("max-concurrent=%d", maxConcurrent), func(b *testing.B) {
			benchmarkFairness(b, f, maxConcurrent)
		})
	}
}

func benchmarkFairness(b *testing.B, f *fixture, maxConcurrent int) {
	rsaKey := f.key(b, labelRSA)
	for _, bc := range []struct {
		name   string
		label  string
		scheme tls.SignatureScheme
	}{
		{"A=ECDSA-P256", labelP256, tls.ECDSAWithP256AndSHA256},
		{"A=RSA-2048-PSS", labelRSA, tls.PSSWithSHA256},
	} {
		b.Run(bc.name, func(b *testing.B) {
			fx := newFairnessFixture(b, f, maxConcurrent)
			aKey := f.key(b, bc.label)
			input, _ := signInput(bc.scheme, tls13Message(32))
			aReq := &keylessv1.SignRequest{
				KeyId:     keyIDBytes(b, aKey.Public()),
				Algorithm: keylessv1.SignatureAlgorithm(bc.scheme),
				Digest:    input,
			}
			checkSig := func(sig []byte) error { return verify(aKey.Public(), bc.scheme, input, sig) }
			pms := make([]byte, 48)
			rand.Read(pms)
			ct, err := rsa.EncryptPKCS1v15(rand.Reader, rsaKey.Public().(*rsa.PublicKey), pms)
			if err != nil {
				b.Fatal(err)
			}
			bReq := &keylessv1.DecryptRequest{KeyId: keyIDBytes(b, rsaKey.Public()), EncryptedPremaster: ct}

			phases := []struct {
				name string
				a    int // A's operations in flight
			}{{"unloaded", 0}, {"fair", maxConcurrent}, {"flood", fairFlood}}
			lat := make([][]time.Duration, len(phases))
			// B's time before its decryption entered the HSM (the
			// request's way in and the wait for a slot), in the HSM, and
			// after (the answer's way out).
			toHSM := make([][]time.Duration, len(phases))
			inHSM := make([][]time.Duration, len(phases))
			fromHSM := make([][]time.Duration, len(phases))
			queued := make([]float64, len(phases))
			aOps := make([]int64, len(phases))
			aTime := make([]time.Duration, len(phases))
			for b.Loop() {
				for range fairRounds {
					for i, ph := range phases {
						signed, stop := fx.runA(b, ph.a, aReq, checkSig)
						start, before := time.Now(), signed()
						for j := range fairWarmup + fairSamples {
							ctx, cancel := context.WithTimeout(b.Context(), 30*time.Second)
							t0 := time.Now()
							resp, err := fx.b.Decrypt(ctx, bReq)
							t1 := time.Now()
							d := t1.Sub(t0)
							cancel()
							if err != nil {
								b.Fatalf("B: Decrypt() = %v", err)
							}
							if !bytes.Equal(resp.GetPremaster(), pms) {
								b.Fatal("B: Decrypt() returned a premaster other than the one encrypted")
							}
							if j >= fairWarmup {
								lat[i] = append(lat[i], d)
								in, out := fx.lastDecrypt()
								toHSM[i] = append(toHSM[i], in.Sub(t0))
								inHSM[i] = append(inHSM[i], out.Sub(in))
								fromHSM[i] = append(fromHSM[i], t1.Sub(out))
								queued[i] += fx.queueDepth(b)
							}
						}
						aTime[i] += time.Since(start)
						aOps[i] += signed() - before
						stop()
					}
				}
			}
			p99 := make([]float64, len(phases))
			for i, ph := range phases {
				slices.Sort(lat[i])
				b.ReportMetric(ms(percentile(lat[i], 0.50)), "B-p50-"+ph.name+"-ms")
				p99[i] = ms(percentile(lat[i], 0.99))
				b.ReportMetric(p99[i], "B-p99-"+ph.name+"-ms")
				for _, part := range []struct {
					name string
					d    []time.Duration
				}{{"to-hsm", toHSM[i]}, {"in-hsm", inHSM[i]}, {"from-hsm", fromHSM[i]}} {
					slices.Sort(part.d)
					b.ReportMetric(ms(percentile(part.d, 0.50)), "B-"+part.name+"-p50-"+ph.name+"-ms")
					b.ReportMetric(ms(percentile(part.d, 0.99)), "B-"+part.name+"-p99-"+ph.name+"-ms")
				}
				b.ReportMetric(queued[i]/float64(len(lat[i])), "queued-"+ph.name)
				if ph.a > 0 {
					b.ReportMetric(float64(aOps[i])/aTime[i].Seconds(), "A-ops/s-"+ph.name)
				}
			}
			b.ReportMetric(p99[2]/p99[0], "p99-flood/unloaded")
			b.ReportMetric(p99[2]/p99[1], "p99-flood/fair")
			b.ReportMetric(p99[2]/max(5*p99[0], 2*p99[1]), "p99-flood/bound")
		})
	}
}

// fairnessFixture is a keyserver over the shared SoftHSM fixture's keys,
// served as cmd/keyserver serves it, with a client connection for each of
// A and B.
type fairnessFixture struct {
	a, b keylessv1.KeylessServiceClient
	// decrypts records when the last premaster decryption entered and
	// left the HSM.
	decrypts decryptTimes
	// metrics holds the service's queue metrics.
	metrics *prometheus.Registry
}

// queueDepth returns the operations waiting for the HSM.
func (fx *fairnessFixture) queueDepth(b *testing.B) float64 {
	mfs, err := fx.metrics.Gather()
	if err != nil {
		b.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "keyless_keyserver_hsm_queue_depth" {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	b.Fatal("no keyless_keyserver_hsm_queue_depth metric")
	return 0
}

func newFairnessFixture(b *testing.B, f *fixture, maxConcurrent int) *fairnessFixture {
	b.Helper()
	policy, err := signer.ParsePolicy("fairness.yaml", []byte(fairnessPolicy))
	if err != nil {
		b.Fatal(err)
	}
	fx := &fairnessFixture{}
	svc, err := signer.NewService(signer.Config{
		Keys:          timedStore{f.m, &fx.decrypts},
		Policy:        policy,
		Quota:         signer.Quota{MaxInFlight: fairMaxInFlight},
		Audit:         signer.NewAuditLog(io.Discard),
		MaxConcurrent: maxConcurrent,
		MaxQueued:     fairMaxQueued,
	})
	if err != nil {
		b.Fatal(err)
	}
	fx.metrics = prometheus.NewRegistry()
	svc.RegisterQueueMetrics(fx.metrics)
	pki := newFairnessPKI(b)
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer(append(link.ServerOptions(),
		grpc.Creds(credentials.NewTLS(pki.serverConfig())),
		grpc.StatsHandler(svc.StatsHandler()))...)
	keylessv1.RegisterKeylessServiceServer(srv, svc)
	go func() { _ = srv.Serve(lis) }()
	b.Cleanup(srv.Stop)
	dial := func(identity string) keylessv1.KeylessServiceClient {
		conn, err := grpc.NewClient("passthrough:///bufnet", append(link.DialOptions(),
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
			grpc.WithTransportCredentials(credentials.NewTLS(pki.clientConfig(b, identity))))...)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = conn.Close() })
		return keylessv1.NewKeylessServiceClient(conn)
	}
	fx.a, fx.b = dial(fairFlooder), dial(fairQuiet)
	return fx
}

// lastDecrypt returns when the last premaster decryption entered and
// left the HSM.
func (fx *fairnessFixture) lastDecrypt() (in, out time.Time) {
	fx.decrypts.mu.Lock()
	defer fx.decrypts.mu.Unlock()
	return fx.decrypts.in, fx.decrypts.out
}

// decryptTimes holds when the last premaster decryption entered and left
// the HSM.
type decryptTimes struct {
	mu      sync.Mutex
	in, out time.Time
}

// timedStore is the module as a key store, its RSA keys wrapped so that
// each premaster decryption records its times in last.
type timedStore struct {
	*hsm.Module
	last *decryptTimes
}

func (s timedStore) Key(ctx context.Context, id link.KeyID) (crypto.Signer, error) {
	k, err := s.Module.Key(ctx, id)
	if d, ok := k.(decryptKey); ok && err == nil {
		return timedKey{d, s.last}, nil
	}
	return k, err
}

// decryptKey is what the module's RSA keys implement.
type decryptKey interface {
	crypto.Signer
	signer.ContextSigner
	signer.SchemeLister
	signer.Describer
	signer.PremasterDecrypter
}

type timedKey struct {
	decryptKey
	last *decryptTimes
}

func (k timedKey) DecryptPremaster(ctx context.Context, ciphertext []byte) ([]byte, error) {
	in := time.Now()
	pms, err := k.decryptKey.DecryptPremaster(ctx, ciphertext)
	out := time.Now()
	k.last.mu.Lock()
	k.last.in, k.last.out = in, out
	k.last.mu.Unlock()
	return pms, err
}

// runA starts n goroutines that each sign with req as A, one signature
// after another, and checks the first signature of each with check. It
// returns once they have made 2n signatures, so that A's operations fill
// the queue before B measures. signed returns the number of signatures made
// so far; stop makes the goroutines finish the signature they are waiting
// for and waits for them.
func (fx *fairnessFixture) runA(b *testing.B, n int, req *keylessv1.SignRequest, check func([]byte) error) (signed func() int64, stop func()) {
	var (
		done  atomic.Bool
		count atomic.Int64
		wg    sync.WaitGroup
	)
	for range n {
		wg.Go(func() {
			for first := true; !done.Load(); first = false {
				ctx, cancel := context.WithTimeout(b.Context(), 30*time.Second)
				resp, err := fx.a.Sign(ctx, req)
				cancel()
				if err != nil {
					b.Errorf("A: Sign() = %v", err)
					return
				}
				if first {
					if err := check(resp.GetSignature()); err != nil {
						b.Errorf("A: Sign() returned a signature that does not verify: %v", err)
						return
					}
				}
				count.Add(1)
			}
		})
	}
	for count.Load() < int64(2*n) && !b.Failed() {
		time.Sleep(time.Millisecond)
	}
	return count.Load, func() {
		done.Store(true)
		wg.Wait()
		if b.Failed() {
			b.FailNow()
		}
	}
}

// percentile returns the q-quantile of sorted (nearest rank).
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(i, 0)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func keyIDBytes(b *testing.B, pub any) []byte {
	b.Helper()
	id, err := link.KeyIDOf(pub)
	if err != nil {
		b.Fatal(err)
	}
	return id[:]
}

// fairnessPKI is a CA for the link, with the keyserver's certificate.
type fairnessPKI struct {
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
	server tls.Certificate
}

func newFairnessPKI(b *testing.B) *fairnessPKI {
	b.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "fairness link CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		b.Fatal(err)
	}
	ca, err := x509.ParseCertificate(der)
	if err != nil {
		b.Fatal(err)
	}
	p := &fairnessPKI{ca: ca, caKey: key}
	p.server = p.issue(b, x509.ExtKeyUsageServerAuth, "keyserver.fairness.test")
	return p
}

// issue returns a certificate and key for name: a URI SAN if it has a
// scheme, else a DNS SAN.
func (p *fairnessPKI) issue(b *testing.B, usage x509.ExtKeyUsage, name string) tls.Certificate {
	b.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "fairness"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
	}
	if u, err := url.Parse(name); err == nil && u.Scheme != "" {
		tmpl.URIs = []*url.URL{u}
	} else {
		tmpl.DNSNames = []string{name}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, key.Public(), p.caKey)
	if err != nil {
		b.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		b.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

func (p *fairnessPKI) pool() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(p.ca)
	return pool
}

func (p *fairnessPKI) serverConfig() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{p.server},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    p.pool(),
	}
}

func (p *fairnessPKI) clientConfig(b *testing.B, identity string) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{p.issue(b, x509.ExtKeyUsageClientAuth, identity)},
		RootCAs:      p.pool(),
		ServerName:   "keyserver.fairness.test",
	}
}
