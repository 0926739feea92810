package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	"github.com/keyless-tls/keyless/tlscore"
)

// MemSnapshot is the edge process's memory at one moment, after garbage
// collection.
type MemSnapshot struct {
	Phase      string `json:"phase"`
	Conns      int64  `json:"conns"` // TCP connections open on the edge
	HeapInuse  uint64 `json:"heap_inuse"`
	HeapAlloc  uint64 `json:"heap_alloc"`
	StackInuse uint64 `json:"stack_inuse"`
	Goroutines int    `json:"goroutines"`
}

func snapshot(phase string, conns int64) MemSnapshot {
	// Two cycles: the first may leave objects freed by finalizers.
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return MemSnapshot{
		Phase:      phase,
		Conns:      conns,
		HeapInuse:  ms.HeapInuse,
		HeapAlloc:  ms.HeapAlloc,
		StackInuse: ms.StackInuse,
		Goroutines: runtime.NumGoroutine(),
	}
}

// countingListener counts the connections it accepted that are still open.
type countingListener struct {
	net.Listener
	open atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.open.Add(1)
	return &countedConn{Conn: c, l: l}, nil
}

type countedConn struct {
	net.Conn
	l      *countingListener
	closed atomic.Bool
}

func (c *countedConn) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		c.l.open.Add(-1)
	}
	return c.Conn.Close()
}

// runEdgemem is the "edgemem" mode: an edge built in this process exactly
// as cmd/edge wires one (tlscore.Dial, NewCertStore and Load,
// NewServerTLSConfig, ServeHTTP), with a trivial handler in place of the
// proxy, so that the process's own heap can be read. It prints
// "ready ADDR", then, for each line "snapshot PHASE" on its standard input,
// one MemSnapshot as a JSON line; it exits when standard input closes.
func runEdgemem(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := newFlagSet("edgemem", stderr)
	var (
		link      linkFlags
		keyserver = fs.String("keyserver", "", "keyserver address host:port (required)")
		certs     = fs.String("certs", "", "directory of the certificate chains (required)")
		listen    = fs.String("listen", "127.0.0.1:0", "address to listen on")
		lifetime  = fs.Duration("lifetime", 5*time.Minute, "exit after this long whatever happens")
	)
	link.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if err := raiseNoFile(20000); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *lifetime)
	defer cancel()
	linkTLS, err := link.tlsConfig()
	if err != nil {
		return err
	}
	client, err := tlscore.Dial(tlscore.ClientConfig{Addresses: []string{*keyserver}, TLS: linkTLS})
	if err != nil {
		return err
	}
	defer client.Close()
	store, err := tlscore.NewCertStore(tlscore.CertStoreConfig{Client: client, Default: nameECDSA})
	if err != nil {
		return err
	}
	if err := store.Load(ctx, *certs); err != nil {
		return err
	}
	tlsConfig, err := tlscore.NewServerTLSConfig(tlscore.ServerConfig{Certificates: store, RSAKeyExchange: []string{nameRSA}})
	if err != nil {
		return err
	}
	raw, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	ln := &countingListener{Listener: raw}
	served := make(chan error, 1)
	go func() { served <- tlscore.ServeHTTP(ctx, ln, tlsConfig, okHandler(), time.Second, nil) }()
	fmt.Fprintf(stdout, "ready %s\n", raw.Addr())

	cmds := make(chan string)
	go func() {
		defer close(cmds)
		lines := bufio.NewScanner(stdin)
		for lines.Scan() {
			cmds <- lines.Text()
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return <-served
		case err := <-served:
			return err
		case line, ok := <-cmds:
			if !ok {
				cancel()
				return <-served
			}
			if phase, ok := strings.CutPrefix(line, "snapshot "); ok {
				if err := writeJSON(stdout, snapshot(phase, ln.open.Load())); err != nil {
					return err
				}
			}
		}
	}
}
