package bench

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Handshake kinds: what the load generator's client offers, and what it
// checks it got.
const (
	HandshakeTLS13ECDSA      = "tls13-ecdsa"
	HandshakeTLS13RSA        = "tls13-rsa"
	HandshakeTLS12ECDHEECDSA = "tls12-ecdhe-ecdsa"
	HandshakeTLS12ECDHERSA   = "tls12-ecdhe-rsa"
	HandshakeTLS12RSAKex     = "tls12-rsa-kex"
	ResumeTLS13              = "resume-tls13"
	ResumeTLS12              = "resume-tls12"
)

// handshakeKinds lists the full-handshake kinds in table order, and
// resumeKinds the resumed ones.
var (
	handshakeKinds = []string{HandshakeTLS13ECDSA, HandshakeTLS13RSA, HandshakeTLS12ECDHEECDSA, HandshakeTLS12ECDHERSA, HandshakeTLS12RSAKex}
	resumeKinds    = []string{ResumeTLS13, ResumeTLS12}
)

// handshakeKind is a client configuration and what the handshake must
// negotiate.
type handshakeKind struct {
	serverName string
	version    uint16
	suites     []uint16 // TLS 1.2 only
	resume     bool
}

func kindOf(name string) (handshakeKind, error) {
	switch name {
	case HandshakeTLS13ECDSA:
		return handshakeKind{serverName: nameECDSA, version: tls.VersionTLS13}, nil
	case HandshakeTLS13RSA:
		return handshakeKind{serverName: nameRSA, version: tls.VersionTLS13}, nil
	case HandshakeTLS12ECDHEECDSA:
		return handshakeKind{serverName: nameECDSA, version: tls.VersionTLS12, suites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256}}, nil
	case HandshakeTLS12ECDHERSA:
		return handshakeKind{serverName: nameRSA, version: tls.VersionTLS12, suites: []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256}}, nil
	case HandshakeTLS12RSAKex:
		return handshakeKind{serverName: nameRSA, version: tls.VersionTLS12, suites: []uint16{tls.TLS_RSA_WITH_AES_128_GCM_SHA256}}, nil
	case ResumeTLS13:
		return handshakeKind{serverName: nameECDSA, version: tls.VersionTLS13, resume: true}, nil
	case ResumeTLS12:
		return handshakeKind{serverName: nameECDSA, version: tls.VersionTLS12, suites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256}, resume: true}, nil
	}
	return handshakeKind{}, fmt.Errorf("bench: unknown handshake kind %q (want one of %s, %s)", name,
		strings.Join(handshakeKinds, ", "), strings.Join(resumeKinds, ", "))
}

// clientConfig returns the load generator's TLS client configuration.
//
// The client does not verify the server's certificate: verification is the
// client's cost, not the server's, and a lighter client leaves more of the
// two cores to the servers being compared. Key exchange uses Go's default
// groups (X25519MLKEM768 first for TLS 1.3), as real clients do.
func (k handshakeKind) clientConfig() *tls.Config {
	cfg := &tls.Config{
		ServerName:         k.serverName,
		InsecureSkipVerify: true,
		MinVersion:         k.version,
		MaxVersion:         k.version,
		CipherSuites:       k.suites,
	}
	if k.resume {
		cfg.ClientSessionCache = tls.NewLRUClientSessionCache(4)
	}
	return cfg
}

// check verifies that a handshake negotiated what the kind asks for.
func (k handshakeKind) check(cs tls.ConnectionState) error {
	if cs.Version != k.version {
		return fmt.Errorf("negotiated %s, want %s", tls.VersionName(cs.Version), tls.VersionName(k.version))
	}
	if len(k.suites) > 0 && cs.CipherSuite != k.suites[0] {
		return fmt.Errorf("negotiated %s, want %s", tls.CipherSuiteName(cs.CipherSuite), tls.CipherSuiteName(k.suites[0]))
	}
	if cs.DidResume != k.resume {
		return fmt.Errorf("resumed: %t, want %t", cs.DidResume, k.resume)
	}
	return nil
}

// dialTLS opens a TCP connection to addr and performs a TLS handshake on
// it with cfg. The caller closes the connection.
func dialTLS(ctx context.Context, addr string, cfg *tls.Config) (*tls.Conn, error) {
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c := tls.Client(raw, cfg)
	if err := c.HandshakeContext(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// handshake opens a TCP connection to addr, performs one TLS handshake
// with cfg, checks it, and closes the connection.
func handshake(ctx context.Context, addr string, k handshakeKind, cfg *tls.Config) error {
	c, err := dialTLS(ctx, addr, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	return k.check(c.ConnectionState())
}

// prime makes one full handshake with cfg and waits for the session
// ticket, so that cfg's session cache holds a session to resume. A TLS 1.3
// ticket arrives after the handshake and is only processed by a Read.
func prime(ctx context.Context, addr string, cfg *tls.Config) error {
	c, err := dialTLS(ctx, addr, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	if c.ConnectionState().Version == tls.VersionTLS13 {
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		var b [1]byte
		c.Read(b[:]) // times out once the tickets are processed
	}
	return nil
}

// runLoadgen is the "loadgen" mode: closed-loop TLS handshake load. Each
// worker opens a new TCP connection per handshake and closes it right
// after; for the resume kinds each worker first makes one full handshake
// and then resumes its session every time (no private-key operation).
func runLoadgen(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("loadgen", stderr)
	var (
		lf   loadFlags
		addr = fs.String("addr", "", "TLS server address host:port (required)")
		kind = fs.String("kind", HandshakeTLS13ECDSA, "handshake kind: "+strings.Join(slices.Concat(handshakeKinds, resumeKinds), ", "))
	)
	lf.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *addr == "" {
		return fmt.Errorf("bench: loadgen: -addr is required")
	}
	k, err := kindOf(*kind)
	if err != nil {
		return err
	}
	cfgs := make([]*tls.Config, lf.concurrency)
	shared := k.clientConfig()
	for i := range cfgs {
		cfgs[i] = shared
		if k.resume {
			cfgs[i] = k.clientConfig() // a session cache per worker
		}
	}
	if k.resume {
		var wg sync.WaitGroup
		errs := make([]error, len(cfgs))
		for i, cfg := range cfgs {
			wg.Go(func() {
				pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				defer cancel()
				errs[i] = prime(pctx, *addr, cfg)
			})
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				return fmt.Errorf("bench: first handshake: %w", err)
			}
		}
	}
	return lf.run(ctx, stdout, *kind, "loadgen", func(ctx context.Context, w int) error {
		return handshake(ctx, *addr, k, cfgs[w])
	})
}

// runHold is the "hold" mode: it opens -n HTTPS connections (TLS 1.3, one
// request each, HTTP/1.1 or HTTP/2), keeps them open and idle, prints
// "held N", and closes them when its standard input closes, it is
// signalled, or -lifetime passes.
func runHold(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := newFlagSet("hold", stderr)
	var (
		addr     = fs.String("addr", "", "HTTPS server address host:port (required)")
		n        = fs.Int("n", 5000, "connections to open")
		h2       = fs.Bool("h2", false, "speak HTTP/2 (default HTTP/1.1)")
		parallel = fs.Int("parallel", 16, "connections being opened at once")
		lifetime = fs.Duration("lifetime", 5*time.Minute, "exit after this long whatever happens")
	)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if err := raiseNoFile(uint64(*n) + 1000); err != nil {
		return err
	}
	transports := make([]*http.Transport, *n)
	var next atomic.Int64
	var failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for range *parallel {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= *n || ctx.Err() != nil {
					return
				}
				// A busy machine can make a handshake time out: try
				// each connection three times.
				var err error
				for range 3 {
					tr := holdTransport(*addr, *h2)
					if err = holdRequest(ctx, tr, *h2); err == nil {
						transports[i] = tr
						break
					}
					tr.CloseIdleConnections()
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				}
			}
		})
	}
	wg.Wait()
	defer func() {
		for _, tr := range transports {
			if tr != nil {
				tr.CloseIdleConnections()
			}
		}
	}()
	if f := failed.Load(); f > 0 {
		return fmt.Errorf("bench: hold: %d of %d connections failed; first: %v", f, *n, firstErr.Load())
	}
	fmt.Fprintf(stdout, "held %d\n", *n)
	waitStop(ctx, stdin, *lifetime)
	return nil
}

func holdTransport(addr string, h2 bool) *http.Transport {
	var d net.Dialer
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", addr)
		},
		TLSClientConfig:     &tls.Config{ServerName: nameECDSA, InsecureSkipVerify: true, MinVersion: tls.VersionTLS13},
		MaxIdleConnsPerHost: 1,
		DisableCompression:  true,
		ForceAttemptHTTP2:   h2,
	}
	if !h2 {
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	return tr
}

func holdRequest(ctx context.Context, tr *http.Transport, h2 bool) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+nameECDSA+"/", nil)
	if err != nil {
		return err
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %s", resp.Status)
	}
	if h2 != (resp.ProtoMajor == 2) {
		return fmt.Errorf("got %s", resp.Proto)
	}
	return nil
}

// raiseNoFile raises the soft limit on open files to at least want, up to
// the hard limit.
func raiseNoFile(want uint64) error {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return err
	}
	if lim.Cur >= want {
		return nil
	}
	if lim.Max < want {
		return fmt.Errorf("bench: the open-files hard limit is %d; %d are needed (raise it with ulimit -Hn)", lim.Max, want)
	}
	lim.Cur = want
	return syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
}
