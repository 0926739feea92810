package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keyless-tls/keyless/hsm"
)

// hsmFlags are the flags that name a PKCS #11 module, token and PIN. They
// are shared by every command that opens the HSM.
type hsmFlags struct {
	module      string
	tokenLabel  string
	tokenSerial string
	slot        int
	pinFile     string
	pinEnv      string
	maxSessions int
	sessionWait time.Duration
}

const defaultPINEnv = "KEYLESS_PIN"

func (f *hsmFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.module, "module", "/usr/lib/softhsm/libsofthsm2.so", "path of the PKCS #11 module")
	fs.StringVar(&f.tokenLabel, "token-label", "", "label of the token (one of -token-label, -token-serial, -slot)")
	fs.StringVar(&f.tokenSerial, "token-serial", "", "serial number of the token")
	fs.IntVar(&f.slot, "slot", -1, "slot number of the token")
	fs.StringVar(&f.pinFile, "pin-file", "", "file holding the user PIN (mode 0600 or stricter); overrides -pin-env")
	fs.StringVar(&f.pinEnv, "pin-env", defaultPINEnv, "environment variable holding the user PIN, used when -pin-file is not set")
	fs.IntVar(&f.maxSessions, "max-sessions", 8, "maximum number of PKCS #11 sessions (at least 2)")
	fs.DurationVar(&f.sessionWait, "session-wait", 5*time.Second, "longest wait for a free PKCS #11 session")
}

// config returns the hsm.Config the flags describe, with the PIN read from
// its file or environment variable. Errors never contain the PIN.
func (f *hsmFlags) config(logger hclog.Logger) (hsm.Config, error) {
	pin, err := readPIN(f.pinFile, f.pinEnv, logger)
	if err != nil {
		return hsm.Config{}, err
	}
	cfg := hsm.Config{
		ModulePath:      f.module,
		TokenLabel:      f.tokenLabel,
		TokenSerial:     f.tokenSerial,
		PIN:             pin,
		MaxSessions:     f.maxSessions,
		PoolWaitTimeout: f.sessionWait,
		Logger:          logger,
	}
	if f.slot >= 0 {
		slot := f.slot
		cfg.SlotNumber = &slot
	}
	return cfg, cfg.Validate()
}

// readPIN reads the PIN from file, or else from the environment variable
// env. A trailing newline in the file is dropped. A PIN file that others
// can read is accepted with a warning.
func readPIN(file, env string, logger hclog.Logger) (string, error) {
	if file != "" {
		fi, err := os.Stat(file)
		if err != nil {
			return "", fmt.Errorf("pin file: %w", err)
		}
		if fi.Mode().Perm()&0o077 != 0 {
			logger.Warn("PIN file is readable by group or others; chmod 600 it", "file", file, "mode", fi.Mode().Perm().String())
		}
		b, err := os.ReadFile(file)
		if err != nil {
			return "", fmt.Errorf("pin file: %w", err)
		}
		pin := strings.TrimRight(string(b), "\r\n")
		if pin == "" {
			return "", fmt.Errorf("pin file %s is empty", file)
		}
		return pin, nil
	}
	if env == "" {
		return "", errors.New("no PIN source: set -pin-file or -pin-env")
	}
	pin, ok := os.LookupEnv(env)
	if !ok || pin == "" {
		return "", fmt.Errorf("no PIN: environment variable %s is not set (or use -pin-file)", env)
	}
	return pin, nil
}

// newLogger returns the process's logger.
func newLogger(name, level string, json bool, w io.Writer) (hclog.Logger, error) {
	lvl := hclog.LevelFromString(level)
	if lvl == hclog.NoLevel {
		return nil, fmt.Errorf("-log-level %q: want trace, debug, info, warn or error", level)
	}
	return hclog.New(&hclog.LoggerOptions{Name: name, Level: lvl, JSONFormat: json, Output: w}), nil
}

// validate checks the flags without reading the PIN: errors name the
// flag. The choice of token is checked by hsm.Config.Validate.
func (f *hsmFlags) validate() error {
	switch {
	case f.module == "":
		return errors.New("-module is required: the path of the PKCS #11 module")
	case f.maxSessions < 2:
		return fmt.Errorf("-max-sessions %d: must be at least 2 (crypto11 keeps one session for itself)", f.maxSessions)
	case f.sessionWait <= 0:
		return fmt.Errorf("-session-wait %v: must be positive", f.sessionWait)
	case f.pinFile == "" && f.pinEnv == "":
		return errors.New("-pin-file and -pin-env are both empty: name where the PIN is")
	}
	return nil
}
