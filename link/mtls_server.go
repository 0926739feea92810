package link

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc/credentials"
)

// ServerConfig returns a configuration for the keyserver's gRPC listener:
// TLS 1.3 only, and every client must present a certificate issued by one of
// the CA certificates and not revoked by a CRL of
// [MTLSCredentials.SetClientCRLs]. Pass it to credentials.NewTLS. A
// keyserver should use [MTLSCredentials.ServerCredentials], which also
// checks the client's identity, logs refused handshakes and closes
// connections whose certificate expires or is revoked.
func (c *MTLSCredentials) ServerConfig() *tls.Config { return c.serverConfig(nil) }

// serverConfig is ServerConfig, with check applied to the verified leaf of
// each client certificate when check is not nil.
func (c *MTLSCredentials) serverConfig(check func(*x509.Certificate) error) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		ClientAuth: tls.RequireAndVerifyClientCert,
		// The certificate, the client CAs and the CRLs are swapped
		// together on Reload: each handshake takes the generation current
		// when it starts.
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			m := c.cur.Load()
			cfg := m.server.Clone()
			cfg.VerifyConnection = func(cs tls.ConnectionState) error {
				// With RequireAndVerifyClientCert, crypto/tls calls this
				// only after the chain verified, also on resumption.
				if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
					return &ClientRefusedError{Err: errors.New("the client certificate was not verified")}
				}
				leaf := cs.VerifiedChains[0][0]
				if slices.ContainsFunc(cs.VerifiedChains[0], m.revoked.has) {
					return &ClientRefusedError{Names: presentedNames(leaf), Err: ErrRevoked}
				}
				if check != nil {
					if err := check(leaf); err != nil {
						return &ClientRefusedError{Names: presentedNames(leaf), Err: err}
					}
				}
				return nil
			}
			return cfg, nil
		},
	}
}

// ClientRefusedError is the handshake error of a client whose certificate
// chains to the CA but that the keyserver refused: revoked, or an identity
// its check refused.
type ClientRefusedError struct {
	// Names are the names the certificate presents (see presentedNames).
	Names []string
	// Err is the reason.
	Err error
}

// presentedNames returns a certificate's URI and DNS SANs as written, for
// the log of a refusal: unlike signer.CertificateNames, it keeps names that
// cannot be identities, which may be why the client was refused.
func presentedNames(cert *x509.Certificate) []string {
	var names []string
	for _, u := range cert.URIs {
		names = append(names, u.String())
	}
	return append(names, cert.DNSNames...)
}

func (e *ClientRefusedError) Error() string {
	return fmt.Sprintf("link: client certificate (%s) refused: %v", boundedNames(e.Names), e.Err)
}

func (e *ClientRefusedError) Unwrap() error { return e.Err }

// Bounds of what a refused handshake may write to the log: a peer without
// a certificate from the CA controls every byte of it.
const (
	maxLoggedNames   = 4
	maxLoggedNameLen = 100
	maxLoggedReason  = 300
)

// boundedNames joins at most maxLoggedNames names, each cut to
// maxLoggedNameLen bytes, and says how many more there were.
func boundedNames(names []string) string {
	if len(names) == 0 {
		return "(none)"
	}
	var b strings.Builder
	for i, n := range names[:min(len(names), maxLoggedNames)] {
		if i > 0 {
			b.WriteString(",")
		}
		b.WriteString(cut(n, maxLoggedNameLen))
	}
	if more := len(names) - maxLoggedNames; more > 0 {
		fmt.Fprintf(&b, " and %d more", more)
	}
	return b.String()
}

// cut returns s as valid UTF-8 of at most n bytes, marked with "…" when cut.
func cut(s string, n int) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	if len(s) <= n {
		return s
	}
	for n > 0 && s[n]&0xc0 == 0x80 {
		n--
	}
	return s[:n] + "…"
}

// HandshakeObserver receives the events of a keyserver's listener, for
// metrics. Nil fields are not called; set ones must be safe for concurrent
// use.
type HandshakeObserver struct {
	// Refused is called with the reason of each refused handshake:
	// "revoked" (a CRL revokes the certificate), "identity_refused" (it
	// chains to the CA but the check refused it), "untrusted_certificate"
	// (it does not verify), "closed_early" (the peer sent nothing) or
	// "handshake_error".
	Refused func(reason string)
	// LogSuppressed is called for each refusal not logged because its
	// source, or all sources together, exceeded the log's rate.
	LogSuppressed func()
	// Closed is called for each established connection the keyserver
	// closes because its client certificate expired ("expired") or was
	// revoked ("revoked").
	Closed func(reason string)
}

// ServerCredentials returns the gRPC transport credentials of a keyserver's
// listener: those of [MTLSCredentials.ServerConfig] (TLS 1.3, a client
// certificate that chains to the CA certificates and is not revoked) and,
// when check is not nil, check must accept the verified leaf certificate,
// or the handshake fails with a bad_certificate alert.
// signer.Service.CheckPeer is the keyserver's check: the client's identity
// must be on the policy's allow-list.
//
// Every established connection lives at most until its client certificate
// (or a certificate of its chain) expires, and until a reload loads a CRL
// that revokes it: then the keyserver closes it.
//
// A refused handshake is logged at warn level with the client's address, a
// few of the names its certificate presents (also for an unverified
// certificate, such as one from another CA), each cut short, and the
// reason: at most about 1 KiB, whatever the certificate holds. Refusals are
// logged at most once a second per source address (with bursts of a few)
// and 50 times a second in all; each logged line counts the refusals of its
// source not logged since. A connection closed before it sent anything (a
// port probe) is logged at debug level. Reload applies to these
// credentials too. obs receives the events for metrics.
func (c *MTLSCredentials) ServerCredentials(check func(*x509.Certificate) error, logger hclog.Logger, obs HandshakeObserver) credentials.TransportCredentials {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	c.conns.setObserver(logger, obs.Closed)
	return &serverCredentials{
		TransportCredentials: credentials.NewTLS(c.serverConfig(check)),
		conns:                c.conns,
		refusals:             newRefusalLog(logger, obs),
	}
}

// refusalReason classifies a failed server handshake for a metric label:
// "revoked" (the certificate is revoked by a CRL), "identity_refused" (it
// chains to the CA but the identity is not allowed), "untrusted_certificate"
// (it does not verify), "closed_early" (the peer sent nothing) or
// "handshake_error".
func refusalReason(err error) string {
	var (
		refused *ClientRefusedError
		verr    *tls.CertificateVerificationError
	)
	switch {
	case errors.Is(err, ErrRevoked):
		return "revoked"
	case errors.As(err, &refused):
		return "identity_refused"
	case errors.As(err, &verr):
		return "untrusted_certificate"
	case errors.Is(err, io.EOF):
		return "closed_early"
	}
	return "handshake_error"
}

// serverCredentials are a keyserver listener's credentials: TLS, plus the
// log of refusals and the registry of established connections.
type serverCredentials struct {
	credentials.TransportCredentials
	conns    *connRegistry
	refusals *refusalLog
}

func (s *serverCredentials) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	c, info, err := s.TransportCredentials.ServerHandshake(conn)
	if err != nil {
		s.refusals.record(conn.RemoteAddr(), err)
		return c, info, err
	}
	if ti, ok := info.(credentials.TLSInfo); ok && len(ti.State.VerifiedChains) > 0 {
		c = s.conns.add(c, ti.State.VerifiedChains[0])
	}
	return c, info, nil
}

func (s *serverCredentials) Clone() credentials.TransportCredentials {
	return &serverCredentials{TransportCredentials: s.TransportCredentials.Clone(), conns: s.conns, refusals: s.refusals}
}
