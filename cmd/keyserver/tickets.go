package main

import (
	"encoding/hex"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keyless-tls/keyless/signer"
)

// ticketFlags are keyserver serve's settings for the session ticket keys
// that GetTicketKeys hands to edges.
type ticketFlags struct {
	secretFile string
	period     time.Duration
	accept     time.Duration
}

func (t *ticketFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&t.secretFile, "ticket-secret-file", "", "file holding the secret edges' session ticket keys are derived from: 64 or more hex digits on one line (openssl rand -hex 32), the same on every keyserver, mode 0600; edges a policy rule allows operations: [tickets] fetch them (default: none, such edges use their own keys)")
	fs.DurationVar(&t.period, "ticket-key-period", signer.DefaultTicketPeriod, "how long each session ticket key seals new tickets before the next one takes over (at least 1s; the same on every keyserver)")
	fs.DurationVar(&t.accept, "ticket-key-accept", signer.DefaultTicketAccept, "how long a session ticket key still opens tickets after its period: a session resumes at most -ticket-key-period plus this after it was sealed")
}

// check checks the settings that need no file; errors name the flag.
func (t *ticketFlags) check() error {
	switch {
	case t.period < time.Second || t.period%time.Millisecond != 0:
		return fmt.Errorf("-ticket-key-period %v: must be at least 1s, in whole milliseconds", t.period)
	case t.accept <= 0:
		return fmt.Errorf("-ticket-key-accept %v: must be positive, or sessions sealed late in a period would end at its rotation", t.accept)
	case t.accept > signer.MaxTicketAcceptPeriods*t.period:
		return fmt.Errorf("-ticket-key-accept %v: at most %d periods of -ticket-key-period %v", t.accept, signer.MaxTicketAcceptPeriods, t.period)
	}
	return nil
}

// load reads the secret and returns the ticket keys, or nil without
// -ticket-secret-file (with a warning if policy has tickets rules).
// Errors name the flag and never quote the file.
func (t *ticketFlags) load(logger hclog.Logger, policy *signer.Policy) (*signer.TicketKeys, error) {
	if t.secretFile == "" {
		if groups := policy.TicketGroups(); len(groups) > 0 {
			logger.Warn("the policy allows tickets but -ticket-secret-file is not set: edges asking for session ticket keys get UNAVAILABLE and use their own", "ticket_groups", strings.Join(groups, ","))
		}
		return nil, nil
	}
	secret, err := readTicketSecret(t.secretFile)
	if err != nil {
		return nil, fmt.Errorf("-ticket-secret-file: %w", err)
	}
	defer clear(secret)
	tk, err := signer.NewTicketKeys(signer.TicketConfig{Secret: secret, Period: t.period, Accept: t.accept})
	if err != nil {
		return nil, fmt.Errorf("-ticket-secret-file: %w", err)
	}
	logger.Info("session ticket keys for edges: on", "ticket_key_period", t.period, "ticket_key_accept", t.accept, "ticket_groups", strings.Join(policy.TicketGroups(), ","))
	return tk, nil
}

// readTicketSecret reads a secret file: hex digits on one line, blank
// lines and lines starting with '#' ignored. The file must not be
// readable by group or others.
func readTicketSecret(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s: mode %v lets group or others read it; chmod 600 it", path, fi.Mode().Perm())
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	defer clear(data)
	var line string
	for _, l := range strings.Split(string(data), "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		if line != "" {
			return nil, fmt.Errorf("%s: more than one line of hex digits; want one secret", path)
		}
		line = l
	}
	if line == "" {
		return nil, fmt.Errorf("%s: no secret; write 64 hex digits (openssl rand -hex 32)", path)
	}
	secret := make([]byte, hex.DecodedLen(len(line)))
	if _, err := hex.Decode(secret, []byte(line)); err != nil || len(line)%2 != 0 {
		// Not err, which quotes a byte of the secret.
		return nil, fmt.Errorf("%s: not hexadecimal digits", path)
	}
	if len(secret) < signer.MinTicketSecretLen {
		return nil, fmt.Errorf("%s: %d bytes of secret; want at least %d (64 hex digits)", path, len(secret), signer.MinTicketSecretLen)
	}
	return secret, nil
}
