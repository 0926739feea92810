package tlscore

import (
	"bytes"
	"crypto/tls"

	"github.com/hashicorp/go-hclog"
)

// ticketServerNameTag prefixes the SessionState.Extra entry that records the
// server name a session was established for.
const ticketServerNameTag = "keyless-sni:"

// bindTicketsToServerName makes cfg's session tickets resume only under the
// server name they were issued for. Without it, a ticket issued for one name
// resumes under any other name the same edge serves: a client could carry a
// session, and its authentication, across virtual hosts.
//
// Tickets are sealed with cfg's own keys through cfg.EncryptTicket and
// cfg.DecryptTicket. The closures capture cfg, so configurations cloned from
// it (such as those GetConfigForClient returns) use cfg's keys too, and
// tickets resume whichever configuration issued them.
func bindTicketsToServerName(cfg *tls.Config, logger hclog.Logger) {
	cfg.WrapSession = func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
		ss.Extra = append(ss.Extra, ticketServerNameEntry(cs.ServerName))
		return cfg.EncryptTicket(cs, ss)
	}
	cfg.UnwrapSession = func(identity []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
		ss, err := cfg.DecryptTicket(identity, cs)
		if err != nil || ss == nil {
			return nil, err
		}
		want := ticketServerNameEntry(cs.ServerName)
		for _, e := range ss.Extra {
			if bytes.Equal(e, want) {
				return ss, nil
			}
		}
		// Not an error: the client falls back to a full handshake.
		logger.Debug("session ticket from another server name ignored", "server_name", cs.ServerName)
		return nil, nil
	}
}

func ticketServerNameEntry(serverName string) []byte {
	return []byte(ticketServerNameTag + normalizeName(serverName))
}
