package signer

import "google.golang.org/grpc"

// WindowSize is the HTTP/2 flow-control window, per stream and per
// connection, that both ends of the edge–keyserver link fix (see
// [ServerOptions]; tlscore.Dial does the same on the edge). Fixing it turns
// off gRPC's bandwidth-delay estimation, which otherwise answers almost
// every message of a link carrying one operation at a time with a PING and
// a WINDOW_UPDATE, and the PING with an ack: two more writes, two more
// reads and their wake-ups per operation on each side, in a keyless handshake
// more than the operation's own message. The link needs no larger window:
// its messages are small (see [MaxRequestSize]), and a stream holds at most
// a few hundred operations in flight, beyond which the keyserver stops
// reading it on purpose (HTTP/2 flow control then holds the edge back). A
// message larger than the window still passes: the receiver opens the
// window for it when it starts reading it.
const WindowSize = 64 << 10

// MaxHeaderListSize bounds the headers of a call (grpc.MaxHeaderListSize).
// An edge's are under 1 KiB; without a bound, gRPC accepts 16 MiB per call
// and keeps its metadata for the call's life, which for a Stream is the
// connection's.
const MaxHeaderListSize = 16 << 10

// ServerOptions returns the gRPC server options that shape a keyserver's
// transport: the request and header size limits, the streams allowed per
// connection and the fixed flow-control windows. A keyserver adds its
// credentials, stats handler and keepalive policy.
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(MaxRequestSize),
		grpc.MaxHeaderListSize(MaxHeaderListSize),
		grpc.MaxConcurrentStreams(MaxStreamsPerConnection),
		grpc.StaticStreamWindowSize(WindowSize),
		grpc.StaticConnWindowSize(WindowSize),
	}
}
