package tlscore

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// Access log formats.
const (
	AccessLogJSON = "json" // one JSON object per line (the default)
	AccessLogText = "text" // key=value pairs, logfmt style
)

// DefaultHandshakeErrorLines is AccessLogConfig.HandshakeErrorsPerSecond
// when it is zero.
const DefaultHandshakeErrorLines = 10

// AccessLogConfig configures an [AccessLog].
type AccessLogConfig struct {
	// Path is the file the log is appended to (created with mode 0640), or
	// "-" for Stdout. Required.
	Path string
	// Stdout is where "-" writes; nil means os.Stdout.
	Stdout io.Writer
	// Format is AccessLogJSON (the default, also for "") or AccessLogText.
	Format string
	// Query, if set, logs a request's path with its query string, which
	// often carries tokens; by default the query string is left out.
	Query bool
	// HandshakeErrorsPerSecond bounds the lines about failed handshakes
	// (a scanner makes thousands): at most this many a second, with bursts
	// of as many; the lines left out are counted in the next one written
	// ("suppressed"). Zero means DefaultHandshakeErrorLines; negative means
	// no such lines.
	HandshakeErrorsPerSecond float64
}

// AccessLog writes one line per HTTP request, per TCP connection and
// (rate-limited) per failed TLS handshake: see [WithAccessLog] for the
// fields. It never writes a secret: no header values, cookies, session
// keys or tickets, and no query string unless asked. It is safe for
// concurrent use.
type AccessLog struct {
	path   string
	stdout io.Writer
	text   bool
	query  bool

	mu   sync.Mutex
	file *os.File // nil for stdout, or after Close

	// Token bucket of handshake failure lines.
	failMu     sync.Mutex
	failRate   float64
	failTokens float64
	failLast   time.Time
	suppressed int64
}

// OpenAccessLog opens the access log cfg describes. The caller must Close
// it.
func OpenAccessLog(cfg AccessLogConfig) (*AccessLog, error) {
	if cfg.Path == "" {
		return nil, errors.New("tlscore: access log: no path (use - for standard output)")
	}
	l := &AccessLog{path: cfg.Path, stdout: cfg.Stdout, query: cfg.Query, failRate: cfg.HandshakeErrorsPerSecond}
	switch cfg.Format {
	case "", AccessLogJSON:
	case AccessLogText:
		l.text = true
	default:
		return nil, fmt.Errorf("tlscore: access log format %q: want %s or %s", cfg.Format, AccessLogJSON, AccessLogText)
	}
	if l.failRate == 0 {
		l.failRate = DefaultHandshakeErrorLines
	}
	l.failTokens = l.failRate
	if l.stdout == nil {
		l.stdout = os.Stdout
	}
	if err := l.Reopen(); err != nil {
		return nil, err
	}
	return l, nil
}

// Reopen closes the log file and opens it again by its path, so that a
// file renamed by logrotate is left to it and a new one started (call it on
// SIGHUP). If the file cannot be opened, the old one stays in use and the
// error is returned. For "-" it does nothing.
func (l *AccessLog) Reopen() error {
	if l.path == "-" {
		return nil
	}
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return fmt.Errorf("tlscore: access log: %w", err)
	}
	l.mu.Lock()
	old := l.file
	l.file = f
	l.mu.Unlock()
	if old != nil {
		old.Close()
	}
	return nil
}

// Close closes the log file; later lines are dropped. It is safe to call
// more than once.
func (l *AccessLog) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.file == nil {
		return nil
	}
	err := l.file.Close()
	l.file = nil
	l.path = "" // not "-": nothing is written after Close
	return err
}

// field is one key and value of a line.
type field struct {
	key   string
	value any // string, int64, float64 or bool
}

// linePool recycles the buffers lines are built in.
var linePool = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// write writes one line of fields. A failed write is not reported: the
// log must not stop the traffic it records.
func (l *AccessLog) write(fields []field) {
	b := linePool.Get().(*bytes.Buffer)
	defer linePool.Put(b)
	b.Reset()
	if l.text {
		for i, f := range fields {
			if i > 0 {
				b.WriteByte(' ')
			}
			b.WriteString(f.key)
			b.WriteByte('=')
			writeTextValue(b, f.value)
		}
	} else {
		b.WriteByte('{')
		for i, f := range fields {
			if i > 0 {
				b.WriteByte(',')
			}
			writeJSONString(b, f.key)
			b.WriteByte(':')
			writeJSONValue(b, f.value)
		}
		b.WriteByte('}')
	}
	b.WriteByte('\n')
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.file != nil:
		l.file.Write(b.Bytes())
	case l.path == "-":
		l.stdout.Write(b.Bytes())
	}
}

// writeJSONValue writes v (nil, string, int64, float64 or bool) as JSON.
func writeJSONValue(b *bytes.Buffer, v any) {
	switch v := v.(type) {
	case string:
		writeJSONString(b, v)
	case int64:
		b.Write(strconv.AppendInt(b.AvailableBuffer(), v, 10))
	case float64:
		b.Write(strconv.AppendFloat(b.AvailableBuffer(), v, 'f', -1, 64))
	case bool:
		b.Write(strconv.AppendBool(b.AvailableBuffer(), v))
	default:
		b.WriteString("null")
	}
}

// writeJSONString writes s as a JSON string: quotes, backslashes and
// control characters escaped, invalid UTF-8 replaced by U+FFFD, and '<',
// '>', '&', U+2028 and U+2029 escaped as encoding/json does, so that a
// client's string cannot break the line or its readers.
func writeJSONString(b *bytes.Buffer, s string) {
	const hex = "0123456789abcdef"
	b.WriteByte('"')
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				b.WriteByte('\\')
				b.WriteByte(c)
			case c == '\n':
				b.WriteString(`\n`)
			case c == '\r':
				b.WriteString(`\r`)
			case c == '\t':
				b.WriteString(`\t`)
			case c < 0x20 || c == '<' || c == '>' || c == '&' || c == 0x7f:
				b.WriteString(`\u00`)
				b.WriteByte(hex[c>>4])
				b.WriteByte(hex[c&0xf])
			default:
				b.WriteByte(c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b.WriteString(`\ufffd`)
		case r == '\u2028' || r == '\u2029':
			b.WriteString(`\u202`)
			b.WriteByte(hex[r&0xf])
		default:
			b.WriteString(s[i : i+size])
		}
		i += size
	}
	b.WriteByte('"')
}

// writeTextValue writes v for the text format: numbers and booleans bare,
// strings bare if they are non-empty and hold no space, quote, '=' or
// control character, else quoted as Go does.
func writeTextValue(b *bytes.Buffer, v any) {
	switch v := v.(type) {
	case string:
		if v != "" && !strings.ContainsFunc(v, func(r rune) bool { return r <= ' ' || r == '"' || r == '=' || r == 0x7f || r == utf8.RuneError }) {
			b.WriteString(v)
		} else {
			b.WriteString(strconv.Quote(v))
		}
	case float64:
		b.WriteString(strconv.FormatFloat(v, 'f', -1, 64))
	default:
		fmt.Fprint(b, v)
	}
}

// maxLoggedLen bounds the strings a client chooses (host, path, server
// name, error text) in a line.
const maxLoggedLen = 2048

// clip cuts s to maxLoggedLen bytes, on a rune boundary.
func clip(s string) string {
	if len(s) <= maxLoggedLen {
		return s
	}
	i := maxLoggedLen
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return s[:i] + "..."
}

// tlsFields returns the fields that describe the TLS side of a connection.
func tlsFields(cs *tls.ConnectionState, oc *observedConn) []field {
	keyID, keyserver, _ := oc.handshakeFacts()
	return []field{
		{"server_name", clip(cs.ServerName)},
		{"tls_version", tlsVersionName(cs.Version)},
		{"cipher", tls.CipherSuiteName(cs.CipherSuite)},
		{"resumed", cs.DidResume},
		{"alpn", cs.NegotiatedProtocol},
		{"key_id", keyID},
		{"keyserver", keyserver},
	}
}

// tlsVersionName returns "1.2" or "1.3" for those versions.
func tlsVersionName(v uint16) string {
	switch v {
	case tls.VersionTLS12:
		return "1.2"
	case tls.VersionTLS13:
		return "1.3"
	case 0:
		return ""
	}
	return tls.VersionName(v)
}

// seconds returns d in seconds, rounded to the microsecond.
func seconds(d time.Duration) float64 {
	return float64(d.Microseconds()) / 1e6
}

// logTCP writes the line of one TCP connection relayed to origin.
func (l *AccessLog) logTCP(start time.Time, client net.Addr, cs *tls.ConnectionState, oc *observedConn, origin string, connect time.Duration, originErr error, up, down int64) {
	fields := []field{
		{"time", start.UTC().Format(time.RFC3339Nano)},
		{"type", "tcp"},
		{"client", client.String()},
	}
	fields = append(fields, tlsFields(cs, oc)...)
	status := "ok"
	if originErr != nil {
		status = "origin_unreachable"
	}
	fields = append(fields,
		field{"origin", origin},
		field{"status", status},
		field{"bytes_in", up},
		field{"bytes_out", down},
		field{"duration", seconds(time.Since(start))},
		field{"upstream_connect_duration", seconds(connect)},
	)
	l.write(fields)
}

// logHandshakeError writes the line of a failed handshake, unless the
// lines of failed handshakes are over their rate.
func (l *AccessLog) logHandshakeError(start time.Time, client net.Addr, serverName string, err error) {
	if l.failRate < 0 {
		return
	}
	l.failMu.Lock()
	now := time.Now()
	if !l.failLast.IsZero() {
		l.failTokens = min(l.failRate, l.failTokens+now.Sub(l.failLast).Seconds()*l.failRate)
	}
	l.failLast = now
	if l.failTokens < 1 {
		l.suppressed++
		l.failMu.Unlock()
		return
	}
	l.failTokens--
	suppressed := l.suppressed
	l.suppressed = 0
	l.failMu.Unlock()

	fields := []field{
		{"time", start.UTC().Format(time.RFC3339Nano)},
		{"type", "handshake_error"},
		{"client", client.String()},
		{"server_name", clip(serverName)},
		{"reason", handshakeOutcome(err)},
		{"error", clip(err.Error())},
		{"duration", seconds(time.Since(start))},
	}
	if suppressed > 0 {
		fields = append(fields, field{"suppressed", suppressed})
	}
	l.write(fields)
}

// requestRecord is what the access log and the request metrics learn of a
// request while it is served.
type requestRecord struct {
	mu       sync.Mutex
	upstream time.Duration // until the origin's response headers; 0 if none came
}

type requestRecordKey struct{}

// noteUpstream records on the request of ctx, if it is being recorded,
// how long the origin took to answer with its headers.
func noteUpstream(ctx context.Context, d time.Duration) {
	if r, ok := ctx.Value(requestRecordKey{}).(*requestRecord); ok {
		r.mu.Lock()
		r.upstream = d
		r.mu.Unlock()
	}
}

// timedTransport records on each request how long its round trip to the
// origin took until the response headers came (see noteUpstream).
type timedTransport struct{ http.RoundTripper }

func (t timedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	start := time.Now()
	resp, err := t.RoundTripper.RoundTrip(req)
	if err == nil {
		noteUpstream(req.Context(), time.Since(start))
	}
	return resp, err
}

// observeRequests wraps h so that each request is written to the access
// log (if al is set) and counted in m (if set).
func observeRequests(h http.Handler, al *AccessLog, m *Metrics) http.Handler {
	if al == nil && m == nil {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &requestRecord{}
		body := &countingBody{ReadCloser: r.Body}
		if r.Body != nil && r.Body != http.NoBody {
			r.Body = body
		}
		rw := &recordingWriter{ResponseWriter: w}
		h.ServeHTTP(rw, r.WithContext(context.WithValue(r.Context(), requestRecordKey{}, rec)))
		d := time.Since(start)
		status := rw.statusCode()
		oc, _ := r.Context().Value(connInfoKey{}).(*observedConn)
		m.observeRequest(r, status, d)
		if al == nil {
			return
		}
		rec.mu.Lock()
		upstream := rec.upstream
		rec.mu.Unlock()
		path := r.URL.Path
		if al.query {
			path = r.URL.RequestURI()
		}
		fields := []field{
			{"time", start.UTC().Format(time.RFC3339Nano)},
			{"type", "http"},
			{"client", r.RemoteAddr},
		}
		if r.TLS != nil {
			fields = append(fields, tlsFields(r.TLS, oc)...)
		}
		fields = append(fields,
			field{"protocol", r.Proto},
			field{"method", clip(r.Method)},
			field{"host", clip(r.Host)},
			field{"path", clip(path)},
			field{"status", int64(status)},
			field{"bytes_in", body.n},
			field{"bytes_out", rw.n},
			field{"duration", seconds(d)},
		)
		if upstream > 0 {
			fields = append(fields, field{"upstream_duration", seconds(upstream)})
		} else {
			fields = append(fields, field{"upstream_duration", nil})
		}
		al.write(fields)
	})
}

// countingBody counts the bytes of a request body the handler read.
type countingBody struct {
	io.ReadCloser
	n int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n += int64(n)
	return n, err
}

// recordingWriter records a response's status and counts its body bytes.
// It passes Flush and Hijack through (also through
// http.ResponseController, by Unwrap), so streaming and WebSocket upgrades
// work as without it.
type recordingWriter struct {
	http.ResponseWriter
	status   int
	n        int64
	hijacked bool
}

func (w *recordingWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 || code == http.StatusSwitchingProtocols {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *recordingWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(p)
	w.n += int64(n)
	return n, err
}

func (w *recordingWriter) Flush() {
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *recordingWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, rw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err == nil {
		w.hijacked = true
		if w.status == 0 {
			w.status = http.StatusSwitchingProtocols
		}
	}
	return c, rw, err
}

func (w *recordingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// statusCode returns the status sent: 200 if the handler wrote nothing
// (as net/http then sends).
func (w *recordingWriter) statusCode() int {
	if w.status == 0 {
		return http.StatusOK
	}
	return w.status
}
