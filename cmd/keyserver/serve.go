package main

import (
	"context"
	"crypto"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/internal/opsserver"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
	"github.com/keyless-tls/keyless/signer"
)

type serveFlags struct {
	hsm              hsmFlags
	listen           string
	tlsCert          string
	tlsKey           string
	clientCA         string
	policy           string
	certs            string
	auditLog         string
	maxConcurrent    int
	maxQueued        int
	maxInFlight      int
	maxStreams       int
	ratePerIdentity  float64
	burstPerIdentity int
	allowExtractable bool
	healthEvery      time.Duration
	grace            time.Duration
	logLevel         string
	logJSON          bool
	metricsListen    string
	metricsRemote    bool
}

// parseServe parses the flags, environment variables (KEYSERVER_*) and
// config file (-config) of keyserver serve, and validates them: the
// effective configuration. Errors name the flag and the problem.
func parseServe(args []string, stderr io.Writer) (*serveFlags, error) {
	var f serveFlags
	fs := flag.NewFlagSet("keyserver serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	f.hsm.register(fs)
	fs.StringVar(&f.listen, "listen", "127.0.0.1:7443", "address of the gRPC listener")
	fs.StringVar(&f.tlsCert, "tls-cert", "", "PEM certificate chain of the keyserver (required)")
	fs.StringVar(&f.tlsKey, "tls-key", "", "PEM private key of the keyserver's TLS certificate (required)")
	fs.StringVar(&f.clientCA, "client-ca", "", "PEM CA certificates that issue edge client certificates (required)")
	fs.StringVar(&f.policy, "policy", "", "YAML policy file: which edge identities may use which keys, operations and schemes; everything else is denied (required)")
	fs.StringVar(&f.certs, "certs", "", "directory of PEM certificates (public, no keys) whose DNS names the policy's cert: patterns match against their keys (default: none, cert: patterns match nothing)")
	fs.StringVar(&f.auditLog, "audit-log", "-", `file the audit trail is appended to, one JSON line per request; "-" is standard error`)
	fs.IntVar(&f.maxConcurrent, "max-concurrent", 4, "key operations running in the HSM at once; more wait in a queue")
	fs.IntVar(&f.maxQueued, "max-queued", 1024, "key operations waiting for the HSM before new ones are refused")
	fs.IntVar(&f.maxInFlight, "max-inflight-per-identity", 256, "requests one edge identity may have in flight at once, unless a quota of the policy names it (0: no bound)")
	fs.IntVar(&f.maxStreams, "max-streams-per-identity", link.MaxStreamsPerConnection, "Stream calls one edge identity may have open at once over all its connections; an edge opens one to four (0: no bound)")
	fs.Float64Var(&f.ratePerIdentity, "rate-per-identity", 0, "requests per second one edge identity may make, unless a quota of the policy names it (0: no bound)")
	fs.IntVar(&f.burstPerIdentity, "burst-per-identity", 0, "burst above -rate-per-identity (0: the rate, rounded up)")
	fs.BoolVar(&f.allowExtractable, "allow-extractable", false, "DANGEROUS: also serve private keys that are extractable or not sensitive, which the token would let anyone with the PIN copy out")
	fs.DurationVar(&f.healthEvery, "health-interval", 2*time.Second, "how often the HSM's health is checked")
	fs.DurationVar(&f.grace, "grace", 10*time.Second, "on shutdown, how long in-flight operations may take to finish")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: trace, debug, info, warn or error")
	fs.BoolVar(&f.logJSON, "log-json", false, "log as JSON lines")
	fs.StringVar(&f.metricsListen, "metrics-listen", "", "address of the operations listener (/metrics, /healthz, /readyz), e.g. 127.0.0.1:9443 (default: none, off)")
	fs.BoolVar(&f.metricsRemote, "metrics-allow-remote", false, "let -metrics-listen be a non-loopback address")
	if err := parseConfig(fs, args, "KEYSERVER"); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("serve: unexpected arguments %q", fs.Args())
	}
	if err := f.hsm.resolveURI(fs); err != nil {
		return nil, fmt.Errorf("serve: %w", err)
	}
	if err := f.validate(); err != nil {
		return nil, fmt.Errorf("serve: %w", err)
	}
	return &f, nil
}

// validate checks the flags that need no file or HSM: errors name the
// flag and the value's problem.
func (f *serveFlags) validate() error {
	if hclog.LevelFromString(f.logLevel) == hclog.NoLevel {
		return fmt.Errorf("-log-level %q: want trace, debug, info, warn or error", f.logLevel)
	}
	for _, req := range []struct{ name, value, why string }{
		{"-tls-cert", f.tlsCert, ""},
		{"-tls-key", f.tlsKey, ""},
		{"-client-ca", f.clientCA, ""},
		{"-policy", f.policy, ": the keyserver denies everything a policy does not allow, so without one it would refuse every request"},
	} {
		if req.value == "" {
			return fmt.Errorf("%s is required%s", req.name, req.why)
		}
	}
	if _, _, err := net.SplitHostPort(f.listen); err != nil {
		return fmt.Errorf("-listen %q: want host:port: %w", f.listen, err)
	}
	if f.metricsListen != "" {
		if _, _, err := net.SplitHostPort(f.metricsListen); err != nil {
			return fmt.Errorf("-metrics-listen %q: want host:port: %w", f.metricsListen, err)
		}
	}
	switch {
	case f.maxConcurrent < 0:
		return fmt.Errorf("-max-concurrent %d: must be 0 (no bound) or more", f.maxConcurrent)
	case f.maxQueued < 0:
		return fmt.Errorf("-max-queued %d: must be 0 or more", f.maxQueued)
	case f.maxStreams < 0:
		return fmt.Errorf("-max-streams-per-identity %d: must be 0 (no bound) or more", f.maxStreams)
	case f.healthEvery <= 0:
		return fmt.Errorf("-health-interval %v: must be positive", f.healthEvery)
	case f.grace < 0:
		return fmt.Errorf("-grace %v: must not be negative", f.grace)
	}
	quota := signer.Quota{MaxInFlight: f.maxInFlight, Rate: f.ratePerIdentity, Burst: f.burstPerIdentity}
	if err := quota.Validate(); err != nil {
		return fmt.Errorf("-max-inflight-per-identity, -rate-per-identity, -burst-per-identity: %w", err)
	}
	return f.hsm.validate()
}

func serve(ctx context.Context, args []string, stderr io.Writer) error {
	f, err := parseServe(args, stderr)
	if err != nil {
		return err
	}
	logger, err := newLogger("keyserver", f.logLevel, f.logJSON, stderr)
	if err != nil {
		return err
	}
	quota := signer.Quota{MaxInFlight: f.maxInFlight, Rate: f.ratePerIdentity, Burst: f.burstPerIdentity}
	// Read everything that can be wrong before opening the HSM.
	policy, err := loadPolicy(f.policy, f.certs)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	if err := link.CheckKeyFileMode(f.tlsKey); err != nil {
		logger.Warn("-tls-key is readable by others", "error", err)
	}
	creds, err := link.LoadMTLSCredentials(f.tlsCert, f.tlsKey, f.clientCA)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	audit, err := openAuditLog(f.auditLog, stderr)
	if err != nil {
		return fmt.Errorf("serve: -audit-log: %w", err)
	}
	defer audit.Close()

	hcfg, err := f.hsm.config(logger)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	if f.allowExtractable {
		hcfg.AllowExtractable = true
		logger.Warn("*** -allow-extractable is set: the keyserver serves private keys that are extractable or not sensitive. " +
			"Anyone with the token's PIN can copy such keys out of the HSM, so they are not protected by it. " +
			"Use this only to migrate: generate new keys inside the token (keyserver keys generate) and remove the flag. ***")
	}
	module, err := hsm.Open(hcfg)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	defer module.Close()
	// With -token-uri naming keys (object=, id=), only those are served.
	store := newKeyStore(module, f.hsm.uri)

	// The metrics see every request through the auditor, after the audit
	// log; they need the policy in force, so they reach the service
	// through svc, set below.
	reg := opsserver.NewRegistry()
	var svc *signer.Service
	metrics := signer.NewMetrics(reg, func() *signer.Policy { return svc.Policy() })
	svc, err = signer.NewService(signer.Config{
		Keys:                  store,
		Policy:                policy,
		Quota:                 quota,
		Audit:                 signer.MultiAuditor(signer.NewAuditLog(audit), metrics),
		MaxConcurrent:         f.maxConcurrent,
		MaxQueued:             f.maxQueued,
		MaxStreamsPerIdentity: f.maxStreams,
		Logger:                logger.Named("signer"),
	})
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	gs := grpc.NewServer(append(link.ServerOptions(),
		grpc.Creds(creds.ServerCredentials(svc.CheckPeer, logger.Named("mtls"), link.HandshakeObserver{Refused: metrics.HandshakeRefused})),
		grpc.StatsHandler(svc.StatsHandler()),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		// Reuse a goroutine per CPU for requests instead of starting one
		// (and growing its stack) for each: -12 % CPU per Sign at
		// concurrency 1 in signer's BenchmarkServiceSign, the same at 4
		// (when every worker is busy, gRPC starts a goroutine as before).
		grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0))),
	)...)
	svc.RegisterQueueMetrics(reg)
	registerSessionMetrics(reg, module)
	keylessv1.RegisterKeylessServiceServer(gs, svc)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)

	ln, err := net.Listen("tcp", f.listen)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	keys, err := store.Keys(ctx)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	if f.hsm.uri != nil && f.hsm.uri.SelectsKeys() {
		logServedKeys(logger, f.hsm.uri, keys)
	}
	lintPolicy(logger, policy, keys)
	metrics.SetKeys(keys)
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	hsmHealth := &healthState{}
	hsmHealth.set(errors.New("not checked yet"))
	go signer.WatchHealthFunc(watchCtx, store, f.healthEvery, func(err error) {
		signer.SetHealth(hs, err)
		metrics.SetHSMUp(err)
		hsmHealth.set(err)
	})
	metricsAddr := "off"
	if f.metricsListen != "" {
		mln, err := opsserver.Listen(f.metricsListen, f.metricsRemote)
		if err != nil {
			return fmt.Errorf("serve: -metrics-listen: %w", err)
		}
		metricsAddr = mln.Addr().String()
		ready := func(ctx context.Context) error {
			if err := hsmHealth.get(); err != nil {
				return fmt.Errorf("HSM: %w", err)
			}
			keys, err := store.Keys(ctx)
			if err != nil {
				return fmt.Errorf("keys: %w", err)
			}
			if len(keys) == 0 {
				return errors.New("no keys loaded")
			}
			return nil
		}
		go opsserver.Serve(watchCtx, mln, reg, ready, logger.Named("metrics"))
	}

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	logger.Info("keyserver ready", "listen", ln.Addr().String(), "metrics", metricsAddr, "module", hcfg.ModulePath,
		"token_label", hcfg.TokenLabel, "token_serial", hcfg.TokenSerial, "token_uri", tokenURIForLog(f.hsm.uri), "health_interval", f.healthEvery,
		"keys", len(keys), "policy", policy.String(), "audit_log", f.auditLog,
		"max_concurrent", f.maxConcurrent, "max_queued", f.maxQueued, "max_inflight_per_identity", f.maxInFlight, "max_streams_per_identity", f.maxStreams,
		"allow_extractable", f.allowExtractable)
	errc := make(chan error, 1)
	go func() { errc <- gs.Serve(ln) }()
	for done := false; !done; {
		select {
		case err := <-errc:
			return fmt.Errorf("serve: %w", err)
		case <-ctx.Done():
			done = true
		case <-hup:
			reload(ctx, logger, f, svc, store, creds, audit)
			if keys, err := store.Keys(ctx); err == nil {
				metrics.SetKeys(keys)
			}
		}
	}
	logger.Info("shutting down: finishing in-flight operations", "grace", f.grace)
	hs.Shutdown()
	// Streams are long-lived: ask them to end once their started
	// operations are answered, so that GracefulStop does not wait for the
	// grace period, and edges send the rest to another keyserver.
	svc.Drain()
	stopped := make(chan struct{})
	go func() { gs.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(f.grace):
		logger.Warn("grace period over: closing remaining connections")
		gs.Stop()
	}
	if err := <-errc; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("serve: %w", err)
	}
	logger.Info("stopped")
	return nil
}

// reload is SIGHUP: it reads the policy, the certificates and the mTLS
// files again and reopens the audit log (for log rotation). Each part that
// fails keeps its previous state, with an error in the log.
func reload(ctx context.Context, logger hclog.Logger, f *serveFlags, svc *signer.Service, store signer.KeyStore, creds *link.MTLSCredentials, audit *auditFile) {
	logger.Info("SIGHUP: reloading the policy, certificates and mTLS credentials, and reopening the audit log")
	if err := audit.Reopen(); err != nil {
		logger.Error("SIGHUP: reopening the audit log failed", "error", err)
	}
	if err := creds.Reload(); err != nil {
		logger.Error("mTLS credentials not reloaded; the previous ones stay in use", "error", err)
	}
	policy, err := loadPolicy(f.policy, f.certs)
	if err != nil {
		logger.Error("policy not reloaded; the previous one stays in force", "error", err)
		return
	}
	if err := svc.SetPolicy(policy); err != nil {
		logger.Error("policy not reloaded", "error", err)
		return
	}
	if keys, err := store.Keys(ctx); err == nil {
		lintPolicy(logger, policy, keys)
	}
	logger.Info("policy reloaded", "policy", policy.String())
}

// loadPolicy reads the policy file and, if certsDir is set, the
// certificates whose names cert: patterns match.
func loadPolicy(path, certsDir string) (*signer.Policy, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("-policy: %w", err)
	}
	policy, err := signer.ParsePolicy(path, data)
	if err != nil {
		return nil, err
	}
	if certsDir == "" {
		return policy, nil
	}
	files, err := certificateFiles(certsDir)
	if err != nil {
		return nil, fmt.Errorf("-certs: %w", err)
	}
	return policy.WithCertificateFiles(files), nil
}

func lintPolicy(logger hclog.Logger, policy *signer.Policy, keys []crypto.Signer) {
	for _, w := range policy.Lint(keys) {
		logger.Warn(w)
	}
	logger.Info("policy allow-list", "identities", strings.Join(policy.Identities(), ","))
}

// healthState is the result of the last health check of the HSM, for
// /readyz. It is safe for concurrent use.
type healthState struct {
	mu  sync.Mutex
	err error
}

func (h *healthState) set(err error) { h.mu.Lock(); h.err = err; h.mu.Unlock() }

func (h *healthState) get() error { h.mu.Lock(); defer h.mu.Unlock(); return h.err }

// logServedKeys logs which keys -token-uri selects, one line each, and
// warns when it selects none.
func logServedKeys(logger hclog.Logger, uri *hsm.URI, keys []crypto.Signer) {
	if len(keys) == 0 {
		logger.Warn("-token-uri selects no key on the token: nothing can be served until one is added", "token_uri", uri.String())
		return
	}
	for _, k := range keys {
		d, err := signer.Describe(k)
		if err != nil {
			continue
		}
		logger.Info("serving key selected by -token-uri", "key_id", fmt.Sprintf("%x", d.GetKeyId()), "label", d.GetLabel(),
			"object_id", fmt.Sprintf("%x", d.GetObjectId()), "type", d.GetType().String())
	}
}

// tokenURIForLog is the URI for the startup line, or "" without one.
func tokenURIForLog(uri *hsm.URI) string {
	if uri == nil {
		return ""
	}
	return uri.String()
}
