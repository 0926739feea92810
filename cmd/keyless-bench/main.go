// Command keyless-bench measures keyless against in-process keys: key
// operations through the keyserver's gRPC API versus the same SoftHSM key
// called in-process, and full and resumed TLS handshakes through an edge
// and a keyserver versus crypto/tls servers holding their keys. "make
// bench" runs
//
//	keyless-bench run
//
// which prints a table and writes the figures as JSON to $BENCH_OUT
// (default bench-results.json). See BENCHMARKS.md and package internal/bench.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/keyless-tls/keyless/internal/bench"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := bench.Main(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	if err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "keyless-bench:", err)
		os.Exit(1)
	}
}
