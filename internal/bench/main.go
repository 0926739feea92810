package bench

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
)

// Usage is the command's usage text.
const Usage = `usage: keyless-bench <mode> [flags]

modes:
  run          the whole benchmark: builds keyserver and edge, makes a SoftHSM
               token and the PKI, starts every process, runs each scenario,
               prints the table and writes the JSON results
  keyops       gRPC key-operation load against a keyserver (one connection)
  inproc       the same key operations in-process through package hsm
  tls-server   a crypto/tls HTTPS server with SoftHSM or software keys
  loadgen      TLS handshake load (full or resumed)
  hold         open many HTTPS connections and keep them idle
  edgemem      an in-process edge that reports its heap
  fleet        many edge links on one keyserver, one identity each (the
               fleet scenario's load), and the keyserver's heap per link
  transport    experiment: CPU per exchange of unary gRPC calls versus one
               batching stream (not part of run)

Every mode but run is started by run; each prints its result as JSON on
standard output. Run "keyless-bench <mode> -h" for its flags.
`

// Main runs the mode named by args[0] with the remaining arguments.
// Results go to stdout, progress and logs to stderr; stdin stops the
// server modes when it closes.
func Main(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, Usage)
		return errors.New("no mode given")
	}
	mode, rest := args[0], args[1:]
	switch mode {
	case "run":
		return runRun(ctx, rest, stdout, stderr)
	case "keyops":
		return runKeyops(ctx, rest, stdout, stderr)
	case "inproc":
		return runInproc(ctx, rest, stdout, stderr)
	case "tls-server":
		return runTLSServer(ctx, rest, stdin, stdout, stderr)
	case "loadgen":
		return runLoadgen(ctx, rest, stdout, stderr)
	case "hold":
		return runHold(ctx, rest, stdin, stdout, stderr)
	case "edgemem":
		return runEdgemem(ctx, rest, stdin, stdout, stderr)
	case "fleet":
		return runFleet(ctx, rest, stdin, stdout, stderr)
	case "transport":
		return runTransport(ctx, rest, stdout, stderr)
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stderr, Usage)
		return flag.ErrHelp
	}
	fmt.Fprint(stderr, Usage)
	return fmt.Errorf("unknown mode %q", mode)
}

// newFlagSet returns the flag set of mode, which reports errors and usage
// to stderr and leaves the exit to the caller.
func newFlagSet(mode string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("keyless-bench "+mode, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// parseFlags parses args and refuses positional arguments.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("bench: %s: unexpected arguments %q", fs.Name(), fs.Args())
	}
	return nil
}
