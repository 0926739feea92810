package e2e

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/hsm/hsmtest"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
	"github.com/keyless-tls/keyless/signer"
)

// Identities of the security tests' edges.
const (
	secEdgeA      = "spiffe://sec.e2e/edge/a"        // signs with both web keys, decrypts with the RSA one
	secEdgeB      = "spiffe://sec.e2e/edge/b"        // signs with the RSA key only; no decryption
	secEdgeLegacy = "spiffe://sec.e2e/edge/legacy"   // may use SHA-1 with the RSA key, which the HSM cannot do
	secEdgeQuota  = "spiffe://sec.e2e/edge/q"        // one request in flight at most
	secStranger   = "spiffe://sec.e2e/edge/stranger" // from the right CA, not in the policy
)

// secPolicy is the security tests' policy.
const secPolicy = `
rules:
  - name: a-web
    identities: [spiffe://sec.e2e/edge/a]
    keys: [label:rsa.sec.test, label:ecdsa.sec.test]
    operations: [sign]
    schemes: [default]
  - name: a-kex
    identities: [spiffe://sec.e2e/edge/a]
    keys: [label:rsa.sec.test]
    operations: [decrypt]
  - name: b-rsa
    identities: [spiffe://sec.e2e/edge/b]
    keys: [label:rsa.sec.test]
    operations: [sign]
    schemes: [default]
  - name: legacy
    identities: [spiffe://sec.e2e/edge/legacy]
    keys: [label:rsa.sec.test]
    operations: [sign]
    schemes: [rsa_pkcs1_sha1, default]
  - name: q-ecdsa
    identities: [spiffe://sec.e2e/edge/q]
    keys: [label:ecdsa.sec.test]
    operations: [sign]
    schemes: [default]
quotas:
  - name: one-at-a-time
    identities: [spiffe://sec.e2e/edge/q]
    max_inflight: 1
`

// secKeyserver is a keyserver built as "keyserver serve" builds it
// (mTLS with the policy's identity check, the request size limit, the audit
// stats handler), in process, over TCP, with keys in a SoftHSM token.
type secKeyserver struct {
	addr       string
	link       *linkPKI
	logs       *syncBuffer // every log line, at trace level
	audit      *syncBuffer // the audit trail
	svc        *signer.Service
	stall      *stall
	rsa, ecdsa crypto.PublicKey
	other      crypto.PublicKey // a key no rule names
}

func startSecKeyserver(t testing.TB) *secKeyserver {
	t.Helper()
	tok := hsmtest.New(t)
	module := tok.Open(t)
	gen := func(spec hsm.KeySpec) crypto.PublicKey {
		k, err := module.Generate(t.Context(), spec)
		if err != nil {
			t.Fatalf("generate %+v: %v", spec, err)
		}
		return k.Public()
	}
	ks := &secKeyserver{
		link:  newLinkPKI(t),
		logs:  &syncBuffer{},
		audit: &syncBuffer{},
		stall: &stall{entered: make(chan struct{}, 16)},
		rsa:   gen(hsm.KeySpec{Type: "rsa", Bits: 2048, Label: "rsa.sec.test"}),
		ecdsa: gen(hsm.KeySpec{Type: "ecdsa", Curve: "P-256", Label: "ecdsa.sec.test"}),
		other: gen(hsm.KeySpec{Type: "ecdsa", Curve: "P-256", Label: "other.sec.test"}),
	}
	logger := hclog.New(&hclog.LoggerOptions{Name: "keyserver", Level: hclog.Trace, Output: ks.logs})
	policy, err := signer.ParsePolicy("security.yaml", []byte(secPolicy))
	if err != nil {
		t.Fatal(err)
	}
	ks.svc, err = signer.NewService(signer.Config{
		Keys:          stallStore{module, ks.stall},
		Policy:        policy,
		Quota:         signer.Quota{MaxInFlight: 64},
		Audit:         signer.NewAuditLog(ks.audit),
		MaxConcurrent: 2,
		MaxQueued:     64,
		Logger:        logger.Named("signer"),
	})
	if err != nil {
		t.Fatal(err)
	}
	creds, err := link.LoadMTLSCredentials(ks.link.serverCert, ks.link.serverKey, ks.link.caFile)
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(append(link.ServerOptions(),
		grpc.Creds(creds.ServerCredentials(ks.svc.CheckPeer, logger.Named("mtls"), link.HandshakeObserver{})),
		grpc.StatsHandler(ks.svc.StatsHandler()),
	)...)
	keylessv1.RegisterKeylessServiceServer(gs, ks.svc)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ks.addr = ln.Addr().String()
	go gs.Serve(ln)
	t.Cleanup(gs.Stop)
	return ks
}

// stall holds signing with the ECDSA key, while armed, until released or
// until the request's deadline: a stuck HSM, under the test's control.
type stall struct {
	armed   atomic.Bool
	entered chan struct{}
	mu      sync.Mutex
	release chan struct{}
}

func (s *stall) arm() {
	s.mu.Lock()
	s.release = make(chan struct{})
	s.mu.Unlock()
	s.armed.Store(true)
}

func (s *stall) disarm() {
	s.armed.Store(false)
	s.mu.Lock()
	close(s.release)
	s.mu.Unlock()
}

func (s *stall) wait(ctx context.Context) error {
	if !s.armed.Load() {
		return nil
	}
	s.mu.Lock()
	release := s.release
	s.mu.Unlock()
	s.entered <- struct{}{}
	select {
	case <-release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// stallStore wraps the ECDSA keys of an hsm.Module in stallKey.
type stallStore struct {
	*hsm.Module
	stall *stall
}

func (s stallStore) wrap(k crypto.Signer) crypto.Signer {
	if k == nil || link.KeyTypeOf(k.Public()) != keylessv1.KeyType_KEY_TYPE_ECDSA {
		return k
	}
	return stallKey{k.(hsmKey), s.stall}
}

func (s stallStore) Key(ctx context.Context, id link.KeyID) (crypto.Signer, error) {
	k, err := s.Module.Key(ctx, id)
	return s.wrap(k), err
}

func (s stallStore) Keys(ctx context.Context) ([]crypto.Signer, error) {
	keys, err := s.Module.Keys(ctx)
	for i, k := range keys {
		keys[i] = s.wrap(k)
	}
	return keys, err
}

// hsmKey is what an hsm signing key offers.
type hsmKey interface {
	crypto.Signer
	signer.ContextSigner
	signer.SchemeLister
	signer.Describer
}

type stallKey struct {
	hsmKey
	stall *stall
}

func (k stallKey) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := k.stall.wait(ctx); err != nil {
		return nil, err
	}
	return k.hsmKey.SignContext(ctx, digest, opts)
}

// clientTLS returns an edge's mTLS client configuration with a certificate
// from ca for names (URIs, then DNS names).
func (ks *secKeyserver) clientTLS(t testing.TB, ca *testCA, uri string, dns ...string) *tls.Config {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	var uris []string
	if uri != "" {
		uris = append(uris, uri)
	}
	cert := ca.issue(t, key.Public(), x509.ExtKeyUsageClientAuth, dns, uris...)
	tc := &tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		ServerName: ks.link.serverName,
		RootCAs:    ks.link.ca.pool(),
		// Always present the certificate, as tlscore's edge does, even when
		// the keyserver asks for another CA's.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return tc, nil },
	}
}

// client returns a KeylessService client over its own connection.
func (ks *secKeyserver) client(t testing.TB, cfg *tls.Config) keylessv1.KeylessServiceClient {
	t.Helper()
	conn, err := grpc.NewClient("passthrough:///"+ks.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return keylessv1.NewKeylessServiceClient(conn)
}

// records returns the audit records written since the previous call.
func (ks *secKeyserver) recordsSince(t testing.TB, seen *int) []signer.AuditRecord {
	t.Helper()
	var all []signer.AuditRecord
	for _, line := range strings.Split(strings.TrimSpace(ks.audit.String()), "\n") {
		if line == "" {
			continue
		}
		var r signer.AuditRecord
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("audit line %q: %v", line, err)
		}
		all = append(all, r)
	}
	recs := all[*seen:]
	*seen = len(all)
	return recs
}

// waitAudit waits until the audit trail has at least n records.
func (ks *secKeyserver) waitAudit(t testing.TB, n int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); strings.Count(ks.audit.String(), "\n") < n; {
		if time.Now().After(deadline) {
			t.Fatalf("the audit trail has fewer than %d records:\n%s", n, ks.audit.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func keyIDOf(t testing.TB, pub crypto.PublicKey) []byte {
	t.Helper()
	id, err := link.KeyIDOf(pub)
	if err != nil {
		t.Fatal(err)
	}
	return id[:]
}

func callCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestSecurityMatrix runs every kind of refusal, and the allowed cases,
// against a real keyserver over TCP and mutual TLS, with SoftHSM.
func TestSecurityMatrix(t *testing.T) {
	ks := startSecKeyserver(t)
	ca := ks.link.ca
	a := ks.client(t, ks.clientTLS(t, ca, secEdgeA, "edge-a.sec.e2e"))
	b := ks.client(t, ks.clientTLS(t, ca, secEdgeB))
	legacy := ks.client(t, ks.clientTLS(t, ca, secEdgeLegacy))
	rsaID, ecID, otherID := keyIDOf(t, ks.rsa), keyIDOf(t, ks.ecdsa), keyIDOf(t, ks.other)
	rsaPub := ks.rsa.(*rsa.PublicKey)
	rc := &keylessv1.RequestContext{ServerName: "www.sec.test", ClientAddress: "198.51.100.7:51000", ConnectionId: "sec-1"}

	digest := sha256.Sum256([]byte("security matrix"))
	sign := func(c keylessv1.KeylessServiceClient, id []byte, alg keylessv1.SignatureAlgorithm, d []byte) (*keylessv1.SignResponse, error) {
		return c.Sign(callCtx(t), &keylessv1.SignRequest{KeyId: id, Algorithm: alg, Digest: d, Context: rc})
	}
	pms := append([]byte{3, 3}, bytes.Repeat([]byte{0x5a}, 46)...)
	validCT, err := rsa.EncryptPKCS1v15(rand.Reader, rsaPub, pms)
	if err != nil {
		t.Fatal(err)
	}
	invalidCT := bytes.Clone(validCT)
	invalidCT[len(invalidCT)-1] ^= 1
	decrypt := func(c keylessv1.KeylessServiceClient, id, ct []byte) (*keylessv1.DecryptResponse, error) {
		return c.Decrypt(callCtx(t), &keylessv1.DecryptRequest{KeyId: id, EncryptedPremaster: ct, Context: rc})
	}
	const (
		pss   = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA256
		ec256 = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA256
		sha1  = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA1
	)
	sha1Digest := make([]byte, 20)

	seen := 0
	tests := []struct {
		name     string
		call     func() error
		want     codes.Code
		wantMsg  string
		identity string
		op, rule string
		keyID    []byte
	}{
		{"allowed: A signs RSA-PSS", func() error {
			resp, err := sign(a, rsaID, pss, digest[:])
			if err == nil {
				err = rsa.VerifyPSS(rsaPub, crypto.SHA256, digest[:], resp.GetSignature(), &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
			}
			return err
		}, codes.OK, "", secEdgeA, "sign", "a-web", rsaID},
		{"allowed: A signs ECDSA", func() error {
			resp, err := sign(a, ecID, ec256, digest[:])
			if err == nil && !ecdsa.VerifyASN1(ks.ecdsa.(*ecdsa.PublicKey), digest[:], resp.GetSignature()) {
				err = errors.New("the ECDSA signature does not verify")
			}
			return err
		}, codes.OK, "", secEdgeA, "sign", "a-web", ecID},
		{"allowed: A decrypts a valid premaster", func() error {
			resp, err := decrypt(a, rsaID, validCT)
			if err == nil && !bytes.Equal(resp.GetPremaster(), pms) {
				err = errors.New("wrong premaster")
			}
			return err
		}, codes.OK, "", secEdgeA, "decrypt", "a-kex", rsaID},
		{"allowed: A decrypts an invalid premaster (implicit rejection)", func() error {
			resp, err := decrypt(a, rsaID, invalidCT)
			if err == nil && (len(resp.GetPremaster()) != 48 || bytes.Equal(resp.GetPremaster(), pms)) {
				err = errors.New("implicit rejection did not answer 48 bytes other than the premaster")
			}
			return err
		}, codes.OK, "", secEdgeA, "decrypt", "a-kex", rsaID},
		// A key the policy does not let the caller use does not exist for
		// it: the same answer as an unknown key.
		{"key not allowed", func() error { _, err := sign(a, otherID, ec256, digest[:]); return err },
			codes.NotFound, signer.ErrKeyNotFound.Error(), secEdgeA, "sign", "", otherID},
		{"key of another rule", func() error { _, err := sign(b, ecID, ec256, digest[:]); return err },
			codes.NotFound, signer.ErrKeyNotFound.Error(), secEdgeB, "sign", "", ecID},
		{"forbidden scheme: SHA-1 not named", func() error { _, err := sign(a, rsaID, sha1, sha1Digest); return err },
			codes.PermissionDenied, `rule "a-web" does not allow scheme rsa_pkcs1_sha1`, secEdgeA, "sign", "a-web", rsaID},
		{"SHA-1 named, but the HSM cannot", func() error { _, err := sign(legacy, rsaID, sha1, sha1Digest); return err },
			codes.InvalidArgument, "not supported by this key on this keyserver", secEdgeLegacy, "sign", "legacy", rsaID},
		{"decrypt not enabled", func() error { _, err := decrypt(b, rsaID, validCT); return err },
			codes.PermissionDenied, `rule "b-rsa" does not allow decrypt`, secEdgeB, "decrypt", "b-rsa", rsaID},
		{"oversize request", func() error { _, err := decrypt(a, rsaID, make([]byte, link.MaxRequestSize+1)); return err },
			codes.ResourceExhausted, "larger than max", secEdgeA, "decrypt", "", nil},
		{"malformed request", func() error { _, err := sign(a, rsaID, pss, digest[:20]); return err },
			codes.InvalidArgument, "invalid digest", secEdgeA, "sign", "", rsaID},
		{"unknown key", func() error { _, err := sign(a, make([]byte, 32), pss, digest[:]); return err },
			codes.NotFound, signer.ErrKeyNotFound.Error(), secEdgeA, "sign", "", make([]byte, 32)},
	}
	// The caller gets one message for an unknown key and a key it may not
	// use; the audit record says which.
	wantAuditError := map[string]string{
		"key not allowed":     fmt.Sprintf(`%s (not allowed by policy: no rule allows identity %q to use key %x)`, signer.ErrKeyNotFound, secEdgeA, otherID),
		"key of another rule": fmt.Sprintf(`%s (not allowed by policy: no rule allows identity %q to use key %x)`, signer.ErrKeyNotFound, secEdgeB, ecID),
		"unknown key":         signer.ErrKeyNotFound.Error() + " (no such key)",
	}
	var decryptRecords []signer.AuditRecord
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			if status.Code(err) != tt.want || !strings.Contains(status.Convert(err).Message(), tt.wantMsg) {
				t.Fatalf("got %v, want %v with %q", err, tt.want, tt.wantMsg)
			}
			if tt.want == codes.NotFound && status.Convert(err).Message() != signer.ErrKeyNotFound.Error() {
				t.Errorf("got %v, want exactly %q", err, signer.ErrKeyNotFound)
			}
			// Records are written before the answer, except for requests
			// gRPC refuses before the handler (oversize): the stats handler
			// writes those just after.
			ks.waitAudit(t, seen+1)
			recs := ks.recordsSince(t, &seen)
			if len(recs) != 1 {
				t.Fatalf("%d audit records, want exactly 1: %+v", len(recs), recs)
			}
			r := recs[0]
			wantKey := ""
			if len(tt.keyID) == 32 {
				wantKey = fmt.Sprintf("%x", tt.keyID)
			}
			if r.Identity != tt.identity || r.Op != tt.op || r.Outcome != tt.want.String() || r.Rule != tt.rule || r.KeyID != wantKey {
				t.Errorf("audit record = %+v; want identity %s, op %s, outcome %v, rule %q, key %s", r, tt.identity, tt.op, tt.want, tt.rule, wantKey)
			}
			if want, ok := wantAuditError[tt.name]; ok && r.Error != want {
				t.Errorf("audit record error = %q, want %q", r.Error, want)
			}
			if tt.op == "decrypt" && tt.want == codes.OK {
				decryptRecords = append(decryptRecords, r)
			}
		})
	}
	// The implicit-rejection record equals the valid one but for the time.
	if len(decryptRecords) != 2 {
		t.Fatalf("%d successful decrypt records", len(decryptRecords))
	}
	for i := range decryptRecords {
		decryptRecords[i].Time, decryptRecords[i].LatencyUS = time.Time{}, 0
	}
	if decryptRecords[0] != decryptRecords[1] {
		t.Errorf("audit records of a valid and an invalid ciphertext differ:\n%+v\n%+v", decryptRecords[0], decryptRecords[1])
	}
	if r := decryptRecords[0]; r.ServerName != rc.ServerName || r.ClientAddress != rc.ClientAddress || r.ConnectionID != rc.ConnectionId || r.EdgeAddress == "" {
		t.Errorf("decrypt record does not carry the request context: %+v", r)
	}

	// ListKeys shows each edge the keys and operations it may use.
	list := func(c keylessv1.KeylessServiceClient) map[string]*keylessv1.Key {
		resp, err := c.ListKeys(callCtx(t), &keylessv1.ListKeysRequest{})
		if err != nil {
			t.Fatalf("ListKeys() = %v", err)
		}
		out := map[string]*keylessv1.Key{}
		for _, k := range resp.GetKeys() {
			out[k.GetLabel()] = k
		}
		return out
	}
	if la := list(a); len(la) != 2 || !la["rsa.sec.test"].GetDecryptPremaster() || la["ecdsa.sec.test"] == nil {
		t.Errorf("ListKeys() for A = %v", la)
	}
	if lb := list(b); len(lb) != 1 || lb["rsa.sec.test"].GetDecryptPremaster() || len(lb["rsa.sec.test"].GetSignatureAlgorithms()) == 0 {
		t.Errorf("ListKeys() for B = %v", lb)
	}
	if ll := list(legacy); slices.Contains(ll["rsa.sec.test"].GetSignatureAlgorithms(), sha1) {
		t.Errorf("ListKeys() for the legacy edge offers SHA-1, which the HSM cannot do: %v", ll)
	}
	ks.recordsSince(t, &seen)

	t.Run("quota exceeded", func(t *testing.T) { testSecurityQuota(t, ks, ecID, &seen) })
	t.Run("wrong CA", func(t *testing.T) {
		other := newTestCA(t, "another CA")
		testHandshakeRefused(t, ks, ks.clientTLS(t, other, secEdgeA, "edge-a.sec.e2e"), secEdgeA, "certificate signed by unknown authority", &seen)
	})
	t.Run("identity not listed", func(t *testing.T) {
		testHandshakeRefused(t, ks, ks.clientTLS(t, ca, secStranger, "stranger.sec.e2e"), secStranger+",stranger.sec.e2e", "is an identity of the policy", &seen)
	})
}

// testSecurityQuota holds the quota identity's only slot with a stalled
// request and checks that its next request is refused.
func testSecurityQuota(t *testing.T, ks *secKeyserver, ecID []byte, seen *int) {
	q := ks.client(t, ks.clientTLS(t, ks.link.ca, secEdgeQuota))
	digest := sha256.Sum256([]byte("quota"))
	req := &keylessv1.SignRequest{KeyId: ecID, Algorithm: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA256, Digest: digest[:]}
	ks.stall.arm()
	held := make(chan error, 1)
	go func() { _, err := q.Sign(callCtx(t), req); held <- err }()
	select {
	case <-ks.stall.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the held request did not reach the key")
	}
	_, err := q.Sign(callCtx(t), req)
	ks.stall.disarm()
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), secEdgeQuota) || !strings.Contains(err.Error(), "at most 1 request in flight") {
		t.Errorf("second Sign() = %v, want ResourceExhausted naming the identity and the limit", err)
	}
	if err := <-held; err != nil {
		t.Errorf("held Sign() = %v", err)
	}
	recs := ks.recordsSince(t, seen)
	if len(recs) != 2 || recs[0].Outcome != "ResourceExhausted" || recs[0].Identity != secEdgeQuota || recs[1].Outcome != "OK" || recs[1].Rule != "q-ecdsa" {
		t.Errorf("audit records = %+v, want the refusal and then the held request", recs)
	}
}

// testHandshakeRefused checks that a client is refused in the handshake,
// that one connection attempt is logged exactly once with the names it
// presented, and that nothing reaches the audit trail. Only log lines of
// this connection (by its address) count: a refusal of an earlier one may
// still be on its way to the log.
func testHandshakeRefused(t *testing.T, ks *secKeyserver, cfg *tls.Config, names, reason string, seen *int) {
	const line = "client refused in the TLS handshake"
	raw, err := net.Dial("tcp", ks.addr)
	if err != nil {
		t.Fatal(err)
	}
	local := raw.LocalAddr().String()
	ours := func() []string {
		var lines []string
		for l := range strings.Lines(ks.logs.String()) {
			if strings.Contains(l, line) && strings.Contains(l, "remote_address="+local+" ") {
				lines = append(lines, strings.TrimSuffix(l, "\n"))
			}
		}
		return lines
	}
	c := cfg.Clone()
	if c.ServerName == "" {
		c.ServerName, _, _ = net.SplitHostPort(ks.addr)
	}
	conn := tls.Client(raw, c)
	err = conn.Handshake()
	if err == nil {
		// In TLS 1.3 the client finishes first; the refusal arrives as an
		// alert.
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err = conn.Read(make([]byte, 1))
	}
	conn.Close()
	if err == nil {
		t.Fatalf("the handshake was accepted")
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(ours()) < 1 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // a second line would come now
	lines := ours()
	if len(lines) != 1 {
		t.Fatalf("the refused connection from %s was logged %d times, want once:\n%s", local, len(lines), ks.logs.String())
	}
	if last := lines[0]; !strings.Contains(last, names) || !strings.Contains(last, reason) {
		t.Errorf("log line %q; want the names %q and the reason %q", last, names, reason)
	}
	// Over gRPC the call fails as Unavailable, and nothing is audited.
	_, err = ks.client(t, cfg).ListKeys(callCtx(t), &keylessv1.ListKeysRequest{})
	if status.Code(err) != codes.Unavailable {
		t.Errorf("ListKeys() = %v, want Unavailable", err)
	}
	if recs := ks.recordsSince(t, seen); len(recs) != 0 {
		t.Errorf("a refused handshake produced audit records: %+v", recs)
	}
}
