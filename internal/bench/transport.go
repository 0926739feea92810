package bench

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"github.com/keyless-tls/keyless/link"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/encoding"
)

// The "transport" mode is an experiment, not part of "run": it measures
// what one key-operation-sized exchange costs in CPU over gRPC with mutual
// TLS 1.3 when each operation is a unary call (as the KeylessService does
// today) and when operations share one bidirectional stream on which the
// client coalesces whatever is pending into one message (the batching a
// streaming API would allow). The server does no work, so the figures are
// the transport's own cost, client and server together, in one process.

// rawCodec passes []byte messages through unchanged.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("bench: rawCodec: %T", v)
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("bench: rawCodec: %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

func (rawCodec) Name() string { return "bench-raw" }

var _ encoding.Codec = rawCodec{}

// Sizes of the experiment's messages: a SignRequest for ECDSA P-256 (key
// id, algorithm, digest, request context) and its signature.
const (
	expRequestSize  = 120
	expResponseSize = 72
	expIDSize       = 8
)

var expServiceDesc = grpc.ServiceDesc{
	ServiceName: "keylessbench.Transport",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Unary",
		Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			var in []byte
			if err := dec(&in); err != nil {
				return nil, err
			}
			out := make([]byte, expResponseSize)
			return &out, nil
		},
	}},
	Streams: []grpc.StreamDesc{{
		StreamName:    "Stream",
		ServerStreams: true,
		ClientStreams: true,
		Handler: func(_ any, stream grpc.ServerStream) error {
			var in []byte
			for {
				if err := stream.RecvMsg(&in); err != nil {
					if errors.Is(err, io.EOF) {
						return nil
					}
					return err
				}
				// One response record per request record, ids echoed.
				n := len(in) / expRequestSize
				out := make([]byte, n*expResponseSize)
				for i := range n {
					copy(out[i*expResponseSize:], in[i*expRequestSize:i*expRequestSize+expIDSize])
				}
				if err := stream.SendMsg(&out); err != nil {
					return err
				}
			}
		},
	}},
}

// batcher multiplexes concurrent requests onto one stream, coalescing the
// pending ones into each message.
type batcher struct {
	stream  grpc.ClientStream
	queue   chan *expCall
	mu      sync.Mutex
	pending map[uint64]*expCall
	next    uint64
}

type expCall struct {
	id   uint64
	done chan struct{}
}

func newBatcher(stream grpc.ClientStream) *batcher {
	b := &batcher{stream: stream, queue: make(chan *expCall, 1024), pending: make(map[uint64]*expCall)}
	go b.send()
	go b.recv()
	return b
}

func (b *batcher) send() {
	for c := range b.queue {
		// A new buffer each time: gRPC may still be writing the last one.
		buf := make([]byte, 0, 8*expRequestSize)
		for {
			rec := make([]byte, expRequestSize)
			binary.BigEndian.PutUint64(rec, c.id)
			buf = append(buf, rec...)
			select {
			case c = <-b.queue:
				continue
			default:
			}
			break
		}
		if err := b.stream.SendMsg(&buf); err != nil {
			return
		}
	}
}

func (b *batcher) recv() {
	var in []byte
	for {
		if err := b.stream.RecvMsg(&in); err != nil {
			return
		}
		b.mu.Lock()
		for i := 0; i+expResponseSize <= len(in); i += expResponseSize {
			id := binary.BigEndian.Uint64(in[i:])
			if c, ok := b.pending[id]; ok {
				delete(b.pending, id)
				close(c.done)
			}
		}
		b.mu.Unlock()
	}
}

func (b *batcher) call(ctx context.Context) error {
	b.mu.Lock()
	b.next++
	c := &expCall{id: b.next, done: make(chan struct{})}
	b.pending[c.id] = c
	b.mu.Unlock()
	b.queue <- c
	select {
	case <-c.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// runTransport is the "transport" mode.
func runTransport(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("transport", stderr)
	var (
		lf     loadFlags
		lnk    linkFlags
		scert  = fs.String("server-cert", "", "PEM certificate of the experiment's server (required)")
		skey   = fs.String("server-key", "", "PEM key of -server-cert (required)")
		stream = fs.Bool("stream", false, "one bidirectional stream with batching instead of unary calls")
	)
	lf.register(fs)
	lnk.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	cert, err := tls.LoadX509KeyPair(*scert, *skey)
	if err != nil {
		return err
	}
	srvTLS := &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAnyClientCert}
	gs := grpc.NewServer(append(link.ServerOptions(), grpc.Creds(credentials.NewTLS(srvTLS)), grpc.ForceServerCodec(rawCodec{}))...)
	gs.RegisterService(&expServiceDesc, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	go gs.Serve(ln)
	defer gs.Stop()
	conn, err := lnk.dial(ln.Addr().String(), nil, grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})))
	if err != nil {
		return err
	}
	defer conn.Close()

	var op Op
	name := "transport/unary"
	if *stream {
		name = "transport/stream"
		s, err := conn.NewStream(ctx, &expServiceDesc.Streams[0], "/keylessbench.Transport/Stream")
		if err != nil {
			return err
		}
		b := newBatcher(s)
		op = func(ctx context.Context, _ int) error { return b.call(ctx) }
	} else {
		req := make([]byte, expRequestSize)
		op = func(ctx context.Context, _ int) error {
			var resp []byte
			return conn.Invoke(ctx, "/keylessbench.Transport/Unary", &req, &resp)
		}
	}
	return lf.run(ctx, stdout, name, "process", op)
}
