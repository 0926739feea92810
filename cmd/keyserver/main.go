// Command keyserver performs the private-key operations of TLS handshakes
// for remote edges, inside an HSM reached through PKCS #11, and manages the
// keys in that HSM.
//
// Usage:
//
//	keyserver serve [flags]      serve the KeylessService over gRPC with mutual TLS
//	keyserver keys <command>     generate, list, delete and export keys; make CSRs and certificates
//	keyserver token init         initialise a token, with PINs from files or the environment
//
// Run "keyserver <command> -h" for the flags of each command. The token PIN is
// read from a file (-pin-file) or an environment variable (-pin-env, default
// KEYLESS_PIN), never from a flag value.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "keyserver:", err)
		os.Exit(1)
	}
}

const usage = `usage: keyserver <command> [flags]

commands:
  token init           initialise a free token with PINs read from files
  serve                serve the KeylessService over gRPC with mutual TLS
  keys generate        generate a key pair inside the token
  keys list            list the token's keys: key ids, attributes, what the keyserver does with each
  keys delete          destroy a key in the token (asks first, unless -yes)
  keys export          print a key's public key (PEM)
  keys csr             create a certificate signing request signed by a token key
  keys selfsign        create a self-signed certificate signed by a token key

Run "keyserver <command> -h" for its flags.
`

// run is main without the process: it parses args, runs the command and
// returns its error. Output goes to stdout, logs and usage to stderr.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errors.New("no command given")
	}
	switch args[0] {
	case "serve":
		return serve(ctx, args[1:], stderr)
	case "keys":
		return keys(ctx, args[1:], stdout, stderr)
	case "token":
		return token(ctx, args[1:], stderr)
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stderr, usage)
		return flag.ErrHelp
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("unknown command %q", args[0])
}
