package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"sync/atomic"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyless-tls/keyless/internal/opsserver"
	"github.com/keyless-tls/keyless/tlscore"
)

// accessLogFlags are the flags of the access log.
type accessLogFlags struct {
	path   string
	format string
	query  bool
}

func (a *accessLogFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&a.path, "access-log", "off", "access log: a file (appended to, reopened on SIGHUP for logrotate), - for standard output, or off; one line per HTTP request or TCP connection, and per failed handshake (at most 10 a second)")
	fs.StringVar(&a.format, "access-log-format", tlscore.AccessLogJSON, "access log format: json or text (key=value)")
	fs.BoolVar(&a.query, "access-log-query", false, "log request paths with their query string (which often carries tokens); by default it is left out")
}

// check reports a bad setting, naming its flag.
func (a *accessLogFlags) check() error {
	if a.path == "" {
		return errors.New("-access-log is empty: want a file, - or off")
	}
	if a.format != tlscore.AccessLogJSON && a.format != tlscore.AccessLogText {
		return fmt.Errorf("-access-log-format %q: want json or text", a.format)
	}
	return nil
}

// open opens the access log, or returns nil for off.
func (a *accessLogFlags) open() (*tlscore.AccessLog, error) {
	if a.path == "off" {
		return nil, nil
	}
	l, err := tlscore.OpenAccessLog(tlscore.AccessLogConfig{Path: a.path, Stdout: os.Stdout, Format: a.format, Query: a.query})
	if err != nil {
		return nil, fmt.Errorf("-access-log: %w", err)
	}
	return l, nil
}

// reopenAccessLog reopens l (nil: none) on SIGHUP.
func reopenAccessLog(l *tlscore.AccessLog, logger hclog.Logger) {
	if l == nil {
		return
	}
	if err := l.Reopen(); err != nil {
		logger.Error("reopening the access log failed; still writing to the old file", "error", err)
	}
}

// readiness is what /readyz reports: not ready, with the reason, until
// the edge serves, and again while it drains. It is safe for concurrent
// use.
type readiness struct {
	certs    *tlscore.CertStore
	client   *tlscore.Client
	waiting  atomic.Pointer[string] // why it does not serve yet; nil once it does
	draining atomic.Pointer[atomic.Bool]
}

func newReadiness(certs *tlscore.CertStore, client *tlscore.Client) *readiness {
	r := &readiness{certs: certs, client: client}
	r.wait("starting: loading certificates, which waits for a keyserver to answer")
	return r
}

// wait sets why the edge does not serve yet.
func (r *readiness) wait(reason string) { r.waiting.Store(&reason) }

// serving marks the edge as serving; draining is set while it drains.
func (r *readiness) serving(draining *atomic.Bool) {
	r.draining.Store(draining)
	r.waiting.Store(nil)
}

func (r *readiness) check(context.Context) error {
	if why := r.waiting.Load(); why != nil {
		return errors.New(*why)
	}
	if d := r.draining.Load(); d != nil && d.Load() {
		return errors.New("draining: the edge is stopping")
	}
	return ready(r.certs, r.client)
}

// startOps starts the operations listener of f (none without
// -metrics-listen) at once, before any keyserver answers: /healthz answers
// 200 while the process runs, and /readyz reports r. It serves until ctx
// ends. It returns the listener's address, or "off".
func startOps(ctx context.Context, f *flags, reg *prometheus.Registry, r *readiness, logger hclog.Logger) (string, error) {
	if f.metricsListen == "" {
		return "off", nil
	}
	mln, err := opsserver.Listen(f.metricsListen, f.metricsRemote)
	if err != nil {
		return "", fmt.Errorf("-metrics-listen: %w", err)
	}
	go opsserver.Serve(ctx, mln, reg, r.check, logger.Named("metrics"))
	logger.Info("operations listener up", "metrics", mln.Addr().String())
	return mln.Addr().String(), nil
}
