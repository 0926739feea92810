package tlscore

import (
	"crypto"
	"crypto/tls"
	"errors"
	"fmt"
	"math"
	"net"
	"slices"

	"github.com/hashicorp/go-hclog"
	"github.com/keyless-tls/keyless/internal/hostname"
)

// defaultNextProtos are the ALPN protocols of an HTTPS edge, as ServeHTTP
// serves them. Never modified: configurations get copies.
var defaultNextProtos = []string{"h2", "http/1.1"}

// ecdheSuites are the TLS 1.2 suites of every handshake: forward secret,
// AEAD only. TLS 1.3 suites are not configurable in crypto/tls.
var ecdheSuites = []uint16{
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
}

// rsaKexSuites are the RSA key-exchange suites added for the names in
// ServerConfig.RSAKeyExchange. crypto/tls enables them only when they are
// listed explicitly, and prefers every ECDHE suite to them.
var rsaKexSuites = []uint16{
	tls.TLS_RSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_RSA_WITH_AES_256_GCM_SHA384,
}

// CipherSuites returns the TLS 1.2 cipher suites an edge offers, in its
// order of preference: the ECDHE ones, then, with rsaKeyExchange, the RSA
// key-exchange ones. The caller owns the returned slice. A server that
// should negotiate as an edge does (a baseline in a benchmark, say) uses it.
func CipherSuites(rsaKeyExchange bool) []uint16 {
	if rsaKeyExchange {
		return append(slices.Clone(ecdheSuites), rsaKexSuites...)
	}
	return slices.Clone(ecdheSuites)
}

// ServerConfig configures the edge's TLS server ([NewServerTLSConfig]). It
// must not be modified after it is passed in.
type ServerConfig struct {
	// Certificates provides the certificate of each handshake. Required.
	Certificates *CertStore

	// RSAKeyExchange lists the host names, exact ("legacy.example.com") or
	// wildcard ("*.example.com", one label), for which the TLS 1.2 RSA
	// key-exchange suites TLS_RSA_WITH_AES_{128,256}_GCM are enabled, for
	// clients that support nothing better, when the name has a certificate
	// of its own (never for the default certificate's key). Matching is case-insensitive and
	// ignores a trailing dot. Empty means RSA key exchange is off, which it
	// should be unless old clients need it: it is not forward secret, and each
	// such handshake costs a keyserver decryption. It has no effect under
	// GODEBUG=fips140=on, where crypto/tls removes these suites.
	RSAKeyExchange []string

	// NextProtos are the ALPN protocols offered, in order of preference. Nil
	// means "h2" and "http/1.1", what [ServeHTTP] serves. A raw TCP edge
	// ([ServeTCP]) should list what its origin speaks, or set an empty,
	// non-nil slice to turn ALPN off.
	NextProtos []string

	// MaxKeyOperations bounds the key operations (signatures and RSA
	// decryptions) that handshakes have in flight at once, across every
	// handshake this configuration serves. A handshake whose key operation
	// finds the bound reached fails at once, without reaching the keyserver
	// and without waiting for a slot: under a flood the edge refuses work
	// it could only queue, instead of holding handshakes open until their
	// deadline. Zero means [DefaultMaxKeyOperations]; a negative value
	// means no bound.
	MaxKeyOperations int

	// HandshakesPerClient limits each client's full handshakes (resumptions
	// are free) to this many per second (0.001 to a million), with bursts of
	// HandshakeBurst; a handshake over it fails before any key operation. A client is an IPv4
	// address or an IPv6 /56. Zero means no limit. Each full handshake
	// costs a keyserver operation before the client has proved anything,
	// so one client could otherwise spend the HSM's capacity; a limit too
	// low refuses many users behind one NAT. [DefaultHandshakesPerClient]
	// and [DefaultHandshakeBurst] suit an edge that sees its clients'
	// addresses; behind a proxy or load balancer that hides them, every
	// client shares the proxy's address, and the limit belongs there.
	HandshakesPerClient float64
	// HandshakeBurst is the burst of HandshakesPerClient; zero means the
	// rate rounded up.
	HandshakeBurst int

	// Metrics, if set, counts the handshakes refused by MaxKeyOperations
	// and HandshakesPerClient, and tracks the key operations in flight
	// (see [Metrics]).
	Metrics *Metrics

	// ClientAuth asks for client certificates for the server names its
	// policies cover: the first policy whose pattern matches the server
	// name the client sends applies. Names no policy covers, and clients
	// that send no server name, are not asked. An HTTP edge should wrap its
	// handler in [ClientAuthHandler], so that a request cannot reach a host
	// through a connection made for another name.
	ClientAuth []ClientAuthPolicy

	// Logger receives debug lines about refused session tickets and, at
	// most once a minute for each bound, a warning that handshakes are
	// being refused by MaxKeyOperations or HandshakesPerClient, with how
	// many (never a client's address). Nil means no logging.
	Logger hclog.Logger
}

// Bounds of ServerConfig.HandshakesPerClient (and, for the upper one,
// HandshakeBurst): a client that may make one full handshake in more than
// 1000 s is not a client, and beyond a million a second the limit limits
// nothing.
const (
	MinHandshakeRate = 0.001
	MaxHandshakeRate = 1e6
)

// MaxKeyOperationsLimit bounds ServerConfig.MaxKeyOperations: far more
// than a keyserver link carries, so a larger value is a mistake.
const MaxKeyOperationsLimit = 1 << 24

// DefaultMaxKeyOperations is ServerConfig.MaxKeyOperations when it is zero.
// By Little's law an edge needs as many operations in flight as its rate of
// full handshakes times the keyserver's latency: this many carries ten
// thousand handshakes a second at 100 ms, more than an edge's processors
// complete, and matches what one keyserver stream queues (more would only
// wait in the client for their deadline).
const DefaultMaxKeyOperations = streamQueue

// DefaultHandshakesPerClient and DefaultHandshakeBurst are the limits the
// edge command applies per client by default. Resumptions are not
// counted, so a client address stays under them unless it opens new
// sessions faster than this: a browser makes a few full handshakes when it
// first visits a site and resumes afterwards, so a NAT reaches the rate
// only with over a thousand users each starting a new session with this
// edge every minute. A larger NAT (a carrier's, say) sees some of its new
// sessions refused at the peaks until its allowance refills.
const (
	DefaultHandshakesPerClient = 20
	DefaultHandshakeBurst      = 40
)

// Validate reports whether the configuration is usable.
func (c *ServerConfig) Validate() error {
	if c.Certificates == nil {
		return errors.New("tlscore: ServerConfig.Certificates is nil")
	}
	for i, p := range c.ClientAuth {
		if err := hostname.CheckPattern(p.Pattern); err != nil {
			return fmt.Errorf("tlscore: ServerConfig.ClientAuth[%d]: host name pattern %q: %w", i, p.Pattern, err)
		}
		if p.CAs == nil {
			return fmt.Errorf("tlscore: ServerConfig.ClientAuth[%d] (%s): CAs is nil", i, p.Pattern)
		}
	}
	for _, p := range c.RSAKeyExchange {
		if err := hostname.CheckPattern(p); err != nil {
			return fmt.Errorf("tlscore: ServerConfig.RSAKeyExchange: host name pattern %q: %w", p, err)
		}
	}
	if r := c.HandshakesPerClient; r != 0 && !(r >= MinHandshakeRate && r <= MaxHandshakeRate) {
		return fmt.Errorf("tlscore: ServerConfig.HandshakesPerClient is %v; it must be 0 (no limit) or from %v to %v", r, MinHandshakeRate, MaxHandshakeRate)
	}
	if c.MaxKeyOperations > MaxKeyOperationsLimit {
		return fmt.Errorf("tlscore: ServerConfig.MaxKeyOperations is %d; it must be at most %d, or zero for the default, or negative for no bound", c.MaxKeyOperations, MaxKeyOperationsLimit)
	}
	if c.HandshakeBurst < 0 || c.HandshakeBurst > MaxHandshakeRate {
		return fmt.Errorf("tlscore: ServerConfig.HandshakeBurst is %d; it must be from 0 (the rate) to %v", c.HandshakeBurst, MaxHandshakeRate)
	}
	return nil
}

// NewServerTLSConfig returns the edge's TLS server configuration.
//
// TLS 1.2 and 1.3 are enabled. TLS 1.2 uses ECDHE with AES-GCM or
// ChaCha20-Poly1305 only, plus RSA key exchange for the names in
// cfg.RSAKeyExchange. Those names are served by a second configuration,
// built here once and returned by GetConfigForClient; it differs only in its
// cipher suites (and, for a client that offers only RSA key exchange, drops
// "h2" from ALPN, since HTTP/2 forbids those suites).
//
// Session tickets are on. Whichever configuration handles a handshake, its
// tickets are sealed and opened with the returned config's ticket keys
// (crypto/tls rotates them daily; to share tickets between edges call
// SetSessionTicketKeys on the returned config, and rotate them yourself).
// A ticket resumes only under the server name it was issued for, and only
// while the certificate store would still serve that name with a
// certificate it could have used then (so not after the name's certificate
// was removed or replaced).
//
// The caller may adjust the result before serving, but must not replace
// GetCertificate, GetConfigForClient, WrapSession or UnwrapSession.
func NewServerTLSConfig(cfg ServerConfig) (*tls.Config, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	logger := cfg.Logger
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	nextProtos := cfg.NextProtos
	if nextProtos == nil {
		nextProtos = defaultNextProtos
	}
	base := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		CipherSuites:   CipherSuites(false),
		NextProtos:     slices.Clone(nextProtos),
		GetCertificate: getCertificate(cfg.Certificates, cfg.keyGuard()),
	}
	bindTickets(base, cfg.Certificates, logger.Named("tickets"))
	cfg.Metrics.useCertificates(cfg.Certificates)
	if len(cfg.RSAKeyExchange) == 0 && len(cfg.ClientAuth) == 0 {
		return base, nil
	}

	patterns := make([]string, len(cfg.RSAKeyExchange))
	for i, p := range cfg.RSAKeyExchange {
		patterns[i] = hostname.Normalize(p)
	}
	policies := make([]ClientAuthPolicy, len(cfg.ClientAuth))
	for i, p := range cfg.ClientAuth {
		p.Pattern = hostname.Normalize(p.Pattern)
		policies[i] = p
	}
	// Every configuration a handshake may get, cloned before
	// GetConfigForClient is set, so the clones have none; WrapSession and
	// UnwrapSession carry over and still use base's keys. configs[0] is
	// without client certificates, configs[i+1] under policies[i]; each
	// holds the plain, RSA key-exchange and RSA-only variants.
	variants := func(c *tls.Config) [3]*tls.Config {
		withRSA := c.Clone()
		withRSA.CipherSuites = CipherSuites(true)
		rsaOnly := withRSA
		if slices.Contains(nextProtos, "h2") {
			rsaOnly = withRSA.Clone()
			rsaOnly.NextProtos = slices.DeleteFunc(slices.Clone(nextProtos), func(p string) bool { return p == "h2" })
		}
		return [3]*tls.Config{c, withRSA, rsaOnly}
	}
	configs := [][3]*tls.Config{variants(base)}
	for _, p := range policies {
		configs = append(configs, variants(p.apply(base)))
	}
	base.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		name := hostname.Normalize(hello.ServerName)
		if hostname.CheckServerName(hello.ServerName) != nil {
			name = ""
		}
		variant := 0
		// Only for a certificate of the name itself: a name the store does
		// not hold gets the default certificate, whose key was not opted in.
		if slices.ContainsFunc(patterns, func(p string) bool { return hostname.Match(p, name) }) && cfg.Certificates.holds(name) {
			variant = 2
			if offersForwardSecrecy(hello) {
				variant = 1
			}
		}
		policy := clientAuthIndex(policies, name)
		if policy < 0 && variant == 0 {
			return nil, nil
		}
		return configs[policy+1][variant], nil
	}
	return base, nil
}

// offersForwardSecrecy reports whether a client can do better than RSA key
// exchange: TLS 1.3 or one of our ECDHE suites. crypto/tls then never picks
// an RSA key-exchange suite.
func offersForwardSecrecy(hello *tls.ClientHelloInfo) bool {
	if slices.Contains(hello.SupportedVersions, tls.VersionTLS13) {
		return true
	}
	return slices.ContainsFunc(hello.CipherSuites, func(s uint16) bool { return slices.Contains(ecdheSuites, s) })
}

// keyGuard returns the guard of MaxKeyOperations and HandshakesPerClient,
// or nil if neither applies.
func (c *ServerConfig) keyGuard() *keyGuard {
	logger := c.Logger
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	g := &keyGuard{metrics: c.Metrics, logger: logger}
	switch n := c.MaxKeyOperations; {
	case n == 0:
		g.slots = &keyOpSlots{max: DefaultMaxKeyOperations, metrics: c.Metrics}
	case n > 0:
		g.slots = &keyOpSlots{max: int64(n), metrics: c.Metrics}
	}
	if c.HandshakesPerClient != 0 {
		burst := c.HandshakeBurst
		if burst == 0 {
			burst = int(math.Ceil(c.HandshakesPerClient))
		}
		g.limit = newHandshakeLimiter(c.HandshakesPerClient, burst, c.Logger)
	}
	if g.slots == nil && g.limit == nil {
		return nil
	}
	return g
}

// getCertificate is certs.GetCertificate that also records the key type of
// the certificate chosen on the connection, for [Metrics], and, with guard
// (nil: none), admits each key operation the handshake makes (see
// keyGuard): only then, and not here, because crypto/tls calls
// GetCertificate before it looks at a TLS 1.2 session ticket, and a
// resumption makes no key operation.
func getCertificate(certs *CertStore, guard *keyGuard) func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
		if oc, ok := hello.Conn.(*observedConn); ok {
			oc.serverName.Store(&hello.ServerName)
		}
		c, err := certs.GetCertificate(hello)
		if unknown := (*UnrecognizedNameError)(nil); errors.As(err, &unknown) {
			// crypto/tls sends unrecognized_name only when neither
			// GetCertificate nor Config.Certificates yields a certificate;
			// any error makes it internal_error.
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		recordKeyType(hello.Conn, c)
		if guard != nil {
			var addr net.Addr
			if hello.Conn != nil {
				addr = hello.Conn.RemoteAddr()
			}
			c.PrivateKey = guard.guard(c.PrivateKey.(crypto.Signer), addr)
		}
		return c, nil
	}
}
