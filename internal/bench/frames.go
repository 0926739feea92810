package bench

import (
	"context"
	"net"
	"sync"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/credentials"
)

// frameCounts counts the HTTP/2 frames of a client's connections by type,
// as written (towards the keyserver) and as read. It is safe for
// concurrent use.
type frameCounts struct {
	mu            sync.Mutex
	read, written map[http2.FrameType]int64
}

func (c *frameCounts) add(written bool, ft http2.FrameType) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.read == nil {
		c.read, c.written = make(map[http2.FrameType]int64), make(map[http2.FrameType]int64)
	}
	if written {
		c.written[ft]++
	} else {
		c.read[ft]++
	}
}

// frameSnapshot is frameCounts at one moment, keyed "out DATA", "in PING"
// and so on.
type frameSnapshot map[string]int64

func (c *frameCounts) snapshot() frameSnapshot {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := frameSnapshot{}
	for ft, n := range c.written {
		s["out "+ft.String()] = n
	}
	for ft, n := range c.read {
		s["in "+ft.String()] = n
	}
	return s
}

// perOp returns the frames of each key between snapshots a and b divided
// by ops, rounded to 0.01; the types the scenarios look at (DATA, HEADERS,
// PING, WINDOW_UPDATE, each way) are present even when none was sent. It
// returns nil when ops is not positive.
func perOp(a, b frameSnapshot, ops int64) map[string]float64 {
	if ops <= 0 {
		return nil
	}
	out := map[string]float64{}
	for _, dir := range []string{"out ", "in "} {
		for _, ft := range []http2.FrameType{http2.FrameData, http2.FrameHeaders, http2.FramePing, http2.FrameWindowUpdate} {
			out[dir+ft.String()] = 0
		}
	}
	for k, n := range b {
		if d := n - a[k]; d > 0 {
			out[k] = float64(int64(float64(d)/float64(ops)*100+0.5)) / 100
		}
	}
	return out
}

// countingCreds wraps client credentials so that every connection's
// HTTP/2 frames, in the clear above TLS, are counted.
type countingCreds struct {
	credentials.TransportCredentials
	counts *frameCounts
}

func (c countingCreds) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ClientHandshake(ctx, authority, raw)
	if err != nil {
		return conn, info, err
	}
	return &countingConn{Conn: conn, counts: c.counts, out: frameScanner{skip: len(http2.ClientPreface)}}, info, nil
}

func (c countingCreds) Clone() credentials.TransportCredentials {
	return countingCreds{c.TransportCredentials.Clone(), c.counts}
}

// countingConn counts the frames read from and written to a connection.
// gRPC reads from one goroutine and writes from one, so each scanner has a
// single user.
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
