package link

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func TestValidateWindowSize(t *testing.T) {
	tests := []struct {
		n       int
		wantErr bool
	}{
		{MinWindowSize - 1, true},
		{MinWindowSize, false},
		{DefaultWindowSize, false},
		{MaxWindowSize, false},
		{MaxWindowSize + 1, true},
		{0, true},
		{-1, true},
	}
	for _, tt := range tests {
		err := ValidateWindowSize(tt.n)
		if (err != nil) != tt.wantErr {
			t.Errorf("ValidateWindowSize(%d) = %v, want error %t", tt.n, err, tt.wantErr)
		}
		if err != nil && !strings.Contains(err.Error(), "window") {
			t.Errorf("ValidateWindowSize(%d) = %q, which does not say what was wrong", tt.n, err)
		}
	}
}

func TestWithWindowSize(t *testing.T) {
	tests := []struct {
		opts []TransportOption
		want int32
	}{
		{nil, DefaultWindowSize},
		{[]TransportOption{WithWindowSize(MinWindowSize)}, MinWindowSize},
		{[]TransportOption{WithWindowSize(4 << 20)}, 4 << 20},
		{[]TransportOption{WithWindowSize(1)}, MinWindowSize},
		{[]TransportOption{WithWindowSize(1 << 40)}, MaxWindowSize},
	}
	for _, tt := range tests {
		if got := newTransport(tt.opts).window; got != tt.want {
			t.Errorf("newTransport(%d options).window = %d, want %d", len(tt.opts), got, tt.want)
		}
	}
}

// readWindows reads HTTP/2 frames from fr until it has seen the peer's
// SETTINGS and its connection WINDOW_UPDATE, and returns the stream window
// (SETTINGS_INITIAL_WINDOW_SIZE) and the connection window they announce.
func readWindows(fr *http2.Framer) (stream, conn uint32, err error) {
	stream, conn = 65535, 65535 // HTTP/2's initial values
	var settings, update bool
	for !settings || !update {
		f, err := fr.ReadFrame()
		if err != nil {
			return 0, 0, fmt.Errorf("ReadFrame() = %w (settings seen %t, window update seen %t)", err, settings, update)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if f.IsAck() {
				continue
			}
			settings = true
			if v, ok := f.Value(http2.SettingInitialWindowSize); ok {
				stream = v
			}
		case *http2.WindowUpdateFrame:
			if f.StreamID == 0 {
				update = true
				conn += f.Increment
			}
		}
	}
	return stream, conn, nil
}

// TestTransportAnnouncesWindow: both ends announce the configured window,
// for streams and for the connection, in their first frames.
func TestTransportAnnouncesWindow(t *testing.T) {
	for _, window := range []int{MinWindowSize + 1, DefaultWindowSize, 4 << 20} {
		// Server side: a raw HTTP/2 client reads the keyserver's first frames.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := grpc.NewServer(ServerOptions(WithWindowSize(window))...)
		go srv.Serve(ln)
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, http2.ClientPreface)
		fr := http2.NewFramer(c, bufio.NewReader(c))
		fr.WriteSettings()
		fr.WriteWindowUpdate(0, 1<<20)
		if s, cw, err := readWindows(fr); err != nil || s != uint32(window) || cw != uint32(window) {
			t.Errorf("ServerOptions(WithWindowSize(%d)) announced stream window %d, connection window %d (%v)", window, s, cw, err)
		}
		c.Close()
		srv.Stop()

		// Client side: a raw listener reads the edge's first frames.
		ln, err = net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		got := make(chan [2]uint32, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			br := bufio.NewReader(c)
			preface := make([]byte, len(http2.ClientPreface))
			if _, err := io.ReadFull(br, preface); err != nil || string(preface) != http2.ClientPreface {
				got <- [2]uint32{}
				return
			}
			fr := http2.NewFramer(c, br)
			fr.WriteSettings()
			s, cw, _ := readWindows(fr) // an error leaves zeros, reported below
			got <- [2]uint32{s, cw}
		}()
		conn, err := grpc.NewClient("passthrough:///"+ln.Addr().String(),
			append(DialOptions(WithWindowSize(window)), grpc.WithTransportCredentials(insecure.NewCredentials()))...)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
		healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}) // only to connect
		if w := <-got; w != [2]uint32{uint32(window), uint32(window)} {
			t.Errorf("DialOptions(WithWindowSize(%d)) announced stream window %d, connection window %d", window, w[0], w[1])
		}
		cancel()
		conn.Close()
		ln.Close()
	}
}

// TestDialOptionsNeverIdle: a channel made with DialOptions keeps its
// connection however long it goes without a call. A shorter idle timeout
// given before DialOptions (gRPC's default is 30 minutes) is overridden.
func TestDialOptionsNeverIdle(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(ServerOptions()...)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	go srv.Serve(ln)
	defer srv.Stop()

	opts := append([]grpc.DialOption{grpc.WithIdleTimeout(50 * time.Millisecond)}, DialOptions()...)
	conn, err := grpc.NewClient(ln.Addr().String(), append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("Check() = %v", err)
	}
	// Ten idle timeouts without a call: the channel must not leave READY.
	idle, cancelIdle := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancelIdle()
	for state := conn.GetState(); ; state = conn.GetState() {
		if state != connectivity.Ready {
			t.Fatalf("channel went %v after an idle stretch; DialOptions must keep it READY", state)
		}
		if !conn.WaitForStateChange(idle, state) {
			break // still READY when the idle stretch ended
		}
	}
}
