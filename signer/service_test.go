package signer

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"math/big"
	"net"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/keyless-tls/keyless/internal/premaster"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// syncBuffer is a bytes.Buffer that handlers on other goroutines may write
// while the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// testServer is a Service served over an in-memory gRPC connection with
// mutual TLS, as a keyserver serves it, with its audit trail.
type testServer struct {
	svc    *Service
	lis    *bufconn.Listener
	client keylessv1.KeylessServiceClient // as testIdentity
	logs   *syncBuffer                    // everything the service logged, at trace level
	audit  *syncBuffer                    // the audit trail, unless cfg.Audit was set
}

// newTestServer serves a Service for cfg; a nil cfg.Policy is replaced by
// testPolicy, a nil cfg.Logger by one that writes to the returned logs and
// a nil cfg.Audit by an AuditLog that writes to audit.
func newTestServer(t testing.TB, cfg Config) *testServer {
	t.Helper()
	ts := &testServer{logs: &syncBuffer{}, audit: &syncBuffer{}}
	if cfg.Logger == nil {
		cfg.Logger = hclog.New(&hclog.LoggerOptions{Name: "signer", Output: ts.logs, Level: hclog.Trace})
	}
	if cfg.Policy == nil {
		cfg.Policy = testPolicy(t)
	}
	if cfg.Audit == nil {
		cfg.Audit = NewAuditLog(ts.audit)
	}
	svc, err := NewService(cfg)
	if err != nil {
		t.Fatalf("NewService() = %v", err)
	}
	ts.svc = svc
	ts.lis = bufconn.Listen(1 << 20)
	// The smallest window, so that a request can exceed it within
	// link.MaxRequestSize (TestMessagesLargerThanWindow).
	srv := grpc.NewServer(append(link.ServerOptions(link.WithWindowSize(link.MinWindowSize)), grpc.Creds(credentials.NewTLS(thePKI().serverTLS())),
		grpc.StatsHandler(svc.StatsHandler()))...)
	keylessv1.RegisterKeylessServiceServer(srv, svc)
	go func() { _ = srv.Serve(ts.lis) }()
	t.Cleanup(srv.Stop)
	ts.client = ts.dial(t, testIdentity)
	return ts
}

// dial returns a client whose certificate has the given names.
func (ts *testServer) dial(t testing.TB, names ...string) keylessv1.KeylessServiceClient {
	t.Helper()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return ts.lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(credentials.NewTLS(thePKI().clientTLS(names...))))
	if err != nil {
		t.Fatalf("grpc.NewClient() = %v", err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return keylessv1.NewKeylessServiceClient(conn)
}

// edgeContext returns a context for calling the service's handlers directly
// as testIdentity, ending after d (defaultTestTimeout if 0).
func (ts *testServer) edgeContext(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	return edgeContext(testContext(t, d), testIdentity)
}

// testContext returns a context that ends after d, or defaultTestTimeout
// if d is 0.
func testContext(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	if d == 0 {
		d = defaultTestTimeout
	}
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// waitUntil polls cond until it holds, failing the test after
// defaultTestTimeout.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(defaultTestTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// checkStatus checks err's gRPC code and, for InvalidArgument, that its
// message names field.
func checkStatus(t *testing.T, call string, err error, want codes.Code, field string) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Fatalf("%s = %v, want code %v", call, err, want)
	}
	if want == codes.InvalidArgument && !strings.Contains(status.Convert(err).Message(), "invalid "+field+":") {
		t.Errorf("%s = %v, want a message naming %q", call, err, field)
	}
}

// checkNotLogged fails if any of secrets (digests, ciphertexts) appears in
// logs, raw or encoded. Secrets too short to be told apart from other
// output are skipped.
func checkNotLogged(t *testing.T, logs string, secrets [][]byte) {
	t.Helper()
	for _, s := range secrets {
		if len(s) < 8 {
			continue
		}
		for _, enc := range []string{string(s), hex.EncodeToString(s), strings.ToUpper(hex.EncodeToString(s)), base64.StdEncoding.EncodeToString(s)} {
			if strings.Contains(logs, enc) {
				t.Errorf("the log contains a request's digest or ciphertext (%x)", s[:8])
				break
			}
		}
	}
}

func TestServiceSign(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t)})
	n := 0
	for _, tc := range signCases(t) {
		if tc.wantCode != codes.OK {
			continue
		}
		n++
		t.Run(tc.name, func(t *testing.T) {
			resp, err := ts.client.Sign(testContext(t, 0), tc.req)
			if err != nil {
				t.Fatalf("Sign() = %v", err)
			}
			alg, _ := link.AlgorithmFor(tc.req.GetAlgorithm())
			pub := testPublicKeyByID(tc.req.GetKeyId())
			if err := verifySignature(pub, alg, tc.req.GetDigest(), resp.GetSignature()); err != nil {
				t.Errorf("Sign(%v) signature: %v", alg, err)
			}
			if rpub, ok := pub.(*rsa.PublicKey); ok && len(resp.GetSignature()) != rpub.Size() {
				t.Errorf("Sign(%v) signature is %d bytes, want %d", alg, len(resp.GetSignature()), rpub.Size())
			}
		})
	}
	// 5 keys: 6 RSA + 3×3 ECDSA schemes, 4 Ed25519 shapes, and the extras.
	if n < 6+9+4 {
		t.Errorf("only %d valid sign cases", n)
	}
}

func TestServiceSignRejects(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t)})
	var secrets [][]byte
	for _, tc := range signCases(t) {
		if tc.wantCode == codes.OK {
			continue
		}
		secrets = append(secrets, tc.req.GetDigest())
		t.Run(tc.name, func(t *testing.T) {
			resp, err := ts.client.Sign(testContext(t, 0), tc.req)
			checkStatus(t, "Sign()", err, tc.wantCode, tc.wantField)
			if resp != nil {
				t.Errorf("Sign() = %v with an error", resp)
			}
		})
	}
	logs := ts.logs.String()
	if !strings.Contains(logs, "operation failed") {
		t.Fatalf("the rejected requests were not logged at debug level; log:\n%s", logs)
	}
	checkNotLogged(t, logs, secrets)
}

// rawRSAEncrypt computes em^e mod n: textbook RSA, to build ciphertexts of
// blocks that PKCS #1 v1.5 encryption would never produce.
func rawRSAEncrypt(pub *rsa.PublicKey, em []byte) []byte {
	c := new(big.Int).Exp(new(big.Int).SetBytes(em), big.NewInt(int64(pub.E)), pub.N)
	return c.FillBytes(make([]byte, pub.Size()))
}

// pkcs1Block returns a k-byte encryption block first‖blockType‖PS‖0‖payload
// with a non-zero PS; a correct one has first 0 and blockType 2.
func pkcs1Block(k int, first, blockType byte, payload []byte) []byte {
	em := make([]byte, k)
	em[0], em[1] = first, blockType
	ps := em[2 : k-len(payload)-1]
	for i := range ps {
		ps[i] = byte(i%255) + 1
	}
	copy(em[k-len(payload):], payload)
	return em
}

type decryptCase struct {
	name      string
	req       *keylessv1.DecryptRequest
	wantCode  codes.Code
	wantField string
	// want is the answer: the premaster of a valid ciphertext, or the
	// implicit rejection (package premaster) of an invalid one.
	want     []byte
	rejected bool
}

func decryptCases(tb testing.TB) []decryptCase {
	tb.Helper()
	priv := testRSAKey()
	pub := &priv.PublicKey
	k := pub.Size()
	rsaID := mustKeyID(tb, pub)
	pms := append([]byte{0x03, 0x03}, testStream("premaster", link.PremasterLen-2)...)
	encrypt := func(msg []byte) []byte {
		c, err := rsa.EncryptPKCS1v15(rand.Reader, pub, msg)
		if err != nil {
			tb.Fatalf("EncryptPKCS1v15() = %v", err)
		}
		return c
	}
	valid := encrypt(pms)
	// A valid ciphertext that starts with a zero byte, which a lax length
	// check would accept without it; a ciphertext has one 1 time in 256.
	zeroFirst := encrypt(pms)
	for zeroFirst[0] != 0 {
		zeroFirst = encrypt(pms)
	}
	noSeparator := pkcs1Block(k, 0, 2, nil)
	noSeparator[k-1] = 0xff

	req := func(id, ct []byte) *keylessv1.DecryptRequest {
		return &keylessv1.DecryptRequest{KeyId: id, EncryptedPremaster: ct}
	}
	ok := func(name string, ct, want []byte) decryptCase {
		return decryptCase{name: name, req: req(rsaID, ct), wantCode: codes.OK, want: want}
	}
	secret, err := premaster.Secret(priv)
	if err != nil {
		tb.Fatal(err)
	}
	rejected := func(name string, ct []byte) decryptCase {
		c := ok(name, ct, premaster.Rejection(secret, ct))
		c.rejected = true
		return c
	}
	return []decryptCase{
		ok("valid", valid, pms),
		ok("valid raw block", rawRSAEncrypt(pub, pkcs1Block(k, 0, 2, pms)), pms),
		ok("valid with context", func() []byte { return encrypt(pms) }(), pms),

		rejected("block type 1", rawRSAEncrypt(pub, pkcs1Block(k, 0, 1, pms))),
		rejected("block type 0", rawRSAEncrypt(pub, pkcs1Block(k, 0, 0, pms))),
		rejected("first byte not zero", rawRSAEncrypt(pub, pkcs1Block(k, 1, 2, pms))),
		rejected("no zero separator", rawRSAEncrypt(pub, noSeparator)),
		rejected("47-byte payload", encrypt(pms[:47])),
		rejected("49-byte payload", encrypt(append(bytes.Clone(pms), 0x42))),
		rejected("empty payload", encrypt(nil)),
		rejected("ciphertext equal to the modulus", pub.N.FillBytes(make([]byte, k))),
		rejected("ciphertext above the modulus", bytes.Repeat([]byte{0xff}, k)),
		rejected("ciphertext short", valid[1:]),
		rejected("ciphertext short (valid but for its leading zero byte)", zeroFirst[1:]),
		rejected("ciphertext long (leading zero)", append([]byte{0}, valid...)),
		rejected("ciphertext long (trailing byte)", append(bytes.Clone(valid), 0)),
		rejected("ciphertext empty", nil),
		rejected("ciphertext oversize", append(bytes.Repeat([]byte{0}, 4096-k), valid...)),

		{name: "ECDSA key", req: req(mustKeyID(tb, testP256Key().Public()), valid), wantCode: codes.InvalidArgument, wantField: "key_id"},
		{name: "Ed25519 key", req: req(mustKeyID(tb, testEd25519Key().Public()), valid), wantCode: codes.InvalidArgument, wantField: "key_id"},
		{name: "key_id empty", req: req(nil, valid), wantCode: codes.InvalidArgument, wantField: "key_id"},
		{name: "key_id 31 bytes", req: req(rsaID[:31], valid), wantCode: codes.InvalidArgument, wantField: "key_id"},
		{name: "key_id 33 bytes", req: req(append(bytes.Clone(rsaID), 0), valid), wantCode: codes.InvalidArgument, wantField: "key_id"},
		{name: "unknown key_id", req: req(testStream("unknown key", 32), valid), wantCode: codes.NotFound},
		{name: "context.connection_id oversize", req: &keylessv1.DecryptRequest{
			KeyId: rsaID, EncryptedPremaster: valid,
			Context: &keylessv1.RequestContext{ConnectionId: strings.Repeat("c", link.MaxContextFieldLen+1)},
		}, wantCode: codes.InvalidArgument, wantField: "context.connection_id"},
		{name: "context.server_name oversize", req: &keylessv1.DecryptRequest{
			KeyId: rsaID, EncryptedPremaster: valid,
			Context: &keylessv1.RequestContext{ServerName: strings.Repeat("s", link.MaxContextFieldLen+1)},
		}, wantCode: codes.InvalidArgument, wantField: "context.server_name"},
	}
}

func TestServiceDecrypt(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t)})
	pms := decryptCases(t)[0].want
	var secrets [][]byte
	for _, tc := range decryptCases(t) {
		secrets = append(secrets, tc.req.GetEncryptedPremaster())
		t.Run(tc.name, func(t *testing.T) {
			resp, err := ts.client.Decrypt(testContext(t, 0), tc.req)
			checkStatus(t, "Decrypt()", err, tc.wantCode, tc.wantField)
			if tc.wantCode != codes.OK {
				return
			}
			got := resp.GetPremaster()
			if !bytes.Equal(got, tc.want) {
				t.Fatalf("Decrypt() = %x, want %x", got, tc.want)
			}
			if !tc.rejected {
				return
			}
			// Implicit rejection: OK, 48 bytes that are not the payload,
			// and the same bytes again, as for a valid ciphertext.
			if len(got) != link.PremasterLen || bytes.Equal(got, pms) {
				t.Fatalf("Decrypt() of an invalid ciphertext = %x, want 48 bytes other than the payload", got)
			}
			resp2, err := ts.client.Decrypt(testContext(t, 0), tc.req)
			if err != nil || !bytes.Equal(resp2.GetPremaster(), got) {
				t.Errorf("second Decrypt() of an invalid ciphertext = %x, %v; want %x again", resp2.GetPremaster(), err, got)
			}
		})
	}
	checkNotLogged(t, ts.logs.String(), append(secrets, pms))
}

// TestServiceDecryptLogsNoOracle checks that the log, like the answer, does
// not tell a valid ciphertext from an invalid one.
func TestServiceDecryptLogsNoOracle(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t)})
	timestamp := regexp.MustCompile(`(?m)^\S+`)
	logOf := func(tc decryptCase) string {
		before := len(ts.logs.String())
		if _, err := ts.client.Decrypt(testContext(t, 0), tc.req); err != nil {
			t.Fatalf("Decrypt(%s) = %v", tc.name, err)
		}
		return timestamp.ReplaceAllString(ts.logs.String()[before:], "")
	}
	var valid string
	for _, tc := range decryptCases(t) {
		switch {
		case tc.wantCode != codes.OK:
		case !tc.rejected && valid == "":
			valid = logOf(tc)
		default:
			if got := logOf(tc); got != valid {
				t.Errorf("log of Decrypt(%s) = %q, want %q as for a valid ciphertext", tc.name, got, valid)
			}
		}
	}
}

func TestServiceListKeys(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t)})
	resp, err := ts.client.ListKeys(testContext(t, 0), &keylessv1.ListKeysRequest{})
	if err != nil {
		t.Fatalf("ListKeys() = %v", err)
	}
	keys := allTestKeys()
	if len(resp.GetKeys()) != len(keys) {
		t.Fatalf("ListKeys() = %d keys, want %d", len(resp.GetKeys()), len(keys))
	}
	seen := map[string]bool{}
	for _, info := range resp.GetKeys() {
		if id := sha256.Sum256(info.GetPublicKey()); !bytes.Equal(info.GetKeyId(), id[:]) {
			t.Errorf("key_id = %x, want sha256(public_key) = %x", info.GetKeyId(), id)
		}
		pub, err := x509.ParsePKIXPublicKey(info.GetPublicKey())
		if err != nil {
			t.Fatalf("ParsePKIXPublicKey(public_key) = %v", err)
		}
		i := slices.IndexFunc(keys, func(k testKey) bool {
			return k.key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(pub)
		})
		if i < 0 {
			t.Fatalf("ListKeys() lists a key that is not in the store: %T", pub)
		}
		k := keys[i]
		if seen[k.name] {
			t.Errorf("ListKeys() lists %s twice", k.name)
		}
		seen[k.name] = true
		if got, want := info.GetType(), link.KeyTypeOf(k.key.Public()); got != want {
			t.Errorf("%s: type = %v, want %v", k.name, got, want)
		}
		if got := info.GetBits(); got != uint32(k.bits) {
			t.Errorf("%s: bits = %d, want %d", k.name, got, k.bits)
		}
		var want []keylessv1.SignatureAlgorithm
		for _, s := range link.DefaultSchemes(k.key.Public()) {
			want = append(want, keylessv1.SignatureAlgorithm(s))
		}
		if got := info.GetSignatureAlgorithms(); !slices.Equal(got, want) {
			t.Errorf("%s: signature_algorithms = %v, want %v", k.name, got, want)
		}
		if got, want := info.GetDecryptPremaster(), info.GetType() == keylessv1.KeyType_KEY_TYPE_RSA; got != want {
			t.Errorf("%s: decrypt_premaster = %t, want %t", k.name, got, want)
		}
		if info.GetLabel() != "" || info.GetObjectId() != nil {
			t.Errorf("%s: label, object_id = %q, %x, want none", k.name, info.GetLabel(), info.GetObjectId())
		}
	}
}

func TestServiceStoreUnavailable(t *testing.T) {
	const detail = "CKR_DEVICE_REMOVED in slot 3"
	ts := newTestServer(t, Config{Keys: &testStore{err: errors.New("hsm: " + detail)}})
	rsaID := mustKeyID(t, testRSAKey().Public())
	calls := map[string]func(context.Context) error{
		"Sign": func(ctx context.Context) error {
			_, err := ts.client.Sign(ctx, &keylessv1.SignRequest{
				KeyId: rsaID, Algorithm: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA256,
				Digest: testDigest(crypto.SHA256, "unavailable"),
			})
			return err
		},
		"Decrypt": func(ctx context.Context) error {
			_, err := ts.client.Decrypt(ctx, &keylessv1.DecryptRequest{KeyId: rsaID, EncryptedPremaster: []byte("ciphertext")})
			return err
		},
		"ListKeys": func(ctx context.Context) error {
			_, err := ts.client.ListKeys(ctx, &keylessv1.ListKeysRequest{})
			return err
		},
	}
	for name, call := range calls {
		t.Run(name, func(t *testing.T) {
			err := call(testContext(t, 0))
			checkStatus(t, name+"()", err, codes.Unavailable, "")
			if strings.Contains(err.Error(), detail) {
				t.Errorf("%s() = %v, which reveals the store's error", name, err)
			}
		})
	}
	if logs := ts.logs.String(); strings.Count(logs, detail) != len(calls) {
		t.Errorf("the store's error was not logged once per call; log:\n%s", logs)
	}
}

// TestServiceStoreDeadline checks that a store that gives up because the
// request's deadline passed is reported as DeadlineExceeded, not as an
// unavailable store. The handlers are called directly: over gRPC the
// client's own deadline would produce the same code.
func TestServiceStoreDeadline(t *testing.T) {
	svc, err := NewService(Config{Keys: ctxStore{}, Policy: testPolicy(t)})
	if err != nil {
		t.Fatal(err)
	}
	ctx := func() context.Context { return edgeContext(testContext(t, 50*time.Millisecond), testIdentity) }
	id := mustKeyID(t, testP256Key().Public())
	_, err = svc.Sign(ctx(), &keylessv1.SignRequest{
		KeyId: id, Algorithm: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA256, Digest: testDigest(crypto.SHA256, "x"),
	})
	checkStatus(t, "Sign()", err, codes.DeadlineExceeded, "")
	_, err = svc.Decrypt(ctx(), &keylessv1.DecryptRequest{KeyId: id})
	checkStatus(t, "Decrypt()", err, codes.DeadlineExceeded, "")
	_, err = svc.ListKeys(ctx(), &keylessv1.ListKeysRequest{})
	checkStatus(t, "ListKeys()", err, codes.DeadlineExceeded, "")
}

func p256SignRequest(t *testing.T) *keylessv1.SignRequest {
	t.Helper()
	return &keylessv1.SignRequest{
		KeyId:     mustKeyID(t, testP256Key().Public()),
		Algorithm: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA256,
		Digest:    testDigest(crypto.SHA256, "p256"),
	}
}

// signAsync starts a Sign call and returns a channel for its error.
func signAsync(ctx context.Context, c keylessv1.KeylessServiceClient, req *keylessv1.SignRequest) <-chan error {
	errc := make(chan error, 1)
	go func() {
		_, err := c.Sign(ctx, req)
		errc <- err
	}()
	return errc
}

// receive waits for the result of an asynchronous call.
func receive(t *testing.T, errc <-chan error) error {
	t.Helper()
	select {
	case err := <-errc:
		return err
	case <-time.After(defaultTestTimeout):
		t.Fatal("the call did not return")
		return nil
	}
}

func TestServiceSignDeadline(t *testing.T) {
	key := newBlockingKey(t, testP256Key())
	ts := newTestServer(t, Config{Keys: &testStore{keys: []crypto.Signer{key}}})
	req := p256SignRequest(t)
	// Connect (the TLS handshake) before the short deadline starts.
	if _, err := ts.client.ListKeys(testContext(t, 0), &keylessv1.ListKeysRequest{}); err != nil {
		t.Fatal(err)
	}

	// The deadline leaves the request ample time to reach the key, which
	// then blocks until the end of the test.
	const deadline = 500 * time.Millisecond

	// Over gRPC.
	err := receive(t, signAsync(testContext(t, deadline), ts.client, req))
	checkStatus(t, "Sign()", err, codes.DeadlineExceeded, "")
	key.waitEntered(t)

	// The handler itself returns, though the key's Sign is still running.
	errc := make(chan error, 1)
	go func() {
		_, err := ts.svc.Sign(ts.edgeContext(t, deadline), req)
		errc <- err
	}()
	checkStatus(t, "Service.Sign()", receive(t, errc), codes.DeadlineExceeded, "")
	key.waitEntered(t)
}

func TestServiceLimiterQueueFull(t *testing.T) {
	key := newBlockingKey(t, testP256Key())
	ts := newTestServer(t, Config{Keys: &testStore{keys: []crypto.Signer{key}}, MaxConcurrent: 1, MaxQueued: 1})
	req := p256SignRequest(t)

	running := signAsync(testContext(t, 0), ts.client, req)
	key.waitEntered(t)
	queued := signAsync(testContext(t, 0), ts.client, req)
	waitUntil(t, "the second request to queue", func() bool { return ts.svc.limit.waiting.Load() == 1 })

	_, err := ts.client.Sign(testContext(t, 0), req)
	checkStatus(t, "third Sign()", err, codes.ResourceExhausted, "")
	_, err = ts.client.Decrypt(testContext(t, 0), &keylessv1.DecryptRequest{KeyId: mustKeyID(t, testP256Key().Public())})
	checkStatus(t, "Decrypt() of a non-RSA key", err, codes.InvalidArgument, "key_id") // validated before queueing

	key.unblock()
	if err := receive(t, running); err != nil {
		t.Errorf("running Sign() = %v", err)
	}
	if err := receive(t, queued); err != nil {
		t.Errorf("queued Sign() = %v", err)
	}
}

func TestServiceLimiterQueuedDeadline(t *testing.T) {
	key := newBlockingKey(t, testP256Key())
	ts := newTestServer(t, Config{Keys: &testStore{keys: []crypto.Signer{key}}, MaxConcurrent: 1, MaxQueued: 1})
	req := p256SignRequest(t)

	running := signAsync(testContext(t, 0), ts.client, req)
	key.waitEntered(t)

	errc := make(chan error, 1)
	go func() {
		_, err := ts.svc.Sign(ts.edgeContext(t, 50*time.Millisecond), req)
		errc <- err
	}()
	checkStatus(t, "queued Service.Sign()", receive(t, errc), codes.DeadlineExceeded, "")
	err := receive(t, signAsync(testContext(t, 50*time.Millisecond), ts.client, req))
	checkStatus(t, "queued Sign()", err, codes.DeadlineExceeded, "")
	if len(key.entered) != 0 {
		t.Error("a queued request whose deadline expired reached the key")
	}
	// The client's deadline may fire before the server's handler returns.
	waitUntil(t, "the queue to empty", func() bool { return ts.svc.limit.waiting.Load() == 0 })

	key.unblock()
	if err := receive(t, running); err != nil {
		t.Errorf("running Sign() = %v", err)
	}
}

// TestServiceTimedOutSignKeepsSlot checks that a Sign that outlives its
// request (an HSM call cannot be cancelled) keeps its place in the limiter
// until it really ends, so that timed-out calls cannot pile up in the store.
func TestServiceTimedOutSignKeepsSlot(t *testing.T) {
	key := newBlockingKey(t, testP256Key())
	ts := newTestServer(t, Config{Keys: &testStore{keys: []crypto.Signer{key}}, MaxConcurrent: 1})
	req := p256SignRequest(t)

	_, err := ts.svc.Sign(ts.edgeContext(t, 50*time.Millisecond), req)
	checkStatus(t, "Service.Sign()", err, codes.DeadlineExceeded, "")
	key.waitEntered(t)

	_, err = ts.client.Sign(testContext(t, 0), req)
	checkStatus(t, "Sign() while the timed-out Sign runs", err, codes.ResourceExhausted, "")
	if len(key.entered) != 0 {
		t.Fatal("a second Sign reached the key while the first was still running")
	}

	key.unblock()
	waitUntil(t, "the slot to be released", func() bool {
		_, err := ts.client.Sign(testContext(t, 0), req)
		return err == nil
	})
}

func TestServiceSchemeListerAndDescriber(t *testing.T) {
	rsaKey := restrictedKey{
		Signer:   testRSAKey(),
		schemes:  []tls.SignatureScheme{tls.PKCS1WithSHA384, tls.PSSWithSHA256},
		label:    "edge-rsa",
		objectID: []byte{0x01, 0x02, 0x03},
	}
	// A store that claims a scheme of another key type for a key is
	// still refused by type.
	ecKey := restrictedKey{Signer: testP256Key(), schemes: []tls.SignatureScheme{tls.PSSWithSHA256, tls.ECDSAWithP256AndSHA256}}
	ts := newTestServer(t, Config{Keys: &testStore{keys: []crypto.Signer{rsaKey, ecKey}}})
	rsaID, ecID := mustKeyID(t, testRSAKey().Public()), mustKeyID(t, testP256Key().Public())

	tests := []struct {
		id     []byte
		scheme tls.SignatureScheme
		want   codes.Code
	}{
		{rsaID, tls.PSSWithSHA256, codes.OK},
		{rsaID, tls.PKCS1WithSHA384, codes.OK},
		{rsaID, tls.PKCS1WithSHA256, codes.InvalidArgument},
		{rsaID, tls.PSSWithSHA384, codes.InvalidArgument},
		{rsaID, tls.PKCS1WithSHA1, codes.PermissionDenied}, // the policy does not name it
		{ecID, tls.ECDSAWithP256AndSHA256, codes.OK},
		{ecID, tls.ECDSAWithP384AndSHA384, codes.InvalidArgument},
		{ecID, tls.PSSWithSHA256, codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(link.KeyTypeOf(testPublicKeyByID(tt.id)).String()+" "+tt.scheme.String(), func(t *testing.T) {
			alg, _ := link.AlgorithmForScheme(tt.scheme)
			digest := testDigest(alg.Hash, "restricted")
			resp, err := ts.client.Sign(testContext(t, 0), &keylessv1.SignRequest{KeyId: tt.id, Algorithm: alg.Wire, Digest: digest})
			checkStatus(t, "Sign()", err, tt.want, "algorithm")
			if err == nil {
				if err := verifySignature(testPublicKeyByID(tt.id), alg, digest, resp.GetSignature()); err != nil {
					t.Error(err)
				}
			}
		})
	}

	resp, err := ts.client.ListKeys(testContext(t, 0), &keylessv1.ListKeysRequest{})
	if err != nil || len(resp.GetKeys()) != 2 {
		t.Fatalf("ListKeys() = %v, %v, want 2 keys", resp, err)
	}
	info := resp.GetKeys()[0]
	want := []keylessv1.SignatureAlgorithm{
		keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA384,
		keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA256,
	}
	if !slices.Equal(info.GetSignatureAlgorithms(), want) {
		t.Errorf("signature_algorithms = %v, want %v", info.GetSignatureAlgorithms(), want)
	}
	if info.GetLabel() != "edge-rsa" || !bytes.Equal(info.GetObjectId(), []byte{1, 2, 3}) {
		t.Errorf("label, object_id = %q, %x, want %q, 010203", info.GetLabel(), info.GetObjectId(), "edge-rsa")
	}
	// The wrapper is not a PremasterDecrypter.
	if info.GetDecryptPremaster() {
		t.Error("decrypt_premaster = true for a key that cannot decrypt")
	}
	_, err = ts.client.Decrypt(testContext(t, 0), &keylessv1.DecryptRequest{KeyId: rsaID})
	checkStatus(t, "Decrypt()", err, codes.InvalidArgument, "key_id")
}

// unmarshalableKey is a signer whose public key has no X.509 encoding.
type unmarshalableKey struct{ crypto.Signer }

func (unmarshalableKey) Public() crypto.PublicKey { return struct{}{} }

func TestServiceListKeysSkipsBadKeys(t *testing.T) {
	ts := newTestServer(t, Config{Keys: &testStore{keys: []crypto.Signer{unmarshalableKey{testP256Key()}, testEd25519Key()}}})
	resp, err := ts.client.ListKeys(testContext(t, 0), &keylessv1.ListKeysRequest{})
	if err != nil || len(resp.GetKeys()) != 1 || resp.GetKeys()[0].GetType() != keylessv1.KeyType_KEY_TYPE_ED25519 {
		t.Fatalf("ListKeys() = %v, %v, want only the Ed25519 key", resp, err)
	}
	if !strings.Contains(ts.logs.String(), "key skipped") {
		t.Error("the skipped key was not logged")
	}
}

func TestConfigValidate(t *testing.T) {
	store := newTestMemoryStore(t)
	policy := testPolicy(t)
	tests := []struct {
		name    string
		cfg     Config
		wantErr string
	}{
		{"zero", Config{}, "Keys"},
		{"no keys", Config{MaxConcurrent: 2, Policy: policy}, "Keys"},
		{"no policy", Config{Keys: store}, "Policy"},
		{"negative MaxConcurrent", Config{Keys: store, Policy: policy, MaxConcurrent: -1}, "MaxConcurrent"},
		{"negative MaxQueued", Config{Keys: store, Policy: policy, MaxConcurrent: 1, MaxQueued: -1}, "MaxQueued"},
		{"negative Quota.MaxInFlight", Config{Keys: store, Policy: policy, Quota: Quota{MaxInFlight: -1}}, "Config.Quota.MaxInFlight"},
		{"negative Quota.Rate", Config{Keys: store, Policy: policy, Quota: Quota{Rate: -1}}, "Config.Quota.Rate"},
		{"NaN Quota.Rate", Config{Keys: store, Policy: policy, Quota: Quota{Rate: math.NaN()}}, "Config.Quota.Rate"},
		{"negative Quota.Burst", Config{Keys: store, Policy: policy, Quota: Quota{Rate: 1, Burst: -1}}, "Config.Quota.Burst"},
		{"minimal", Config{Keys: store, Policy: policy}, ""},
		{"bounded", Config{Keys: store, Policy: policy, MaxConcurrent: 2, MaxQueued: 100, Quota: Quota{MaxInFlight: 3, Rate: 10}, Logger: hclog.NewNullLogger()}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Errorf("Validate() = %v, want nil", err)
				}
				if svc, err := NewService(tt.cfg); err != nil || svc == nil {
					t.Errorf("NewService() = %v, %v", svc, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.HasPrefix(err.Error(), "signer: ") || strings.Count(err.Error(), "signer:") != 1 {
				t.Errorf("Validate() = %v, want a signer error naming %s, with one package prefix", err, tt.wantErr)
			}
			if svc, err := NewService(tt.cfg); err == nil || svc != nil {
				t.Errorf("NewService() = %v, %v, want an error", svc, err)
			}
		})
	}
}

func TestQuotaValidate(t *testing.T) {
	tests := []struct {
		q    Quota
		want string
	}{
		{Quota{}, ""},
		{Quota{MaxInFlight: 4, Rate: 2.5, Burst: 3}, ""},
		{Quota{MaxInFlight: -1}, "signer: Quota.MaxInFlight is -1; it must be 0 (no bound) or more"},
		{Quota{Rate: math.Inf(1)}, "signer: Quota.Rate is +Inf; it must be 0 (no bound) or a positive number of requests per second"},
		{Quota{Rate: 1, Burst: -2}, "signer: Quota.Burst is -2; it must be 0 (the rate, rounded up) or more"},
	}
	for _, tt := range tests {
		err := tt.q.Validate()
		if got := fmt.Sprint(err); (tt.want == "" && err != nil) || (tt.want != "" && got != tt.want) {
			t.Errorf("%+v.Validate() = %v, want %q", tt.q, err, tt.want)
		}
	}
}

func TestNewMemoryStore(t *testing.T) {
	if _, err := NewMemoryStore(faultyKey{testRSAKey()}); err == nil {
		t.Error("NewMemoryStore(wrapped key) = nil error, want an error")
	}
	s, err := NewMemoryStore()
	if err != nil {
		t.Fatalf("NewMemoryStore() = %v", err)
	}
	if keys, err := s.Keys(t.Context()); err != nil || len(keys) != 0 {
		t.Errorf("empty store Keys() = %v, %v", keys, err)
	}
	s = newTestMemoryStore(t)
	for _, k := range allTestKeys() {
		id, _ := link.KeyIDOf(k.key.Public())
		got, err := s.Key(t.Context(), id)
		if err != nil || got == nil || !k.key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(got.Public()) {
			t.Errorf("Key(%s) = %v, %v", k.name, got, err)
		}
		if _, ok := got.(PremasterDecrypter); ok != (k.name == "RSA-2048") {
			t.Errorf("Key(%s) is a PremasterDecrypter: %t", k.name, ok)
		}
	}
	if got, err := s.Key(t.Context(), link.KeyID{}); got != nil || err != nil {
		t.Errorf("Key(zero id) = %v, %v, want nil, nil", got, err)
	}
}

func TestKeyID(t *testing.T) {
	pub := testP256Key().Public()
	id, err := link.KeyIDOf(pub)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(pub)
	if id != sha256.Sum256(der) {
		t.Errorf("link.KeyIDOf() = %x, want sha256 of the SPKI", id)
	}
	s := link.FormatKeyID(id)
	if got, err := link.ParseKeyID(s); err != nil || got != id || s != strings.ToLower(s) || len(s) != 64 {
		t.Errorf("link.ParseKeyID(link.FormatKeyID(id)) = %x, %v; link.FormatKeyID = %q", got, err, s)
	}
	for _, bad := range []string{"", "zz", s[:62], s + "00", s[:63]} {
		if _, err := link.ParseKeyID(bad); err == nil {
			t.Errorf("link.ParseKeyID(%q) = nil error", bad)
		}
	}
	if _, err := link.KeyIDOf(struct{}{}); err == nil {
		t.Error("link.KeyIDOf(struct{}{}) = nil error")
	}
}

func TestWatchHealth(t *testing.T) {
	services := []string{"", keylessv1.KeylessService_ServiceDesc.ServiceName}
	waitStatus := func(t *testing.T, hs *health.Server, want healthpb.HealthCheckResponse_ServingStatus) {
		t.Helper()
		for _, svc := range services {
			waitUntil(t, "health of "+svc+" to be "+want.String(), func() bool {
				resp, err := hs.Check(t.Context(), &healthpb.HealthCheckRequest{Service: svc})
				return err == nil && resp.GetStatus() == want
			})
		}
	}

	t.Run("Checker", func(t *testing.T) {
		store := &testStore{}
		hs := health.NewServer()
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() {
			defer close(done)
			WatchHealth(ctx, store, hs, 2*time.Millisecond)
		}()
		t.Cleanup(func() {
			cancel()
			<-done
		})
		waitStatus(t, hs, healthpb.HealthCheckResponse_SERVING)
		down := errors.New("hsm: token not present")
		store.checkErr.Store(&down)
		waitStatus(t, hs, healthpb.HealthCheckResponse_NOT_SERVING)
		store.checkErr.Store(nil)
		waitStatus(t, hs, healthpb.HealthCheckResponse_SERVING)
		store.checkErr.Store(&down)
		waitStatus(t, hs, healthpb.HealthCheckResponse_NOT_SERVING)
	})

	t.Run("not a Checker", func(t *testing.T) {
		hs := health.NewServer()
		hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
		done := make(chan struct{})
		go func() {
			defer close(done)
			WatchHealth(t.Context(), newTestMemoryStore(t), hs, time.Hour)
		}()
		select {
		case <-done:
		case <-time.After(defaultTestTimeout):
			t.Fatal("WatchHealth did not return for a store that is not a Checker")
		}
		waitStatus(t, hs, healthpb.HealthCheckResponse_SERVING)
	})
}

// TestServiceLimiterSequential checks that a finished operation frees its
// slot before its caller gets the answer: with no queue, back-to-back
// requests must never see ResourceExhausted.
func TestServiceLimiterSequential(t *testing.T) {
	ts := newTestServer(t, Config{Keys: &testStore{keys: []crypto.Signer{testP256Key()}}, MaxConcurrent: 1})
	req := p256SignRequest(t)
	for i := range 50 {
		if _, err := ts.client.Sign(testContext(t, 0), req); err != nil {
			t.Fatalf("Sign() #%d = %v", i, err)
		}
	}
}

func TestWatchHealthDefaultInterval(t *testing.T) {
	hs := health.NewServer()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		WatchHealth(ctx, &testStore{}, hs, 0) // must not panic
	}()
	waitUntil(t, "health to be SERVING", func() bool {
		resp, err := hs.Check(t.Context(), &healthpb.HealthCheckRequest{})
		return err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING
	})
	cancel()
	<-done
}

// TestServiceLogsOnlyKeyIDLength checks that a key_id that is not 32 bytes
// is logged by its length, so that a peer cannot fill the log.
func TestServiceLogsOnlyKeyIDLength(t *testing.T) {
	ts := newTestServer(t, Config{Keys: newTestMemoryStore(t)})
	long := bytes.Repeat([]byte{0xab}, 4000)
	_, err := ts.client.Sign(testContext(t, 0), &keylessv1.SignRequest{KeyId: long})
	checkStatus(t, "Sign()", err, codes.InvalidArgument, "key_id")
	logs := ts.logs.String()
	if strings.Contains(logs, "abababab") || !strings.Contains(logs, "(4000 bytes)") {
		t.Errorf("log of a 4000-byte key_id:\n%s", logs)
	}
}
