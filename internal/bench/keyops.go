package bench

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/keyless-tls/keyless/internal/h2frames"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
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
		rf    relayFlags
		addr  = fs.String("addr", "", "keyserver address host:port (required)")
		empty = fs.Duration("empty", 0, "after the load, measure the empty gRPC call for this long (0: not at all)")
		unary = fs.Bool("unary", false, "call the unary Sign and Decrypt RPCs instead of the edge's client (which batches operations on a stream)")
	)
	lf.register(fs)
	kf.register(fs)
	link.register(fs)
	rf.register(fs)
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
	dialAddr, relay, err := rf.start(ctx, *addr)
	if err != nil {
		return err
	}
	if relay != nil {
		defer relay.Close()
	}
	frames := &h2frames.Counts{}
	conn, err := link.dial(dialAddr, frames)
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
	res, err := lf.measure(ctx, "keyless/"+kf.op, "client", op, frames)
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
	res.LinkWindow = link.window
	if relay != nil {
		res.LinkRTTms = float64(rf.rtt) / float64(time.Millisecond)
		res.LinkMaxUp, res.LinkMaxDown = relay.MaxInFlight()
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
