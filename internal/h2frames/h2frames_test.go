package h2frames

import (
	"bytes"
	"maps"
	"net"
	"testing"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// TestScanner: frames written by http2.Framer after the client preface are
// found whatever the split of the bytes, payloads skipped.
func TestScanner(t *testing.T) {
	var buf bytes.Buffer
	buf.WriteString(http2.ClientPreface)
	fr := http2.NewFramer(&buf, nil)
	fr.WriteSettings()
	fr.WriteData(1, false, bytes.Repeat([]byte{0}, 300)) // a payload that holds header-like bytes
	fr.WritePing(false, [8]byte{0, 0, 9, 1})
	fr.WriteWindowUpdate(0, 1000)
	fr.WriteData(3, true, []byte("x"))
	want := map[http2.FrameType]int64{http2.FrameSettings: 1, http2.FrameData: 2, http2.FramePing: 1, http2.FrameWindowUpdate: 1}
	for _, step := range []int{1, 2, 7, 9, 10, 1000} {
		c := &Counts{}
		s := scanner{skip: len(http2.ClientPreface)}
		b := buf.Bytes()
		for len(b) > 0 {
			n := min(step, len(b))
			s.scan(b[:n], func(ft http2.FrameType) { c.add(true, ft) })
			b = b[n:]
		}
		if read, written := c.Snapshot(); !maps.Equal(written, want) || len(read) != 0 {
			t.Errorf("chunks of %d bytes: written %v, read %v; want %v and none", step, written, read, want)
		}
		if _, n := c.Get(http2.FrameData); n != 2 {
			t.Errorf("chunks of %d bytes: Get(DATA) written %d, want 2", step, n)
		}
	}
}

// TestCredentials: both ends of a real gRPC connection count the frames of
// each call, as the other end sent them.
func TestCredentials(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var server, client Counts
	srv := grpc.NewServer(grpc.Creds(ServerCredentials(insecure.NewCredentials(), &server)))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go srv.Serve(ln)
	defer srv.Stop()
	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(ClientCredentials(insecure.NewCredentials(), &client)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	const calls = 3
	for range calls {
		if _, err := healthpb.NewHealthClient(conn).Check(t.Context(), &healthpb.HealthCheckRequest{}); err != nil {
			t.Fatalf("Check() = %v", err)
		}
	}
	for _, ft := range []http2.FrameType{http2.FrameHeaders, http2.FrameData} {
		sRead, _ := server.Get(ft)
		_, cWritten := client.Get(ft)
		if sRead < calls || sRead != cWritten {
			t.Errorf("%v frames: the server read %d and the client wrote %d; want the same, at least %d", ft, sRead, cWritten, calls)
		}
		cRead, _ := client.Get(ft)
		if cRead < calls {
			t.Errorf("%v frames: the client read %d, want at least %d", ft, cRead, calls)
		}
	}
}
