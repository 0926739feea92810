package main

import (
	"errors"
	"flag"
	"fmt"
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
	tokenURI    string

	uriFlag string   // the flag tokenURI came from: "" means -token-uri
	uri     *hsm.URI // -token-uri parsed and checked by resolveURI, or nil
}

const defaultPINEnv = "KEYLESS_PIN"

func (f *hsmFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.tokenURI, "token-uri", "", "RFC 7512 PKCS #11 URI of the token (and keys), e.g. 'pkcs11:token=web;object=www.example.com?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/keyless/pin', instead of -module, -token-label, -token-serial, -slot and -pin-file; object= and id= select the keys used (pin-value is refused)")
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
	if err := f.resolveURI(nil); err != nil {
		return hsm.Config{}, err
	}
	pin, err := readPIN(f.pinFile, f.pinEnv, logger)
	if err != nil {
		return hsm.Config{}, err
	}
	cfg := hsm.Config{
		ModulePath:      f.module,
		TokenLabel:      f.tokenLabel,
		TokenSerial:     f.tokenSerial,
		TokenURI:        f.uri,
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
// env, which it then removes from the environment. A trailing newline in
// the file is dropped. A PIN file that others can read is accepted with a
// warning.
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
	// Out of the environment that libraries and any child process see.
	// (The kernel's copy, /proc/<pid>/environ, stays: hence -pin-file.)
	os.Unsetenv(env)
	return pin, nil
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

// resolveURI parses -token-uri, checks it against the other flags of fs
// (after parsing) and copies its token, module-path and pin-source into
// them. A setting made both by the URI and by a flag (on the command line,
// in the environment or in the config file) is an error naming both; with
// a nil fs, the URI's settings win. It does nothing without -token-uri, or
// when it has already run.
func (f *hsmFlags) resolveURI(fs *flag.FlagSet) error {
	if f.tokenURI == "" || f.uri != nil {
		return nil
	}
	from := f.uriFlag
	if from == "" {
		from = "-token-uri"
	}
	u, err := hsm.ParseURI(f.tokenURI)
	if err != nil {
		return fmt.Errorf("%s: %w", from, err)
	}
	set := make(map[string]bool)
	if fs != nil {
		fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
	}
	conflict := func(attr, name string) error {
		return fmt.Errorf("%s sets %s and -%s is set too: use one of them", from, attr, name)
	}
	if u.SelectsToken() {
		for _, name := range []string{"token-label", "token-serial", "slot"} {
			if set[name] {
				return conflict("the token", name)
			}
		}
		// URIs printed by p11tool and pkcs11-tool name the token by
		// serial and label (and manufacturer and model) at once: the
		// token is looked up by one of them, the most specific, and must
		// match all of them (hsm.Config.TokenURI).
		f.tokenLabel, f.tokenSerial, f.slot = "", "", -1
		switch {
		case u.TokenSerial != "":
			f.tokenSerial = u.TokenSerial
		case u.TokenLabel != "":
			f.tokenLabel = u.TokenLabel
		default:
			f.slot = *u.SlotID
		}
	}
	if u.ModulePath != "" {
		if set["module"] {
			return conflict("module-path", "module")
		}
		f.module = u.ModulePath
	}
	if u.PINSource != "" {
		for _, name := range []string{"pin-file", "pin-env"} {
			if set[name] {
				return conflict("pin-source", name)
			}
		}
		f.pinFile = u.PINSource
	}
	f.uri = u
	return nil
}
