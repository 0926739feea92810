// Command demo-origin is the small HTTP origin of the keyless demo. It
// answers every request with the hostname and TLS version that the edge
// served it with (from the X-Keyless-Server-Name and X-Keyless-TLS-Version
// headers the edge adds), and the client address from X-Forwarded-For.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stderr)
	stop()
	if err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "demo-origin:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("demo-origin", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:8080", "address to listen on")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: http.HandlerFunc(answer), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	fmt.Fprintf(stderr, "demo-origin: listening on %s\n", ln.Addr())
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// answer tells the client how its request reached the origin.
func answer(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	fmt.Fprintf(w, "Hello from the keyless demo origin.\n")
	fmt.Fprintf(w, "hostname:    %s\n", orNone(r.Header.Get("X-Keyless-Server-Name")))
	fmt.Fprintf(w, "tls version: %s\n", orNone(r.Header.Get("X-Keyless-TLS-Version")))
	fmt.Fprintf(w, "client:      %s\n", orNone(r.Header.Get("X-Forwarded-For")))
	fmt.Fprintf(w, "request:     %s %s %s\n", r.Method, r.URL.RequestURI(), r.Proto)
	if s := r.Header.Get("X-Keyless-Client-Subject"); s != "" {
		fmt.Fprintf(w, "client cert: %s\n", s)
	}
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}
