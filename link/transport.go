package link

import "google.golang.org/grpc"

// WindowSize is the HTTP/2 flow-control window, per stream and per
// connection, that both ends of the edge–keyserver link fix (see
// [ServerOptions] and [DialOptions]). Fixing it turns off gRPC's
// bandwidth-delay estimation, which otherwise answers almost every message
// of a link carrying one operation at a time with a PING and a
// WINDOW_UPDATE, and the PING with an ack: two more writes, two more reads
// and their wake-ups per operation on each side, in a keyless handshake
// more than the operation's own message. The link needs no larger window on
// a short path: its messages are small (see [MaxRequestSize]), and a stream
// holds at most a few hundred operations in flight, beyond which the
// keyserver stops reading it on purpose (HTTP/2 flow control then holds the
// edge back). A message larger than the window still passes: the receiver
// opens the window for it when it starts reading it.
const WindowSize = 64 << 10

// ServerOptions returns the gRPC server options that shape a keyserver's
// transport: the request and header size limits, the streams allowed per
// connection, the fixed flow-control windows and a handshake timeout of
// [DefaultHandshakeTimeout]. A keyserver adds its credentials, stats
// handler and keepalive policy (a later grpc.ConnectionTimeout replaces the
// handshake timeout).
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ConnectionTimeout(DefaultHandshakeTimeout),
		grpc.MaxRecvMsgSize(MaxRequestSize),
		grpc.MaxHeaderListSize(MaxHeaderListSize),
		grpc.MaxConcurrentStreams(MaxStreamsPerConnection),
		grpc.StaticStreamWindowSize(WindowSize),
		grpc.StaticConnWindowSize(WindowSize),
	}
}

// DialOptions returns the gRPC dial options that shape the edge's side of
// the link as [ServerOptions] shapes the keyserver's: fixed flow-control
// windows of [WindowSize]. A client adds its credentials.
func DialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithStaticStreamWindowSize(WindowSize),
		grpc.WithStaticConnWindowSize(WindowSize),
	}
}
