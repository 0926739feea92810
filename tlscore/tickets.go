package tlscore

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/hashicorp/go-hclog"
	"github.com/keyless-tls/keyless/internal/hostname"
)

// Tags of the SessionState.Extra entries that bind a session ticket.
const (
	// ticketServerNameTag prefixes the server name a session was
	// established for.
	ticketServerNameTag = "keyless-sni:"
	// ticketCertTag prefixes the SHA-256 of a leaf certificate that could
	// serve that name when the ticket was issued.
	ticketCertTag = "keyless-cert:"
)

// bindTickets makes cfg's session tickets resume only under the server name
// they were issued for, and only while certs would still serve that name
// with a certificate it could have used then.
//
// Without the first, a ticket issued for one name resumes under any other
// name the same edge serves: a client could carry a session, and its
// authentication, across virtual hosts. Without the second, a name whose
// certificate was removed or replaced (a customer leaving, a revoked
// certificate) keeps resuming with the old authentication until the ticket
// keys age out: a TLS 1.3 resumption asks for no certificate at all.
//
// Tickets are sealed with cfg's own keys through cfg.EncryptTicket and
// cfg.DecryptTicket. The closures capture cfg, so configurations cloned from
// it (such as those GetConfigForClient returns) use cfg's keys too, and
// tickets resume whichever configuration issued them.
func bindTickets(cfg *tls.Config, certs *CertStore, logger hclog.Logger) {
	cfg.WrapSession = func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
		ss.Extra = append(ss.Extra, ticketServerNameEntry(cs.ServerName))
		for _, h := range certs.servingLeaves(cs.ServerName) {
			ss.Extra = append(ss.Extra, ticketCertEntry(h))
		}
		return cfg.EncryptTicket(cs, ss)
	}
	cfg.UnwrapSession = func(identity []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
		ss, err := cfg.DecryptTicket(identity, cs)
		if err != nil || ss == nil {
			return nil, err
		}
		has := func(entry []byte) bool {
			return slices.ContainsFunc(ss.Extra, func(e []byte) bool { return bytes.Equal(e, entry) })
		}
		// Not errors: the client falls back to a full handshake.
		if !has(ticketServerNameEntry(cs.ServerName)) {
			logger.Debug("session ticket from another server name ignored", "server_name", cs.ServerName)
			return nil, nil
		}
		for _, h := range certs.servingLeaves(cs.ServerName) {
			if has(ticketCertEntry(h)) {
				return ss, nil
			}
		}
		logger.Debug("session ticket for a certificate no longer served ignored", "server_name", cs.ServerName)
		return nil, nil
	}
}

func ticketServerNameEntry(serverName string) []byte {
	return []byte(ticketServerNameTag + hostname.Normalize(serverName))
}

func ticketCertEntry(leafHash [sha256.Size]byte) []byte {
	return append([]byte(ticketCertTag), leafHash[:]...)
}

// LoadTicketKeys reads session ticket keys for tls.Config.SetSessionTicketKeys
// from a file: one key per line, 64 hexadecimal digits (32 random bytes,
// such as `openssl rand -hex 32` prints), blank lines and lines starting
// with '#' ignored. The first key seals new tickets; every key opens them.
// Edges that share the file resume each other's sessions, each of which
// saves a keyserver operation. To rotate across a fleet, add the new key
// as the second line and reload every edge, then move it to the top and
// reload again (so that no edge seals tickets others cannot open yet), and
// drop the oldest once its tickets have expired (7 days at most).
//
// It fails, naming the line, for anything else, and for a file with no key
// or one that group or others may read (mount a Kubernetes Secret with
// defaultMode 0400).
func LoadTicketKeys(path string) ([][32]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("tlscore: session ticket keys: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("tlscore: session ticket keys %s: mode %v lets group or others read it; chmod 600 it", path, fi.Mode().Perm())
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("tlscore: session ticket keys: %w", err)
	}
	var keys [][32]byte
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		var k [32]byte
		if len(line) != hex.EncodedLen(len(k)) {
			return nil, fmt.Errorf("tlscore: session ticket keys %s line %d: want 64 hexadecimal digits (32 bytes), got %d characters", path, i+1, len(line))
		}
		if _, err := hex.Decode(k[:], []byte(line)); err != nil {
			// Not err, which quotes a byte of the key.
			return nil, fmt.Errorf("tlscore: session ticket keys %s line %d: not 64 hexadecimal digits", path, i+1)
		}
		keys = append(keys, k)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("tlscore: session ticket keys %s: no key", path)
	}
	return keys, nil
}
