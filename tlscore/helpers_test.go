package tlscore

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
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

	"github.com/keyless-tls/keyless/internal/h2frames"
	"github.com/keyless-tls/keyless/internal/pkitest"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
	"github.com/keyless-tls/keyless/signer"
)

// defaultTestTimeout bounds anything a test waits for that should be quick.
const defaultTestTimeout = 10 * time.Second

// keyserverName is the name in the test keyservers' certificates.
const keyserverName = "keyserver.test"

// edgeIdentity is the name in the test edges' client certificates.
const edgeIdentity = "edge.test"

// testPolicy lets edgeIdentity use every key for everything the keyserver
// offers without SHA-1.
func testPolicy(t testing.TB) *signer.Policy {
	t.Helper()
	p, err := signer.ParsePolicy("test.yaml", []byte(`
rules:
  - name: edge
    identities: [`+edgeIdentity+`]
    keys: ["*"]
    operations: [sign, decrypt]
    schemes: [default]
`))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func mustKeyID(t testing.TB, pub crypto.PublicKey) link.KeyID {
	t.Helper()
	id, err := link.KeyIDOf(pub)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// opRecorder records the key operations a keyserver received.
type opRecorder struct {
	mu       sync.Mutex
	messages int // StreamRequest messages
	signs    []*keylessv1.SignRequest
	decrypts []*keylessv1.DecryptRequest
}

func (r *opRecorder) intercept(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	r.mu.Lock()
	switch req := req.(type) {
	case *keylessv1.SignRequest:
		r.signs = append(r.signs, req)
	case *keylessv1.DecryptRequest:
		r.decrypts = append(r.decrypts, req)
	}
	r.mu.Unlock()
	return handler(ctx, req)
}

// interceptStream records the operations of Stream calls.
func (r *opRecorder) interceptStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	return handler(srv, recordingStream{ss, r})
}

type recordingStream struct {
	grpc.ServerStream
	r *opRecorder
}

func (s recordingStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if req, ok := m.(*keylessv1.StreamRequest); ok {
		s.r.mu.Lock()
		s.r.messages++
		for _, op := range req.GetOperations() {
			if sr := op.GetSign(); sr != nil {
				s.r.signs = append(s.r.signs, sr)
			}
			if dr := op.GetDecrypt(); dr != nil {
				s.r.decrypts = append(s.r.decrypts, dr)
			}
		}
		s.r.mu.Unlock()
	}
	return nil
}

// counts returns the numbers of Sign and Decrypt requests so far.
func (r *opRecorder) counts() (signs, decrypts int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.signs), len(r.decrypts)
}

func (r *opRecorder) lastSign() *keylessv1.SignRequest {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.signs) == 0 {
		return nil
	}
	return r.signs[len(r.signs)-1]
}

// testKeyserver is a gRPC keyserver on an in-memory listener, with mTLS
// and the transport options of a real one ([link.ServerOptions]).
type testKeyserver struct {
	lis    *bufconn.Listener
	ops    *opRecorder
	frames *h2frames.Counts // HTTP/2 frames the keyserver read and wrote
	srv    *grpc.Server
	health *health.Server
}

func startKeyserver(t testing.TB, pki *pkitest.MTLS, svc keylessv1.KeylessServiceServer) *testKeyserver {
	t.Helper()
	return startKeyserverWithHealth(t, pki, svc, healthpb.HealthCheckResponse_SERVING)
}

// startKeyserverWithHealth starts a keyserver whose health service reports
// st for the KeylessService, with extra server options.
func startKeyserverWithHealth(t testing.TB, pki *pkitest.MTLS, svc keylessv1.KeylessServiceServer, st healthpb.HealthCheckResponse_ServingStatus, opts ...grpc.ServerOption) *testKeyserver {
	t.Helper()
	cfg, err := link.ServerMTLSConfig(pki.ServerCert, pki.ServerKey, pki.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	ks := &testKeyserver{lis: bufconn.Listen(1 << 20), ops: &opRecorder{}, frames: &h2frames.Counts{}}
	srv := grpc.NewServer(append(append(link.ServerOptions(), grpc.Creds(h2frames.ServerCredentials(credentials.NewTLS(cfg), ks.frames)),
		grpc.ChainUnaryInterceptor(ks.ops.intercept), grpc.ChainStreamInterceptor(ks.ops.interceptStream)), opts...)...)
	keylessv1.RegisterKeylessServiceServer(srv, svc)
	hs := health.NewServer()
	hs.SetServingStatus(keylessv1.KeylessService_ServiceDesc.ServiceName, st)
	healthpb.RegisterHealthServer(srv, hs)
	go srv.Serve(ks.lis)
	t.Cleanup(srv.Stop)
	ks.srv = srv
	ks.health = hs
	return ks
}

// newSignerService returns the real keyserver service over in-memory keys.
// Keys listed in schemes report only those schemes.
func newSignerService(t testing.TB, keys []crypto.Signer, schemes map[link.KeyID][]tls.SignatureScheme) *signer.Service {
	t.Helper()
	ms, err := signer.NewMemoryStore(keys...)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := signer.NewService(signer.Config{Keys: schemeStore{ms, schemes}, Policy: testPolicy(t)})
	if err != nil {
		t.Fatal(err)
	}
	return svc
}

// schemeStore restricts some keys to given signature schemes, as an HSM that
// lacks a mechanism would.
type schemeStore struct {
	signer.KeyStore
	schemes map[link.KeyID][]tls.SignatureScheme
}

type schemeKey struct {
	crypto.Signer
	schemes []tls.SignatureScheme
}

func (k schemeKey) SignatureSchemes() []tls.SignatureScheme { return k.schemes }

type schemeDecrypterKey struct {
	schemeKey
	signer.PremasterDecrypter
}

func (s schemeStore) wrap(k crypto.Signer) crypto.Signer {
	id, _ := link.KeyIDOf(k.Public())
	sc, ok := s.schemes[id]
	if !ok || k == nil {
		return k
	}
	if d, ok := k.(signer.PremasterDecrypter); ok {
		return schemeDecrypterKey{schemeKey{k, sc}, d}
	}
	return schemeKey{k, sc}
}

func (s schemeStore) Key(ctx context.Context, id link.KeyID) (crypto.Signer, error) {
	k, err := s.KeyStore.Key(ctx, id)
	if k == nil || err != nil {
		return k, err
	}
	return s.wrap(k), nil
}

func (s schemeStore) Keys(ctx context.Context) ([]crypto.Signer, error) {
	ks, err := s.KeyStore.Keys(ctx)
	for i := range ks {
		ks[i] = s.wrap(ks[i])
	}
	return ks, err
}

// dialTestClient returns a Client for the given keyservers, keyed by the
// address the client is given for each.
func dialTestClient(t testing.TB, pki *pkitest.MTLS, cfg ClientConfig, servers map[string]*testKeyserver) *Client {
	t.Helper()
	tlsCfg, err := link.ClientMTLSConfig(pki.ClientCert, pki.ClientKey, pki.CAFile, keyserverName)
	if err != nil {
		t.Fatal(err)
	}
	cfg.TLS = tlsCfg
	if cfg.Addresses == nil {
		for a := range servers {
			cfg.Addresses = append(cfg.Addresses, a)
		}
	}
	cfg.Dialer = func(ctx context.Context, addr string) (net.Conn, error) {
		return servers[addr].lis.DialContext(ctx)
	}
	c, err := Dial(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// fakeService is a KeylessService whose handlers are set per test. Nil
// handlers delegate to next.
type fakeService struct {
	keylessv1.UnimplementedKeylessServiceServer
	next    keylessv1.KeylessServiceServer
	sign    func(context.Context, *keylessv1.SignRequest) (*keylessv1.SignResponse, error)
	decrypt func(context.Context, *keylessv1.DecryptRequest) (*keylessv1.DecryptResponse, error)
	lists   *atomic.Int64 // if set, counts ListKeys calls
	// noStream makes Stream answer UNIMPLEMENTED, as a keyserver that has
	// only the unary calls.
	noStream bool
}

// Stream performs each operation with the service's own Sign or Decrypt,
// each in its own goroutine with the operation's deadline, so that the
// per-test handlers see the stream's operations too.
func (f *fakeService) Stream(stream grpc.BidiStreamingServer[keylessv1.StreamRequest, keylessv1.StreamResponse]) error {
	if f.noStream {
		return status.Error(codes.Unimplemented, "fake keyserver without Stream")
	}
	var sendMu sync.Mutex
	for {
		req, err := stream.Recv()
		if err != nil {
			return nil
		}
		for _, op := range req.GetOperations() {
			go func() {
				timeout := link.DefaultOperationTimeout
				if ms := op.GetTimeoutMs(); ms > 0 {
					timeout = time.Duration(ms) * time.Millisecond
				}
				ctx, cancel := context.WithTimeout(stream.Context(), timeout)
				defer cancel()
				res := &keylessv1.OperationResult{Id: op.GetId()}
				var err error
				switch {
				case op.GetSign() != nil:
					var resp *keylessv1.SignResponse
					if resp, err = f.Sign(ctx, op.GetSign()); err == nil {
						res.Result = &keylessv1.OperationResult_Sign{Sign: resp}
					}
				case op.GetDecrypt() != nil:
					var resp *keylessv1.DecryptResponse
					if resp, err = f.Decrypt(ctx, op.GetDecrypt()); err == nil {
						res.Result = &keylessv1.OperationResult_Decrypt{Decrypt: resp}
					}
				default:
					err = status.Error(codes.InvalidArgument, "empty operation")
				}
				if err != nil {
					st := status.Convert(err)
					res.Result = &keylessv1.OperationResult_Error{Error: &keylessv1.OperationError{Code: uint32(st.Code()), Message: st.Message()}}
				}
				sendMu.Lock()
				defer sendMu.Unlock()
				_ = stream.Send(&keylessv1.StreamResponse{Results: []*keylessv1.OperationResult{res}})
			}()
		}
	}
}

func (f *fakeService) Sign(ctx context.Context, req *keylessv1.SignRequest) (*keylessv1.SignResponse, error) {
	if f.sign != nil {
		return f.sign(ctx, req)
	}
	return f.next.Sign(ctx, req)
}

func (f *fakeService) Decrypt(ctx context.Context, req *keylessv1.DecryptRequest) (*keylessv1.DecryptResponse, error) {
	if f.decrypt != nil {
		return f.decrypt(ctx, req)
	}
	return f.next.Decrypt(ctx, req)
}

func (f *fakeService) ListKeys(ctx context.Context, req *keylessv1.ListKeysRequest) (*keylessv1.ListKeysResponse, error) {
	if f.lists != nil {
		f.lists.Add(1)
	}
	return f.next.ListKeys(ctx, req)
}

// blockingHandler returns a handler that never answers until the test ends,
// whatever its context says: a keyserver that hangs.
func blockingHandler[Req, Resp any](t *testing.T) func(context.Context, Req) (Resp, error) {
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	return func(context.Context, Req) (Resp, error) {
		<-release
		var zero Resp
		return zero, nil
	}
}

// testEnv is an edge's view of one keyserver: a Client, and a directory of
// certificates for the four test keys.
type testEnv struct {
	pki    *pkitest.MTLS
	ks     *testKeyserver
	client *Client
	dir    string
	leaves map[string]*x509.Certificate // by file name
}

type envOptions struct {
	schemes     map[link.KeyID][]tls.SignatureScheme
	wrap        func(next keylessv1.KeylessServiceServer) keylessv1.KeylessServiceServer
	callTimeout time.Duration
}

// The certificates of a testEnv, by file name.
var envCerts = []struct {
	file  string
	key   func() crypto.Signer
	names []string
}{
	{"ed25519.pem", func() crypto.Signer { return pkitest.Ed25519Key() }, []string{"ed25519.example.com"}},
	{"p256.pem", func() crypto.Signer { return pkitest.P256Key() }, []string{"p256.example.com", "*.wild.example.com"}},
	{"p384.pem", func() crypto.Signer { return pkitest.P384Key() }, []string{"p384.example.com"}},
	{"rsa.pem", func() crypto.Signer { return pkitest.RSAKey() }, []string{"rsa.example.com", "legacy.example.com", "*.legacy-wild.example.com"}},
}

func newTestEnv(t *testing.T, o envOptions) *testEnv {
	t.Helper()
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	var keys []crypto.Signer
	for _, c := range envCerts {
		keys = append(keys, c.key())
	}
	var svc keylessv1.KeylessServiceServer = newSignerService(t, keys, o.schemes)
	if o.wrap != nil {
		svc = o.wrap(svc)
	}
	ks := startKeyserver(t, pki, svc)
	client := dialTestClient(t, pki, ClientConfig{CallTimeout: o.callTimeout}, map[string]*testKeyserver{"ks1.test:443": ks})
	env := &testEnv{pki: pki, ks: ks, client: client, dir: t.TempDir(), leaves: make(map[string]*x509.Certificate)}
	for _, c := range envCerts {
		leaf := pki.CA.Issue(t, c.key().Public(), pkitest.LeafOptions{Names: c.names})
		env.leaves[c.file] = leaf
		pkitest.WriteFile(t, env.dir, c.file, pkitest.CertPEM(leaf))
	}
	return env
}

// newStore returns a CertStore over env's client, loaded from env's
// directory.
func (env *testEnv) newStore(t *testing.T, cfg CertStoreConfig) *CertStore {
	t.Helper()
	cfg.Client = env.client
	s, err := NewCertStore(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), defaultTestTimeout)
	defer cancel()
	if err := s.Load(ctx, env.dir); err != nil {
		t.Fatalf("Load(%s) = %v", env.dir, err)
	}
	return s
}

// serverConfig returns the edge's TLS config over a store of env's
// certificates.
func (env *testEnv) serverConfig(t *testing.T, rsaKex ...string) *tls.Config {
	t.Helper()
	cfg, err := NewServerTLSConfig(ServerConfig{Certificates: env.newStore(t, CertStoreConfig{}), RSAKeyExchange: rsaKex})
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// clientConfig returns a TLS client config that trusts the test CA.
func (env *testEnv) clientConfig(serverName string, minVersion, maxVersion uint16) *tls.Config {
	return &tls.Config{RootCAs: env.pki.CA.Pool, ServerName: serverName, MinVersion: minVersion, MaxVersion: maxVersion}
}

// newTestLogger returns a logger whose output the test can read.
func newTestLogger() (hclog.Logger, *syncBuffer) {
	var buf syncBuffer
	return hclog.New(&hclog.LoggerOptions{Output: &buf, Level: hclog.Debug}), &buf
}

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
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

func bufDialer(ks *testKeyserver) func(context.Context, string) (net.Conn, error) {
	return func(ctx context.Context, _ string) (net.Conn, error) { return ks.lis.DialContext(ctx) }
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
