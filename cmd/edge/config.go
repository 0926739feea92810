package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keyless-tls/keyless/internal/config"
	"github.com/keyless-tls/keyless/link"
	"github.com/keyless-tls/keyless/tlscore"
)

// flags is the edge's effective configuration.
type flags struct {
	listen         string
	certs          string
	defaultCert    string
	rsaKeyExchange string
	origin         string
	tcpOrigin      string
	tcpIdle        time.Duration
	handshakeRate  float64
	ticketKeys     string
	handshakeBurst int
	maxKeyOps      int
	keyservers     string
	keyserverName  string
	keyserverCA    string
	tlsCert        string
	tlsKey         string
	callTimeout    time.Duration
	keepalive      time.Duration
	linkWindow     int
	reconnect      time.Duration
	grace          time.Duration
	drainDelay     time.Duration
	logLevel       string
	logJSON        bool
	metricsListen  string
	metricsRemote  bool
	proxy          proxyFlags     // routes.go
	accessLog      accessLogFlags // observe.go

	// Certificates as production serves them (docs/DEPLOY.md).
	requireAllCerts bool
	ocspStapling    bool
	clientAuth      string
	// Derived by parse: the policies of -client-auth, CA files read.
	clientAuthPolicies []tlscore.ClientAuthPolicy

	// Session ticket keys from the keyserver (tickets.go), without -ticket-keys.
	ticketKeysFromKeyserver bool

	// Derived from the above by parse.
	level         hclog.Level
	originURL     *url.URL
	keyserverList []string
	serverName    string // of the keyservers' certificates
}

// parse reads the edge's settings from args, EDGE_* environment variables
// and a YAML -config file (see [config.Parse]) and checks them. Every
// error names the flag of the bad setting.
func parse(args []string, stderr io.Writer) (*flags, error) {
	var f flags
	fs := flag.NewFlagSet("edge", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.listen, "listen", "127.0.0.1:8443", "address to accept TLS connections on")
	fs.StringVar(&f.certs, "certs", "", "directory of PEM certificate chains, one per file (required)")
	fs.StringVar(&f.defaultCert, "default-cert", "", "certificate for clients without a known server name: a file name in -certs or a host name (default: none, such handshakes fail)")
	fs.StringVar(&f.rsaKeyExchange, "rsa-key-exchange", "", "comma-separated host names (or *.wildcards) for which TLS 1.2 RSA key exchange is enabled (default: none)")
	fs.StringVar(&f.origin, "origin", "", "HTTP origin URL to reverse-proxy to, e.g. http://127.0.0.1:8080; with routes in -config, the origin of host names they do not name")
	fs.StringVar(&f.tcpOrigin, "tcp-origin", "", "raw TCP origin host:port, instead of -origin, for non-HTTP protocols")
	fs.DurationVar(&f.tcpIdle, "tcp-idle-timeout", tlscore.DefaultTCPIdleTimeout, "with -tcp-origin: close a connection on which nothing moved in either direction this long, or whose client or origin takes nothing for as long (0: never); protocols quiet for longer need more")
	fs.Float64Var(&f.handshakeRate, "handshakes-per-client", tlscore.DefaultHandshakesPerClient, "full TLS handshakes (each a keyserver operation; resumptions are free) one client, an IPv4 address or IPv6 /56, may make per second; more are refused before any key operation (0: no limit, for an edge behind a proxy that hides client addresses)")
	fs.IntVar(&f.handshakeBurst, "handshake-burst", tlscore.DefaultHandshakeBurst, "burst above -handshakes-per-client (0: the rate, rounded up)")
	fs.IntVar(&f.maxKeyOps, "max-key-operations", tlscore.DefaultMaxKeyOperations, "key operations (one per full handshake) in flight at once; a handshake beyond them is refused at once, without queueing (0: no bound)")
	fs.StringVar(&f.ticketKeys, "ticket-keys", "", "file of TLS session ticket keys, one per line as 64 hex digits, the first for new tickets (mode 0600); edges sharing it resume each other's sessions; reread on SIGHUP (default: keys of this process, rotated daily)")
	fs.BoolVar(&f.ticketKeysFromKeyserver, "ticket-keys-from-keyserver", true, "without -ticket-keys, take the session ticket keys from the keyserver, shared by the edges of a policy rule with operations: [tickets] and rotated on the keyserver's schedule; kept in memory only, and kept through a keyserver outage (until the keyserver grants them, and with false, the edge's own keys are used)")
	fs.StringVar(&f.keyservers, "keyserver", "", "comma-separated keyserver addresses host:port, or one dns:///host:port for every address the name resolves to (required)")
	fs.StringVar(&f.keyserverName, "keyserver-name", "", "name the keyservers' certificates are verified against (default: the host of a single -keyserver)")
	fs.StringVar(&f.keyserverCA, "keyserver-ca", "", "PEM CA certificates that issue the keyservers' certificates (required)")
	fs.StringVar(&f.tlsCert, "tls-cert", "", "PEM client certificate of this edge for the keyserver link (required)")
	fs.StringVar(&f.tlsKey, "tls-key", "", "PEM private key of -tls-cert (required)")
	fs.DurationVar(&f.callTimeout, "call-timeout", tlscore.DefaultCallTimeout, "deadline of each keyserver call, raised to 4 × the farthest keyserver's measured round trip; a handshake whose key operation takes longer fails")
	fs.DurationVar(&f.keepalive, "keepalive", 15*time.Second, "ping a keyserver connection idle this long (at least 10s; 0 turns pings off), and drop it when no answer comes within -call-timeout or 2s, whichever is longer")
	fs.IntVar(&f.linkWindow, "link-window", link.DefaultWindowSize, "HTTP/2 flow-control window of each keyserver connection, in bytes: the link carries at most this much per round trip each way (64 KiB to 64 MiB; docs/DEPLOY.md)")
	fs.DurationVar(&f.reconnect, "reconnect-backoff", tlscore.DefaultReconnectBackoff, "longest wait between attempts to reconnect to a keyserver that is down")
	fs.DurationVar(&f.grace, "grace", 10*time.Second, "on shutdown, how long in-flight requests may take to finish")
	fs.DurationVar(&f.drainDelay, "drain-delay", 0, "on shutdown, how long to keep accepting connections while /readyz reports not ready, before -grace starts (give a load balancer's health check time to notice)")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: trace, debug, info, warn or error")
	fs.BoolVar(&f.logJSON, "log-json", false, "log as JSON lines")
	fs.StringVar(&f.metricsListen, "metrics-listen", "", "address of the operations listener (/metrics, /healthz, /readyz), e.g. 127.0.0.1:9444 (default: none, off)")
	fs.BoolVar(&f.metricsRemote, "metrics-allow-remote", false, "let -metrics-listen be a non-loopback address")
	f.proxy.define(fs)
	f.accessLog.register(fs)
	fs.BoolVar(&f.requireAllCerts, "require-all-certs", false, "refuse to start, or to reload, if any certificate file cannot be served (broken, or its key missing from the keyserver); by default such a file is skipped with an error naming it")
	fs.BoolVar(&f.ocspStapling, "ocsp-stapling", true, "staple verified OCSP responses: fetched from each certificate's OCSP responder (its file must hold the issuer) and read from NAME.ocsp beside NAME.pem")
	fs.StringVar(&f.clientAuth, "client-auth", "", "client certificates per server name, comma-separated NAME=MODE:CAFILE items, NAME a host name or *.wildcard, MODE request or require, CAFILE the PEM CAs that issue them; the verified subject goes to the origin in "+tlscore.HeaderClientSubject)
	if err := config.Parse(fs, args, "EDGE", routesSection); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	for _, req := range []struct{ name, value string }{
		{"-certs", f.certs}, {"-keyserver", f.keyservers}, {"-keyserver-ca", f.keyserverCA},
		{"-tls-cert", f.tlsCert}, {"-tls-key", f.tlsKey},
	} {
		if req.value == "" {
			return nil, fmt.Errorf("%s is required", req.name)
		}
	}
	if _, _, err := net.SplitHostPort(f.listen); err != nil {
		return nil, fmt.Errorf("-listen %q: want host:port: %w", f.listen, err)
	}
	if r := f.handshakeRate; r != 0 && !(r >= tlscore.MinHandshakeRate && r <= tlscore.MaxHandshakeRate) {
		return nil, fmt.Errorf("-handshakes-per-client %v: must be 0 (no limit) or from %v to %v", r, tlscore.MinHandshakeRate, tlscore.MaxHandshakeRate)
	}
	if f.handshakeBurst < 0 || f.handshakeBurst > tlscore.MaxHandshakeRate {
		return nil, fmt.Errorf("-handshake-burst %d: must be from 0 (the rate) to %v", f.handshakeBurst, tlscore.MaxHandshakeRate)
	}
	if f.maxKeyOps < 0 || f.maxKeyOps > tlscore.MaxKeyOperationsLimit {
		return nil, fmt.Errorf("-max-key-operations %d: must be 0 (no bound) or from 1 to %d", f.maxKeyOps, tlscore.MaxKeyOperationsLimit)
	}
	if err := f.proxy.check(fs, f.tcpOrigin != ""); err != nil {
		return nil, err
	}
	if http := f.origin != "" || len(f.proxy.routes) > 0; http == (f.tcpOrigin != "") {
		return nil, errors.New("set exactly one of -origin or routes in -config (HTTP), and -tcp-origin (raw TCP)")
	}
	if f.origin != "" {
		u, err := tlscore.ParseOrigin(f.origin)
		if err != nil {
			return nil, fmt.Errorf("-origin %w", err)
		}
		f.originURL = u
	}
	if f.tcpOrigin != "" {
		if _, _, err := net.SplitHostPort(f.tcpOrigin); err != nil {
			return nil, fmt.Errorf("-tcp-origin %q: want host:port: %w", f.tcpOrigin, err)
		}
		if f.tcpIdle < 0 {
			return nil, fmt.Errorf("-tcp-idle-timeout %v: must be 0 (none) or more", f.tcpIdle)
		}
	}
	f.keyserverList = splitList(f.keyservers)
	for _, k := range f.keyserverList {
		hostport, isDNS := strings.CutPrefix(k, "dns:///")
		if isDNS && len(f.keyserverList) > 1 {
			return nil, fmt.Errorf("-keyserver %q: a dns:/// name must be the only keyserver address", k)
		}
		if _, _, err := net.SplitHostPort(hostport); err != nil {
			return nil, fmt.Errorf("-keyserver %q: %w", k, err)
		}
	}
	f.serverName = f.keyserverName
	if f.serverName == "" {
		if len(f.keyserverList) != 1 {
			return nil, errors.New("-keyserver-name is required with several keyservers")
		}
		f.serverName, _, _ = net.SplitHostPort(strings.TrimPrefix(f.keyserverList[0], "dns:///"))
	}
	if f.callTimeout <= 0 {
		return nil, fmt.Errorf("-call-timeout %v: must be positive", f.callTimeout)
	}
	if f.keepalive != 0 && f.keepalive < 10*time.Second {
		return nil, fmt.Errorf("-keepalive %v: must be 0 or at least 10s (gRPC's minimum, and the keyserver's)", f.keepalive)
	}
	if err := link.ValidateWindowSize(f.linkWindow); err != nil {
		return nil, fmt.Errorf("-link-window %d: must be between %d (64 KiB) and %d (64 MiB) bytes", f.linkWindow, link.MinWindowSize, link.MaxWindowSize)
	}
	if f.reconnect <= 0 {
		return nil, fmt.Errorf("-reconnect-backoff %v: must be positive", f.reconnect)
	}
	if f.drainDelay < 0 {
		return nil, fmt.Errorf("-drain-delay %v: must be zero or more", f.drainDelay)
	}
	if f.grace < 0 {
		return nil, fmt.Errorf("-grace %v: must be zero or more", f.grace)
	}
	if f.level = hclog.LevelFromString(f.logLevel); f.level == hclog.NoLevel {
		return nil, fmt.Errorf("-log-level %q: want trace, debug, info, warn or error", f.logLevel)
	}
	policies, err := tlscore.ParseClientAuth(f.clientAuth)
	if err != nil {
		return nil, fmt.Errorf("-client-auth %w", err)
	}
	f.clientAuthPolicies = policies
	if f.metricsListen != "" {
		if _, _, err := net.SplitHostPort(f.metricsListen); err != nil {
			return nil, fmt.Errorf("-metrics-listen %q: want host:port: %w", f.metricsListen, err)
		}
	}
	if err := f.accessLog.check(); err != nil {
		return nil, err
	}
	return &f, nil
}
