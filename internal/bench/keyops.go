package bench

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
	"github.com/keyless-tls/keyless/signer"
	"github.com/keyless-tls/keyless/tlscore"
)

// Key operations the bench measures.
const (
	OpECDSASign  = "ecdsa-p256-sign"
	OpRSASign    = "rsa2048-pss-sign"
	OpRSADecrypt = "rsa2048-decrypt"
)

// keyOps lists the key operations in table order.
var keyOps = []string{OpECDSASign, OpRSASign, OpRSADecrypt}

// keyOpInput is what one worker sends: a digest to sign or a ciphertext to
// decrypt, made for the key's public key.
type keyOpInput struct {
	alg        link.Algorithm
	digest     []byte
	ciphertext []byte
}

// newKeyOpInput returns a fresh input for op with the key pub: a random
// SHA-256 digest, or a valid PKCS #1 v1.5 encryption of a random 48-byte
// premaster secret.
func newKeyOpInput(op string, pub crypto.PublicKey) (*keyOpInput, error) {
	in := &keyOpInput{}
	var sum [32]byte
	if _, err := rand.Read(sum[:]); err != nil {
		return nil, err
	}
	in.digest = sum[:]
	var wire keylessv1.SignatureAlgorithm
	switch op {
	case OpECDSASign:
		wire = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA256
	case OpRSASign:
		wire = keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA256
	case OpRSADecrypt:
		rpub, ok := pub.(*rsa.PublicKey)
		if !ok {
			return nil, fmt.Errorf("bench: %s needs an RSA key, not %T", op, pub)
		}
		pms := make([]byte, link.PremasterLen)
		if _, err := rand.Read(pms); err != nil {
			return nil, err
		}
		ct, err := rsa.EncryptPKCS1v15(rand.Reader, rpub, pms)
		if err != nil {
			return nil, err
		}
		in.ciphertext = ct
		return in, nil
	default:
		return nil, fmt.Errorf("bench: unknown key operation %q (want %s)", op, strings.Join(keyOps, ", "))
	}
	alg, ok := link.AlgorithmFor(wire)
	if !ok {
		return nil, fmt.Errorf("bench: no algorithm %v", wire)
	}
	in.alg = alg
	return in, nil
}

// loadFlags are the flags of every mode that runs a load.
type loadFlags struct {
	concurrency int
	warmup      time.Duration
	duration    time.Duration
	timeout     time.Duration
	pause       time.Duration
	watch       string
}

func (f *loadFlags) register(fs *flag.FlagSet) {
	fs.IntVar(&f.concurrency, "concurrency", 1, "number of workers, each running one operation at a time")
	fs.DurationVar(&f.warmup, "warmup", 500*time.Millisecond, "time to run before measuring")
	fs.DurationVar(&f.duration, "duration", 2*time.Second, "time to measure")
	fs.DurationVar(&f.timeout, "op-timeout", tlscore.DefaultCallTimeout, "deadline of each operation")
	fs.DurationVar(&f.pause, "pause", 0, "idle time of each worker before each operation, not counted in its latency")
	fs.StringVar(&f.watch, "watch", "", "other processes whose CPU time to measure, as name=pid,name=pid")
}

// measure runs the load of op and returns what it measured; self names
// this process in Result.CPU.
func (f *loadFlags) measure(ctx context.Context, name, self string, op Op) (Result, error) {
	watch, err := parseWatch(f.watch)
	if err != nil {
		return Result{}, err
	}
	watch[self] = os.Getpid()
	load := &Load{Name: name, Concurrency: f.concurrency, Warmup: f.warmup, Duration: f.duration, OpTimeout: f.timeout, Op: op,
		Pause: f.pause, Watch: watch}
	return load.Run(ctx)
}

// run is measure, with the Result printed as JSON on stdout.
func (f *loadFlags) run(ctx context.Context, stdout io.Writer, name, self string, op Op) error {
	res, err := f.measure(ctx, name, self, op)
	if err != nil {
		return err
	}
	return writeJSON(stdout, res)
}

// keyFlags name a key operation and the key's public key.
type keyFlags struct {
	op  string
	pub string
}

func (f *keyFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.op, "op", OpECDSASign, "key operation: "+strings.Join(keyOps, ", "))
	fs.StringVar(&f.pub, "pub", "", "PEM public key of the key (required)")
}

// inputs returns the key id and one input per worker.
func (f *keyFlags) inputs(n int) (link.KeyID, []*keyOpInput, error) {
	data, err := os.ReadFile(f.pub)
	if err != nil {
		return link.KeyID{}, nil, fmt.Errorf("bench: -pub: %w", err)
	}
	pub, err := readPublicKey(data)
	if err != nil {
		return link.KeyID{}, nil, err
	}
	id, err := link.KeyIDOf(pub)
	if err != nil {
		return id, nil, err
	}
	ins := make([]*keyOpInput, n)
	for i := range ins {
		if ins[i], err = newKeyOpInput(f.op, pub); err != nil {
			return id, nil, err
		}
	}
	return id, ins, nil
}

// runKeyops is the "keyops" mode: a gRPC client that loads a keyserver
// with one key operation over one mutual-TLS connection, as an edge does,
// then measures the empty call (grpc.health.v1 Check) on that same
// connection.
func runKeyops(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("keyops", stderr)
	var (
		lf    loadFlags
		kf    keyFlags
		link  linkFlags
		addr  = fs.String("addr", "", "keyserver address host:port (required)")
		empty = fs.Duration("empty", 0, "after the load, measure the empty gRPC call for this long (0: not at all)")
		unary = fs.Bool("unary", false, "call the unary Sign and Decrypt RPCs instead of the edge's client (which batches operations on a stream)")
	)
	lf.register(fs)
	kf.register(fs)
	link.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *addr == "" {
		return fmt.Errorf("bench: keyops: -addr is required")
	}
	id, ins, err := kf.inputs(lf.concurrency)
	if err != nil {
		return err
	}
	conn, err := link.dial(*addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	health := healthpb.NewHealthClient(conn)
	if err := waitHealthy(ctx, health); err != nil {
		return err
	}
	var op Op
	if *unary {
		op = unaryKeyOp(keylessv1.NewKeylessServiceClient(conn), kf.op, id, ins)
	} else {
		// The edge's client, on the same connection as the empty call.
		client, err := tlscore.NewClientConn(conn, lf.timeout)
		if err != nil {
			return err
		}
		defer client.Close()
		op = clientKeyOp(client, kf.op, id, ins)
	}
	res, err := lf.measure(ctx, "keyless/"+kf.op, "client", op)
	if err != nil {
		return err
	}
	if *empty > 0 {
		req := &healthpb.HealthCheckRequest{Service: keylessv1.KeylessService_ServiceDesc.ServiceName}
		er, err := (&Load{Name: "empty", Concurrency: 1, Warmup: *empty / 5, Duration: *empty, OpTimeout: lf.timeout,
			Op: func(ctx context.Context, _ int) error {
				_, err := health.Check(ctx, req)
				return err
			}}).Run(ctx)
		if err != nil {
			return err
		}
		if er.Errors > 0 {
			return fmt.Errorf("bench: empty call failed: %s", er.FirstError)
		}
		res.EmptyP50us, res.EmptyP99us = er.P50us, er.P99us
	}
	return writeJSON(stdout, res)
}

// clientKeyOp is the key operation through tlscore.Client, as the edge
// performs it. Inputs are built once per worker.
func clientKeyOp(c *tlscore.Client, name string, id link.KeyID, ins []*keyOpInput) Op {
	if name == OpRSADecrypt {
		return func(ctx context.Context, w int) error {
			_, err := c.Decrypt(ctx, id, ins[w].ciphertext, nil)
			return err
		}
	}
	return func(ctx context.Context, w int) error {
		_, err := c.Sign(ctx, id, ins[w].alg, ins[w].digest, nil)
		return err
	}
}

// unaryKeyOp is the key operation as one unary call each. Requests are
// built once per worker; gRPC only reads them.
func unaryKeyOp(api keylessv1.KeylessServiceClient, name string, id link.KeyID, ins []*keyOpInput) Op {
	if name == OpRSADecrypt {
		reqs := make([]*keylessv1.DecryptRequest, len(ins))
		for i, in := range ins {
			reqs[i] = &keylessv1.DecryptRequest{KeyId: id[:], EncryptedPremaster: in.ciphertext}
		}
		return func(ctx context.Context, w int) error {
			resp, err := api.Decrypt(ctx, reqs[w])
			if err == nil && len(resp.GetPremaster()) != link.PremasterLen {
				err = fmt.Errorf("decrypt returned %d bytes", len(resp.GetPremaster()))
			}
			return err
		}
	}
	reqs := make([]*keylessv1.SignRequest, len(ins))
	for i, in := range ins {
		reqs[i] = &keylessv1.SignRequest{KeyId: id[:], Algorithm: in.alg.Wire, Digest: in.digest}
	}
	return func(ctx context.Context, w int) error {
		resp, err := api.Sign(ctx, reqs[w])
		if err == nil && len(resp.GetSignature()) == 0 {
			err = fmt.Errorf("sign returned no signature")
		}
		return err
	}
}

// waitHealthy waits up to 20 s for the keyserver's KeylessService to be
// SERVING.
func waitHealthy(ctx context.Context, health healthpb.HealthClient) error {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	req := &healthpb.HealthCheckRequest{Service: keylessv1.KeylessService_ServiceDesc.ServiceName}
	for {
		resp, err := health.Check(ctx, req, grpc.WaitForReady(true))
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("bench: keyserver not healthy (last answer: %v, %v): %w", resp.GetStatus(), err, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// linkFlags are the client side of the mutual-TLS link to a keyserver.
type linkFlags struct {
	serverName, ca, cert, key string
}

func (f *linkFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.serverName, "server-name", linkServerName, "name of the keyserver's certificate")
	fs.StringVar(&f.ca, "ca", "", "PEM CA of the keyserver's certificate (required)")
	fs.StringVar(&f.cert, "cert", "", "PEM client certificate (required)")
	fs.StringVar(&f.key, "key", "", "PEM private key of -cert (required)")
}

func (f *linkFlags) tlsConfig() (*tls.Config, error) {
	return link.ClientMTLSConfig(f.cert, f.key, f.ca, f.serverName)
}

// dial opens one gRPC connection to addr with the link's credentials and
// the edge's transport options, then opts: what the edge's client does,
// without its balancing and retry service config.
func (f *linkFlags) dial(addr string, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	cfg, err := f.tlsConfig()
	if err != nil {
		return nil, err
	}
	opts = append(append(link.DialOptions(), grpc.WithTransportCredentials(credentials.NewTLS(cfg))), opts...)
	conn, err := grpc.NewClient("passthrough:///"+addr, opts...)
	if err != nil {
		return nil, fmt.Errorf("bench: dial %s: %w", addr, err)
	}
	return conn, nil
}

// hsmFlags open the token in-process.
type hsmFlags struct {
	module, label, pinFile string
	maxSessions            int
}

func (f *hsmFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.module, "module", "/usr/lib/softhsm/libsofthsm2.so", "PKCS #11 module")
	fs.StringVar(&f.label, "token-label", "", "token label (required)")
	fs.StringVar(&f.pinFile, "pin-file", "", "file holding the user PIN (required)")
	fs.IntVar(&f.maxSessions, "max-sessions", 0, "hsm.Config.MaxSessions (0: the package default)")
}

func (f *hsmFlags) open() (*hsm.Module, error) {
	pin, err := os.ReadFile(f.pinFile)
	if err != nil {
		return nil, fmt.Errorf("bench: -pin-file: %w", err)
	}
	return hsm.Open(hsm.Config{
		ModulePath:  f.module,
		TokenLabel:  f.label,
		PIN:         strings.TrimRight(string(pin), "\r\n"),
		MaxSessions: f.maxSessions,
	})
}

// runInproc is the "inproc" mode, the baseline of the key operations: the
// same SoftHSM key called in this process through package hsm, at the
// given concurrency, with no bound but hsm's own session pool.
func runInproc(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("inproc", stderr)
	var (
		lf loadFlags
		kf keyFlags
		hf hsmFlags
	)
	lf.register(fs)
	kf.register(fs)
	hf.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	id, ins, err := kf.inputs(lf.concurrency)
	if err != nil {
		return err
	}
	m, err := hf.open()
	if err != nil {
		return err
	}
	defer m.Close()
	key, err := m.Key(ctx, id)
	if err != nil {
		return err
	}
	if key == nil {
		return fmt.Errorf("bench: key %s is not on token %q", link.FormatKeyID(id), hf.label)
	}
	var op Op
	switch kf.op {
	case OpRSADecrypt:
		d, ok := key.(signer.PremasterDecrypter)
		if !ok {
			return fmt.Errorf("bench: key %s cannot decrypt", link.FormatKeyID(id))
		}
		op = func(ctx context.Context, w int) error {
			_, err := d.DecryptPremaster(ctx, ins[w].ciphertext)
			return err
		}
	default:
		cs, ok := key.(signer.ContextSigner)
		if !ok {
			return fmt.Errorf("bench: key %s has no SignContext", link.FormatKeyID(id))
		}
		op = func(ctx context.Context, w int) error {
			_, err := cs.SignContext(ctx, ins[w].digest, ins[w].alg.SignerOpts())
			return err
		}
	}
	return lf.run(ctx, stdout, "inproc/"+kf.op, "inproc", op)
}
