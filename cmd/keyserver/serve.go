package main

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
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

// serve runs keyserver serve: it parses the settings, assembles the
// keyserver from them and runs it until ctx is done.
func serve(ctx context.Context, args []string, stderr io.Writer) error {
	c, err := parseServe(args, stderr)
	if err != nil {
		return err
	}
	ks, err := assemble(ctx, c, stderr)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	defer ks.close()
	if err := ks.run(ctx); err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	return nil
}

// keyserver is every part of a keyserver, built by assemble from a
// serveConfig, with its listeners open: ready to run.
type keyserver struct {
	cfg     *serveConfig
	logger  hclog.Logger
	audit   *auditFile
	creds   *link.MTLSCredentials
	module  *hsm.Module
	store   signer.KeyStore // the module's keys, as -token-uri selects them
	svc     *signer.Service
	metrics *signer.Metrics
	reg     *prometheus.Registry
	grpc    *grpc.Server
	health  *health.Server
	ln      *link.Listener
	opsLn   net.Listener // -metrics-listen; nil without it
	// linkMetrics count what happens to the edges' connections.
	linkMetrics *linkMetrics
	// tokenLog describes the module and token for the startup line.
	tokenLog []any
	// keys is how many keys the store served at startup.
	keys int
}

// assemble builds the keyserver c describes and opens its listeners. It
// reads every file that can be wrong (policy, certificates, mTLS
// credentials, audit log, PIN) before it opens the HSM. On error, whatever
// it opened is closed again.
func assemble(ctx context.Context, c *serveConfig, stderr io.Writer) (_ *keyserver, err error) {
	ks := &keyserver{
		cfg:    c,
		logger: hclog.New(&hclog.LoggerOptions{Name: "keyserver", Level: c.logLevel, JSONFormat: c.logJSON, Output: stderr}),
		reg:    opsserver.NewRegistry(),
	}
	ks.linkMetrics = newLinkMetrics(ks.reg, ks.expiredCRLs)
	defer func() {
		if err != nil {
			ks.closeListeners()
			ks.close()
		}
	}()
	policy, err := loadPolicy(c.policy, c.certs)
	if err != nil {
		return nil, err
	}
	if err := link.CheckKeyFileMode(c.tlsKey); err != nil {
		ks.logger.Warn("-tls-key is readable by others", "error", err)
	}
	if ks.creds, err = link.LoadMTLSCredentials(c.tlsCert, c.tlsKey, c.clientCA); err != nil {
		return nil, err
	}
	if len(c.clientCRLs) > 0 {
		if err := ks.creds.SetClientCRLs(c.clientCRLs...); err != nil {
			return nil, fmt.Errorf("-client-crl: %w", err)
		}
		ks.warnExpiredCRLs()
	}
	if ks.audit, err = openAuditLog(c.auditLog, stderr); err != nil {
		return nil, fmt.Errorf("-audit-log: %w", err)
	}
	if c.service.Tickets, err = c.tickets.load(ks.logger, policy); err != nil {
		return nil, err
	}

	hcfg, err := c.hsm.config(ks.logger)
	if err != nil {
		return nil, err
	}
	if c.allowExtractable {
		hcfg.AllowExtractable = true
		ks.logger.Warn("*** -allow-extractable is set: the keyserver serves private keys that are extractable or not sensitive. " +
			"Anyone with the token's PIN can copy such keys out of the HSM, so they are not protected by it. " +
			"Use this only to migrate: generate new keys inside the token (keyserver keys generate) and remove the flag. ***")
	}
	ks.tokenLog = []any{"module", hcfg.ModulePath, "token_label", hcfg.TokenLabel, "token_serial", hcfg.TokenSerial,
		"token_uri", tokenURIForLog(c.hsm.uri)}
	if ks.module, err = hsm.Open(hcfg); err != nil {
		return nil, err
	}
	// With -token-uri naming keys (object=, id=), only those are served.
	ks.store = newKeyStore(ks.module, c.hsm.uri)

	if err := ks.newService(policy); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", c.listen)
	if err != nil {
		return nil, err
	}
	ks.ln = link.LimitListener(ln, c.maxConns, c.maxConnsSource, ks.linkMetrics.connectionRefused)
	if c.metricsListen != "" {
		if ks.opsLn, err = opsserver.Listen(c.metricsListen, c.metricsRemote); err != nil {
			return nil, fmt.Errorf("-metrics-listen: %w", err)
		}
	}
	keys, err := ks.store.Keys(ctx)
	if err != nil {
		return nil, err
	}
	if c.hsm.uri != nil && c.hsm.uri.SelectsKeys() {
		logServedKeys(ks.logger, c.hsm.uri, keys)
	}
	lintPolicy(ks.logger, policy, keys)
	ks.metrics.SetKeys(keys)
	ks.keys = len(keys)
	return ks, nil
}

// newService builds the signer.Service over ks.store with policy, its
// metrics and audit trail, and the gRPC server that serves it.
func (ks *keyserver) newService(policy *signer.Policy) error {
	// The metrics see every request through the auditor, after the audit
	// log; they need the policy in force, so they reach the service
	// through ks.svc, set below.
	ks.metrics = signer.NewMetrics(ks.reg, func() *signer.Policy { return ks.svc.Policy() })
	cfg := ks.cfg.service
	cfg.Keys = ks.store
	cfg.Policy = policy
	cfg.Audit = signer.MultiAuditor(signer.NewAuditLog(ks.audit), ks.metrics)
	cfg.Logger = ks.logger.Named("signer")
	cfg.Revoked = ks.creds.Revoked
	svc, err := signer.NewService(cfg)
	if err != nil {
		return err
	}
	ks.svc = svc
	ks.grpc = grpc.NewServer(append(link.ServerOptions(link.WithWindowSize(ks.cfg.linkWindow)),
		grpc.Creds(ks.creds.ServerCredentials(svc.CheckPeer, ks.logger.Named("mtls"), link.HandshakeObserver{
			Refused:       ks.metrics.HandshakeRefused,
			LogSuppressed: ks.linkMetrics.refusalLogSuppressed,
			Closed:        ks.linkMetrics.connectionClosed,
		})),
		grpc.StatsHandler(svc.StatsHandler()),
		grpc.ConnectionTimeout(ks.cfg.handshakeTimeout),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionAge: maxAge(ks.cfg.maxConnAge), MaxConnectionAgeGrace: ks.cfg.maxConnAgeGrace}),
		// Reuse a goroutine per CPU for requests instead of starting one
		// (and growing its stack) for each; when every worker is busy,
		// gRPC starts a goroutine as it would without them.
		grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0))),
	)...)
	svc.RegisterQueueMetrics(ks.reg)
	registerSessionMetrics(ks.reg, ks.module)
	keylessv1.RegisterKeylessServiceServer(ks.grpc, svc)
	ks.health = health.NewServer()
	healthpb.RegisterHealthServer(ks.grpc, ks.health)
	return nil
}

// closeListeners closes the listeners that run did not get to serve.
func (ks *keyserver) closeListeners() {
	if ks.ln != nil {
		ks.ln.Close()
	}
	if ks.opsLn != nil {
		ks.opsLn.Close()
	}
}

// expiredCRLs returns the -client-crl files whose next update is past.
func (ks *keyserver) expiredCRLs() []string {
	if ks.creds == nil {
		return nil
	}
	return ks.creds.ExpiredClientCRLs(time.Now())
}

// warnExpiredCRLs logs, at error level, every -client-crl file whose next
// update is past: it is still used, but certificates revoked since it was
// issued are not refused.
func (ks *keyserver) warnExpiredCRLs() {
	for _, f := range ks.expiredCRLs() {
		ks.logger.Error("client CRL expired: it is still used, but certificates revoked since it was issued are accepted; install a fresh one and send SIGHUP", "file", f)
	}
}

// close closes the HSM module and the audit log, the parts that outlive
// run.
func (ks *keyserver) close() {
	if ks.module != nil {
		ks.module.Close()
	}
	if ks.audit != nil {
		ks.audit.Close()
	}
}

// run serves until ctx is done, then stops gracefully: health checks of
// the HSM and the operations listener run alongside, and SIGHUP reloads
// (see reload). It returns when the gRPC server has stopped.
func (ks *keyserver) run(ctx context.Context) error {
	c, logger := ks.cfg, ks.logger
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	hsmHealth := &healthState{}
	hsmHealth.set(errors.New("not checked yet"))
	go signer.WatchHealthChanges(watchCtx, ks.store, ks.module.Changed, c.healthEvery, func(err error) {
		signer.SetHealth(ks.health, err)
		ks.metrics.SetHSMUp(err)
		hsmHealth.set(err)
	})
	metricsAddr := "off"
	if ks.opsLn != nil {
		metricsAddr = ks.opsLn.Addr().String()
		go opsserver.Serve(watchCtx, ks.opsLn, ks.reg, ks.ready(hsmHealth), logger.Named("metrics"))
	}

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	logger.Info("keyserver ready", append(append([]any{"listen", ks.ln.Addr().String(), "metrics", metricsAddr}, ks.tokenLog...),
		"health_interval", c.healthEvery, "keys", ks.keys, "policy", ks.svc.Policy().String(), "audit_log", c.auditLog,
		"max_concurrent", c.service.MaxConcurrent, "max_queued", c.service.MaxQueued,
		"max_inflight_per_identity", c.service.Quota.MaxInFlight, "max_streams_per_identity", c.service.MaxStreamsPerIdentity,
		"allow_extractable", c.allowExtractable)...)
	errc := make(chan error, 1)
	go func() { errc <- ks.grpc.Serve(ks.ln) }()
	for done := false; !done; {
		select {
		case err := <-errc:
			return err
		case <-ctx.Done():
			done = true
		case <-hup:
			ks.reload(ctx)
		}
	}
	ks.drain()
	if err := <-errc; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return err
	}
	logger.Info("stopped")
	return nil
}

// drain stops the gRPC server: in-flight operations may finish for up to
// -grace, then the remaining connections are closed.
func (ks *keyserver) drain() {
	ks.logger.Info("shutting down: finishing in-flight operations", "grace", ks.cfg.grace)
	ks.health.Shutdown()
	// Streams are long-lived: ask them to end once their started
	// operations are answered, so that GracefulStop does not wait for the
	// grace period, and edges send the rest to another keyserver.
	ks.svc.Drain()
	stopped := make(chan struct{})
	go func() { ks.grpc.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(ks.cfg.grace):
		ks.logger.Warn("grace period over: closing remaining connections")
		// Also those still in their TLS handshake, which Stop would
		// wait for.
		ks.ln.CloseConnections()
		ks.grpc.Stop()
	}
}

// ready is /readyz: the last health check of the HSM passed and the store
// serves at least one key.
func (ks *keyserver) ready(hsmHealth *healthState) func(context.Context) error {
	return func(ctx context.Context) error {
		if err := hsmHealth.get(); err != nil {
			return fmt.Errorf("HSM: %w", err)
		}
		keys, err := ks.store.Keys(ctx)
		if err != nil {
			return fmt.Errorf("keys: %w", err)
		}
		if len(keys) == 0 {
			return errors.New("no keys loaded")
		}
		return nil
	}
}

// reload is SIGHUP: it reads the policy, the certificates, the mTLS files
// and the PIN file again and reopens the audit log (for log rotation). Each part that
// fails keeps its previous state, with an error in the log.
func (ks *keyserver) reload(ctx context.Context) {
	logger := ks.logger
	logger.Info("SIGHUP: reloading the policy, certificates and mTLS credentials, and reopening the audit log")
	if err := ks.audit.Reopen(); err != nil {
		logger.Error("SIGHUP: reopening the audit log failed", "error", err)
	}
	if err := ks.creds.Reload(); err != nil {
		logger.Error("mTLS credentials and client CRLs not reloaded; the previous ones stay in use", "error", err)
	}
	if f := ks.cfg.hsm.pinFile; f != "" {
		// A token that refused the PIN is not logged in to again until
		// the PIN changes (hsm.Module.SetPIN).
		if pin, err := readPIN(f, "", logger); err != nil {
			logger.Error("PIN not reread", "error", err)
		} else {
			ks.module.SetPIN(pin)
		}
	}
	ks.warnExpiredCRLs()
	defer func() {
		if keys, err := ks.store.Keys(ctx); err == nil {
			ks.metrics.SetKeys(keys)
		}
	}()
	policy, err := loadPolicy(ks.cfg.policy, ks.cfg.certs)
	if err != nil {
		logger.Error("policy not reloaded; the previous one stays in force", "error", err)
		return
	}
	if err := ks.svc.SetPolicy(policy); err != nil {
		logger.Error("policy not reloaded", "error", err)
		return
	}
	if keys, err := ks.store.Keys(ctx); err == nil {
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

// maxAge is -max-connection-age as gRPC takes it: 0 means forever.
func maxAge(d time.Duration) time.Duration {
	if d == 0 {
		return time.Duration(math.MaxInt64)
	}
	return d
}
