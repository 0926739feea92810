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
// SIGTERM or SIGINT stops the edge gracefully: it stops accepting
// connections, lets requests (or TCP connections) in progress finish for up
// to -grace, and exits.
//
// SIGHUP reloads the certificate directory and the keyserver link's
// credentials (-tls-cert, -tls-key, -keyserver-ca) without dropping any
// connection: new handshakes use the new files. Each of the two is
// replaced only if all its files are valid; otherwise the error is logged
// and the previous configuration stays in force.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

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

type flags struct {
	listen         string
	certs          string
	defaultCert    string
	rsaKeyExchange string
	origin         string
	tcpOrigin      string
	keyservers     string
	keyserverName  string
	keyserverCA    string
	tlsCert        string
	tlsKey         string
	callTimeout    time.Duration
	keepalive      time.Duration
	reconnect      time.Duration
	grace          time.Duration
	logLevel       string
	logJSON        bool
}

func parse(args []string, stderr io.Writer) (*flags, error) {
	var f flags
	fs := flag.NewFlagSet("edge", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.listen, "listen", "127.0.0.1:8443", "address to accept TLS connections on")
	fs.StringVar(&f.certs, "certs", "", "directory of PEM certificate chains, one per file (required)")
	fs.StringVar(&f.defaultCert, "default-cert", "", "certificate for clients without a known server name: a file name in -certs or a host name (default: none, such handshakes fail)")
	fs.StringVar(&f.rsaKeyExchange, "rsa-key-exchange", "", "comma-separated host names (or *.wildcards) for which TLS 1.2 RSA key exchange is enabled (default: none)")
	fs.StringVar(&f.origin, "origin", "", "HTTP origin URL to reverse-proxy to, e.g. http://127.0.0.1:8080")
	fs.StringVar(&f.tcpOrigin, "tcp-origin", "", "raw TCP origin host:port, instead of -origin, for non-HTTP protocols")
	fs.StringVar(&f.keyservers, "keyserver", "", "comma-separated keyserver addresses host:port (required)")
	fs.StringVar(&f.keyserverName, "keyserver-name", "", "name the keyservers' certificates are verified against (default: the host of a single -keyserver)")
	fs.StringVar(&f.keyserverCA, "keyserver-ca", "", "PEM CA certificates that issue the keyservers' certificates (required)")
	fs.StringVar(&f.tlsCert, "tls-cert", "", "PEM client certificate of this edge for the keyserver link (required)")
	fs.StringVar(&f.tlsKey, "tls-key", "", "PEM private key of -tls-cert (required)")
	fs.DurationVar(&f.callTimeout, "call-timeout", tlscore.DefaultCallTimeout, "deadline of each keyserver call; a handshake whose key operation takes longer fails")
	fs.DurationVar(&f.keepalive, "keepalive", 15*time.Second, "ping a keyserver connection idle this long, and drop it when no answer comes within -call-timeout (at least 10s; 0 turns pings off)")
	fs.DurationVar(&f.reconnect, "reconnect-backoff", tlscore.DefaultReconnectBackoff, "longest wait between attempts to reconnect to a keyserver that is down")
	fs.DurationVar(&f.grace, "grace", 10*time.Second, "on shutdown, how long in-flight requests may take to finish")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: trace, debug, info, warn or error")
	fs.BoolVar(&f.logJSON, "log-json", false, "log as JSON lines")
	if err := fs.Parse(args); err != nil {
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
	if (f.origin == "") == (f.tcpOrigin == "") {
		return nil, errors.New("set exactly one of -origin (HTTP) and -tcp-origin (raw TCP)")
	}
	if f.callTimeout <= 0 {
		return nil, fmt.Errorf("-call-timeout %v: must be positive", f.callTimeout)
	}
	if f.keepalive != 0 && f.keepalive < 10*time.Second {
		return nil, fmt.Errorf("-keepalive %v: must be 0 or at least 10s (gRPC's minimum, and the keyserver's)", f.keepalive)
	}
	if f.reconnect <= 0 {
		return nil, fmt.Errorf("-reconnect-backoff %v: must be positive", f.reconnect)
	}
	return &f, nil
}

// run is main without the process: it wires the keyserver client, the
// certificate store and the TLS listener, then serves until ctx is done.
// Each value received from reload (SIGHUP in main; nil means never) reloads
// the certificates and the keyserver link's credentials.
func run(ctx context.Context, args []string, stderr io.Writer, reload <-chan os.Signal) error {
	f, err := parse(args, stderr)
	if err != nil {
		return err
	}
	level := hclog.LevelFromString(f.logLevel)
	if level == hclog.NoLevel {
		return fmt.Errorf("-log-level %q: want trace, debug, info, warn or error", f.logLevel)
	}
	logger := hclog.New(&hclog.LoggerOptions{Name: "edge", Level: level, JSONFormat: f.logJSON, Output: stderr})

	var origin *url.URL
	if f.origin != "" {
		if origin, err = url.Parse(f.origin); err != nil || (origin.Scheme != "http" && origin.Scheme != "https") || origin.Host == "" {
			return fmt.Errorf("-origin %q: want an http:// or https:// URL with a host", f.origin)
		}
	}
	keyservers := splitList(f.keyservers)
	name := f.keyserverName
	if name == "" {
		if len(keyservers) != 1 {
			return errors.New("-keyserver-name is required with several keyservers")
		}
		if name, _, err = net.SplitHostPort(keyservers[0]); err != nil {
			return fmt.Errorf("-keyserver %q: %w", keyservers[0], err)
		}
	}
	link, err := tlscore.LoadMTLSCredentials(f.tlsCert, f.tlsKey, f.keyserverCA)
	if err != nil {
		return err
	}
	client, err := tlscore.Dial(tlscore.ClientConfig{
		Addresses:         keyservers,
		TLS:               link.ClientConfig(name),
		CallTimeout:       f.callTimeout,
		KeepaliveInterval: f.keepalive,
		ReconnectBackoff:  f.reconnect,
		Logger:            logger.Named("keyserver"),
	})
	if err != nil {
		return err
	}
	defer client.Close()

	certs, err := tlscore.NewCertStore(tlscore.CertStoreConfig{Client: client, Default: f.defaultCert, Logger: logger})
	if err != nil {
		return err
	}
	if err := certs.Load(ctx, f.certs); err != nil {
		return err
	}
	serverCfg := tlscore.ServerConfig{Certificates: certs, RSAKeyExchange: splitList(f.rsaKeyExchange), Logger: logger}
	if f.tcpOrigin != "" {
		serverCfg.NextProtos = []string{}
	}
	tlsConfig, err := tlscore.NewServerTLSConfig(serverCfg)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", f.listen)
	if err != nil {
		return err
	}
	reloadCtx, stopReload := context.WithCancel(ctx)
	defer stopReload()
	go reloadOn(reloadCtx, reload, func() { reloadConfig(reloadCtx, f.certs, certs, link, logger) })
	if origin != nil {
		logger.Info("edge ready", "listen", ln.Addr().String(), "origin", origin.String(), "keyservers", f.keyservers)
		return tlscore.ServeHTTP(ctx, ln, tlsConfig, tlscore.NewReverseProxy(origin, logger), f.grace, logger)
	}
	logger.Info("edge ready", "listen", ln.Addr().String(), "tcp_origin", f.tcpOrigin, "keyservers", f.keyservers)
	return tlscore.ServeTCP(ctx, ln, tlsConfig, f.tcpOrigin, f.grace, logger)
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

// reloadConfig reloads the keyserver link's credentials and then the
// certificates from dir. Each is replaced only if all its files are valid
// (and, for the certificates, the keyservers hold their keys); otherwise
// the error is logged and the previous one stays in force. Established
// connections, to clients and to keyservers, are not disturbed.
func reloadConfig(ctx context.Context, dir string, certs *tlscore.CertStore, link *tlscore.MTLSCredentials, logger hclog.Logger) {
	logger.Info("reloading certificates and keyserver link credentials")
	ok := true
	// The credentials first: the certificates are checked against the
	// keyservers over the link.
	if err := link.Reload(); err != nil {
		ok = false
		logger.Error("reload of the keyserver link credentials failed; the previous ones stay in force", "error", err)
	}
	lctx, cancel := context.WithTimeout(ctx, reloadTimeout)
	defer cancel()
	if err := certs.Load(lctx, dir); err != nil {
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
