package bench

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// startEcho starts a TCP echo server on 127.0.0.1 that answers every byte
// and half-closes when its client does; it stops with the test.
func startEcho(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	return ln.Addr().String()
}

func newTestRelay(t *testing.T, cfg RelayConfig) *Relay {
	t.Helper()
	r, err := StartRelay(t.Context(), cfg)
	if err != nil {
		t.Fatalf("StartRelay(%+v) = %v", cfg, err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// roundTrip writes msg through c and reads it back, returning how long
// that took.
func roundTrip(t *testing.T, c net.Conn, msg []byte) time.Duration {
	t.Helper()
	start := time.Now()
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("Write() = %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("ReadFull() = %v", err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo through the relay = %q, want %q", got, msg)
	}
	return time.Since(start)
}

// TestRelayDelaysEachDirection: a round trip through the relay takes at
// least its RTT, every time, and the bytes come back intact; at RTT 0 it
// forwards as well.
func TestRelayDelaysEachDirection(t *testing.T) {
	echo := startEcho(t)
	for _, rtt := range []time.Duration{0, 60 * time.Millisecond} {
		r := newTestRelay(t, RelayConfig{Target: echo, RTT: rtt})
		c, err := net.Dial("tcp", r.Addr())
		if err != nil {
			t.Fatal(err)
		}
		for i := range 3 {
			d := roundTrip(t, c, []byte(strings.Repeat("x", 1+i*5000)))
			t.Logf("RTT %v: round trip %d took %v", rtt, i, d)
			if d < rtt {
				t.Errorf("RTT %v: round trip %d took %v, less than the RTT", rtt, i, d)
			}
		}
		c.Close()
	}
}

// TestRelayBandwidth: with a cap, a transfer takes at least its size over
// the cap (less the first chunk, which is written at once).
func TestRelayBandwidth(t *testing.T) {
	echo := startEcho(t)
	const bw, size = 512 << 10, 256 << 10
	r := newTestRelay(t, RelayConfig{Target: echo, Bandwidth: bw})
	c, err := net.Dial("tcp", r.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := make([]byte, size)
	rand.Read(msg)
	go c.Write(msg)
	start := time.Now()
	got := make([]byte, size)
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("ReadFull() = %v", err)
	}
	d := time.Since(start)
	if !bytes.Equal(got, msg) {
		t.Fatal("the bytes came back changed")
	}
	want := time.Duration(size-relayChunk) * time.Second / bw
	t.Logf("%d bytes at a cap of %d B/s each way: %v (at least %v)", size, bw, d, want)
	if d < want {
		t.Errorf("%d bytes through a %d B/s cap took %v, want at least %v", size, bw, d, want)
	}
	if up, down := r.MaxInFlight(); up <= 0 || down <= 0 || up > size || down > size {
		t.Errorf("MaxInFlight() = %d, %d; want each in (0, %d]", up, down, size)
	}
}

// TestRelayHalfClose: a client that ends its side still reads everything
// the server sent back before the server's end.
func TestRelayHalfClose(t *testing.T) {
	r := newTestRelay(t, RelayConfig{Target: startEcho(t), RTT: 10 * time.Millisecond})
	c, err := net.Dial("tcp", r.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := []byte("last words")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, msg) {
		t.Errorf("ReadAll() after CloseWrite = %q, %v; want %q, nil", got, err, msg)
	}
}

// TestRelayStopsWithContext: when its context ends the relay closes the
// connections it relays and accepts no more.
func TestRelayStopsWithContext(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	r, err := StartRelay(ctx, RelayConfig{Target: startEcho(t), RTT: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", r.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip(t, c, []byte("ping"))
	cancel()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil {
		t.Errorf("Read() after the context ended = %d, nil; want the connection closed", n)
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Errorf("Read() after the context ended timed out; want the connection closed")
	}
	r.Close() // waits for every goroutine
	if c2, err := net.Dial("tcp", r.Addr()); err == nil {
		c2.Close()
		t.Errorf("Dial() after the context ended succeeded; want it refused")
	}
}

func TestRelayConfigValidate(t *testing.T) {
	tests := []struct {
		name    string
		cfg     RelayConfig
		wantErr string
	}{
		{"ok", RelayConfig{Target: "127.0.0.1:1", RTT: time.Millisecond, Bandwidth: 1}, ""},
		{"no target", RelayConfig{}, "no target"},
		{"bad target", RelayConfig{Target: "nowhere"}, `target "nowhere"`},
		{"negative RTT", RelayConfig{Target: "127.0.0.1:1", RTT: -1}, "RTT -1ns is negative"},
		{"negative bandwidth", RelayConfig{Target: "127.0.0.1:1", Bandwidth: -5}, "bandwidth -5"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Errorf("Validate() = %v, want nil", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("Validate() = %v, want an error containing %q", err, tt.wantErr)
			}
		})
	}
}

// TestRelaySetRTT: one connection through the relay sees each RTT set
// while it is open, from the next bytes on, and a negative RTT is refused
// without changing the one in force.
func TestRelaySetRTT(t *testing.T) {
	r := newTestRelay(t, RelayConfig{Target: startEcho(t)})
	c, err := net.Dial("tcp", r.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := []byte("ping")
	for _, rtt := range []time.Duration{0, 80 * time.Millisecond, 20 * time.Millisecond, 0} {
		if err := r.SetRTT(rtt); err != nil {
			t.Fatalf("SetRTT(%v) = %v", rtt, err)
		}
		if got := r.RTT(); got != rtt {
			t.Fatalf("RTT() = %v after SetRTT(%v)", got, rtt)
		}
		d := roundTrip(t, c, msg)
		t.Logf("RTT %v: round trip %v", rtt, d)
		if d < rtt {
			t.Errorf("RTT %v: round trip took %v, less than the RTT", rtt, d)
		}
		// Far less than the longest RTT set: a shorter RTT takes effect.
		if rtt < 80*time.Millisecond && d >= rtt+60*time.Millisecond {
			t.Errorf("RTT %v: round trip took %v, as if an earlier, longer RTT still held", rtt, d)
		}
	}
	if err := r.SetRTT(-time.Millisecond); err == nil {
		t.Error("SetRTT(-1ms) = nil, want an error")
	}
	if got := r.RTT(); got != 0 {
		t.Errorf("RTT() = %v after a refused SetRTT, want 0", got)
	}
}
