package tlscore

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"

	"github.com/keyless-tls/keyless/internal/hostname"
)

// HeaderClientSubject carries, to the origin, the subject (RFC 4514 string)
// of the client certificate that the edge verified under a
// [ClientAuthPolicy]. It is absent when no certificate was verified; what a
// client sends under this name is dropped, so the origin may trust it.
const HeaderClientSubject = "X-Keyless-Client-Subject"

// ClientAuthPolicy asks clients for a certificate when they name certain
// server names (SNI) ([ServerConfig.ClientAuth]).
type ClientAuthPolicy struct {
	// Pattern is a host name ("api.example.com") or a wildcard
	// ("*.example.com", one label), matched case-insensitively against the
	// server name the client sends.
	Pattern string
	// Require refuses a handshake without a valid certificate; otherwise a
	// certificate is requested, and verified if the client sends one.
	Require bool
	// CAs are the certificate authorities whose certificates (with the
	// client-authentication extended key usage) are accepted. Required.
	CAs *x509.CertPool
}

// ParseClientAuth parses the edge's -client-auth value: comma-separated
// NAME=MODE:CAFILE items, NAME a host name or wildcard, MODE request or
// require, CAFILE a PEM file of CA certificates, which it reads. An empty
// value yields no policy.
func ParseClientAuth(spec string) ([]ClientAuthPolicy, error) {
	var out []ClientAuthPolicy
	for _, item := range strings.Split(spec, ",") {
		if item = strings.TrimSpace(item); item == "" {
			continue
		}
		name, rest, ok := strings.Cut(item, "=")
		mode, file, ok2 := strings.Cut(rest, ":")
		if !ok || !ok2 || file == "" {
			return nil, fmt.Errorf("%q: want NAME=MODE:CAFILE, e.g. api.example.com=require:/etc/edge/client-ca.pem", item)
		}
		if err := hostname.CheckPattern(name); err != nil {
			return nil, fmt.Errorf("%q: host name pattern %q: %w", item, name, err)
		}
		p := ClientAuthPolicy{Pattern: hostname.Normalize(name)}
		switch mode {
		case "require":
			p.Require = true
		case "request":
		default:
			return nil, fmt.Errorf("%q: mode %q: want request or require", item, mode)
		}
		pem, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("%q: CA file: %w", item, err)
		}
		p.CAs = x509.NewCertPool()
		if !p.CAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%q: CA file %s holds no PEM certificate", item, file)
		}
		for _, q := range out {
			if q.Pattern == p.Pattern {
				return nil, fmt.Errorf("%q: %s has a client-certificate policy already", item, name)
			}
		}
		out = append(out, p)
	}
	return out, nil
}

// clientAuthIndex returns the index of the first policy that covers a
// normalized server name, or -1.
func clientAuthIndex(policies []ClientAuthPolicy, name string) int {
	if name == "" {
		return -1
	}
	for i, p := range policies {
		if hostname.Match(p.Pattern, name) {
			return i
		}
	}
	return -1
}

// apply returns a copy of c that asks for client certificates as p says.
func (p *ClientAuthPolicy) apply(c *tls.Config) *tls.Config {
	c = c.Clone()
	c.ClientCAs = p.CAs
	c.ClientAuth = tls.VerifyClientCertIfGiven
	if p.Require {
		c.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return c
}

// ClientAuthHandler returns a handler that answers 421 Misdirected Request
// to a request whose Host falls under another client-certificate policy
// than the server name of its connection (policies as in
// [ServerConfig.ClientAuth]), and passes the others to next. Without it a
// client could open a connection for a name that asks for no certificate
// and then send requests for one that requires it (HTTP/2 clients also
// reuse connections across names; on 421 they open a new one).
func ClientAuthHandler(policies []ClientAuthPolicy, next http.Handler) http.Handler {
	if len(policies) == 0 {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS != nil {
			host := r.Host
			if h, _, err := net.SplitHostPort(host); err == nil {
				host = h
			}
			sni := ""
			if hostname.CheckServerName(r.TLS.ServerName) == nil {
				sni = hostname.Normalize(r.TLS.ServerName)
			}
			if host == "" { // routed by the server name, as Proxy does
				host = sni
			}
			if clientAuthIndex(policies, hostname.Normalize(host)) != clientAuthIndex(policies, sni) {
				w.Header().Set("Content-Type", "text/plain; charset=utf-8")
				w.WriteHeader(http.StatusMisdirectedRequest)
				fmt.Fprintln(w, "421 Misdirected Request: this host's client-certificate policy differs from the one of the server name of this connection; connect with the host as server name (SNI)")
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// clientSubject returns the subject of the client certificate verified on
// cs, made safe for a header value (control characters escaped), or "".
func clientSubject(cs *tls.ConnectionState) string {
	if cs == nil || len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return ""
	}
	s := cs.VerifiedChains[0][0].Subject.String()
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c == 0x7f {
			fmt.Fprintf(&b, `\%02x`, c)
		} else {
			b.WriteByte(c)
		}
	}
	return b.String()
}
