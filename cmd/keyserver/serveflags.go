package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keyless-tls/keyless/internal/config"
	"github.com/keyless-tls/keyless/link"
	"github.com/keyless-tls/keyless/signer"
)

// serveConfig is the effective configuration of keyserver serve: its
// flags, KEYSERVER_* environment variables and -config file, checked by
// parseServe.
type serveConfig struct {
	hsm hsmFlags
	// tickets are the session ticket key settings (tickets.go).
	tickets ticketFlags
	// service holds the service's limits and default quota per identity,
	// straight from their flags; assemble adds the keys, policy, audit
	// trail and logger.
	service signer.Config

	listen           string
	tlsCert          string
	tlsKey           string
	clientCA         string
	clientCRLs       fileList
	handshakeTimeout time.Duration
	maxConns         int
	maxConnsSource   int
	maxConnAge       time.Duration
	maxConnAgeGrace  time.Duration
	linkWindow       int
	policy           string
	certs            string
	auditLog         string
	allowExtractable bool
	healthEvery      time.Duration
	grace            time.Duration
	logLevelName     string
	logLevel         hclog.Level // logLevelName parsed
	logJSON          bool
	metricsListen    string
	metricsRemote    bool
}

// parseServe parses the flags, environment variables (KEYSERVER_*) and
// config file (-config) of keyserver serve, and checks them: the effective
// configuration. It reads no other file. Errors name the flag and the
// problem.
func parseServe(args []string, stderr io.Writer) (*serveConfig, error) {
	var c serveConfig
	fs := flag.NewFlagSet("keyserver serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	c.hsm.register(fs)
	c.tickets.register(fs)
	fs.StringVar(&c.listen, "listen", "127.0.0.1:7443", "address of the gRPC listener")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "PEM certificate chain of the keyserver (required)")
	fs.StringVar(&c.tlsKey, "tls-key", "", "PEM private key of the keyserver's TLS certificate (required)")
	fs.StringVar(&c.clientCA, "client-ca", "", "PEM CA certificates that issue edge client certificates (required)")
	fs.Var(&c.clientCRLs, "client-crl", "PEM or DER CRL of the -client-ca, whose revoked edge certificates are refused and their connections closed; repeat the flag or separate files with commas; re-read on SIGHUP (default: none)")
	fs.DurationVar(&c.handshakeTimeout, "handshake-timeout", link.DefaultHandshakeTimeout, "how long a connection may take to complete its TLS handshake")
	fs.IntVar(&c.maxConns, "max-connections", link.DefaultMaxConnections, "connections open at once, in all; more are closed at once (0: no bound)")
	fs.IntVar(&c.maxConnsSource, "max-connections-per-source", link.DefaultMaxConnectionsPerSource, "connections open at once from one IP address; an edge opens two per keyserver, one for its calls and one to watch its health (0: no bound)")
	fs.DurationVar(&c.maxConnAge, "max-connection-age", time.Hour, "how long an edge's connection may live; the edge then reconnects, with the credentials and CRLs of the moment (0: forever)")
	fs.DurationVar(&c.maxConnAgeGrace, "max-connection-age-grace", time.Minute, "how long a connection past -max-connection-age may finish its calls; edges move their streams within 30 s")
	fs.IntVar(&c.linkWindow, "link-window", link.DefaultWindowSize, "HTTP/2 flow-control window of each edge connection, in bytes: a link carries at most this much per round trip each way, and an edge may make the keyserver buffer this much per connection (64 KiB to 64 MiB; docs/DEPLOY.md)")
	fs.StringVar(&c.policy, "policy", "", "YAML policy file: which edge identities may use which keys, operations and schemes; everything else is denied (required)")
	fs.StringVar(&c.certs, "certs", "", "directory of PEM certificates (public, no keys) whose DNS names the policy's cert: patterns match against their keys (default: none, cert: patterns match nothing)")
	fs.StringVar(&c.auditLog, "audit-log", "-", `file the audit trail is appended to, one JSON line per request; "-" is standard error`)
	fs.IntVar(&c.service.MaxConcurrent, "max-concurrent", 4, "key operations running in the HSM at once; more wait in a queue")
	fs.IntVar(&c.service.MaxQueued, "max-queued", 1024, "key operations waiting for the HSM before new ones are refused")
	fs.IntVar(&c.service.Quota.MaxInFlight, "max-inflight-per-identity", 256, "requests one edge identity may have in flight at once, unless a quota of the policy names it (0: no bound)")
	fs.IntVar(&c.service.MaxStreamsPerIdentity, "max-streams-per-identity", link.MaxStreamsPerConnection, "Stream calls one edge identity may have open at once over all its connections; an edge opens one to four (0: no bound)")
	fs.Float64Var(&c.service.Quota.Rate, "rate-per-identity", 0, "requests per second one edge identity may make, unless a quota of the policy names it (0: no bound)")
	fs.IntVar(&c.service.Quota.Burst, "burst-per-identity", 0, "burst above -rate-per-identity (0: the rate, rounded up)")
	fs.BoolVar(&c.allowExtractable, "allow-extractable", false, "DANGEROUS: also serve private keys that are extractable or not sensitive, which the token would let anyone with the PIN copy out")
	fs.DurationVar(&c.healthEvery, "health-interval", 2*time.Second, "how often the HSM's health is checked")
	fs.DurationVar(&c.grace, "grace", 10*time.Second, "on shutdown, how long in-flight operations may take to finish")
	fs.StringVar(&c.logLevelName, "log-level", "info", "log level: trace, debug, info, warn or error")
	fs.BoolVar(&c.logJSON, "log-json", false, "log as JSON lines")
	fs.StringVar(&c.metricsListen, "metrics-listen", "", "address of the operations listener (/metrics, /healthz, /readyz), e.g. 127.0.0.1:9443 (default: none, off)")
	fs.BoolVar(&c.metricsRemote, "metrics-allow-remote", false, "let -metrics-listen be a non-loopback address")
	if err := config.Parse(fs, args, "KEYSERVER"); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("serve: unexpected arguments %q", fs.Args())
	}
	if err := c.hsm.resolveURI(fs); err != nil {
		return nil, fmt.Errorf("serve: %w", err)
	}
	if err := c.check(); err != nil {
		return nil, fmt.Errorf("serve: %w", err)
	}
	return &c, nil
}

// check checks the settings that need no file or HSM, and parses the log
// level: errors name the flag and the value's problem. The service's
// settings are checked here, before anything is opened, under their flag
// names; signer.NewService checks them again for its other callers.
// limitFlags names the flag of each signer.Config limit that serve sets.
var limitFlags = map[string]string{
	"Config.MaxConcurrent":         "-max-concurrent",
	"Config.MaxQueued":             "-max-queued",
	"Config.MaxStreamsPerIdentity": "-max-streams-per-identity",
	"Config.Quota.MaxInFlight":     "-max-inflight-per-identity",
	"Config.Quota.Rate":            "-rate-per-identity",
	"Config.Quota.Burst":           "-burst-per-identity",
}

func (c *serveConfig) check() error {
	if c.logLevel = hclog.LevelFromString(c.logLevelName); c.logLevel == hclog.NoLevel {
		return fmt.Errorf("-log-level %q: want trace, debug, info, warn or error", c.logLevelName)
	}
	for _, req := range []struct{ name, value, why string }{
		{"-tls-cert", c.tlsCert, ""},
		{"-tls-key", c.tlsKey, ""},
		{"-client-ca", c.clientCA, ""},
		{"-policy", c.policy, ": the keyserver denies everything a policy does not allow, so without one it would refuse every request"},
	} {
		if req.value == "" {
			return fmt.Errorf("%s is required%s", req.name, req.why)
		}
	}
	if _, _, err := net.SplitHostPort(c.listen); err != nil {
		return fmt.Errorf("-listen %q: want host:port: %w", c.listen, err)
	}
	if c.metricsListen != "" {
		if _, _, err := net.SplitHostPort(c.metricsListen); err != nil {
			return fmt.Errorf("-metrics-listen %q: want host:port: %w", c.metricsListen, err)
		}
	}
	switch {
	case c.handshakeTimeout <= 0:
		return fmt.Errorf("-handshake-timeout %v: must be positive", c.handshakeTimeout)
	case c.maxConns < 0:
		return fmt.Errorf("-max-connections %d: must be 0 (no bound) or more", c.maxConns)
	case c.maxConnsSource < 0:
		return fmt.Errorf("-max-connections-per-source %d: must be 0 (no bound) or more", c.maxConnsSource)
	case c.maxConnAge < 0:
		return fmt.Errorf("-max-connection-age %v: must be 0 (forever) or positive", c.maxConnAge)
	case c.maxConnAgeGrace < 0:
		return fmt.Errorf("-max-connection-age-grace %v: must not be negative", c.maxConnAgeGrace)
	case c.healthEvery <= 0:
		return fmt.Errorf("-health-interval %v: must be positive", c.healthEvery)
	case c.grace < 0:
		return fmt.Errorf("-grace %v: must not be negative", c.grace)
	case link.ValidateWindowSize(c.linkWindow) != nil:
		return fmt.Errorf("-link-window %d: must be between %d (64 KiB) and %d (64 MiB) bytes", c.linkWindow, link.MinWindowSize, link.MaxWindowSize)
	}
	if err := c.tickets.check(); err != nil {
		return err
	}
	if err := c.service.ValidateLimits(); err != nil {
		var ce *signer.ConfigError
		if errors.As(err, &ce) && limitFlags[ce.Field] != "" {
			return fmt.Errorf("%s %v: must be %s", limitFlags[ce.Field], ce.Value, ce.Want)
		}
		return err
	}
	return c.hsm.validate()
}

// fileList is a flag of file names that may be repeated, each value a
// comma-separated list.
type fileList []string

func (l *fileList) String() string { return strings.Join(*l, ",") }

func (l *fileList) Set(v string) error {
	for _, f := range strings.Split(v, ",") {
		if f = strings.TrimSpace(f); f == "" {
			return fmt.Errorf("empty file name in %q", v)
		}
		*l = append(*l, f)
	}
	return nil
}
