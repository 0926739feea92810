// Command edge terminates TLS for many host names without holding any
// private key, and forwards the decrypted traffic to an origin. Every
// private-key operation of a handshake is performed by a keyserver, over gRPC
// with mutual TLS 1.3.
//
// Usage:
//
//	edge -certs DIR -keyserver HOST:PORT -keyserver-ca FILE -tls-cert FILE -tls-key FILE \
//	     (-origin URL | -tcp-origin HOST:PORT) [flags]
//
// Run "edge -h" for every flag and its default.
//
// # Signals
//
// SIGTERM or SIGINT stops the edge gracefully: with -drain-delay, it first
// reports not ready on /readyz for that long while still serving, so that a
// load balancer stops sending it clients; then it stops accepting
// connections, lets requests (or TCP connections) in progress finish for up
// to -grace, and exits.
//
// SIGHUP reloads the certificate directory, the keyserver link's
// credentials (-tls-cert, -tls-key, -keyserver-ca), the session ticket
// keys (-ticket-keys) and the routes of the -config file without dropping
// any connection: new handshakes and requests use the new files. Each is
// replaced only if all its files are valid; otherwise the error is logged
// and the previous configuration stays in force.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyless-tls/keyless/internal/opsserver"
	"github.com/keyless-tls/keyless/link"
	"github.com/keyless-tls/keyless/tlscore"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	reload := make(chan os.Signal, 1)
	signal.Notify(reload, syscall.SIGHUP)
	err := run(ctx, os.Args[1:], os.Stderr, reload)
	signal.Stop(reload)
	stop()
	if err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "edge:", err)
		os.Exit(1)
	}
}

// run is main without the process: it wires the keyserver client, the
// certificate store and the TLS listener, then serves until ctx is done.
// Each value received from reload (SIGHUP in main; nil means never) reloads
// the certificates, the keyserver link's credentials and the session ticket
// keys.
func run(ctx context.Context, args []string, stderr io.Writer, reload <-chan os.Signal) error {
	f, err := parse(args, stderr)
	if err != nil {
		return err
	}
	logger := hclog.New(&hclog.LoggerOptions{Name: "edge", Level: f.level, JSONFormat: f.logJSON, Output: stderr})

	reg := opsserver.NewRegistry()
	metrics := tlscore.NewMetrics(reg)
	keyservers, name := f.keyserverList, f.serverName
	if err := link.CheckKeyFileMode(f.tlsKey); err != nil {
		logger.Warn("-tls-key is readable by others", "error", err)
	}
	link, err := link.LoadMTLSCredentials(f.tlsCert, f.tlsKey, f.keyserverCA)
	if err != nil {
		return err
	}
	client, err := tlscore.Dial(tlscore.ClientConfig{
		Addresses:         keyservers,
		TLS:               link.ClientConfig(name),
		CallTimeout:       f.callTimeout,
		KeepaliveInterval: f.keepalive,
		WindowSize:        f.linkWindow,
		ReconnectBackoff:  f.reconnect,
		Logger:            logger.Named("keyserver"),
		Metrics:           metrics,
	})
	if err != nil {
		return err
	}
	defer client.Close()

	certCfg := tlscore.CertStoreConfig{Client: client, Default: f.defaultCert, Logger: logger, Metrics: metrics}
	clientAuth := f.certOptions(&certCfg)
	certs, err := tlscore.NewCertStore(certCfg)
	if err != nil {
		return err
	}
	// Access log, and the operations listener from the first moment.
	accessLog, err := f.accessLog.open()
	if err != nil {
		return err
	}
	if accessLog != nil {
		defer accessLog.Close()
	}
	readiness := newReadiness(certs, client)
	opsCtx, stopOps := context.WithCancel(context.WithoutCancel(ctx))
	defer stopOps()
	metricsAddr, err := startOps(opsCtx, f, reg, readiness, logger)
	if err != nil {
		return err
	}

	if err := loadCertificates(ctx, certs, f.certs, logger); err != nil {
		if ctx.Err() != nil {
			logger.Info("stopped before a keyserver answered")
			return nil
		}
		return err
	}
	serverCfg := f.serverConfig(certs, metrics, logger)
	serverCfg.ClientAuth = clientAuth
	tlsConfig, err := tlscore.NewServerTLSConfig(serverCfg)
	if err != nil {
		return err
	}
	if f.ticketKeys != "" {
		keys, err := tlscore.LoadTicketKeys(f.ticketKeys)
		if err != nil {
			return fmt.Errorf("-ticket-keys: %w", err)
		}
		tlsConfig.SetSessionTicketKeys(keys)
	}
	ticketKeys, err := startTicketFetcher(ctx, f, client, tlsConfig, logger)
	if err != nil {
		return err
	}
	defer ticketKeys.stop()
	readiness.wait("starting: certificates loaded, opening the TLS listener")
	ln, err := net.Listen("tcp", f.listen)
	if err != nil {
		return err
	}
	if f.proxy.proxyProtocol {
		if ln, err = tlscore.ProxyProtocolListener(ln, f.proxy.trusted); err != nil {
			return err
		}
	}
	var proxy *tlscore.Proxy
	if f.tcpOrigin == "" {
		pc, err := f.proxyConfig(metrics, logger)
		if err == nil {
			proxy, err = tlscore.NewProxy(pc)
		}
		if err != nil {
			ln.Close()
			return err
		}
	}
	// serveCtx ends what ctx ends, after the drain delay.
	serveCtx, draining, stopServing := drainAfter(ctx, f.drainDelay, logger)
	defer stopServing()
	reloadCtx, stopReload := context.WithCancel(serveCtx)
	defer stopReload()
	go reloadOn(reloadCtx, reload, func() {
		reloadConfig(reloadCtx, f, certs, link, tlsConfig, logger)
		if proxy != nil {
			reloadRoutes(f, proxy, logger)
		}
		reopenAccessLog(accessLog, logger)
	})
	go certs.RunOCSP(reloadCtx)

	readiness.serving(draining)
	summary := []any{"listen", ln.Addr().String()}
	if proxy != nil {
		summary = append(summary, "routes", len(proxy.Routes()), "trusted_proxies", f.proxy.trusted.String(), "proxy_protocol", f.proxy.proxyProtocol)
	} else {
		summary = append(summary, "tcp_origin", f.tcpOrigin)
	}
	summary = append(summary, "keyservers", strings.Join(keyservers, ","), "keyserver_name", name,
		"certs", f.certs, "certificates", certs.Loaded(), "default_cert", f.defaultCert,
		"rsa_key_exchange", f.rsaKeyExchange, "call_timeout", f.callTimeout, "keepalive", f.keepalive, "link_window", f.linkWindow,
		"reconnect_backoff", f.reconnect, "grace", f.grace, "handshakes_per_client", f.handshakeRate, "handshake_burst", f.handshakeBurst,
		"max_key_operations", f.maxKeyOps, "metrics", metricsAddr, "access_log", f.accessLog.path,
		"require_all_certs", f.requireAllCerts, "ocsp_stapling", f.ocspStapling, "client_auth_names", len(clientAuth),
		"ticket_keys", ticketKeys.source)
	logger.Info("edge ready", summary...)
	if proxy != nil {
		return tlscore.ServeHTTP(serveCtx, ln, tlsConfig, tlscore.ClientAuthHandler(clientAuth, proxy), f.grace, logger, tlscore.WithMetrics(metrics), tlscore.WithAccessLog(accessLog))
	}
	return tlscore.ServeTCP(serveCtx, ln, tlsConfig, f.tcpOrigin, f.grace, logger, tlscore.WithMetrics(metrics), tlscore.WithIdleTimeout(f.tcpIdle),
		tlscore.WithOriginProxyProtocol(byte(f.proxy.originProxy)), tlscore.WithAccessLog(accessLog))
}

// serverConfig returns the configuration of the edge's TLS server.
func (f *flags) serverConfig(certs *tlscore.CertStore, metrics *tlscore.Metrics, logger hclog.Logger) tlscore.ServerConfig {
	cfg := tlscore.ServerConfig{
		Certificates:        certs,
		RSAKeyExchange:      splitList(f.rsaKeyExchange),
		MaxKeyOperations:    f.maxKeyOps,
		HandshakesPerClient: f.handshakeRate,
		HandshakeBurst:      f.handshakeBurst,
		Metrics:             metrics,
		Logger:              logger,
	}
	if f.maxKeyOps == 0 {
		cfg.MaxKeyOperations = -1 // the flag's "no bound"
	}
	if f.tcpOrigin != "" {
		cfg.NextProtos = []string{}
	}
	return cfg
}

// drainAfter returns a context that ends delay after ctx does, keeping
// ctx's values, and a flag set for that delay: the edge then reports not
// ready on /readyz while it still accepts connections, so that a load
// balancer stops sending it clients before it stops taking them. A zero
// delay ends it with ctx. stop ends it at once.
func drainAfter(ctx context.Context, delay time.Duration, logger hclog.Logger) (serveCtx context.Context, draining *atomic.Bool, stop context.CancelFunc) {
	serveCtx, stop = context.WithCancel(context.WithoutCancel(ctx))
	draining = new(atomic.Bool)
	go func() {
		select {
		case <-ctx.Done():
		case <-serveCtx.Done():
			return
		}
		if delay > 0 {
			draining.Store(true)
			logger.Info("draining: /readyz reports not ready; still accepting connections", "for", delay)
			select {
			case <-time.After(delay):
			case <-serveCtx.Done():
			}
		}
		stop()
	}()
	return serveCtx, draining, stop
}

// ready reports whether the edge can serve: it has certificates and a
// keyserver is connected and healthy.
func ready(certs *tlscore.CertStore, client *tlscore.Client) error {
	if certs.Loaded() == 0 {
		return errors.New("no certificates loaded")
	}
	if !client.Ready() {
		return errors.New("no keyserver ready")
	}
	return nil
}

// reloadOn calls do for each value received from signals until ctx is
// done.
func reloadOn(ctx context.Context, signals <-chan os.Signal, do func()) {
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-signals:
			if !ok {
				return
			}
			do()
		}
	}
}

// reloadTimeout bounds a reload, which asks a keyserver for its keys.
const reloadTimeout = 30 * time.Second

// reloadConfig reloads the session ticket keys (with -ticket-keys), the
// keyserver link's credentials and then the certificates from -certs. Each
// is replaced only if all its files are valid (and, for the certificates,
// the keyservers hold their keys); otherwise the error is logged and the
// previous one stays in force. Established connections, to clients and to
// keyservers, are not disturbed.
func reloadConfig(ctx context.Context, f *flags, certs *tlscore.CertStore, link *link.MTLSCredentials, tlsConfig *tls.Config, logger hclog.Logger) {
	logger.Info("reloading certificates, keyserver link credentials and session ticket keys")
	ok := true
	if f.ticketKeys != "" {
		if keys, err := tlscore.LoadTicketKeys(f.ticketKeys); err != nil {
			ok = false
			logger.Error("reload of the session ticket keys failed; the previous ones stay in force", "error", err)
		} else {
			tlsConfig.SetSessionTicketKeys(keys)
		}
	}
	// The credentials first: the certificates are checked against the
	// keyservers over the link.
	if err := link.Reload(); err != nil {
		ok = false
		logger.Error("reload of the keyserver link credentials failed; the previous ones stay in force", "error", err)
	}
	lctx, cancel := context.WithTimeout(ctx, reloadTimeout)
	defer cancel()
	if err := certs.Load(lctx, f.certs); err != nil {
		ok = false
		logger.Error("reload of the certificates failed; the previous ones stay in force", "error", err)
	}
	if ok {
		logger.Info("reload complete")
	}
}

// splitList splits a comma-separated flag value, dropping empty items.
func splitList(s string) []string {
	var out []string
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			out = append(out, v)
		}
	}
	return out
}

// Waits between attempts of loadCertificates.
const (
	firstLoadRetry = time.Second
	maxLoadRetry   = 30 * time.Second
)

// loadCertificates loads dir into certs. While no keyserver answers
// (Unavailable or DeadlineExceeded), it logs and tries again, waiting 1 s
// and then twice as long each time up to 30 s, until ctx ends (then it
// returns ctx.Err()): an edge that starts before its keyservers (after a
// datacenter restart, say) comes up with them instead of exiting. Any other
// error is returned at once, and so is a failed mutual-TLS handshake with
// a keyserver (a *tlscore.LinkHandshakeError: the keyserver's certificate
// does not verify against -keyserver-ca, say), which waiting does not
// mend.
func loadCertificates(ctx context.Context, certs *tlscore.CertStore, dir string, logger hclog.Logger) error {
	for wait := firstLoadRetry; ; wait = min(2*wait, maxLoadRetry) {
		err := certs.Load(ctx, dir)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var handshake *tlscore.LinkHandshakeError
		if code := status.Code(err); err == nil || code != codes.Unavailable && code != codes.DeadlineExceeded ||
			errors.As(err, &handshake) {
			return err
		}
		logger.Warn("no keyserver answered; the edge starts once one does", "error", err, "next_attempt_in", wait)
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
