// Package h2frames counts the HTTP/2 frames of gRPC connections by type,
// in the clear above TLS: how tests and the benchmark show what the link
// costs in frames (one DATA frame each way per operation sent alone, no
// flow-control chatter). It wraps transport credentials, so it sees exactly
// the bytes gRPC reads and writes.
package h2frames

import (
	"context"
	"net"
	"sync"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/credentials"
)

// Counts holds the frames counted on one or more connections, by type, as
// read and as written by the end that counts. The zero value is ready to
// use; it is safe for concurrent use.
type Counts struct {
	mu            sync.Mutex
	read, written map[http2.FrameType]int64
}

// Get returns how many frames of type ft were read and written.
func (c *Counts) Get(ft http2.FrameType) (read, written int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.read[ft], c.written[ft]
}

// Snapshot returns copies of the counts read and written.
func (c *Counts) Snapshot() (read, written map[http2.FrameType]int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	read, written = make(map[http2.FrameType]int64, len(c.read)), make(map[http2.FrameType]int64, len(c.written))
	for ft, n := range c.read {
		read[ft] = n
	}
	for ft, n := range c.written {
		written[ft] = n
	}
	return read, written
}

func (c *Counts) add(written bool, ft http2.FrameType) {
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

// ClientCredentials returns tc with every connection it makes counted in
// counts, from the client's side.
func ClientCredentials(tc credentials.TransportCredentials, counts *Counts) credentials.TransportCredentials {
	return countingCreds{tc, counts}
}

// ServerCredentials returns tc with every connection it accepts counted in
// counts, from the server's side.
func ServerCredentials(tc credentials.TransportCredentials, counts *Counts) credentials.TransportCredentials {
	return countingCreds{tc, counts}
}

type countingCreds struct {
	credentials.TransportCredentials
	counts *Counts
}

// ClientHandshake counts the client's frames: what it writes starts with
// the connection preface, which is not a frame.
func (c countingCreds) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ClientHandshake(ctx, authority, raw)
	if err != nil {
		return conn, info, err
	}
	return &countingConn{Conn: conn, counts: c.counts, out: scanner{skip: len(http2.ClientPreface)}}, info, nil
}

// ServerHandshake counts the server's frames: what it reads starts with
// the client's preface.
func (c countingCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ServerHandshake(raw)
	if err != nil {
		return conn, info, err
	}
	return &countingConn{Conn: conn, counts: c.counts, in: scanner{skip: len(http2.ClientPreface)}}, info, nil
}

func (c countingCreds) Clone() credentials.TransportCredentials {
	return countingCreds{c.TransportCredentials.Clone(), c.counts}
}

// countingConn counts the frames read from and written to a connection.
// gRPC reads from one goroutine and writes from one, so each scanner has a
// single user.
type countingConn struct {
	net.Conn
	counts  *Counts
	in, out scanner
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

// scanner finds frame headers in one direction of an HTTP/2 connection,
// however its bytes are split.
type scanner struct {
	skip int    // bytes still to pass over: the preface, then a frame's payload
	hdr  []byte // a frame header read in part
}

func (s *scanner) scan(b []byte, frame func(http2.FrameType)) {
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
