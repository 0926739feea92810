package main

import (
	"context"
	"flag"
	"fmt"
	"io"

	"github.com/hashicorp/go-hclog"

	"github.com/keyless-tls/keyless/hsm"
)

// token runs "keyserver token init": it initialises a free token with a
// label and PINs read from files or environment variables, so that no PIN
// ever appears on a command line.
func token(_ context.Context, args []string, stderr io.Writer) error {
	if len(args) == 0 || args[0] != "init" {
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("token: want \"token init\"")
	}
	fs := flag.NewFlagSet("keyserver token init", flag.ContinueOnError)
	fs.SetOutput(stderr)
	module := fs.String("module", "/usr/lib/softhsm/libsofthsm2.so", "path of the PKCS #11 module")
	label := fs.String("label", "", "label of the new token (required)")
	pinFile := fs.String("pin-file", "", "file holding the new user PIN")
	pinEnv := fs.String("pin-env", defaultPINEnv, "environment variable holding the new user PIN, used when -pin-file is not set")
	soPINFile := fs.String("so-pin-file", "", "file holding the new security officer PIN")
	soPINEnv := fs.String("so-pin-env", "KEYLESS_SO_PIN", "environment variable holding the new security officer PIN, used when -so-pin-file is not set")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if *label == "" {
		return fmt.Errorf("token init: -label is required")
	}
	logger := hclog.New(&hclog.LoggerOptions{Name: "keyserver", Level: hclog.Warn, Output: stderr})
	pin, err := readPIN(*pinFile, *pinEnv, logger)
	if err != nil {
		return fmt.Errorf("token init: user PIN: %w", err)
	}
	soPIN, err := readPIN(*soPINFile, *soPINEnv, logger)
	if err != nil {
		return fmt.Errorf("token init: security officer PIN: %w", err)
	}
	return hsm.InitToken(*module, *label, soPIN, pin)
}
