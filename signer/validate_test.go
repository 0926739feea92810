package signer

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/keyless-tls/keyless/internal/premaster"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// tls13ServerPrefix is written out independently of the package's own copy.
const tls13ServerPrefix = "                                                                " +
	"TLS 1.3, server CertificateVerify\x00"

// tls13Message returns a TLS 1.3 server CertificateVerify signature input
// with a transcript hash of hashLen bytes (RFC 8446, section 4.4.3).
func tls13Message(hashLen int) []byte {
	return append([]byte(tls13ServerPrefix), testStream("transcript", hashLen)...)
}

// tls12Message returns TLS 1.2 ServerKeyExchange signed params for X25519:
// client_random, server_random, curve_type named_curve, x25519, and a 32-byte
// point with its length (RFC 8422, section 5.4).
func tls12Message() []byte {
	return tls12GroupMessage(0x1d, testStream("x25519 point", 32))
}

// tls12GroupMessage returns TLS 1.2 ServerKeyExchange signed params for
// the named group with the given point.
func tls12GroupMessage(group uint16, point []byte) []byte {
	m := testStream("randoms", 64)
	m = append(m, 0x03, byte(group>>8), byte(group), byte(len(point)))
	return append(m, point...)
}

// uncompressedPoint returns n bytes shaped like an uncompressed NIST curve
// point: 0x04, then x and y.
func uncompressedPoint(n int) []byte {
	return append([]byte{4}, testStream("nist point", n-1)...)
}

// testDigest returns a digest-sized value for h, distinct for each label.
func testDigest(h crypto.Hash, label string) []byte {
	return testStream(label+" "+h.String(), h.Size())
}

// isTLSServerSignatureInput is the fuzz oracle for Ed25519 messages, written
// independently of validateEd25519Message.
func isTLSServerSignatureInput(m []byte) bool {
	if rest, ok := bytes.CutPrefix(m, []byte(tls13ServerPrefix)); ok {
		return len(rest) == sha256.Size || len(rest) == 48 || len(rest) == 64
	}
	if len(m) < 64+4+1 {
		return false
	}
	params := m[64:]
	if params[0] != 3 || int(params[3]) != len(params)-4 {
		return false
	}
	switch group, point := int(params[1])<<8|int(params[2]), params[4:]; group {
	case 0x001d:
		return len(point) == 32
	case 0x0017:
		return len(point) == 1+2*32 && point[0] == 4
	case 0x0018:
		return len(point) == 1+2*48 && point[0] == 4
	case 0x0019:
		return len(point) == 1+2*66 && point[0] == 4
	}
	return false
}

// signCase is a SignRequest and what the package makes of it.
type signCase struct {
	name string
	req  *keylessv1.SignRequest
	// valid is whether ValidateSignRequest accepts it (the key is not
	// looked at).
	valid bool
	// wantCode is Service.Sign's answer over newTestMemoryStore.
	wantCode codes.Code
	// wantField is the request field an InvalidArgument names.
	wantField string
}

// signCases returns the table shared by the validation, service and fuzz
// tests: every scheme on every suitable key, and malformed requests of
// every kind.
func signCases(tb testing.TB) []signCase {
	tb.Helper()
	const (
		unspecified = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_UNSPECIFIED
		ed25519Alg  = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ED25519
		ecdsa256    = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA256
		ecdsaSHA1   = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA1
		pss256      = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA256
		pkcs1SHA256 = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256
		pkcs1SHA384 = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA384
		pkcs1SHA1   = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA1
	)
	rsaID := mustKeyID(tb, testRSAKey().Public())
	p256ID := mustKeyID(tb, testP256Key().Public())
	p384ID := mustKeyID(tb, testP384Key().Public())
	edID := mustKeyID(tb, testEd25519Key().Public())
	unknownID := testStream("unknown key", 32)
	d256 := testDigest(crypto.SHA256, "digest")

	req := func(id []byte, alg keylessv1.SignatureAlgorithm, digest []byte) *keylessv1.SignRequest {
		return &keylessv1.SignRequest{KeyId: id, Algorithm: alg, Digest: digest}
	}
	ok := func(name string, r *keylessv1.SignRequest) signCase {
		return signCase{name: name, req: r, valid: true, wantCode: codes.OK}
	}
	bad := func(name, field string, r *keylessv1.SignRequest) signCase {
		return signCase{name: name, req: r, wantCode: codes.InvalidArgument, wantField: field}
	}
	// refused passes validation but not the key's check.
	refused := func(name string, r *keylessv1.SignRequest) signCase {
		return signCase{name: name, req: r, valid: true, wantCode: codes.InvalidArgument, wantField: "algorithm"}
	}
	// denied passes validation but not the default test policy.
	denied := func(name string, r *keylessv1.SignRequest) signCase {
		return signCase{name: name, req: r, valid: true, wantCode: codes.PermissionDenied}
	}
	withContext := func(r *keylessv1.SignRequest, c *keylessv1.RequestContext) *keylessv1.SignRequest {
		r.Context = c
		return r
	}
	long := strings.Repeat("x", link.MaxContextFieldLen+1)
	longest := strings.Repeat("x", link.MaxContextFieldLen)

	var cases []signCase
	for _, k := range allTestKeys() {
		id := mustKeyID(tb, k.key.Public())
		for _, s := range link.DefaultSchemes(k.key.Public()) {
			a, _ := link.AlgorithmForScheme(s)
			if a.Hash == 0 {
				continue // Ed25519 messages below
			}
			cases = append(cases, ok(k.name+" "+a.String(), req(id, a.Wire, testDigest(a.Hash, k.name))))
		}
	}
	cases = append(cases,
		// A P-384 key signing a SHA-256 digest: TLS 1.2 lets any curve use
		// any hash.
		ok("P-384 SHA-256 digest (TLS 1.2)", req(p384ID, ecdsa256, d256)),
		ok("Ed25519 TLS 1.3 CertificateVerify SHA-256", req(edID, ed25519Alg, tls13Message(32))),
		ok("Ed25519 TLS 1.3 CertificateVerify SHA-384", req(edID, ed25519Alg, tls13Message(48))),
		ok("Ed25519 TLS 1.3 CertificateVerify SHA-512", req(edID, ed25519Alg, tls13Message(64))),
		ok("Ed25519 TLS 1.2 ServerKeyExchange", req(edID, ed25519Alg, tls12Message())),
		ok("Ed25519 TLS 1.2 ServerKeyExchange secp256r1", req(edID, ed25519Alg, tls12GroupMessage(23, uncompressedPoint(65)))),
		ok("Ed25519 TLS 1.2 ServerKeyExchange secp384r1", req(edID, ed25519Alg, tls12GroupMessage(24, uncompressedPoint(97)))),
		ok("Ed25519 TLS 1.2 ServerKeyExchange secp521r1", req(edID, ed25519Alg, tls12GroupMessage(25, uncompressedPoint(133)))),
		ok("context at the limits", withContext(req(p256ID, ecdsa256, d256), &keylessv1.RequestContext{
			ServerName: longest, ClientAddress: longest, ConnectionId: longest,
		})),
		ok("context ordinary", withContext(req(rsaID, pss256, d256), &keylessv1.RequestContext{
			ServerName: "example.com", ClientAddress: "192.0.2.1:443", ConnectionId: "c-1",
		})),

		bad("key_id empty", "key_id", req(nil, ecdsa256, d256)),
		bad("key_id 31 bytes", "key_id", req(p256ID[:31], ecdsa256, d256)),
		bad("key_id 33 bytes", "key_id", req(append(bytes.Clone(p256ID), 0), ecdsa256, d256)),
		bad("key_id hex string", "key_id", req([]byte(link.FormatKeyID(link.KeyID(p256ID))), ecdsa256, d256)),
		bad("key_id checked before the rest", "key_id", req(p256ID[:1], unspecified, nil)),
		signCase{name: "unknown key_id", req: req(unknownID, ecdsa256, d256), valid: true, wantCode: codes.NotFound},

		bad("algorithm unspecified", "algorithm", req(p256ID, unspecified, d256)),
		bad("algorithm unknown number", "algorithm", req(p256ID, 9999, d256)),
		bad("algorithm negative", "algorithm", req(p256ID, -1, d256)),
		bad("algorithm rsa_pss_pss_sha256", "algorithm", req(rsaID, 0x0809, d256)),
		bad("algorithm ed448", "algorithm", req(edID, 0x0808, tls13Message(32))),

		bad("digest empty", "digest", req(p256ID, ecdsa256, nil)),
		bad("digest 31 bytes for SHA-256", "digest", req(p256ID, ecdsa256, d256[:31])),
		bad("digest 33 bytes for SHA-256", "digest", req(p256ID, ecdsa256, append(bytes.Clone(d256), 1))),
		bad("digest 64 bytes for SHA-256", "digest", req(p256ID, ecdsa256, testDigest(crypto.SHA512, "digest"))),
		bad("digest 48 bytes for RSA PSS SHA-256", "digest", req(rsaID, pss256, testDigest(crypto.SHA384, "digest"))),
		bad("digest 32 bytes for RSA PKCS1 SHA-384", "digest", req(rsaID, pkcs1SHA384, d256)),
		bad("digest 20 bytes for RSA PKCS1 SHA-256", "digest", req(rsaID, pkcs1SHA256, testDigest(crypto.SHA1, "digest"))),
		bad("digest checked before context", "digest", withContext(req(p256ID, ecdsa256, nil), &keylessv1.RequestContext{ServerName: long})),

		refused("ECDSA scheme on RSA key", req(rsaID, ecdsa256, d256)),
		refused("Ed25519 on ECDSA key", req(p256ID, ed25519Alg, tls13Message(32))),
		refused("PSS on ECDSA key", req(p256ID, pss256, d256)),
		refused("PKCS1 on Ed25519 key", req(edID, pkcs1SHA256, d256)),
		refused("ECDSA on Ed25519 key", req(edID, ecdsa256, d256)),
		denied("RSA PKCS1 SHA-1", req(rsaID, pkcs1SHA1, testDigest(crypto.SHA1, "digest"))),
		denied("ECDSA SHA-1", req(p256ID, ecdsaSHA1, testDigest(crypto.SHA1, "digest"))),

		bad("Ed25519 arbitrary message", "digest", req(edID, ed25519Alg, testStream("arbitrary message", 100))),
		bad("Ed25519 SHA-256 digest", "digest", req(edID, ed25519Alg, d256)),
		bad("Ed25519 empty", "digest", req(edID, ed25519Alg, nil)),
		bad("Ed25519 oversize", "digest", req(edID, ed25519Alg, tls13Message(MaxEd25519MessageLen+1-len(tls13ServerPrefix)))),
		bad("Ed25519 oversize TLS 1.2 shape", "digest", req(edID, ed25519Alg, append(tls12Message(), make([]byte, MaxEd25519MessageLen)...))),
		bad("Ed25519 TLS 1.3 hash 31 bytes", "digest", req(edID, ed25519Alg, tls13Message(31))),
		bad("Ed25519 TLS 1.3 hash 33 bytes", "digest", req(edID, ed25519Alg, tls13Message(33))),
		bad("Ed25519 TLS 1.3 no hash", "digest", req(edID, ed25519Alg, tls13Message(0))),
		bad("Ed25519 TLS 1.3 client CertificateVerify", "digest", req(edID, ed25519Alg,
			append([]byte(strings.Replace(tls13ServerPrefix, "server", "client", 1)), d256...))),
		bad("Ed25519 TLS 1.2 wrong point length", "digest", req(edID, ed25519Alg, func() []byte {
			m := tls12Message()
			m[67]++
			return m
		}())),
		bad("Ed25519 TLS 1.2 explicit curve", "digest", req(edID, ed25519Alg, func() []byte {
			m := tls12Message()
			m[64] = 1
			return m
		}())),
		bad("Ed25519 TLS 1.2 no point", "digest", req(edID, ed25519Alg, tls12Message()[:68])),
		bad("Ed25519 TLS 1.2 unknown group", "digest", req(edID, ed25519Alg, tls12GroupMessage(0xffff, testStream("chosen", 200)))),
		bad("Ed25519 TLS 1.2 unknown group, 32 bytes", "digest", req(edID, ed25519Alg, tls12GroupMessage(0xffff, testStream("chosen", 32)))),
		bad("Ed25519 TLS 1.2 X25519MLKEM768 (TLS 1.3 only)", "digest", req(edID, ed25519Alg, tls12GroupMessage(0x11ec, testStream("hybrid", 65)))),
		bad("Ed25519 TLS 1.2 x25519 with 65 bytes", "digest", req(edID, ed25519Alg, tls12GroupMessage(29, uncompressedPoint(65)))),
		bad("Ed25519 TLS 1.2 secp256r1 with 32 bytes", "digest", req(edID, ed25519Alg, tls12GroupMessage(23, testStream("short", 32)))),
		bad("Ed25519 TLS 1.2 secp384r1 with a P-256 point", "digest", req(edID, ed25519Alg, tls12GroupMessage(24, uncompressedPoint(65)))),
		bad("Ed25519 TLS 1.2 secp521r1 compressed", "digest", req(edID, ed25519Alg, tls12GroupMessage(25, append([]byte{2}, testStream("x", 132)...)))),
		bad("Ed25519 TLS 1.2 secp256r1 compressed length", "digest", req(edID, ed25519Alg, tls12GroupMessage(23, append([]byte{3}, testStream("x", 32)...)))),

		bad("context.server_name oversize", "context.server_name", withContext(req(p256ID, ecdsa256, d256), &keylessv1.RequestContext{ServerName: long})),
		bad("context.client_address oversize", "context.client_address", withContext(req(p256ID, ecdsa256, d256), &keylessv1.RequestContext{ClientAddress: long})),
		bad("context.connection_id oversize", "context.connection_id", withContext(req(p256ID, ecdsa256, d256), &keylessv1.RequestContext{ConnectionId: long})),
	)
	return cases
}

func TestValidateSignRequest(t *testing.T) {
	for _, tc := range signCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			id, alg, err := ValidateSignRequest(tc.req)
			if (err == nil) != tc.valid {
				t.Fatalf("ValidateSignRequest() error = %v, want valid %t", err, tc.valid)
			}
			checkValidation(t, tc.req, id, alg, err)
			if err != nil {
				var verr *ValidationError
				if !errors.As(err, &verr) || verr.Field != tc.wantField {
					t.Errorf("ValidateSignRequest() error = %#v, want a *ValidationError for %q", err, tc.wantField)
				}
			}
		})
	}
}

func TestValidateSignRequestNil(t *testing.T) {
	var verr *ValidationError
	if _, _, err := ValidateSignRequest(nil); !errors.As(err, &verr) || verr.Field != "key_id" {
		t.Errorf("ValidateSignRequest(nil) = %v, want a key_id ValidationError", err)
	}
	if _, err := ValidateDecryptRequest(nil); !errors.As(err, &verr) || verr.Field != "key_id" {
		t.Errorf("ValidateDecryptRequest(nil) = %v, want a key_id ValidationError", err)
	}
}

func TestValidationErrorMessage(t *testing.T) {
	err := &ValidationError{Field: "digest", Reason: "is 3 bytes"}
	if got, want := err.Error(), "signer: invalid digest: is 3 bytes"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

// checkValidation checks the invariants of ValidateSignRequest's result.
func checkValidation(t *testing.T, req *keylessv1.SignRequest, id link.KeyID, alg link.Algorithm, err error) {
	t.Helper()
	if err != nil {
		var verr *ValidationError
		if !errors.As(err, &verr) {
			t.Fatalf("ValidateSignRequest() error = %#v, want a *ValidationError", err)
		}
		switch verr.Field {
		case "key_id", "algorithm", "digest", "context.server_name", "context.client_address", "context.connection_id":
		default:
			t.Fatalf("ValidateSignRequest() error field = %q, not a SignRequest field", verr.Field)
		}
		return
	}
	if !bytes.Equal(id[:], req.GetKeyId()) {
		t.Fatalf("ValidateSignRequest() key id = %x, want the request's %x", id, req.GetKeyId())
	}
	if alg.Wire != req.GetAlgorithm() {
		t.Fatalf("ValidateSignRequest() algorithm = %v, want the request's %v", alg, req.GetAlgorithm())
	}
	if got, ok := link.AlgorithmFor(alg.Wire); !ok || got != alg {
		t.Fatalf("link.AlgorithmFor(%v) = %v, %t, want %v", alg.Wire, got, ok, alg)
	}
	if got, ok := link.AlgorithmForScheme(alg.Scheme()); !ok || got != alg {
		t.Fatalf("link.AlgorithmForScheme(%v) = %v, %t, want %v", alg.Scheme(), got, ok, alg)
	}
	d := req.GetDigest()
	if alg.Hash != 0 {
		if len(d) != alg.Hash.Size() {
			t.Fatalf("ValidateSignRequest() accepted a %d-byte digest for %v", len(d), alg)
		}
		if pss, ok := alg.SignerOpts().(*rsa.PSSOptions); ok != alg.PSS || pss != nil && pss.HashFunc() != alg.Hash {
			t.Fatalf("%v.SignerOpts() = %#v", alg, alg.SignerOpts())
		}
	} else if len(d) > MaxEd25519MessageLen || !isTLSServerSignatureInput(d) {
		t.Fatalf("ValidateSignRequest() accepted Ed25519 message %q", d)
	}
	c := req.GetContext()
	for _, f := range []string{c.GetServerName(), c.GetClientAddress(), c.GetConnectionId()} {
		if len(f) > link.MaxContextFieldLen {
			t.Fatalf("ValidateSignRequest() accepted a %d-byte context field", len(f))
		}
	}
}

// fuzzPolicyYAML lets testIdentity sign with every test key but the P-384
// one (default schemes), sign with RSA PKCS #1 SHA-1 on the RSA key (which
// the memory store cannot do), and decrypt with the RSA key only.
const fuzzPolicyYAML = `
rules:
  - name: fuzz-sign
    identities: [spiffe://test.example/edge/1]
    keys: [id:%[1]x, id:%[2]x, id:%[3]x, id:%[4]x]
    operations: [sign]
    schemes: [default]
  - name: fuzz-legacy
    identities: [spiffe://test.example/edge/1]
    keys: [id:%[1]x]
    operations: [sign]
    schemes: [rsa_pkcs1_sha1]
  - name: fuzz-decrypt
    identities: [spiffe://test.example/edge/1]
    keys: [id:%[1]x]
    operations: [decrypt]
`

// fuzzService is a Service over a MemoryStore of every test key with the
// fuzz policy, called directly rather than over gRPC, as testIdentity.
type fuzzService struct {
	svc   *Service
	ctx   context.Context
	audit *lastRecord
}

// lastRecord is an Auditor that keeps the last record.
type lastRecord struct {
	mu  sync.Mutex
	rec *AuditRecord
}

func (l *lastRecord) Audit(rec *AuditRecord) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.rec = rec
	return nil
}

func (l *lastRecord) take() *AuditRecord {
	l.mu.Lock()
	defer l.mu.Unlock()
	r := l.rec
	l.rec = nil
	return r
}

func newFuzzService(tb testing.TB) *fuzzService {
	tb.Helper()
	policy := mustPolicy(tb, fmt.Sprintf(fuzzPolicyYAML,
		mustKeyID(tb, testRSAKey().Public()), mustKeyID(tb, testP256Key().Public()), mustKeyID(tb, testEd25519Key().Public()),
		mustKeyID(tb, testP521Key().Public())))
	fs := &fuzzService{ctx: edgeContext(context.Background(), testIdentity), audit: &lastRecord{}}
	var err error
	fs.svc, err = NewService(Config{Keys: newTestMemoryStore(tb), Policy: policy, Audit: fs.audit})
	if err != nil {
		tb.Fatalf("NewService() = %v", err)
	}
	return fs
}

// fuzzPolicyAllows is the fuzz policy written out independently: whether
// it lets testIdentity perform op (with wire, for sign) with key pub.
// fuzzPolicyCovers reports whether a rule of the fuzz policy names the key:
// every test key but the P-384 one. A key it does not cover does not exist
// for the caller (NotFound).
func fuzzPolicyCovers(pub crypto.PublicKey) bool {
	return !testP384Key().Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(pub)
}

func fuzzPolicyAllows(pub crypto.PublicKey, op string, wire keylessv1.SignatureAlgorithm) bool {
	kt := link.KeyTypeOf(pub)
	p384 := testP384Key().Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(pub)
	switch {
	case op == OpDecrypt:
		return kt == keylessv1.KeyType_KEY_TYPE_RSA
	case p384:
		return false
	case wire == keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA1:
		return kt == keylessv1.KeyType_KEY_TYPE_RSA
	case wire == keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA1:
		return false
	}
	return true
}

// checkRecord checks the audit record of a direct call that returned err.
func checkRecord(t *testing.T, rec *AuditRecord, op string, keyID []byte, err error) {
	t.Helper()
	if rec == nil {
		t.Fatalf("%s: no audit record", op)
	}
	if rec.Op != op || rec.Outcome != status.Code(err).String() || rec.Identity != testIdentity {
		t.Fatalf("audit record %+v for %s = %v", rec, op, err)
	}
	if want := hexKeyID(keyID); rec.KeyID != want {
		t.Fatalf("audit record key_id = %q, want %q", rec.KeyID, want)
	}
}

// testPublicKeyByID returns the public key of the test key with the given
// id, or nil.
func testPublicKeyByID(id []byte) crypto.PublicKey {
	for _, k := range allTestKeys() {
		if kid, err := link.KeyIDOf(k.key.Public()); err == nil && bytes.Equal(kid[:], id) {
			return k.key.Public()
		}
	}
	return nil
}

func FuzzValidateSignRequest(f *testing.F) {
	for _, tc := range signCases(f) {
		c := tc.req.GetContext()
		f.Add(tc.req.GetKeyId(), int32(tc.req.GetAlgorithm()), tc.req.GetDigest(), c.GetServerName(), c.GetClientAddress(), c.GetConnectionId())
	}
	f.Fuzz(func(t *testing.T, keyID []byte, alg int32, digest []byte, serverName, clientAddress, connectionID string) {
		req := &keylessv1.SignRequest{
			KeyId:     keyID,
			Algorithm: keylessv1.SignatureAlgorithm(alg),
			Digest:    digest,
			Context:   &keylessv1.RequestContext{ServerName: serverName, ClientAddress: clientAddress, ConnectionId: connectionID},
		}
		id, a, err := ValidateSignRequest(req)
		checkValidation(t, req, id, a, err)
	})
}

func FuzzSignRequestProto(f *testing.F) {
	for _, tc := range signCases(f) {
		b, err := proto.Marshal(tc.req)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{})
	f.Add([]byte{0x0a, 0x20}) // a truncated key_id
	fs := newFuzzService(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		req := &keylessv1.SignRequest{}
		if err := proto.Unmarshal(data, req); err != nil {
			return
		}
		id, alg, verr := ValidateSignRequest(req)
		checkValidation(t, req, id, alg, verr)

		resp, err := fs.svc.Sign(fs.ctx, req)
		checkRecord(t, fs.audit.take(), OpSign, req.GetKeyId(), err)
		pub := testPublicKeyByID(req.GetKeyId())
		want := codes.OK
		switch {
		case verr != nil:
			want = codes.InvalidArgument
		case pub == nil, !fuzzPolicyCovers(pub):
			want = codes.NotFound
		case !fuzzPolicyAllows(pub, OpSign, alg.Wire):
			want = codes.PermissionDenied
		case link.KeyTypeOf(pub) != alg.KeyType || alg.Legacy:
			want = codes.InvalidArgument
		}
		if got := status.Code(err); got != want {
			t.Fatalf("Sign(%v with a %v key) = %v, want %v", alg, link.KeyTypeOf(pub), err, want)
		}
		if err != nil {
			return
		}
		if err := verifySignature(pub, alg, req.GetDigest(), resp.GetSignature()); err != nil {
			t.Fatalf("Sign(%v) signature: %v", alg, err)
		}
	})
}

func FuzzDecryptRequestProto(f *testing.F) {
	priv := testRSAKey()
	fuzzRejectionSecret, err := premaster.Secret(priv)
	if err != nil {
		f.Fatal(err)
	}
	for _, tc := range decryptCases(f) {
		b, err := proto.Marshal(tc.req)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{})
	fs := newFuzzService(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		req := &keylessv1.DecryptRequest{}
		if err := proto.Unmarshal(data, req); err != nil {
			return
		}
		_, verr := ValidateDecryptRequest(req)
		resp, err := fs.svc.Decrypt(fs.ctx, req)
		checkRecord(t, fs.audit.take(), OpDecrypt, req.GetKeyId(), err)
		pub := testPublicKeyByID(req.GetKeyId())
		want := codes.OK
		switch {
		case verr != nil:
			want = codes.InvalidArgument
		case pub == nil, !fuzzPolicyCovers(pub):
			want = codes.NotFound
		case !fuzzPolicyAllows(pub, OpDecrypt, 0):
			want = codes.PermissionDenied
		}
		if got := status.Code(err); got != want {
			t.Fatalf("Decrypt(key %x) = %v, want %v", req.GetKeyId(), err, want)
		}
		if err != nil {
			return
		}
		pms := resp.GetPremaster()
		if len(pms) != link.PremasterLen {
			t.Fatalf("Decrypt() = %d bytes, want %d", len(pms), link.PremasterLen)
		}
		if !bytes.Equal(req.GetKeyId(), mustKeyID(t, priv.Public())) {
			t.Fatalf("Decrypt() = OK with key %x, which is not the RSA key", req.GetKeyId())
		}
		// A valid 48-byte PKCS #1 v1.5 plaintext must come back exactly,
		// anything else as its implicit rejection. (crypto/rsa also
		// decrypts a ciphertext shorter than the modulus, which RFC 8017
		// rejects, and so does the service.)
		ct := req.GetEncryptedPremaster()
		wantPMS := premaster.Rejection(fuzzRejectionSecret, ct)
		if pt, err := rsa.DecryptPKCS1v15(nil, priv, ct); err == nil && len(pt) == link.PremasterLen && len(ct) == priv.Size() {
			wantPMS = pt
		}
		if !bytes.Equal(pms, wantPMS) {
			t.Fatalf("Decrypt() = %x, want %x", pms, wantPMS)
		}
	})
}
