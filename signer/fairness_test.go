package signer

import (
	"crypto"
	"crypto/ecdsa"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// Two edge identities for the fairness tests.
const (
	floodIdentity = "spiffe://test.example/edge/flood"
	quietIdentity = "spiffe://test.example/edge/quiet"
)

const fairnessPolicyYAML = `
rules:
  - name: flood
    identities: [spiffe://test.example/edge/flood]
    keys: ["*"]
    operations: [sign]
    schemes: [default]
  - name: quiet
    identities: [spiffe://test.example/edge/quiet]
    keys: ["*"]
    operations: [sign]
    schemes: [default]
`

// orderedKey is a key whose Sign, like an uncancellable HSM call, says
// that it started by sending name on entered and then waits for a value on
// release; keys sharing the two channels show the order in which the key
// store was given their operations.
type orderedKey struct {
	crypto.Signer
	name    string
	entered chan<- string
	release <-chan struct{}
}

func (k orderedKey) Sign(rand io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	k.entered <- k.name
	<-k.release
	return k.Signer.Sign(rand, digest, opts)
}

// TestServiceFairBetweenIdentities checks that the queue into the key
// store serves identities in turn: with one slot, the flooding identity
// running one operation and eight more queued, the quiet identity's one
// operation, queued last, is the second to run (after the flooding
// identity's oldest, whose turn came first), not the last.
func TestServiceFairBetweenIdentities(t *testing.T) {
	entered := make(chan string, 16)
	release := make(chan struct{})
	floodKey := orderedKey{testP256Key(), "flood", entered, release}
	quietKey := orderedKey{testP384Key(), "quiet", entered, release}
	ts := newTestServer(t, Config{
		Keys:          &testStore{keys: []crypto.Signer{floodKey, quietKey}},
		Policy:        mustPolicy(t, fairnessPolicyYAML),
		MaxConcurrent: 1,
		MaxQueued:     64,
	})
	floodReq := p256SignRequest(t)
	quietReq := &keylessv1.SignRequest{
		KeyId:     mustKeyID(t, testP384Key().Public()),
		Algorithm: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA384,
		Digest:    testDigest(crypto.SHA384, "quiet"),
	}
	type result struct {
		who string
		sig []byte
		err error
	}
	results := make(chan result, 16)
	sign := func(who, identity string, req *keylessv1.SignRequest) {
		go func() {
			resp, err := ts.svc.Sign(edgeContext(testContext(t, 0), identity), req)
			results <- result{who, resp.GetSignature(), err}
		}()
	}
	waitEntered := func() string {
		t.Helper()
		select {
		case who := <-entered:
			return who
		case <-time.After(defaultTestTimeout):
			t.Fatal("no operation reached the key store")
			return ""
		}
	}

	const backlog = 8
	sign("flood", floodIdentity, floodReq)
	if who := waitEntered(); who != "flood" {
		t.Fatalf("first operation in the key store = %s, want flood", who)
	}
	// Queue the backlog one by one, so that the queue's order is known.
	for i := range backlog {
		sign("flood", floodIdentity, floodReq)
		waitUntil(t, fmt.Sprintf("flood operation %d to queue", i+1), func() bool { return ts.svc.limit.waiting.Load() == int64(i+1) })
	}
	sign("quiet", quietIdentity, quietReq)
	waitUntil(t, "the quiet operation to queue", func() bool { return ts.svc.limit.waiting.Load() == backlog+1 })

	var order []string
	for range backlog + 1 {
		release <- struct{}{}
		order = append(order, waitEntered())
	}
	release <- struct{}{}
	want := "flood quiet" + strings.Repeat(" flood", backlog-1)
	if got := strings.Join(order, " "); got != want {
		t.Errorf("operations queued behind the running one entered the key store in the order\n\t%s\nwant\n\t%s\n(the quiet identity's one operation must not wait for the flooding identity's backlog)", got, want)
	}
	for range backlog + 2 {
		r := <-results
		if r.err != nil {
			t.Errorf("Sign() as %s = %v", r.who, r.err)
			continue
		}
		pub, digest := testP256Key().Public().(*ecdsa.PublicKey), floodReq.GetDigest()
		if r.who == "quiet" {
			pub, digest = testP384Key().Public().(*ecdsa.PublicKey), quietReq.GetDigest()
		}
		if !ecdsa.VerifyASN1(pub, digest, r.sig) {
			t.Errorf("Sign() as %s returned a signature that does not verify", r.who)
		}
	}
	if n := ts.svc.limit.running(); n != 0 {
		t.Errorf("limiter.running() = %d after every operation ended, want 0", n)
	}
}

// TestServiceQueueFullFairBetweenIdentities checks that a flood cannot
// fill the queue into the key store against another identity: with the
// queue full of the flooding identity's operations, the quiet identity's
// operation takes the place of the flooder's newest, which is refused
// with ResourceExhausted, and is then performed.
func TestServiceQueueFullFairBetweenIdentities(t *testing.T) {
	entered := make(chan string, 16) // not read after the first: the order is not checked here
	release := make(chan struct{})
	floodKey := orderedKey{testP256Key(), "flood", entered, release}
	quietKey := orderedKey{testP384Key(), "quiet", entered, release}
	const maxQueued = 4
	ts := newTestServer(t, Config{
		Keys:          &testStore{keys: []crypto.Signer{floodKey, quietKey}},
		Policy:        mustPolicy(t, fairnessPolicyYAML),
		MaxConcurrent: 1,
		MaxQueued:     maxQueued,
	})
	floodReq := p256SignRequest(t)
	quietReq := &keylessv1.SignRequest{
		KeyId:     mustKeyID(t, testP384Key().Public()),
		Algorithm: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA384,
		Digest:    testDigest(crypto.SHA384, "quiet"),
	}
	type result struct {
		who string
		sig []byte
		err error
	}
	results := make(chan result, 16)
	sign := func(who, identity string, req *keylessv1.SignRequest) {
		go func() {
			resp, err := ts.svc.Sign(edgeContext(testContext(t, 0), identity), req)
			results <- result{who, resp.GetSignature(), err}
		}()
	}
	receiveResult := func() result {
		t.Helper()
		select {
		case r := <-results:
			return r
		case <-time.After(defaultTestTimeout):
			t.Fatal("no Sign call returned")
			return result{}
		}
	}

	sign("flood", floodIdentity, floodReq)
	select {
	case who := <-entered:
		if who != "flood" {
			t.Fatalf("first operation in the key store = %s, want flood", who)
		}
	case <-time.After(defaultTestTimeout):
		t.Fatal("no operation reached the key store")
	}
	for i := range maxQueued {
		sign("flood", floodIdentity, floodReq)
		waitUntil(t, fmt.Sprintf("flood operation %d to queue", i+1), func() bool { return ts.svc.limit.waiting.Load() == int64(i+1) })
	}
	sign("quiet", quietIdentity, quietReq)
	r := receiveResult()
	if r.who != "flood" || status.Code(r.err) != codes.ResourceExhausted {
		t.Fatalf("with the queue full of the flooder's operations, a Sign as %s returned %v first; want a flood Sign to return ResourceExhausted and the quiet one to queue", r.who, r.err)
	}
	waitUntil(t, "the quiet operation to queue", func() bool { return ts.svc.limit.waiting.Load() == maxQueued })

	var quiet []byte
	for range maxQueued + 1 {
		release <- struct{}{}
		r := receiveResult()
		if r.err != nil {
			t.Fatalf("Sign() as %s = %v", r.who, r.err)
		}
		if r.who == "quiet" {
			quiet = r.sig
		} else if !ecdsa.VerifyASN1(testP256Key().Public().(*ecdsa.PublicKey), floodReq.GetDigest(), r.sig) {
			t.Error("a flood Sign() returned a signature that does not verify")
		}
	}
	if !ecdsa.VerifyASN1(testP384Key().Public().(*ecdsa.PublicKey), quietReq.GetDigest(), quiet) {
		t.Error("the quiet Sign() returned no signature that verifies")
	}
}
