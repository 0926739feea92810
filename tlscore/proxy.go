package tlscore

import (
	"crypto/tls"
	"io"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"

	"github.com/hashicorp/go-hclog"
	"github.com/keyless-tls/keyless/internal/hostname"
)

// Headers the reverse proxy sets on requests to the origin. Values a client
// sent under these names are removed first.
const (
	// HeaderServerName carries the server name (SNI) the client asked for,
	// in lower case; it is absent when the client sent none, or one that is
	// not a host name.
	HeaderServerName = "X-Keyless-Server-Name"
	// HeaderTLSVersion carries the TLS version of the client's connection,
	// such as "TLS 1.3".
	HeaderTLSVersion = "X-Keyless-TLS-Version"
)

// NewReverseProxy returns a handler that forwards every request to origin
// (scheme, host and path prefix), for use with [ServeHTTP].
//
// The origin sees X-Forwarded-For (the client's address only: values the
// client sent are dropped), X-Forwarded-Host, X-Forwarded-Proto,
// [HeaderServerName] (in lower case) and [HeaderTLSVersion]; what a client
// sent under these names, under X-Real-Ip or Forwarded, or under the same
// names with '_' for '-', is dropped. The origin is reached directly,
// whatever proxy the environment names. Responses are streamed: each
// write of the origin is flushed to the client at once. If the origin cannot
// be reached or fails to answer, the client gets 502 Bad Gateway with a short
// body, and the failure is logged once. The handler is safe for concurrent
// use.
func NewReverseProxy(origin *url.URL, logger hclog.Logger) http.Handler {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	logger = logger.Named("proxy")
	transport := http.DefaultTransport.(*http.Transport).Clone()
	// A proxy talks to one origin: keep enough idle connections to it.
	transport.MaxIdleConnsPerHost = 64
	// Decrypted traffic goes to the origin named, never through a proxy
	// that HTTPS_PROXY or the like happens to name.
	transport.Proxy = nil
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(origin)
			dropProxyHeaders(pr.Out.Header)
			pr.SetXForwarded()
			if cs := pr.In.TLS; cs != nil {
				if cs.ServerName != "" && hostname.CheckServerName(cs.ServerName) == nil {
					pr.Out.Header.Set(HeaderServerName, hostname.Normalize(cs.ServerName))
				}
				pr.Out.Header.Set(HeaderTLSVersion, tls.VersionName(cs.Version))
			}
		},
		Transport:     transport,
		FlushInterval: -1,
		ErrorLog:      stdLogger(logger, hclog.Warn),
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if r.Context().Err() != nil {
				// The client went away; nothing is wrong with the origin.
				logger.Debug("request canceled by the client", "method", r.Method, "host", r.Host, "path", r.URL.Path, "error", err)
			} else {
				logger.Warn("origin request failed", "method", r.Method, "host", r.Host, "path", r.URL.Path, "error", err)
			}
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			w.Header().Set("X-Content-Type-Options", "nosniff")
			w.WriteHeader(http.StatusBadGateway)
			_, _ = io.WriteString(w, "502 Bad Gateway: the origin server did not answer\n")
		},
	}
}

// dropProxyHeaders removes from h what a client sent under the names of the
// headers the proxy sets, and under names that differ from them only by '_'
// for '-' (X_Forwarded_For), which CGI-style origins read as the same
// variable: Forwarded, X-Forwarded-*, X-Real-Ip and X-Keyless-*.
func dropProxyHeaders(h http.Header) {
	for name := range h {
		n := strings.ToLower(strings.ReplaceAll(name, "_", "-"))
		if n == "forwarded" || n == "x-real-ip" || strings.HasPrefix(n, "x-forwarded-") || strings.HasPrefix(n, "x-keyless-") {
			delete(h, name)
		}
	}
}

// stdLogger returns a *log.Logger for net/http's ErrorLog that writes to
// logger at level, so that nothing goes through the standard log package.
func stdLogger(logger hclog.Logger, level hclog.Level) *log.Logger {
	return log.New(logWriter{logger: logger, level: level}, "", 0)
}

// logWriter turns net/http's log lines into hclog lines. Handshake failures
// and broken client connections, which scanners and impatient clients cause
// all day, go to debug; failed key operations are logged by the Client.
type logWriter struct {
	logger hclog.Logger
	level  hclog.Level
}

func (w logWriter) Write(p []byte) (int, error) {
	msg := strings.TrimSpace(string(p))
	level := w.level
	if strings.HasPrefix(msg, "http: TLS handshake error") || strings.HasPrefix(msg, "http2: ") {
		level = hclog.Debug
	}
	w.logger.Log(level, msg)
	return len(p), nil
}
