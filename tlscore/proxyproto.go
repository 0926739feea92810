package tlscore

import (
	"fmt"
	"net"

	"github.com/pires/go-proxyproto"
)

// ProxyProtocolListener returns ln accepting PROXY protocol headers (v1 and
// v2, as HAProxy and cloud load balancers send them) from trusted peers
// only. A connection from a peer in trusted must begin with one, within
// the handshake timeout of 10 seconds, or it is closed; its RemoteAddr and
// LocalAddr are then the client's and the address the client reached, as
// the header says (a LOCAL header, a load balancer's health check, keeps
// the peer's own). So the client address in logs, in the headers the
// origin receives and in the keyserver's audit context is the real one,
// and the per-client handshake limit applies to it. Connections from any
// other peer are served as they are: a PROXY header from one fails its TLS
// handshake.
//
// The header is read by the connection's first Read or RemoteAddr, in the
// goroutine serving it, never in Accept. The listener is safe for
// concurrent use.
func ProxyProtocolListener(ln net.Listener, trusted TrustedProxies) (net.Listener, error) {
	if trusted.Empty() {
		return nil, fmt.Errorf("tlscore: PROXY protocol needs trusted proxies: accepting its headers from anyone would let any client claim any address")
	}
	return &proxyproto.Listener{
		Listener: ln,
		ConnPolicy: func(o proxyproto.ConnPolicyOptions) (proxyproto.Policy, error) {
			if trusted.containsAddr(o.Upstream) {
				return proxyproto.REQUIRE, nil
			}
			return proxyproto.SKIP, nil
		},
		ReadHeaderTimeout: handshakeTimeout,
	}, nil
}

// WithOriginProxyProtocol makes [ServeTCP] begin each connection to the
// origin with a PROXY protocol header of version (1 for the text form, 2
// for the binary one) giving the client's address and the address it
// reached, so that the origin learns who its client is. Zero sends none
// (the default). [ServeHTTP] ignores it.
func WithOriginProxyProtocol(version byte) ServeOption {
	return func(o *serveOptions) { o.proxyProtocol = version }
}

// writeProxyHeader writes to origin the PROXY header of version for
// client's connection.
func writeProxyHeader(origin net.Conn, version byte, client net.Conn) error {
	h := proxyproto.HeaderProxyFromAddrs(version, client.RemoteAddr(), client.LocalAddr())
	if _, err := h.WriteTo(origin); err != nil {
		return fmt.Errorf("send PROXY v%d header: %w", version, err)
	}
	return nil
}
