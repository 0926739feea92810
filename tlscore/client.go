package tlscore

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	_ "google.golang.org/grpc/health" // client-side health checking
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// DefaultCallTimeout is the deadline of a keyserver call when
// [ClientConfig.CallTimeout] is zero.
const DefaultCallTimeout = 2 * time.Second

// minConnectTimeout bounds one attempt to connect to a keyserver, TLS
// handshake included.
const minConnectTimeout = 5 * time.Second

// DefaultReconnectBackoff caps the wait between attempts to connect to a
// keyserver when [ClientConfig.ReconnectBackoff] is zero.
const DefaultReconnectBackoff = 2 * time.Second

// ClientConfig configures a [Client]. It must not be modified after it is
// passed to [Dial].
type ClientConfig struct {
	// Addresses are the keyservers, each "host:port". Required. Calls are
	// balanced round-robin over the keyservers that are connected and whose
	// health service reports keyless.v1.KeylessService as SERVING.
	//
	// Alternatively, a single "dns:///host:port" names every address that
	// host resolves to, through gRPC's DNS resolver, which resolves it again
	// when a connection fails; the TLS server name is then host unless
	// TLS.ServerName says otherwise.
	Addresses []string

	// TLS is the client side of the mutual TLS 1.3 link, as built by
	// [link.ClientMTLSConfig]. Required: it must present a client certificate and
	// have MinVersion TLS 1.3. Its ServerName is the name every keyserver's
	// certificate is verified against; if it is empty, the host of the
	// first address is used, which is allowed only with a single address.
	TLS *tls.Config

	// CallTimeout bounds each call, retries included, unless the caller's
	// context ends sooner. Zero means DefaultCallTimeout. On a long path
	// the bound is raised to four times the link's round trip, measured for
	// each keyserver as the shortest operation that succeeded in the last
	// 10 to 20 seconds, when that is longer: the farthest keyserver's.
	CallTimeout time.Duration

	// KeepaliveInterval, if positive, makes the client ping a keyserver
	// whose connection has been quiet for that long and drop the connection
	// when no answer comes within CallTimeout (at least
	// DefaultCallTimeout, so that a lowered CallTimeout does not drop a
	// sound link whose round trip rose for a moment), so that a keyserver
	// that vanished without closing its connections is taken out of the
	// balancing even while no operation goes to it. Each ping is a TCP
	// segment each way, which keeps NAT and firewall state alive. gRPC
	// raises values under 10 seconds to 10 seconds. The keyserver's
	// keepalive.EnforcementPolicy.MinTime must be at most this interval, or
	// it will close the connection. Zero means no pings.
	KeepaliveInterval time.Duration

	// WindowSize is the HTTP/2 flow-control window of the client's
	// connections, in bytes (see [link.DefaultWindowSize]): it caps what a
	// keyserver link carries per round trip. Zero means
	// link.DefaultWindowSize; otherwise it must lie between
	// link.MinWindowSize and link.MaxWindowSize.
	WindowSize int

	// ReconnectBackoff caps the wait between attempts to connect to a
	// keyserver that is down: attempts start 100 ms apart and the interval
	// grows by 1.6 each time, with jitter, up to this cap. It bounds how
	// long a keyserver that has come back waits before it is used again.
	// Zero means DefaultReconnectBackoff (gRPC's own default is two
	// minutes).
	ReconnectBackoff time.Duration

	// Dialer, if set, opens connections instead of a TCP dial, for example
	// to a Unix socket or, in tests, an in-memory listener. addr is one of
	// Addresses.
	Dialer func(ctx context.Context, addr string) (net.Conn, error)

	// Logger receives one line per failed call. Nil means no logging.
	Logger hclog.Logger

	// Metrics, if set, records the duration and errors of each call by
	// keyserver address (see [Metrics]). The client then dials the
	// keyservers itself (with Dialer, else a plain TCP dial), so that each
	// connection is named by its configured address; gRPC's proxy support
	// (HTTPS_PROXY) is not used. For a static list of addresses, it also
	// follows each keyserver's health over a connection of its own (see
	// keyserverHealth), sets keyless_edge_keyserver_up and logs each change
	// of state once: ready (it reports SERVING), failing (it reports
	// NOT_SERVING, an HSM fault say, or its link handshake fails), gone (its
	// connection was refused, or lost and not made again within a second:
	// a connection the keyserver ends at its -max-connection-age is not
	// news) and back (ready again).
	Metrics *Metrics
}

// Validate reports whether the configuration is usable.
func (c *ClientConfig) Validate() error {
	if len(c.Addresses) == 0 {
		return errors.New("tlscore: ClientConfig.Addresses is empty")
	}
	for i, a := range c.Addresses {
		hostport, isDNS := strings.CutPrefix(a, dnsScheme)
		if isDNS && len(c.Addresses) > 1 {
			return fmt.Errorf("tlscore: ClientConfig.Addresses[%d] %q: a %s target must be the only address", i, a, dnsScheme)
		}
		if _, _, err := net.SplitHostPort(hostport); err != nil {
			return fmt.Errorf("tlscore: ClientConfig.Addresses[%d] %q is not host:port: %w", i, a, err)
		}
		if slices.Index(c.Addresses, a) != i {
			return fmt.Errorf("tlscore: ClientConfig.Addresses lists %q twice", a)
		}
	}
	switch {
	case c.TLS == nil:
		return errors.New("tlscore: ClientConfig.TLS is nil; the keyserver link needs mutual TLS")
	case len(c.TLS.Certificates) == 0 && c.TLS.GetClientCertificate == nil:
		return errors.New("tlscore: ClientConfig.TLS has no client certificate; the keyserver requires one")
	case c.TLS.MinVersion < tls.VersionTLS13:
		return errors.New("tlscore: ClientConfig.TLS.MinVersion must be TLS 1.3")
	case c.TLS.ServerName == "" && len(c.Addresses) > 1:
		return errors.New("tlscore: ClientConfig.TLS.ServerName is required with several addresses: it names the keyservers' certificates")
	case c.CallTimeout < 0:
		return fmt.Errorf("tlscore: ClientConfig.CallTimeout is %v; it must be positive, or zero for the default", c.CallTimeout)
	case c.KeepaliveInterval < 0:
		return fmt.Errorf("tlscore: ClientConfig.KeepaliveInterval is %v; it must be positive, or zero for none", c.KeepaliveInterval)
	case c.WindowSize != 0 && link.ValidateWindowSize(c.WindowSize) != nil:
		return fmt.Errorf("tlscore: ClientConfig.WindowSize is %d; it must be between %d and %d bytes, or zero for the default", c.WindowSize, link.MinWindowSize, link.MaxWindowSize)
	case c.ReconnectBackoff < 0:
		return fmt.Errorf("tlscore: ClientConfig.ReconnectBackoff is %v; it must be positive, or zero for the default", c.ReconnectBackoff)
	}
	return nil
}

// Client calls the keyservers. Sign and Decrypt travel as operations on
// long-lived KeylessService.Stream calls, batched with whatever else is
// pending (see stream.go), or as unary calls to a keyserver without
// Stream; ListKeys is a unary call. It is safe for concurrent use; the
// caller owns it and must Close it.
type Client struct {
	conn    *grpc.ClientConn
	api     keylessv1.KeylessServiceClient
	timeout time.Duration
	// rtt estimates the link's round trip from successful operations;
	// it raises a call's deadline above timeout on a long path.
	rtt     rttEstimator
	logger  hclog.Logger
	metrics *Metrics
	ownConn bool // Close closes conn
	// handshakes records the link's handshakes, to explain failed calls;
	// nil for a Client over a caller's connection.
	handshakes *handshakeState
	// health follows each keyserver's state; nil without metrics, or for
	// a dns:/// target.
	health *keyserverHealth

	// streams carry Sign and Decrypt (see stream.go); streamsCtx ends them
	// at Close.
	streams     *opStreams
	streamsCtx  context.Context
	stopStreams context.CancelFunc

	closeOnce sync.Once
	closeErr  error
}

// resolverScheme is the scheme of the per-Client manual resolver. It is
// registered only with that Client's connection, never globally.
const resolverScheme = "keyless"

// dnsScheme prefixes a keyserver address resolved by gRPC's DNS resolver.
const dnsScheme = "dns:///"

// serviceConfig balances round-robin over healthy keyservers and retries a
// call once, on the next keyserver, when the first answers UNAVAILABLE: a
// keyserver that died or is shutting down, or whose HSM is reconnecting
// after a fault. Every operation is safe to repeat: a signature or a
// premaster decryption has no side effect, the keyserver is stateless, and
// a call is repeated only when no answer came. (Implicit rejection answers
// a ciphertext with the same bytes on every keyserver holding the key.)
// Retries happen within the call's one deadline, so within the handshake's.
//
// A keyserver leaves the balancing when its connection breaks (at once for
// a killed process, whose kernel resets the connection; after the
// keepalive timeout for one that vanished) or when its health service
// stops reporting SERVING (an HSM fault, a shutdown), and comes back when
// it reconnects and reports SERVING again.
var serviceConfig = fmt.Sprintf(`{
  "loadBalancingConfig": [{"round_robin": {}}],
  "healthCheckConfig": {"serviceName": %[1]q},
  "methodConfig": [{
    "name": [{"service": %[1]q, "method": "Sign"}, {"service": %[1]q, "method": "Decrypt"}, {"service": %[1]q, "method": "ListKeys"}],
    "retryPolicy": {
      "maxAttempts": 2,
      "initialBackoff": "0.005s",
      "maxBackoff": "0.05s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }]
}`, keylessv1.KeylessService_ServiceDesc.ServiceName)

// Dial returns a Client for the keyservers in cfg. It does not wait for a
// connection: the first call does. Errors are configuration errors.
func Dial(cfg ClientConfig) (*Client, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	timeout := cfg.CallTimeout
	if timeout == 0 {
		timeout = DefaultCallTimeout
	}
	logger := cfg.Logger
	if logger == nil {
		logger = hclog.NewNullLogger()
	}

	// A static list goes through a manual resolver; a dns:/// target
	// through gRPC's own DNS resolver.
	target := cfg.Addresses[0]
	var resolvers []grpc.DialOption
	if !strings.HasPrefix(target, dnsScheme) {
		r := manual.NewBuilderWithScheme(resolverScheme)
		addrs := make([]resolver.Address, len(cfg.Addresses))
		for i, a := range cfg.Addresses {
			addrs[i] = resolver.Address{Addr: a}
		}
		r.InitialState(resolver.State{Addresses: addrs})
		resolvers = append(resolvers, grpc.WithResolvers(r))
		// The target's endpoint is the first address, which is also the
		// TLS server name when cfg.TLS.ServerName is empty (a single
		// keyserver).
		target = resolverScheme + ":///" + target
	}

	maxBackoff := cfg.ReconnectBackoff
	if maxBackoff == 0 {
		maxBackoff = DefaultReconnectBackoff
	}
	handshakes := &handshakeState{}
	connectParams := grpc.ConnectParams{
		Backoff: backoff.Config{
			BaseDelay:  min(100*time.Millisecond, maxBackoff),
			Multiplier: 1.6,
			Jitter:     0.2,
			MaxDelay:   maxBackoff,
		},
		MinConnectTimeout: minConnectTimeout,
	}
	var window []link.TransportOption
	if cfg.WindowSize != 0 {
		window = append(window, link.WithWindowSize(cfg.WindowSize))
	}
	opts := append(link.DialOptions(window...),
		grpc.WithTransportCredentials(&linkCredentials{TransportCredentials: credentials.NewTLS(cfg.TLS), state: handshakes}),
		grpc.WithDefaultServiceConfig(serviceConfig),
		grpc.WithConnectParams(connectParams),
	)
	dialer := cfg.Dialer
	if cfg.Metrics != nil {
		if dialer == nil {
			var d net.Dialer
			dialer = func(ctx context.Context, addr string) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) }
		}
		opts = append(opts, grpc.WithChainUnaryInterceptor(cfg.Metrics.unaryInterceptor(func(a net.Addr) string {
			if ka, ok := a.(keyserverAddr); ok {
				return string(ka)
			}
			return "none"
		})), grpc.WithContextDialer(namedDialer(dialer)))
	} else if dialer != nil {
		// Named, so that streams tell keyservers apart (see stream.go)
		// when the dialer's connections share a remote address.
		opts = append(opts, grpc.WithContextDialer(namedDialer(dialer)))
	}
	var keepaliveOpts []grpc.DialOption
	if cfg.KeepaliveInterval > 0 {
		keepaliveOpts = append(keepaliveOpts, grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time: cfg.KeepaliveInterval,
			// gRPC fixes it for the connection's life, so it cannot follow
			// the measured round trip as call deadlines do; 2 s is over
			// three times the longest round trip on Earth (a geostationary
			// hop, ~600 ms).
			Timeout:             max(timeout, DefaultCallTimeout),
			PermitWithoutStream: true,
		}))
	}
	opts = append(opts, keepaliveOpts...)
	conn, err := grpc.NewClient(target, append(opts, resolvers...)...)
	if err != nil {
		return nil, fmt.Errorf("tlscore: keyserver client: %w", err)
	}
	// One stream per keyserver of a static list; a DNS name may stand for
	// several, so it gets a few.
	n := len(cfg.Addresses)
	if strings.HasPrefix(cfg.Addresses[0], dnsScheme) {
		n = dnsStreams
	}
	c := newClient(conn, timeout, logger.Named("keyserver_client"), n)
	c.streams.failover = n > 1
	c.metrics = cfg.Metrics
	c.ownConn = true
	c.handshakes = handshakes
	if cfg.Metrics != nil && !strings.HasPrefix(cfg.Addresses[0], dnsScheme) {
		c.health = newKeyserverHealth(logger.Named("keyserver_health"), cfg.Metrics, cfg.Addresses)
		watchOpts := append(link.DialOptions(), grpc.WithConnectParams(connectParams))
		c.health.watch(c.streamsCtx, cfg.TLS, dialer, append(watchOpts, keepaliveOpts...))
	}
	return c, nil
}

// NewClientConn returns a Client that calls a keyserver over conn, a
// connection the caller made with its own options and still owns: Close
// does not close it. Each call is bounded by timeout (zero means
// DefaultCallTimeout); there are no metrics and no logging. Dial is the
// way to reach keyservers for an edge; this is for programs that manage
// their connection themselves, such as the benchmark.
func NewClientConn(conn *grpc.ClientConn, timeout time.Duration) (*Client, error) {
	if conn == nil {
		return nil, errors.New("tlscore: NewClientConn: nil connection")
	}
	if timeout < 0 {
		return nil, fmt.Errorf("tlscore: NewClientConn: timeout %v; it must be positive, or zero for the default", timeout)
	}
	if timeout == 0 {
		timeout = DefaultCallTimeout
	}
	return newClient(conn, timeout, hclog.NewNullLogger(), 1), nil
}

// newClient returns a Client over conn with streams streams.
func newClient(conn *grpc.ClientConn, timeout time.Duration, logger hclog.Logger, streams int) *Client {
	c := &Client{
		conn:    conn,
		api:     keylessv1.NewKeylessServiceClient(conn),
		timeout: timeout,
		logger:  logger,
	}
	c.streamsCtx, c.stopStreams = context.WithCancel(context.Background())
	c.streams = newOpStreams(c, streams)
	return c
}

// dnsStreams is the number of streams of a Client whose keyservers are
// named by a dns:/// target.
const dnsStreams = 4

// keyserverLabel names the keyserver at addr for metrics.
func (c *Client) keyserverLabel(addr net.Addr) string {
	if ka, ok := addr.(keyserverAddr); ok {
		return string(ka)
	}
	if addr == nil {
		return "none"
	}
	return addr.String()
}

// Ready reports whether a keyserver is ready for calls: connected, and
// reporting SERVING to health checks. A client that has gone idle is asked
// to reconnect, and reports false until it has.
func (c *Client) Ready() bool {
	switch c.conn.GetState() {
	case connectivity.Ready:
		return true
	case connectivity.Idle:
		c.conn.Connect()
	}
	return false
}

// CallTimeout returns the deadline applied to each call.
func (c *Client) CallTimeout() time.Duration { return c.timeout }

// Close ends the client's streams and closes its connections (unless it
// was made by NewClientConn). Calls made after Close fail. It is safe to
// call more than once; later calls return the first call's result.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		if c.health != nil {
			c.health.closing.Store(true)
		}
		c.stopStreams()
		c.streams.close()
		if c.ownConn {
			c.closeErr = c.conn.Close()
		}
	})
	return c.closeErr
}

// callContext bounds a call by the client's timeout, raised to four times
// the link's measured round trip when that is longer (the farthest
// keyserver's, since the call and its retry may go to any), or by ctx's own
// deadline if that is sooner.
func (c *Client) callContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, max(c.rtt.deadline(c.timeout), rttDeadlineFactor*c.streams.farthest()))
}

// Sign asks a keyserver to sign digest (for Ed25519, the whole message) with
// the key keyID using alg. rc describes the TLS connection for the
// keyserver's audit trail; it may be nil, and fields too long or not UTF-8
// are cut to what the keyserver takes. Errors wrap the gRPC status (use
// status.Code): DeadlineExceeded when no keyserver answered in time,
// Unavailable when none could be reached, NotFound for an unknown key,
// InvalidArgument for a request the keyserver refused. When none could be
// reached and the link's latest handshake failed, the error is also a
// *[LinkHandshakeError].
func (c *Client) Sign(ctx context.Context, keyID link.KeyID, alg link.Algorithm, digest []byte, rc *keylessv1.RequestContext) ([]byte, error) {
	ctx, cancel := c.callContext(ctx)
	defer cancel()
	start := time.Now()
	req := &keylessv1.SignRequest{
		KeyId:     keyID[:],
		Algorithm: alg.Wire,
		Digest:    digest,
		Context:   auditContext(rc),
	}
	resp, ks, err := perform(c, ctx, "Sign", start, &keylessv1.Operation{Request: &keylessv1.Operation_Sign{Sign: req}},
		(*keylessv1.OperationResult).GetSign, func(o ...grpc.CallOption) (*keylessv1.SignResponse, error) { return c.api.Sign(ctx, req, o...) })
	if err == nil && len(resp.GetSignature()) == 0 {
		err = errors.New("the keyserver returned an empty signature")
	}
	if err != nil {
		return nil, fmt.Errorf("tlscore: %w", c.failed("sign", keyID, rc, start, err))
	}
	recordKeyOp(ctx, keyID, ks)
	return resp.GetSignature(), nil
}

// Decrypt asks a keyserver to decrypt a TLS 1.2 RSA-encrypted premaster
// secret with the key keyID. The answer is always exactly
// [link.PremasterLen] (48) bytes: the keyserver applies implicit rejection,
// so an invalid ciphertext yields bytes unpredictable without the key (the
// same bytes each time), not an error. An answer of any other length is an
// error. Errors are as for [Client.Sign].
func (c *Client) Decrypt(ctx context.Context, keyID link.KeyID, ciphertext []byte, rc *keylessv1.RequestContext) ([]byte, error) {
	ctx, cancel := c.callContext(ctx)
	defer cancel()
	start := time.Now()
	req := &keylessv1.DecryptRequest{
		KeyId:              keyID[:],
		EncryptedPremaster: ciphertext,
		Context:            auditContext(rc),
	}
	resp, ks, err := perform(c, ctx, "Decrypt", start, &keylessv1.Operation{Request: &keylessv1.Operation_Decrypt{Decrypt: req}},
		(*keylessv1.OperationResult).GetDecrypt, func(o ...grpc.CallOption) (*keylessv1.DecryptResponse, error) { return c.api.Decrypt(ctx, req, o...) })
	if err == nil && len(resp.GetPremaster()) != link.PremasterLen {
		err = fmt.Errorf("the keyserver returned a %d-byte premaster secret; want %d", len(resp.GetPremaster()), link.PremasterLen)
	}
	if err != nil {
		return nil, fmt.Errorf("tlscore: %w", c.failed("decrypt", keyID, rc, start, err))
	}
	recordKeyOp(ctx, keyID, ks)
	return resp.GetPremaster(), nil
}

// ListKeys returns the keys the keyservers let this edge use. It asks one
// keyserver: all keyservers behind one Client are expected to hold the
// same keys. Errors are as for [Client.Sign].
func (c *Client) ListKeys(ctx context.Context) ([]*keylessv1.Key, error) {
	keys, err := c.listKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("tlscore: %w", err)
	}
	return keys, nil
}

// listKeys is ListKeys, with errors that do not name the package.
func (c *Client) listKeys(ctx context.Context) ([]*keylessv1.Key, error) {
	ctx, cancel := c.callContext(ctx)
	defer cancel()
	start := time.Now()
	resp, err := c.api.ListKeys(ctx, &keylessv1.ListKeysRequest{})
	if err != nil {
		return nil, c.failed("list_keys", link.KeyID{}, nil, start, err)
	}
	return resp.GetKeys(), nil
}

// perform sends op on a stream and returns the response get picks from its
// result (nil if the result is another kind or an error), or, for a
// keyserver without Stream, makes the unary call with the options given.
// It also returns the label of the keyserver that answered ("none" if
// none did).
func perform[Resp any](c *Client, ctx context.Context, method string, start time.Time, op *keylessv1.Operation,
	get func(*keylessv1.OperationResult) Resp, unary func(...grpc.CallOption) (Resp, error)) (Resp, string, error) {
	if !c.streams.unary.Load() {
		r, ks, err := c.stream(ctx, method, start, op)
		if !errors.Is(err, errUseUnary) {
			if err == nil {
				c.rtt.observe(time.Since(start))
			}
			return get(r), ks, err
		}
	}
	var p peer.Peer
	resp, err := unary(grpc.Peer(&p))
	if err == nil {
		c.rtt.observe(time.Since(start))
	}
	return resp, c.keyserverLabel(p.Addr), err
}

// stream performs op on a stream and returns its result, or its error as a
// status error; it records the call's metrics under method. When the
// keyserver turns out not to implement Stream, it returns errUseUnary (and
// later calls skip streams): the caller makes the unary call instead.
func (c *Client) stream(ctx context.Context, method string, start time.Time, op *keylessv1.Operation) (*keylessv1.OperationResult, string, error) {
	r, ks, err := c.streams.do(ctx, op)
	if errors.Is(err, errUseUnary) {
		c.logger.Info("the keyserver does not implement Stream; using unary calls")
		return nil, ks, err
	}
	if err == nil && r.GetError() != nil {
		err = status.Error(codes.Code(r.GetError().GetCode()), r.GetError().GetMessage())
	}
	if c.metrics != nil {
		c.metrics.observeCall(method, ks, start, err)
	}
	return r, ks, err
}

// failed logs a failed call once and returns the error to hand back, which
// names the operation but not the package: a *LinkHandshakeError if the
// link's latest handshake explains it.
func (c *Client) failed(op string, keyID link.KeyID, rc *keylessv1.RequestContext, start time.Time, err error) error {
	err = c.handshakes.explain(err)
	args := []any{"op", op, "code", status.Code(err), "duration", time.Since(start), "error", err}
	if keyID != (link.KeyID{}) {
		args = append(args, "key_id", link.FormatKeyID(keyID))
	}
	if rc != nil {
		args = append(args, "server_name", rc.GetServerName(), "connection_id", rc.GetConnectionId())
	}
	c.logger.Warn("keyserver call failed", args...)
	if op == "list_keys" {
		return fmt.Errorf("list keys: %w", err)
	}
	return fmt.Errorf("%s with key %s: %w", op, link.FormatKeyID(keyID), err)
}
