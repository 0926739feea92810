package link

import (
	"fmt"

	"google.golang.org/grpc"
)

// The HTTP/2 flow-control window, per stream and per connection, that both
// ends of the edge–keyserver link fix (see [ServerOptions] and
// [DialOptions]).
//
// Fixing it turns off gRPC's bandwidth-delay estimation, which otherwise
// answers almost every message of a link carrying one operation at a time
// with a PING and a WINDOW_UPDATE, and the PING with an ack: two more
// writes, two more reads and their wake-ups per operation on each side, in
// a keyless handshake more than the operation's own message. A static
// window that is large enough costs nothing on a short path: a receiver
// returns credit only once a quarter of the window is used, so operations
// sent one at a time still cost one frame each way.
//
// A window caps what a link carries per round trip: window / RTT bytes per
// second each way, whatever the HSM can do. [DefaultWindowSize] is sized
// for edges far from the keyserver; the keyserver and the edge both take
// -link-window to change it. A message larger than the window still
// passes: the receiver opens the window for it when it starts reading it.
const (
	// MinWindowSize is the smallest window gRPC honours (it ignores a
	// smaller one), and the window the link used before windows were
	// configurable: 64 KiB per round trip, about 3,000 RSA-2048 signatures
	// per second at 80 ms.
	MinWindowSize = 64 << 10

	// DefaultWindowSize is the window both ends use unless told
	// otherwise. An RSA-2048 signature costs ~280 bytes down and ~90 up, and
	// a link achieves 76–88 % of its window per round trip, so 3,000
	// signatures per second at 300 ms need ~300 KiB; 1 MiB leaves 3×
	// headroom (~11,000 RSA-2048 signatures per second at 300 ms, ~40,000
	// at 80 ms) and covers 1,024 operations in flight on one link. It is
	// also what a peer may make the receiver buffer per stream that the
	// receiver stops reading (gRPC returns connection-level credit on
	// receipt, so only the stream window bounds unread data): a
	// keyserver's worst case per edge identity is its streams × the
	// window (see docs/SECURITY.md), while an honest edge with 1,024
	// operations in flight leaves ~100 KB unread.
	DefaultWindowSize = 1 << 20

	// MaxWindowSize bounds the window: beyond it the memory a peer may
	// pin per connection buys no rate a link needs.
	MaxWindowSize = 64 << 20
)

// ValidateWindowSize returns an error, naming the value and the bounds, for
// a window outside [MinWindowSize, MaxWindowSize].
func ValidateWindowSize(n int) error {
	if n < MinWindowSize || n > MaxWindowSize {
		return fmt.Errorf("link: window %d bytes: must be between %d (64 KiB) and %d (64 MiB)", n, MinWindowSize, MaxWindowSize)
	}
	return nil
}

// TransportOption changes the transport that [ServerOptions] and
// [DialOptions] shape.
type TransportOption func(*transport)

// transport is what the options set.
type transport struct {
	window int32
}

// WithWindowSize sets the flow-control window of both the streams and the
// connection, in bytes. A size outside [MinWindowSize, MaxWindowSize] is
// clamped to it; check it first with [ValidateWindowSize] to report it.
func WithWindowSize(n int) TransportOption {
	return func(t *transport) {
		t.window = int32(min(max(n, MinWindowSize), MaxWindowSize))
	}
}

func newTransport(opts []TransportOption) transport {
	t := transport{window: DefaultWindowSize}
	for _, o := range opts {
		o(&t)
	}
	return t
}

// ServerOptions returns the gRPC server options that shape a keyserver's
// transport: the request and header size limits, the streams allowed per
// connection, fixed flow-control windows ([DefaultWindowSize] unless
// [WithWindowSize] says otherwise), no read buffer, and a handshake
// timeout of [DefaultHandshakeTimeout]. A keyserver adds its credentials,
// stats handler and keepalive policy (a later grpc.ConnectionTimeout
// replaces the handshake timeout).
//
// gRPC reads each connection through a 32 KiB buffer of its own, held as
// long as the connection is open (its pooled read buffer works only on a
// plain TCP connection, not through TLS). On the link it buffers nothing
// useful: crypto/tls already holds a whole decrypted record and serves
// reads from it, so frames are read from the TLS connection directly. A
// keyserver with a thousand idle edge links saves 32 MiB of heap; loaded
// throughput is the same (see signer's BenchmarkLinkReadBuffer). gRPC's
// write buffer is already returned to a pool after each flush.
func ServerOptions(opts ...TransportOption) []grpc.ServerOption {
	t := newTransport(opts)
	return []grpc.ServerOption{
		grpc.ConnectionTimeout(DefaultHandshakeTimeout),
		grpc.MaxRecvMsgSize(MaxRequestSize),
		grpc.MaxHeaderListSize(MaxHeaderListSize),
		grpc.MaxConcurrentStreams(MaxStreamsPerConnection),
		grpc.StaticStreamWindowSize(t.window),
		grpc.StaticConnWindowSize(t.window),
		grpc.ReadBufferSize(0),
	}
}

// DialOptions returns the gRPC dial options that shape the edge's side of
// the link as [ServerOptions] shapes the keyserver's: fixed flow-control
// windows ([DefaultWindowSize] unless [WithWindowSize] says otherwise), and
// a connection that never goes idle. A client adds its credentials.
//
// gRPC otherwise closes a channel's connections after 30 minutes without a
// call, so the first handshake after a quiet half hour would wait for a new
// TCP connection and link handshake (two round trips or more to a distant
// keyserver). The edge keeps its links instead, and keepalive pings keep
// them open through NAT and firewalls.
func DialOptions(opts ...TransportOption) []grpc.DialOption {
	t := newTransport(opts)
	return []grpc.DialOption{
		grpc.WithStaticStreamWindowSize(t.window),
		grpc.WithStaticConnWindowSize(t.window),
		grpc.WithIdleTimeout(0),
	}
}
