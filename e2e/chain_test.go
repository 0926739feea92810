package e2e

import (
	"bufio"
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/hsm/hsmtest"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
	"github.com/keyless-tls/keyless/signer"
	"github.com/keyless-tls/keyless/tlscore"
)

// chain is the whole product in one test process, with every real part:
// crypto/tls clients → an edge (tlscore, over TCP) → gRPC with mutual TLS
// 1.3 over TCP → signer.Service → hsm.Module → a SoftHSM token made for the
// test. The keyserver's audit trail counts the key operations.
type chain struct {
	webCA    *testCA
	edgeAddr string

	signs, decrypts atomic.Int64
	// stall, while set, makes every key operation wait for the request's
	// deadline, as a stuck HSM would (see stallingStore).
	stall atomic.Bool

	stopKeyserver func()
	// stop stops everything the chain started and removes the directory
	// of its certificates and link PKI (keys included).
	stop func()

	// For tests that talk to the keyserver directly: its address, the link
	// PKI (the edge's client certificate), the RSA key, and everything the
	// keyserver logged (at trace level) and audited.
	ksAddr    string
	certs     string // the directory of the edge's certificates
	link      *linkPKI
	rsaPub    *rsa.PublicKey
	logs      *syncBuffer
	auditLogs *syncBuffer
}

// chainCallTimeout is the edge's deadline for each keyserver call.
const chainCallTimeout = 1 * time.Second

// Certificates of the chain and the key each uses.
const (
	nameRSA      = "rsa.e2e.test"       // RSA-2048, RSA key exchange enabled
	nameRSANoKex = "rsa-nokex.e2e.test" // same certificate, RSA key exchange off
	nameECDSA    = "ecdsa.e2e.test"     // P-256, the default certificate
	nameP384     = "p384.e2e.test"      // P-384, also *.wild.e2e.test
	nameEd25519  = "ed25519.e2e.test"   // Ed25519
)

// chainPolicy lets the chain's edge use every key for everything but SHA-1.
const chainPolicy = `
rules:
  - name: chain-edge
    identities: [spiffe://e2e.internal/edge/1]
    keys: ["*"]
    operations: [sign, decrypt]
    schemes: [default]
`

var (
	chainOnce sync.Once
	theChain  *chain
	chainErr  error
)

// sharedChain returns the chain shared by the tests of this file, started on
// first use and stopped when the test binary exits. Tests that use it must
// not run in parallel: they read its operation counters.
func sharedChain(t *testing.T) *chain {
	t.Helper()
	hsmtest.New(t) // skips or fails here if SoftHSM is missing
	chainOnce.Do(func() { theChain, chainErr = startChain(t) })
	if chainErr != nil {
		t.Fatal(chainErr)
	}
	return theChain
}

func startChain(t *testing.T) (*chain, error) {
	tok := hsmtest.New(t)
	cfg := tok.Config()
	module, err := hsm.Open(cfg)
	if err != nil {
		return nil, err
	}
	ctx := context.Background()
	gen := func(spec hsm.KeySpec) crypto.PublicKey {
		k, err := module.Generate(ctx, spec)
		if err != nil {
			t.Fatalf("generate %+v: %v", spec, err)
		}
		return k.Public()
	}
	rsaPub := gen(hsm.KeySpec{Type: "rsa", Bits: 2048, Label: nameRSA})
	p256Pub := gen(hsm.KeySpec{Type: "ecdsa", Curve: "P-256", Label: nameECDSA})
	p384Pub := gen(hsm.KeySpec{Type: "ecdsa", Curve: "P-384", Label: nameP384})
	edPub := gen(hsm.KeySpec{Type: "ed25519", Label: nameEd25519})

	// Not t.TempDir: the chain outlives the test that starts it.
	dir, err := os.MkdirTemp("", "keyless-e2e-chain-")
	if err != nil {
		return nil, err
	}
	c := &chain{webCA: newTestCA(t, "e2e web CA"), rsaPub: rsaPub.(*rsa.PublicKey), logs: &syncBuffer{}, auditLogs: &syncBuffer{}}
	certs := filepath.Join(dir, "certs")
	os.Mkdir(certs, 0o755)
	issue := func(file string, pub crypto.PublicKey, names ...string) {
		writeCert(t, certs, file, c.webCA.issue(t, pub, x509.ExtKeyUsageServerAuth, names))
	}
	issue("rsa.pem", rsaPub, nameRSA, nameRSANoKex)
	issue("ecdsa.pem", p256Pub, nameECDSA)
	issue("p384.pem", p384Pub, nameP384, "*.wild.e2e.test")
	issue("ed25519.pem", edPub, nameEd25519)
	lp := newLinkPKIIn(t, dir)
	c.link = lp

	// The keyserver, as keyserver serve builds it.
	creds, err := link.LoadMTLSCredentials(lp.serverCert, lp.serverKey, lp.caFile)
	if err != nil {
		return nil, err
	}
	policy, err := signer.ParsePolicy("chain.yaml", []byte(chainPolicy))
	if err != nil {
		return nil, err
	}
	logger := hclog.New(&hclog.LoggerOptions{Name: "keyserver", Level: hclog.Trace, Output: c.logs})
	svc, err := signer.NewService(signer.Config{Keys: stallingStore{module, c}, Policy: policy,
		Audit:         signer.MultiAuditor(signer.NewAuditLog(c.auditLogs), opCounter{c}),
		MaxConcurrent: 2, MaxQueued: 256, Logger: logger})
	if err != nil {
		return nil, err
	}
	gs := grpc.NewServer(append(link.ServerOptions(), grpc.Creds(creds.ServerCredentials(svc.CheckPeer, nil, link.HandshakeObserver{})),
		grpc.StatsHandler(svc.StatsHandler()))...)
	keylessv1.RegisterKeylessServiceServer(gs, svc)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	ksLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	hctx, stopHealth := context.WithCancel(ctx)
	go signer.WatchHealth(hctx, module, hs, time.Second)
	go gs.Serve(ksLn)
	var stopOnce sync.Once
	c.stopKeyserver = func() { stopOnce.Do(func() { stopHealth(); gs.Stop() }) }
	var closers []func() error // the edge's parts, in the order to close them
	c.stop = func() {
		c.stopKeyserver()
		for _, f := range slices.Backward(closers) {
			f()
		}
		module.Close()
		os.RemoveAll(dir)
	}
	c.ksAddr = ksLn.Addr().String()
	c.certs = certs

	// The edge.
	clientTLS, err := link.ClientMTLSConfig(lp.edgeCert, lp.edgeKey, lp.caFile, lp.serverName)
	if err != nil {
		return nil, err
	}
	client, err := tlscore.Dial(tlscore.ClientConfig{Addresses: []string{ksLn.Addr().String()}, TLS: clientTLS, CallTimeout: chainCallTimeout})
	if err != nil {
		return nil, err
	}
	closers = append(closers, client.Close)
	store, err := tlscore.NewCertStore(tlscore.CertStoreConfig{Client: client, Default: nameECDSA})
	if err != nil {
		return nil, err
	}
	if err := store.Load(ctx, certs); err != nil {
		return nil, err
	}
	edgeTLS, err := tlscore.NewServerTLSConfig(tlscore.ServerConfig{Certificates: store, RSAKeyExchange: []string{nameRSA}})
	if err != nil {
		return nil, err
	}
	edgeLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	c.edgeAddr = edgeLn.Addr().String()
	edgeCtx, stopEdge := context.WithCancel(ctx)
	edgeDone := make(chan struct{})
	go func() {
		defer close(edgeDone)
		tlscore.ServeHTTP(edgeCtx, edgeLn, edgeTLS, http.HandlerFunc(echoTLS), time.Second, nil)
	}()
	closers = append(closers, func() error { stopEdge(); <-edgeDone; return nil })
	return c, nil
}

// opCounter counts, from the audit trail, the key operations the keyserver
// was asked for, whatever their outcome, on streams and unary calls alike.
type opCounter struct{ c *chain }

func (o opCounter) Audit(rec *signer.AuditRecord) error {
	switch rec.Op {
	case signer.OpSign:
		o.c.signs.Add(1)
	case signer.OpDecrypt:
		o.c.decrypts.Add(1)
	}
	return nil
}

// stallingStore is the token, whose key lookups wait for the request's
// deadline while c.stall is set, as a stuck HSM would.
type stallingStore struct {
	*hsm.Module
	c *chain
}

func (s stallingStore) Key(ctx context.Context, id link.KeyID) (crypto.Signer, error) {
	if s.c.stall.Load() {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return s.Module.Key(ctx, id)
}

// ops returns the numbers of sign and decrypt operations so far.
func (c *chain) ops() (int64, int64) { return c.signs.Load(), c.decrypts.Load() }

// echoTLS answers with what the edge saw of the TLS connection.
func echoTLS(w http.ResponseWriter, r *http.Request) {
	fmt.Fprintf(w, "sni=%s version=%s resumed=%t", r.TLS.ServerName, tlsVersionName(r.TLS.Version), r.TLS.DidResume)
}

func tlsVersionName(v uint16) string {
	switch v {
	case 0x0303:
		return "TLS1.2"
	case 0x0304:
		return "TLS1.3"
	}
	return fmt.Sprintf("0x%04x", v)
}

// get performs one HTTPS request over a new connection with cfg and returns
// the connection state and the body.
func (c *chain) get(t *testing.T, cfg *tls.Config) (*tls.ConnectionState, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	d := tls.Dialer{Config: cfg}
	conn, err := d.DialContext(ctx, "tcp", c.edgeAddr)
	if err != nil {
		return nil, "", err
	}
	defer conn.Close()
	tc := conn.(*tls.Conn)
	st := tc.ConnectionState()
	req, _ := http.NewRequest("GET", "https://"+cfg.ServerName+"/", nil)
	req.Close = true
	if err := req.Write(conn); err != nil {
		return &st, "", err
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		return &st, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return &st, string(body), err
}
