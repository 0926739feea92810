package signer

import (
	"bytes"
	"crypto"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// auditRecords parses an audit trail of JSON lines, failing the test on
// anything else, and checks that every record has every field.
func auditRecords(t *testing.T, trail string) []AuditRecord {
	t.Helper()
	var recs []AuditRecord
	for _, line := range strings.Split(strings.TrimSuffix(trail, "\n"), "\n") {
		if line == "" {
			continue
		}
		var fields map[string]any
		if err := json.Unmarshal([]byte(line), &fields); err != nil {
			t.Fatalf("audit line %q is not JSON: %v", line, err)
		}
		for _, f := range []string{"time", "identity", "key_id", "op", "scheme", "server_name", "client_address", "connection_id", "edge_address", "outcome", "error", "rule", "latency_us"} {
			if _, ok := fields[f]; !ok {
				t.Errorf("audit line %q has no field %q", line, f)
			}
		}
		if len(fields) != 13 {
			t.Errorf("audit line %q has %d fields, want 13", line, len(fields))
		}
		var r AuditRecord
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatal(err)
		}
		recs = append(recs, r)
	}
	return recs
}

// newAuditCount returns a function that returns the records written since
// the previous call.
func newAuditCount(t *testing.T, ts *testServer) func() []AuditRecord {
	seen := 0
	return func() []AuditRecord {
		t.Helper()
		all := auditRecords(t, ts.audit.String())
		recs := all[seen:]
		seen = len(all)
		return recs
	}
}

func TestServicePolicy(t *testing.T) {
	rsaID := mustKeyID(t, testRSAKey().Public())
	p256ID := mustKeyID(t, testP256Key().Public())
	p384ID := mustKeyID(t, testP384Key().Public())
	const (
		edgeA    = "spiffe://test.example/edge/a"
		edgeB    = "edge-b.test.example"
		stranger = "spiffe://test.example/edge/stranger"
	)
	policy := mustPolicy(t, fmt.Sprintf(`
rules:
  - name: a-rsa
    identities: [spiffe://test.example/edge/a]
    keys: [id:%x]
    operations: [sign, decrypt]
    schemes: [rsa_pss_rsae_sha256, rsa_pkcs1_sha256]
  - name: a-ecdsa
    identities: [spiffe://test.example/edge/a]
    keys: [label:ecdsa-key]
    operations: [sign]
    schemes: [default]
  - name: b-rsa
    identities: [edge-b.test.example]
    keys: [id:%x]
    operations: [sign]
    schemes: [default, rsa_pkcs1_sha1]
`, rsaID, rsaID))
	keys := []crypto.Signer{memoryKey(t, testRSAKey()), restrictedKey{Signer: testP256Key(), schemes: link.DefaultSchemes(testP256Key().Public()), label: "ecdsa-key"}, testP384Key()}
	ts := newTestServer(t, Config{Keys: &testStore{keys: keys}, Policy: policy})
	a, b, s := ts.dial(t, "other.example", edgeA), ts.dial(t, edgeB), ts.dial(t, stranger, "edge-b.test.example.com")
	newRecords := newAuditCount(t, ts)
	sign := func(c keylessv1.KeylessServiceClient, id []byte, wire keylessv1.SignatureAlgorithm) error {
		alg, _ := link.AlgorithmFor(wire)
		digest := testDigest(alg.Hash, "policy")
		resp, err := c.Sign(testContext(t, 0), &keylessv1.SignRequest{KeyId: id, Algorithm: wire, Digest: digest,
			Context: &keylessv1.RequestContext{ServerName: "www.example.com", ClientAddress: "198.51.100.1:5555", ConnectionId: "c1"}})
		if err == nil {
			if verr := verifySignature(testPublicKeyByID(id), alg, digest, resp.GetSignature()); verr != nil {
				t.Errorf("signature: %v", verr)
			}
		}
		return err
	}
	decrypt := func(c keylessv1.KeylessServiceClient, id []byte) error {
		ct, _ := rsa.EncryptPKCS1v15(nil, &testRSAKey().PublicKey, testStream("pms", link.PremasterLen))
		resp, err := c.Decrypt(testContext(t, 0), &keylessv1.DecryptRequest{KeyId: id, EncryptedPremaster: ct})
		if err == nil && !bytes.Equal(resp.GetPremaster(), testStream("pms", link.PremasterLen)) {
			t.Error("Decrypt() returned the wrong premaster")
		}
		return err
	}
	const (
		pss    = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA256
		pss384 = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA384
		sha1   = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA1
		ec256  = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA256
	)
	tests := []struct {
		name     string
		call     func() error
		want     codes.Code
		wantMsg  string
		identity string
		op       string
		rule     string
	}{
		{"A signs RSA", func() error { return sign(a, rsaID, pss) }, codes.OK, "", edgeA, OpSign, "a-rsa"},
		{"A decrypts RSA", func() error { return decrypt(a, rsaID) }, codes.OK, "", edgeA, OpDecrypt, "a-rsa"},
		{"A signs ECDSA by label", func() error { return sign(a, p256ID, ec256) }, codes.OK, "", edgeA, OpSign, "a-ecdsa"},
		{"A scheme not in rule", func() error { return sign(a, rsaID, pss384) }, codes.PermissionDenied, `rule "a-rsa" does not allow scheme rsa_pss_rsae_sha384`, edgeA, OpSign, "a-rsa"},
		{"A SHA-1", func() error { return sign(a, rsaID, sha1) }, codes.PermissionDenied, "SHA-1 schemes are allowed only where a rule names them", edgeA, OpSign, "a-rsa"},
		{"A key not allowed", func() error { return sign(a, p384ID, ec256) }, codes.NotFound, ErrKeyNotFound.Error(), edgeA, OpSign, ""},
		{"B decrypt not enabled", func() error { return decrypt(b, rsaID) }, codes.PermissionDenied, `rule "b-rsa" does not allow decrypt`, edgeB, OpDecrypt, "b-rsa"},
		{"B SHA-1 named but not possible", func() error { return sign(b, rsaID, sha1) }, codes.InvalidArgument, "not supported by this key", edgeB, OpSign, "b-rsa"},
		{"B other key", func() error { return sign(b, p256ID, ec256) }, codes.NotFound, ErrKeyNotFound.Error(), edgeB, OpSign, ""},
		{"B decrypts a key not allowed", func() error { return decrypt(b, p384ID) }, codes.NotFound, ErrKeyNotFound.Error(), edgeB, OpDecrypt, ""},
		{"unlisted identity", func() error { return sign(s, rsaID, pss) }, codes.PermissionDenied, "(spiffe://test.example/edge/stranger, edge-b.test.example.com) is an identity of the policy", stranger, OpSign, ""},
		{"unknown key", func() error { return sign(a, testStream("nokey", 32), pss) }, codes.NotFound, ErrKeyNotFound.Error(), edgeA, OpSign, ""},
		{"unknown key, decrypt", func() error { return decrypt(b, testStream("nokey", 32)) }, codes.NotFound, ErrKeyNotFound.Error(), edgeB, OpDecrypt, ""},
	}
	// What the caller is told of a key the store does not hold and of one
	// its policy does not let it use is the same, to the byte; the audit
	// record tells the operator which.
	wantDetail := map[string]string{
		"A key not allowed":            ` (not allowed by policy: no rule allows identity "spiffe://test.example/edge/a" to use key ` + link.FormatKeyID(link.KeyID(p384ID)) + ")",
		"B other key":                  ` (not allowed by policy: no rule allows identity "edge-b.test.example" to use key ` + link.FormatKeyID(link.KeyID(p256ID)) + ")",
		"B decrypts a key not allowed": ` (not allowed by policy: no rule allows identity "edge-b.test.example" to use key ` + link.FormatKeyID(link.KeyID(p384ID)) + ")",
		"unknown key":                  " (no such key)",
		"unknown key, decrypt":         " (no such key)",
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			if status.Code(err) != tt.want || !strings.Contains(status.Convert(err).Message(), tt.wantMsg) {
				t.Fatalf("call = %v, want %v with %q", err, tt.want, tt.wantMsg)
			}
			if tt.want == codes.NotFound && status.Convert(err).Message() != ErrKeyNotFound.Error() {
				t.Errorf("call = %v, want exactly %q", err, ErrKeyNotFound)
			}
			recs := newRecords()
			if len(recs) != 1 {
				t.Fatalf("%d audit records, want 1: %+v", len(recs), recs)
			}
			r := recs[0]
			if r.Identity != tt.identity || r.Op != tt.op || r.Outcome != tt.want.String() || r.Rule != tt.rule || r.Error != status.Convert(err).Message()+wantDetail[tt.name] {
				t.Errorf("audit record = %+v, want identity %q, op %q, outcome %v, rule %q", r, tt.identity, tt.op, tt.want, tt.rule)
			}
		})
	}

	// ListKeys shows each caller what it may use, and nothing else.
	list := func(c keylessv1.KeylessServiceClient) map[string]*keylessv1.Key {
		t.Helper()
		resp, err := c.ListKeys(testContext(t, 0), &keylessv1.ListKeysRequest{})
		if err != nil {
			t.Fatalf("ListKeys() = %v", err)
		}
		out := map[string]*keylessv1.Key{}
		for _, k := range resp.GetKeys() {
			out[fmt.Sprintf("%x", k.GetKeyId())] = k
		}
		return out
	}
	la := list(a)
	if len(la) != 2 || la[fmt.Sprintf("%x", p384ID)] != nil {
		t.Fatalf("ListKeys() for A = %v, want the RSA and P-256 keys", la)
	}
	if k := la[fmt.Sprintf("%x", rsaID)]; !k.GetDecryptPremaster() || !slices.Equal(k.GetSignatureAlgorithms(), []keylessv1.SignatureAlgorithm{pss, keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256}) {
		t.Errorf("ListKeys() for A: RSA key = %v", k)
	}
	if k := la[fmt.Sprintf("%x", p256ID)]; k.GetDecryptPremaster() || len(k.GetSignatureAlgorithms()) != 3 {
		t.Errorf("ListKeys() for A: P-256 key = %v", k)
	}
	lb := list(b)
	if k := lb[fmt.Sprintf("%x", rsaID)]; len(lb) != 1 || k.GetDecryptPremaster() || slices.Contains(k.GetSignatureAlgorithms(), sha1) || len(k.GetSignatureAlgorithms()) != 6 {
		t.Errorf("ListKeys() for B = %v, want the RSA key with its 6 schemes (no SHA-1: the key cannot) and no decryption", lb)
	}
	if _, err := s.ListKeys(testContext(t, 0), &keylessv1.ListKeysRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("ListKeys() for an unlisted identity = %v, want PermissionDenied", err)
	}
	if recs := newRecords(); len(recs) != 3 || recs[0].Op != "list_keys" || recs[2].Outcome != "PermissionDenied" {
		t.Errorf("ListKeys audit records = %+v", recs)
	}

	// A new policy applies to the next request on the same connection.
	if err := ts.svc.SetPolicy(mustPolicy(t, strings.Replace(testPolicyYAML, testIdentity, edgeB, 1))); err != nil {
		t.Fatal(err)
	}
	if err := sign(a, rsaID, pss); status.Code(err) != codes.PermissionDenied {
		t.Errorf("Sign() by an identity the new policy removed = %v, want PermissionDenied", err)
	}
	if err := sign(b, p384ID, ec256); err != nil {
		t.Errorf("Sign() allowed by the new policy = %v", err)
	}
	if ts.svc.SetPolicy(nil) == nil {
		t.Error("SetPolicy(nil) = nil error")
	}
}

// memoryKey returns the key as a MemoryStore holds it: RSA keys can decrypt.
func memoryKey(t *testing.T, k crypto.Signer) crypto.Signer {
	t.Helper()
	ms, err := NewMemoryStore(k)
	if err != nil {
		t.Fatal(err)
	}
	keys, _ := ms.Keys(t.Context())
	return keys[0]
}

func TestServiceNoPeerCertificate(t *testing.T) {
	svc, err := NewService(Config{Keys: newTestMemoryStore(t), Policy: testPolicy(t)})
	if err != nil {
		t.Fatal(err)
	}
	_, err = svc.ListKeys(testContext(t, 0), &keylessv1.ListKeysRequest{})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "no verified client certificate") {
		t.Errorf("ListKeys() without a peer = %v, want PermissionDenied", err)
	}
}

func TestServiceQuotaInFlight(t *testing.T) {
	key := newBlockingKey(t, testP256Key())
	policy := mustPolicy(t, testPolicyYAML+`
  - name: other
    identities: [spiffe://test.example/edge/2]
    keys: ["*"]
    operations: [sign]
    schemes: [default]
quotas:
  - name: one-at-a-time
    identities: [spiffe://test.example/edge/1]
    max_inflight: 1
`)
	ts := newTestServer(t, Config{Keys: &testStore{keys: []crypto.Signer{key}}, Policy: policy, Quota: Quota{MaxInFlight: 2}})
	req := p256SignRequest(t)
	running := signAsync(testContext(t, 0), ts.client, req)
	key.waitEntered(t)

	_, err := ts.client.Sign(testContext(t, 0), req)
	checkStatus(t, "second Sign()", err, codes.ResourceExhausted, "")
	if msg := status.Convert(err).Message(); !strings.Contains(msg, `identity "spiffe://test.example/edge/1"`) || !strings.Contains(msg, `quota "one-at-a-time"`) || !strings.Contains(msg, "at most 1 request in flight") {
		t.Errorf("second Sign() = %q, want a message naming the identity, the quota and the limit", msg)
	}
	_, err = ts.client.ListKeys(testContext(t, 0), &keylessv1.ListKeysRequest{})
	checkStatus(t, "ListKeys()", err, codes.ResourceExhausted, "")

	// Another identity has its own counter, under the default quota.
	other := ts.dial(t, "spiffe://test.example/edge/2")
	o1 := signAsync(testContext(t, 0), other, req)
	key.waitEntered(t)
	o2 := signAsync(testContext(t, 0), other, req)
	key.waitEntered(t)
	_, err = other.Sign(testContext(t, 0), req)
	checkStatus(t, "third Sign() of identity 2", err, codes.ResourceExhausted, "")
	if msg := status.Convert(err).Message(); !strings.Contains(msg, "default quota") || !strings.Contains(msg, "at most 2 requests in flight") {
		t.Errorf("third Sign() of identity 2 = %q", msg)
	}

	key.unblock()
	for _, c := range []<-chan error{running, o1, o2} {
		if err := receive(t, c); err != nil {
			t.Errorf("Sign() = %v", err)
		}
	}
	if _, err := ts.client.Sign(testContext(t, 0), req); err != nil {
		t.Errorf("Sign() after the others finished = %v", err)
	}
	var exhausted int
	for _, r := range auditRecords(t, ts.audit.String()) {
		if r.Outcome == "ResourceExhausted" {
			exhausted++
		}
	}
	if exhausted != 3 {
		t.Errorf("%d ResourceExhausted audit records, want 3", exhausted)
	}
}

func TestServiceQuotaRate(t *testing.T) {
	policy := mustPolicy(t, testPolicyYAML+`
quotas:
  - name: slow
    identities: [spiffe://test.example/edge/1]
    rate: 0.001
    burst: 2
`)
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t), Policy: policy})
	req := p256SignRequest(t)
	for i := range 2 {
		if _, err := ts.client.Sign(testContext(t, 0), req); err != nil {
			t.Fatalf("Sign() %d within the burst = %v", i, err)
		}
	}
	_, err := ts.client.Sign(testContext(t, 0), req)
	checkStatus(t, "Sign() over the rate", err, codes.ResourceExhausted, "")
	if msg := status.Convert(err).Message(); !strings.Contains(msg, `quota "slow"`) || !strings.Contains(msg, "at most 0.001 requests per second, in bursts of at most 2") {
		t.Errorf("Sign() over the rate = %q", msg)
	}
	if n := ts.svc.quotas.inFlight(testIdentity); n != 0 {
		t.Errorf("%d requests in flight after all returned", n)
	}
}

func TestQuotaAcquire(t *testing.T) {
	qs := newQuotas()
	release, err := qs.acquire("a", "q", Quota{})
	if err != nil {
		t.Fatal(err)
	}
	release()
	r1, err := qs.acquire("a", "q", Quota{MaxInFlight: 1, Rate: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := qs.acquire("a", "q", Quota{MaxInFlight: 1, Rate: 1000}); err == nil {
		t.Fatal("second acquire over MaxInFlight succeeded")
	}
	r1()
	r1() // a second release is a no-op
	if n := qs.inFlight("a"); n != 0 {
		t.Fatalf("inFlight = %d after release", n)
	}
	// A reloaded policy's new rate applies to the existing bucket.
	if _, err := qs.acquire("a", "q", Quota{Rate: 0.0001, Burst: 1}); err != nil {
		t.Fatalf("acquire after a rate change = %v", err)
	}
	var qerr *QuotaError
	if _, err := qs.acquire("a", "q", Quota{Rate: 0.0001, Burst: 1}); !errors.As(err, &qerr) || qerr.Identity != "a" || qerr.Quota != "q" {
		t.Fatalf("acquire over the new rate = %v", err)
	}
	if (Quota{Rate: 2.5}).burst() != 3 || (Quota{Rate: 0.1}).burst() != 1 || (Quota{Rate: 5, Burst: 7}).burst() != 7 {
		t.Error("burst defaults are wrong")
	}
}

func TestServiceAuditTrail(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t)})
	newRecords := newAuditCount(t, ts)
	rc := &keylessv1.RequestContext{ServerName: "www.example.com", ClientAddress: "203.0.113.9:443", ConnectionId: "conn-7"}

	// One record per request, with the request's context and no secret.
	req := p256SignRequest(t)
	req.Context = rc
	resp, err := ts.client.Sign(testContext(t, 0), req)
	if err != nil {
		t.Fatal(err)
	}
	recs := newRecords()
	if len(recs) != 1 {
		t.Fatalf("%d records for one Sign, want 1", len(recs))
	}
	r := recs[0]
	want := AuditRecord{Time: r.Time, Identity: testIdentity, KeyID: fmt.Sprintf("%x", req.GetKeyId()), Op: "sign", Scheme: "ecdsa_sha256",
		ServerName: "www.example.com", ClientAddress: "203.0.113.9:443", ConnectionID: "conn-7", EdgeAddress: "bufconn",
		Outcome: "OK", Rule: "test-all", LatencyUS: r.LatencyUS}
	if r != want {
		t.Errorf("audit record = %+v, want %+v", r, want)
	}
	if time.Since(r.Time) > time.Minute || r.Time.Location() != time.UTC || r.LatencyUS < 0 {
		t.Errorf("audit record time, latency = %v, %d", r.Time, r.LatencyUS)
	}
	checkNotLogged(t, ts.audit.String(), [][]byte{req.GetDigest(), resp.GetSignature()})

	// Implicit rejection: a decryption of an invalid ciphertext is recorded
	// exactly like that of a valid one.
	var valid, invalid *AuditRecord
	for _, tc := range decryptCases(t) {
		if tc.wantCode != codes.OK {
			continue
		}
		tc.req.Context = rc
		if _, err := ts.client.Decrypt(testContext(t, 0), tc.req); err != nil {
			t.Fatal(err)
		}
		recs := newRecords()
		if len(recs) != 1 {
			t.Fatalf("%s: %d records, want 1", tc.name, len(recs))
		}
		r := recs[0]
		r.Time, r.LatencyUS = time.Time{}, 0
		if !tc.rejected && valid == nil {
			valid = &r
			continue
		}
		if tc.rejected {
			invalid = &r
		}
		if r != *valid {
			t.Errorf("%s: audit record %+v differs from a valid decryption's %+v", tc.name, r, *valid)
		}
	}
	if invalid == nil || valid.Outcome != "OK" || valid.Op != "decrypt" || valid.Scheme != "" {
		t.Fatalf("decrypt records: valid %+v, invalid %+v", valid, invalid)
	}

	// An oversize request never reaches the handler; the stats handler
	// records it all the same, once.
	_, err = ts.client.Decrypt(testContext(t, 0), &keylessv1.DecryptRequest{KeyId: req.GetKeyId(), EncryptedPremaster: make([]byte, link.MaxRequestSize)})
	checkStatus(t, "oversize Decrypt()", err, codes.ResourceExhausted, "")
	// The stats handler writes this record just after the answer.
	waitUntil(t, "the oversize request's record", func() bool {
		return strings.Contains(ts.audit.String(), `"outcome":"ResourceExhausted"`)
	})
	recs = newRecords()
	if len(recs) != 1 || recs[0].Op != "decrypt" || recs[0].Outcome != "ResourceExhausted" || recs[0].Identity != testIdentity || recs[0].KeyID != "" {
		t.Errorf("oversize Decrypt() records = %+v", recs)
	}

	// A malformed request: its key_id is kept only when it is one.
	_, err = ts.client.Sign(testContext(t, 0), &keylessv1.SignRequest{KeyId: []byte("short"), Algorithm: 9999})
	checkStatus(t, "Sign()", err, codes.InvalidArgument, "key_id")
	recs = newRecords()
	if len(recs) != 1 || recs[0].KeyID != "" || recs[0].Scheme != "9999" || recs[0].Outcome != "InvalidArgument" || !strings.Contains(recs[0].Error, "invalid key_id") {
		t.Errorf("malformed Sign() records = %+v", recs)
	}

	// Handlers called directly, without the stats handler, write their
	// own record.
	_, err = ts.svc.Sign(ts.edgeContext(t, 0), p256SignRequest(t))
	if err != nil {
		t.Fatal(err)
	}
	if recs := newRecords(); len(recs) != 1 || recs[0].Outcome != "OK" || recs[0].EdgeAddress != "192.0.2.7:40000" {
		t.Errorf("direct Sign() records = %+v", recs)
	}
}

// failingWriter fails while broken is set.
type failingWriter struct {
	mu     sync.Mutex
	broken bool
	buf    bytes.Buffer
}

func (w *failingWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.broken {
		return 0, errors.New("disk full")
	}
	return w.buf.Write(p)
}

func (w *failingWriter) set(broken bool) {
	w.mu.Lock()
	w.broken = broken
	w.mu.Unlock()
}

func TestServiceAuditFailsClosed(t *testing.T) {
	w := &failingWriter{}
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t), Audit: NewAuditLog(w)})
	req := p256SignRequest(t)
	w.set(true)
	// The first request reaches the key, but its record cannot be written:
	// the signature is withheld.
	resp, err := ts.client.Sign(testContext(t, 0), req)
	checkStatus(t, "Sign() whose record cannot be written", err, codes.Unavailable, "")
	if resp != nil || !ts.svc.auditFailing.Load() {
		t.Fatalf("Sign() = %v, audit failing %t", resp, ts.svc.auditFailing.Load())
	}
	// The next is refused before it reaches the key.
	_, err = ts.client.Sign(testContext(t, 0), req)
	checkStatus(t, "Sign() while the audit trail fails", err, codes.Unavailable, "")
	if !strings.Contains(err.Error(), "audit trail cannot be written") {
		t.Errorf("Sign() = %v", err)
	}
	if !strings.Contains(ts.logs.String(), "disk full") {
		t.Error("the audit failure was not logged")
	}
	w.set(false)
	// The refusal's record is written, which heals the trail.
	_, _ = ts.client.Sign(testContext(t, 0), req)
	if _, err := ts.client.Sign(testContext(t, 0), req); err != nil {
		t.Errorf("Sign() after the audit trail recovered = %v", err)
	}
	if !strings.Contains(ts.logs.String(), "audit trail writable again") {
		t.Error("the recovery was not logged")
	}
}

// TestAuditLogConcurrent checks that concurrent records are whole lines.
func TestAuditLogConcurrent(t *testing.T) {
	var buf syncBuffer
	l := NewAuditLog(&buf)
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Go(func() {
			if err := l.Audit(&AuditRecord{Op: "sign", Identity: strings.Repeat("x", i*10)}); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if recs := auditRecords(t, buf.String()); len(recs) != 50 {
		t.Errorf("%d records, want 50", len(recs))
	}
}
