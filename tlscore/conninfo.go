package tlscore

import (
	"context"
	"crypto/tls"
	"net"

	"github.com/keyless-tls/keyless/link"
)

// keyOpInfo is what the access log says of a handshake's key operation:
// the key it used and the keyserver that performed it.
type keyOpInfo struct {
	keyID     link.KeyID
	keyserver string
}

// connInfoKey is the context key of the *observedConn a handshake (and the
// requests that follow it) runs on.
type connInfoKey struct{}

// keyOpContext returns hello.Context() carrying hello's connection, if it
// is an *observedConn, so that the Client can record the key operation it
// performs for the handshake (see recordKeyOp).
func keyOpContext(hello *tls.ClientHelloInfo) context.Context {
	ctx := hello.Context()
	if oc, ok := hello.Conn.(*observedConn); ok {
		ctx = context.WithValue(ctx, connInfoKey{}, oc)
	}
	return ctx
}

// recordKeyOp notes on the connection in ctx, if any, that the key keyID
// was used on keyserver for its handshake.
func recordKeyOp(ctx context.Context, keyID link.KeyID, keyserver string) {
	if oc, ok := ctx.Value(connInfoKey{}).(*observedConn); ok {
		oc.keyOp.Store(&keyOpInfo{keyID: keyID, keyserver: keyserver})
	}
}

// observedConnOf returns the *observedConn under c, a *tls.Conn made by
// ServeHTTP or ServeTCP, or nil.
func observedConnOf(c net.Conn) *observedConn {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	oc, _ := c.(*observedConn)
	return oc
}

// handshakeFacts returns what the access log and the request metrics say
// of oc's handshake: the key id ("" without a key operation, as for a
// resumption), the keyserver that performed it and the key type of the
// certificate chosen ("" if unknown).
func (oc *observedConn) handshakeFacts() (keyID, keyserver, keyType string) {
	if oc == nil {
		return "", "", ""
	}
	if op := oc.keyOp.Load(); op != nil {
		keyID, keyserver = link.FormatKeyID(op.keyID), op.keyserver
	}
	if kt := oc.keyType.Load(); kt != nil {
		keyType = *kt
	}
	return keyID, keyserver, keyType
}
