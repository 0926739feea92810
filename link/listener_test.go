package link

import (
	"net"
	"sync"
	"testing"
	"time"
)

// TestLimitListener checks the bounds on connections, in all and per
// source, and that CloseConnections closes connections that never sent a
// byte (stalled in their handshake).
func TestLimitListener(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	refused := map[string]int{}
	ln := LimitListener(inner, 0, 3, func(r string) { mu.Lock(); refused[r]++; mu.Unlock() })
	defer ln.Close()
	accepted := make(chan net.Conn, 10)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	var clients []net.Conn
	for range 5 {
		c, err := net.Dial("tcp", inner.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients = append(clients, c)
	}
	var server []net.Conn
	for range 3 {
		select {
		case c := <-accepted:
			server = append(server, c)
		case <-time.After(defaultTestTimeout):
			t.Fatal("Accept() returned no connection")
		}
	}
	// The two connections over the per-source bound are closed by the
	// server: reading from them ends.
	closedByServer := 0
	for _, c := range clients {
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); err != nil && !isTimeout(err) {
			closedByServer++
		}
	}
	mu.Lock()
	n := refused["max_connections_per_source"]
	mu.Unlock()
	if closedByServer != 2 || n != 2 || ln.Open() != 3 {
		t.Errorf("%d connections closed at accept, %d reported, %d open; want 2, 2, 3", closedByServer, n, ln.Open())
	}
	// Closing one makes room for another.
	server[0].Close()
	c, err := net.Dial("tcp", inner.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case <-accepted:
	case <-time.After(defaultTestTimeout):
		t.Fatal("Accept() returned no connection after one closed")
	}
	ln.CloseConnections()
	if ln.Open() != 0 {
		t.Errorf("Open() after CloseConnections = %d", ln.Open())
	}
	c.SetReadDeadline(time.Now().Add(defaultTestTimeout))
	if _, err := c.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Errorf("Read() after CloseConnections = %v, want the connection closed", err)
	}

	// The total bound.
	ln2 := LimitListener(inner, 1, 0, nil)
	if reason := ln2.admit("a"); reason != "" {
		t.Fatalf("admit() = %q", reason)
	}
	ln2.open[&limitedConn{}] = struct{}{}
	if reason := ln2.admit("b"); reason != "max_connections" {
		t.Errorf("admit() over the total = %q, want max_connections", reason)
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
