package link

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc/credentials"
)

// MTLSCredentials are one end's credentials for the edge–keyserver link: a
// certificate chain with its private key, and the CA certificates that
// authenticate the peer, all read from PEM files.
//
// The configurations it returns read the credentials at each handshake, so
// [MTLSCredentials.Reload] takes effect without rebuilding a gRPC server or
// client: handshakes that start after Reload returns use the new files,
// established connections are not disturbed. It is safe for concurrent use.
type MTLSCredentials struct {
	certFile, keyFile, caFile string
	cur                       atomic.Pointer[mtlsMaterial]
}

// mtlsMaterial is one loaded generation of credentials. It is immutable.
type mtlsMaterial struct {
	cert   *tls.Certificate
	pool   *x509.CertPool
	server *tls.Config // the keyserver's per-handshake config, built once per load
}

// LoadMTLSCredentials reads a certificate chain (certFile, leaf first), its
// private key (keyFile) and the CA certificates that authenticate the peer
// (caFile). Errors name the file and the problem: a file that cannot be read,
// that holds no PEM block of the expected type, a key that does not match
// the certificate, or a certificate that has expired.
func LoadMTLSCredentials(certFile, keyFile, caFile string) (*MTLSCredentials, error) {
	c := &MTLSCredentials{certFile: certFile, keyFile: keyFile, caFile: caFile}
	if err := c.Reload(); err != nil {
		return nil, err
	}
	return c, nil
}

// Reload reads the files again and, if they are all valid, replaces the
// credentials. On error the previous credentials stay in use.
func (c *MTLSCredentials) Reload() error {
	m, err := loadMTLSMaterial(c.certFile, c.keyFile, c.caFile)
	if err != nil {
		return err
	}
	c.cur.Store(m)
	return nil
}

// ServerConfig returns a configuration for the keyserver's gRPC listener:
// TLS 1.3 only, and every client must present a certificate issued by one of
// the CA certificates. Pass it to credentials.NewTLS. A keyserver should use
// [MTLSCredentials.ServerCredentials], which also checks the client's
// identity and logs refused handshakes.
func (c *MTLSCredentials) ServerConfig() *tls.Config { return c.serverConfig(nil) }

// serverConfig is ServerConfig, with check applied to the verified leaf of
// each client certificate when check is not nil.
func (c *MTLSCredentials) serverConfig(check func(*x509.Certificate) error) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		ClientAuth: tls.RequireAndVerifyClientCert,
		// The certificate and the client CAs are swapped together on
		// Reload: each handshake takes the generation current when it
		// starts.
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			cfg := c.cur.Load().server
			if check == nil {
				return cfg, nil
			}
			cfg = cfg.Clone()
			cfg.VerifyConnection = func(cs tls.ConnectionState) error {
				// With RequireAndVerifyClientCert, crypto/tls calls this
				// only after the chain verified, also on resumption.
				if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
					return &ClientRefusedError{Err: errors.New("the client certificate was not verified")}
				}
				leaf := cs.VerifiedChains[0][0]
				if err := check(leaf); err != nil {
					return &ClientRefusedError{Names: presentedNames(leaf), Err: err}
				}
				return nil
			}
			return cfg, nil
		},
	}
}

// ClientRefusedError is the handshake error of a client whose certificate
// chains to the CA but whose identity the keyserver's check refused.
type ClientRefusedError struct {
	// Names are the names the certificate presents (see presentedNames).
	Names []string
	// Err is the check's error.
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
	return fmt.Sprintf("link: client certificate (%s) refused: %v", strings.Join(e.Names, ", "), e.Err)
}

func (e *ClientRefusedError) Unwrap() error { return e.Err }

// ServerCredentials returns the gRPC transport credentials of a keyserver's
// listener: those of [MTLSCredentials.ServerConfig] (TLS 1.3, a client
// certificate that chains to the CA certificates) and, when check is not
// nil, check must accept the verified leaf certificate, or the handshake
// fails with a bad_certificate alert. signer.Service.CheckPeer is the
// keyserver's check: the client's identity must be on the policy's
// allow-list.
//
// Every refused handshake is logged once to logger, at warn level, with the
// client's address, the names its certificate presents (also for an
// unverified certificate, such as one from another CA) and the reason; a
// connection closed before it sent anything (a port probe) is logged at
// debug level. Reload applies to these credentials too.
func (c *MTLSCredentials) ServerCredentials(check func(*x509.Certificate) error, logger hclog.Logger) credentials.TransportCredentials {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	return &refusalLogger{TransportCredentials: credentials.NewTLS(c.serverConfig(check)), logger: logger}
}

// ServerCredentialsCounted is [MTLSCredentials.ServerCredentials] that
// also calls refused with the reason of each refused handshake (see
// [RefusalReason]), for a metric. refused must be safe for concurrent use.
func (c *MTLSCredentials) ServerCredentialsCounted(check func(*x509.Certificate) error, logger hclog.Logger, refused func(reason string)) credentials.TransportCredentials {
	r := c.ServerCredentials(check, logger).(*refusalLogger)
	r.count = refused
	return r
}

// RefusalReason classifies a failed server handshake for a metric label:
// "identity_refused" (the certificate chains to the CA but the identity is
// not allowed), "untrusted_certificate" (it does not verify),
// "closed_early" (the peer sent nothing) or "handshake_error".
func RefusalReason(err error) string {
	var (
		refused *ClientRefusedError
		verr    *tls.CertificateVerificationError
	)
	switch {
	case errors.As(err, &refused):
		return "identity_refused"
	case errors.As(err, &verr):
		return "untrusted_certificate"
	case errors.Is(err, io.EOF):
		return "closed_early"
	}
	return "handshake_error"
}

// refusalLogger logs each failed server handshake of its credentials.
type refusalLogger struct {
	credentials.TransportCredentials
	logger hclog.Logger
	count  func(reason string) // nil: not counted
}

func (r *refusalLogger) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	c, info, err := r.TransportCredentials.ServerHandshake(conn)
	if err != nil {
		r.logRefusal(conn.RemoteAddr(), err)
		if r.count != nil {
			r.count(RefusalReason(err))
		}
	}
	return c, info, err
}

func (r *refusalLogger) Clone() credentials.TransportCredentials {
	return &refusalLogger{TransportCredentials: r.TransportCredentials.Clone(), logger: r.logger, count: r.count}
}

func (r *refusalLogger) logRefusal(addr net.Addr, err error) {
	remote := "unknown"
	if addr != nil {
		remote = addr.String()
	}
	var (
		refused *ClientRefusedError
		verr    *tls.CertificateVerificationError
		names   []string
	)
	switch {
	case errors.As(err, &refused):
		names = refused.Names
	case errors.As(err, &verr) && len(verr.UnverifiedCertificates) > 0:
		names = presentedNames(verr.UnverifiedCertificates[0])
	case errors.Is(err, io.EOF):
		r.logger.Debug("connection closed before the TLS handshake", "remote_address", remote)
		return
	}
	presented := strings.Join(names, ",")
	if presented == "" {
		presented = "(none)"
	}
	r.logger.Warn("client refused in the TLS handshake", "remote_address", remote, "presented_names", presented, "reason", err.Error())
}

// ClientConfig returns a configuration for the edge's gRPC connections to
// keyservers named serverName: TLS 1.3 only, the client certificate
// presented, and the keyserver's certificate verified against the CA
// certificates and serverName, which must not be empty.
//
// Because crypto/tls has no per-handshake hook for a client's roots, the
// configuration verifies the server itself in VerifyConnection (with
// InsecureSkipVerify set only to turn off the built-in check, which would pin
// the roots of the moment). The verification is the one crypto/tls performs:
// chain to the current CA certificates, server-auth key usage, host name.
// Do not clear VerifyConnection on the result.
func (c *MTLSCredentials) ClientConfig(serverName string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		ServerName: serverName,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return c.cur.Load().cert, nil
		},
		InsecureSkipVerify: true, // replaced by VerifyConnection below
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verifyServer(c.cur.Load().pool, serverName, cs)
		},
	}
}

// verifyServer verifies a keyserver's certificate chain as crypto/tls would.
func verifyServer(roots *x509.CertPool, serverName string, cs tls.ConnectionState) error {
	if serverName == "" {
		return errors.New("link: no keyserver name to verify the certificate against")
	}
	if len(cs.PeerCertificates) == 0 {
		return errors.New("link: the keyserver sent no certificate")
	}
	opts := x509.VerifyOptions{
		Roots:         roots,
		DNSName:       serverName,
		Intermediates: x509.NewCertPool(),
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, ic := range cs.PeerCertificates[1:] {
		opts.Intermediates.AddCert(ic)
	}
	if _, err := cs.PeerCertificates[0].Verify(opts); err != nil {
		return fmt.Errorf("link: keyserver certificate: %w", err)
	}
	return nil
}

// ServerMTLSConfig returns the configuration for a keyserver's gRPC
// listener, as [MTLSCredentials.ServerConfig] over [LoadMTLSCredentials]:
// TLS 1.3 only, tls.RequireAndVerifyClientCert with clientCAFile as the
// client CAs. Use LoadMTLSCredentials directly to be able to reload.
func ServerMTLSConfig(certFile, keyFile, clientCAFile string) (*tls.Config, error) {
	c, err := LoadMTLSCredentials(certFile, keyFile, clientCAFile)
	if err != nil {
		return nil, err
	}
	return c.ServerConfig(), nil
}

// ClientMTLSConfig returns the configuration for an edge's connections to
// keyservers named serverName, as [MTLSCredentials.ClientConfig] over
// [LoadMTLSCredentials]: TLS 1.3 only, the certificate in certFile
// presented, the keyserver verified against caFile. serverName is required.
func ClientMTLSConfig(certFile, keyFile, caFile, serverName string) (*tls.Config, error) {
	if serverName == "" {
		return nil, errors.New("link: ClientMTLSConfig: the keyserver's server name is empty")
	}
	c, err := LoadMTLSCredentials(certFile, keyFile, caFile)
	if err != nil {
		return nil, err
	}
	return c.ClientConfig(serverName), nil
}

func loadMTLSMaterial(certFile, keyFile, caFile string) (*mtlsMaterial, error) {
	certPEM, err := readPEMFile(certFile, "certificate", isCertificateBlock)
	if err != nil {
		return nil, err
	}
	keyPEM, err := readPEMFile(keyFile, "key", IsPrivateKeyBlock)
	if err != nil {
		return nil, err
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("link: key file %q and certificate file %q: %w", keyFile, certFile, err)
	}
	if now := time.Now(); now.After(cert.Leaf.NotAfter) {
		return nil, fmt.Errorf("link: certificate file %q: the certificate expired on %s", certFile, cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	caPEM, err := readPEMFile(caFile, "CA", isCertificateBlock)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("link: CA file %q: no certificate could be parsed", caFile)
	}
	return &mtlsMaterial{
		cert: &cert,
		pool: pool,
		server: &tls.Config{
			MinVersion:   tls.VersionTLS13,
			ClientAuth:   tls.RequireAndVerifyClientCert,
			ClientCAs:    pool,
			Certificates: []tls.Certificate{cert},
			// gRPC requires ALPN h2; credentials.NewTLS adds it too.
			NextProtos: []string{"h2"},
		},
	}, nil
}

// readPEMFile reads a file and checks that it holds at least one PEM block
// that want accepts. what names the file's role in errors.
func readPEMFile(path, what string, want func(*pem.Block) bool) ([]byte, error) {
	if path == "" {
		return nil, fmt.Errorf("link: no %s file given", what)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("link: %s file: %w", what, err)
	}
	for rest := data; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return nil, fmt.Errorf("link: %s file %q: no %s PEM block found", what, path, blockKind(what))
		}
		if want(b) {
			return data, nil
		}
	}
}

func blockKind(what string) string {
	if what == "key" {
		return "PRIVATE KEY"
	}
	return "CERTIFICATE"
}

func isCertificateBlock(b *pem.Block) bool { return b.Type == "CERTIFICATE" }

// IsPrivateKeyBlock reports whether b holds a private key, whatever its PEM
// type: "PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED
// PRIVATE KEY" and so on. An edge uses it to refuse certificate files that
// carry a key.
func IsPrivateKeyBlock(b *pem.Block) bool { return strings.HasSuffix(b.Type, "PRIVATE KEY") }

// CheckKeyFileMode returns an error if the private key file at path may be
// read by its group or others (mode 0600 or stricter is expected): whoever
// reads it can act as this edge or keyserver on the link. The commands log
// it as a warning, as they do for a readable PIN file. A file that cannot
// be read at all is left to LoadMTLSCredentials to report.
func CheckKeyFileMode(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return nil
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("private key file %s has mode %v: group or others can read it; chmod 600 it", path, perm)
	}
	return nil
}
