package link

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// MTLSCredentials are one end's credentials for the edge–keyserver link: a
// certificate chain with its private key, and the CA certificates that
// authenticate the peer, all read from PEM files.
//
// The configurations it returns read the credentials at each handshake, so
// [MTLSCredentials.Reload] takes effect without rebuilding a gRPC server or
// client: handshakes that start after Reload returns use the new files.
// Established connections are not disturbed, except on a keyserver those
// of a client certificate that a newly loaded CRL revokes (see
// [MTLSCredentials.SetClientCRLs]). It is safe for concurrent use.
type MTLSCredentials struct {
	certFile, keyFile, caFile string

	reload   sync.Mutex // serializes loads
	crlFiles []string   // guarded by reload
	cur      atomic.Pointer[mtlsMaterial]
	conns    *connRegistry // a keyserver's established connections
}

// mtlsMaterial is one loaded generation of credentials. It is immutable.
type mtlsMaterial struct {
	cert    *tls.Certificate
	pool    *x509.CertPool
	cas     []*x509.Certificate
	server  *tls.Config // the keyserver's per-handshake config, built once per load
	revoked *revocations
}

// LoadMTLSCredentials reads a certificate chain (certFile, leaf first), its
// private key (keyFile) and the CA certificates that authenticate the peer
// (caFile). Errors name the file and the problem: a file that cannot be read,
// that holds no PEM block of the expected type, a key that does not match
// the certificate, or a certificate that has expired.
func LoadMTLSCredentials(certFile, keyFile, caFile string) (*MTLSCredentials, error) {
	c := &MTLSCredentials{certFile: certFile, keyFile: keyFile, caFile: caFile, conns: newConnRegistry()}
	if err := c.Reload(); err != nil {
		return nil, err
	}
	return c, nil
}

// Reload reads the files again, the client CRLs included, and, if they are
// all valid, replaces the credentials; then it closes the established
// connections of every client certificate the CRLs now revoke. On error the
// previous credentials stay in use.
func (c *MTLSCredentials) Reload() error {
	c.reload.Lock()
	defer c.reload.Unlock()
	return c.load(c.crlFiles)
}

// SetClientCRLs makes a keyserver refuse the client certificates that the
// certificate revocation lists in files revoke: in the handshake, and by
// closing the established connections that use them. Each file holds CRLs
// in PEM ("X509 CRL" blocks) or one in DER, and each CRL must be signed by
// a certificate of the CA file. [MTLSCredentials.Reload] reads them again.
// On error (a file that cannot be read or parsed, a CRL of another issuer)
// nothing changes. An expired CRL is used all the same: see
// [MTLSCredentials.ExpiredClientCRLs].
func (c *MTLSCredentials) SetClientCRLs(files ...string) error {
	c.reload.Lock()
	defer c.reload.Unlock()
	if err := c.load(files); err != nil {
		return err
	}
	c.crlFiles = files
	return nil
}

// load loads the files and crlFiles, and on success swaps them in and
// closes the connections they revoke. c.reload must be held.
func (c *MTLSCredentials) load(crlFiles []string) error {
	m, err := loadMTLSMaterial(c.certFile, c.keyFile, c.caFile)
	if err != nil {
		return err
	}
	if m.revoked, err = loadRevocations(crlFiles, m.cas); err != nil {
		return err
	}
	c.cur.Store(m)
	c.conns.closeIf(func(chain []*x509.Certificate) bool { return slices.ContainsFunc(chain, m.revoked.has) }, "revoked")
	return nil
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
	var cas []*x509.Certificate
	for rest := caPEM; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if ca, err := x509.ParseCertificate(b.Bytes); b.Type == "CERTIFICATE" && err == nil {
			pool.AddCert(ca)
			cas = append(cas, ca)
		}
	}
	if len(cas) == 0 {
		return nil, fmt.Errorf("link: CA file %q: no certificate could be parsed", caFile)
	}
	return &mtlsMaterial{
		cert: &cert,
		pool: pool,
		cas:  cas,
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
