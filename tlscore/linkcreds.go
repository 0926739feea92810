package tlscore

import (
	"context"
	"fmt"
	"net"
	"sync/atomic"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// LinkHandshakeError is the error of a call that reached no keyserver
// while the latest mutual-TLS handshake with a keyserver had failed: the
// keyserver's certificate does not verify against the link's CA
// certificates, for example. Unlike a keyserver that is down, that is
// seldom mended by waiting. The calls of a [Client] made by [Dial] return
// it wrapped; the call's gRPC status stays reachable through it, so
// status.Code still reports Unavailable or DeadlineExceeded.
//
// A keyserver that refuses the edge's client certificate is not reported
// this way: in TLS 1.3 the client's handshake completes before the server
// checks its certificate, and the refusal ends the connection afterwards.
type LinkHandshakeError struct {
	// Err is the error of the failed handshake.
	Err error

	call error // the call's error, a gRPC status error
}

func (e *LinkHandshakeError) Error() string {
	return fmt.Sprintf("mutual-TLS handshake with a keyserver failed: %v", e.Err)
}

// Unwrap returns the call's error and the handshake's error.
func (e *LinkHandshakeError) Unwrap() []error { return []error{e.call, e.Err} }

// handshakeState holds the error of the latest client handshake of a
// Client's connections, nil once one succeeds. It is safe for concurrent
// use.
type handshakeState struct {
	last atomic.Pointer[error]
}

// explain returns err, the error of a call, as a *LinkHandshakeError when
// no keyserver was reached (Unavailable or DeadlineExceeded) and the
// latest handshake failed; otherwise err itself. A nil state explains
// nothing.
func (h *handshakeState) explain(err error) error {
	if h == nil {
		return err
	}
	if c := status.Code(err); c != codes.Unavailable && c != codes.DeadlineExceeded {
		return err
	}
	if last := h.last.Load(); last != nil {
		return &LinkHandshakeError{Err: *last, call: err}
	}
	return err
}

// linkCredentials are the transport credentials of a Client's keyserver
// connections: those of the link's TLS configuration, recording the
// outcome of each handshake in state. Clones share the state.
type linkCredentials struct {
	credentials.TransportCredentials
	state  *handshakeState
	health *keyserverHealth // nil: none
}

var _ credentials.TransportCredentials = (*linkCredentials)(nil)

func (c *linkCredentials) ClientHandshake(ctx context.Context, authority string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	tconn, info, err := c.TransportCredentials.ClientHandshake(ctx, authority, conn)
	if err != nil {
		c.state.last.Store(&err)
	} else {
		c.state.last.Store(nil)
	}
	if hc, ok := conn.(*healthConn); ok {
		if err != nil {
			hc.handshakeFailed()
		}
		c.health.connected(string(hc.addr), err)
	}
	return tconn, info, err
}

func (c *linkCredentials) Clone() credentials.TransportCredentials {
	return &linkCredentials{TransportCredentials: c.TransportCredentials.Clone(), state: c.state, health: c.health}
}
