package tlscore

import (
	"net"
	"sync"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/credentials"
)

// frameCounts counts HTTP/2 frames by type, as read and as written by one
// end of a connection.
type frameCounts struct {
	mu            sync.Mutex
	read, written map[http2.FrameType]int
}

// get returns how many frames of type ft were read and written.
func (c *frameCounts) get(ft http2.FrameType) (read, written int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.read[ft], c.written[ft]
}

func (c *frameCounts) add(written bool, ft http2.FrameType) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.read == nil {
		c.read, c.written = make(map[http2.FrameType]int), make(map[http2.FrameType]int)
	}
	if written {
		c.written[ft]++
	} else {
		c.read[ft]++
	}
}

// countingCreds wraps server credentials so that every connection's HTTP/2
// frames, in the clear above TLS, are counted in counts.
type countingCreds struct {
	credentials.TransportCredentials
	counts *frameCounts
}

func (c countingCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ServerHandshake(raw)
	if err != nil {
		return conn, info, err
	}
	return &countingConn{Conn: conn, counts: c.counts, in: frameScanner{skip: len(http2.ClientPreface)}}, info, nil
}

func (c countingCreds) Clone() credentials.TransportCredentials {
	return countingCreds{c.TransportCredentials.Clone(), c.counts}
}

// countingConn counts the frames read from and written to a server's
// connection.
type countingConn struct {
	net.Conn
	counts  *frameCounts
	in, out frameScanner
}

func (c *countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.in.scan(b[:n], func(ft http2.FrameType) { c.counts.add(false, ft) })
	return n, err
}

func (c *countingConn) Write(b []byte) (int, error) {
	c.out.scan(b, func(ft http2.FrameType) { c.counts.add(true, ft) })
	return c.Conn.Write(b)
}

// frameScanner finds frame headers in one direction of an HTTP/2
// connection, however its bytes are split.
type frameScanner struct {
	skip int    // bytes still to pass over: the preface, then a frame's payload
	hdr  []byte // a frame header read in part
}

func (s *frameScanner) scan(b []byte, frame func(http2.FrameType)) {
	for len(b) > 0 {
		if s.skip > 0 {
			n := min(s.skip, len(b))
			s.skip -= n
			b = b[n:]
			continue
		}
		n := min(9-len(s.hdr), len(b))
		s.hdr = append(s.hdr, b[:n]...)
		b = b[n:]
		if len(s.hdr) == 9 {
			frame(http2.FrameType(s.hdr[3]))
			s.skip = int(s.hdr[0])<<16 | int(s.hdr[1])<<8 | int(s.hdr[2])
			s.hdr = s.hdr[:0]
		}
	}
}
