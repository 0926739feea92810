package signer

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// Config configures a [Service]. A Config must not be modified after it is
// passed to [NewService].
type Config struct {
	// Keys is where the keys live. Required.
	Keys KeyStore

	// Policy says which client identities may use which keys, operations
	// and schemes; everything else is denied. Required: without a policy
	// there is nothing to allow. [Service.SetPolicy] replaces it.
	Policy *Policy

	// Quota is the quota of each identity that no quota of the policy
	// names. The zero value sets no limit.
	Quota Quota

	// Audit receives one record per request. Nil means no audit trail (the
	// keyserver command always sets one). Install [Service.StatsHandler] on
	// the gRPC server so that requests refused before their handler are
	// recorded too.
	Audit Auditor

	// MaxConcurrent bounds the key operations running in the key store at
	// once; more wait in a queue that is fair between identities: each
	// identity waits in its own queue, and a slot that frees goes to the
	// identity with the fewest operations running among those waiting
	// (in turn between equals), so an identity that floods the keyserver
	// delays mostly itself. Zero means no bound.
	MaxConcurrent int

	// MaxQueued bounds the unary calls waiting for the key store when
	// MaxConcurrent are running; beyond it they fail at once with
	// ResourceExhausted, unless another identity has at least two more
	// calls waiting than the caller's: then the newest of those fails
	// with ResourceExhausted instead and the call waits in its place, so
	// that one identity cannot fill the queue against the others.
	// Operations of a Stream wait in their stream
	// instead (at most 256 per stream; beyond that the stream is not read,
	// so HTTP/2 flow control holds the client back). Waits are bounded by
	// each request's deadline.
	MaxQueued int

	// MaxStreamsPerIdentity bounds the Stream calls one identity may have
	// open at once, over all its connections; a Stream beyond it ends at
	// once with ResourceExhausted. An open Stream holds memory and
	// goroutines in the keyserver even when idle, which quotas (counting
	// operations) do not bound. An edge opens one to four. Zero means no
	// bound.
	MaxStreamsPerIdentity int

	// Revoked reports whether a client certificate is revoked; the
	// service refuses every request of a connection whose certificate it
	// reports, with Unauthenticated. A keyserver passes
	// [link.MTLSCredentials.Revoked], which also closes such connections.
	// Nil means no certificate is revoked.
	Revoked func(*x509.Certificate) bool

	// Tickets derives the session ticket keys that GetTicketKeys hands to
	// the identities a policy rule allows the tickets operation. Nil
	// means GetTicketKeys answers UNAVAILABLE.
	Tickets *TicketKeys

	// Logger receives one line per failed operation. Nil means no logging.
	Logger hclog.Logger

	// resultDelay replaces maxResultDelay in tests.
	resultDelay time.Duration
	// workerIdle replaces streamWorkerIdle in tests.
	workerIdle time.Duration
}

// Validate reports whether the configuration is usable. A value out of
// range is a *[ConfigError].
func (c *Config) Validate() error {
	switch {
	case c.Keys == nil:
		return errors.New("signer: Config.Keys is nil")
	case c.Policy == nil:
		return errors.New("signer: Config.Policy is nil; the service denies everything a policy does not allow, so it needs one")
	}
	return c.ValidateLimits()
}

// ValidateLimits reports whether the configuration's limits and quota are
// in range, which a caller can check before it has a key store or a
// policy. Errors are *[ConfigError].
func (c *Config) ValidateLimits() error {
	switch {
	case c.MaxConcurrent < 0:
		return &ConfigError{Field: "Config.MaxConcurrent", Value: c.MaxConcurrent, Want: "0 (no bound) or more"}
	case c.MaxQueued < 0:
		return &ConfigError{Field: "Config.MaxQueued", Value: c.MaxQueued, Want: "0 or more"}
	case c.MaxStreamsPerIdentity < 0:
		return &ConfigError{Field: "Config.MaxStreamsPerIdentity", Value: c.MaxStreamsPerIdentity, Want: "0 (no bound) or more"}
	}
	return c.Quota.validate("Config.Quota")
}

// defaultStreamWorkers is the number of workers of each Stream when
// Config.MaxConcurrent sets no bound.
const defaultStreamWorkers = 8

// Service implements keylessv1.KeylessServiceServer over a [KeyStore]. Its
// handlers identify the caller, validate each request, apply the policy and
// quotas, find the key, perform the operation and map errors to gRPC
// codes; they know nothing of the transport. It is safe for concurrent use.
type Service struct {
	keylessv1.UnimplementedKeylessServiceServer

	keys   KeyStore
	policy atomic.Pointer[Policy]
	quota  Quota
	quotas *quotas
	limit  *limiter
	audit  Auditor
	logger hclog.Logger
	// tickets is Config.Tickets.
	tickets *TicketKeys

	// auditFailing is set while the last audit record could not be written.
	auditFailing atomic.Bool
	// revoked is Config.Revoked, or a func that reports nothing revoked.
	revoked func(*x509.Certificate) bool

	// streamWorkers is the number of workers of each Stream.
	streamWorkers int
	// resultDelay bounds how long a Stream's result waits for others to
	// share its message (see serverStream.hold).
	resultDelay time.Duration
	// workerIdle is how long a Stream's worker waits for an operation
	// before it ends (see serverStream.work).
	workerIdle time.Duration
	// traffic counts the messages of every Stream and what they carry.
	traffic streamTraffic
	// workersRunning counts the workers of every Stream.
	workersRunning atomic.Int64
	// maxStreamsPerIdentity is Config.MaxStreamsPerIdentity.
	maxStreamsPerIdentity int
	// streamsMu guards the open streams, their number per identity, and
	// draining, set by Drain.
	streamsMu sync.Mutex
	streams   map[*serverStream]struct{}
	streamsOf map[string]int
	draining  bool
}

var _ keylessv1.KeylessServiceServer = (*Service)(nil)

// NewService returns a Service for cfg.
func NewService(cfg Config) (*Service, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	logger := cfg.Logger
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	s := &Service{
		keys:    cfg.Keys,
		quota:   cfg.Quota,
		quotas:  newQuotas(),
		limit:   newLimiter(cfg.MaxConcurrent, cfg.MaxQueued),
		audit:   cfg.Audit,
		logger:  logger,
		revoked: cfg.Revoked,
		tickets: cfg.Tickets,

		streamWorkers: 2 * cfg.MaxConcurrent,
		resultDelay:   cfg.resultDelay,
		workerIdle:    cfg.workerIdle,
		streams:       make(map[*serverStream]struct{}),
		streamsOf:     make(map[string]int),

		maxStreamsPerIdentity: cfg.MaxStreamsPerIdentity,
	}
	if s.streamWorkers == 0 {
		s.streamWorkers = defaultStreamWorkers
	}
	if s.revoked == nil {
		s.revoked = func(*x509.Certificate) bool { return false }
	}
	if s.resultDelay == 0 {
		s.resultDelay = maxResultDelay
	}
	if s.workerIdle == 0 {
		s.workerIdle = streamWorkerIdle
	}
	s.policy.Store(cfg.Policy)
	return s, nil
}

// SetPolicy replaces the policy for requests that start after it returns,
// on new and existing connections alike: an identity the new policy does
// not list is refused at its next request. Counters of quotas carry over.
func (s *Service) SetPolicy(p *Policy) error {
	if p == nil {
		return errors.New("signer: SetPolicy(nil): the service needs a policy")
	}
	s.policy.Store(p)
	return nil
}

// Policy returns the policy in force.
func (s *Service) Policy() *Policy { return s.policy.Load() }

// CheckPeer reports whether a client certificate that chains to the
// keyserver's CA presents an identity the policy lists, and none that its
// deny list names. It is meant for the
// TLS handshake (see link.MTLSCredentials.ServerCredentials), so that
// unlisted clients are refused before they can send a request; the handlers
// check again at every request. The error is a *[PermissionError].
func (s *Service) CheckPeer(leaf *x509.Certificate) error {
	if _, ok, reason := s.policy.Load().admit(CertificateNames(leaf)); !ok {
		return &PermissionError{Reason: reason}
	}
	return nil
}

// checkCredential returns ErrCredentialExpired or ErrCredentialRevoked if
// the certificate chain the caller's connection was authenticated with has
// expired or been revoked since the connection was opened: TLS checks it
// only in the handshake, and a connection may outlive it.
func (s *Service) checkCredential(ctx context.Context, now time.Time) error {
	p, _ := peer.FromContext(ctx)
	if p == nil {
		return nil
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.VerifiedChains) == 0 {
		return nil
	}
	for _, c := range info.State.VerifiedChains[0] {
		if now.After(c.NotAfter) {
			return ErrCredentialExpired
		}
		if s.revoked(c) {
			return ErrCredentialRevoked
		}
	}
	return nil
}

// admit applies the caller's quota: the policy's quota for identity, or
// the service's default. The caller must call release after a nil error.
func (s *Service) admit(pol *Policy, identity string) (release func(), err error) {
	if q, ok := pol.quotaFor(identity); ok {
		return s.quotas.acquire(identity, q.desc, q.quota)
	}
	return s.quotas.acquire(identity, "the keyserver's default quota per identity", s.quota)
}

// start identifies the caller of c and admits it: the checks every
// request passes first. The caller must call release after a nil error.
func (s *Service) start(ctx context.Context, c *call) (pol *Policy, identity string, release func(), err error) {
	pol = s.policy.Load()
	identity, err = identify(ctx, pol, c)
	if err != nil {
		return nil, "", nil, err
	}
	if err := s.checkCredential(ctx, time.Now()); err != nil {
		return nil, "", nil, err
	}
	if s.auditFailing.Load() {
		return nil, "", nil, ErrAuditUnavailable
	}
	release, err = s.admit(pol, identity)
	if err != nil {
		return nil, "", nil, err
	}
	return pol, identity, release, nil
}

// Sign implements KeylessService.Sign.
func (s *Service) Sign(ctx context.Context, req *keylessv1.SignRequest) (*keylessv1.SignResponse, error) {
	return s.sign1(ctx, req, nil)
}

// sign1 answers one sign request, the unary call's or a stream
// operation's; refused, if not nil, is the error to answer with instead of
// performing it.
func (s *Service) sign1(ctx context.Context, req *keylessv1.SignRequest, refused error) (*keylessv1.SignResponse, error) {
	c, finish := s.begin(ctx, OpSign)
	c.setRequest(req.GetKeyId(), req.GetContext())
	if a := req.GetAlgorithm(); a != keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_UNSPECIFIED {
		c.scheme = SchemeName(a)
	}
	var sig []byte
	err := refused
	if err == nil {
		sig, err = s.sign(ctx, c, req)
	}
	if err = s.answer(c, finish, err); err != nil {
		return nil, err
	}
	return &keylessv1.SignResponse{Signature: sig}, nil
}

func (s *Service) sign(ctx context.Context, c *call, req *keylessv1.SignRequest) ([]byte, error) {
	pol, identity, release, err := s.start(ctx, c)
	if err != nil {
		return nil, err
	}
	defer release()
	id, alg, err := ValidateSignRequest(req)
	if err != nil {
		return nil, err
	}
	key, err := s.key(ctx, identity, id)
	if err != nil {
		return nil, err
	}
	if c.rule, err = pol.authorize(identity, refOf(id, key), OpSign, alg); err != nil {
		return nil, err
	}
	if err := checkAlgorithm(key, alg); err != nil {
		return nil, err
	}
	done, err := s.limit.acquire(ctx, identity, c.streamed)
	if err != nil {
		return nil, err
	}
	return signContext(ctx, key, req.GetDigest(), alg.SignerOpts(), done)
}

// answer ends a request that returned err: it logs a failure, writes the
// audit record and returns the status error to answer with. A result that
// could not be recorded is not returned.
func (s *Service) answer(c *call, finish func(error) error, err error) error {
	if err != nil {
		s.logFailure(c, err)
		var nferr *KeyNotFoundError
		if errors.As(err, &nferr) {
			c.detail = nferr.Reason
		}
		st := toStatus(err)
		_ = finish(st)
		return st
	}
	if ferr := finish(nil); ferr != nil {
		return toStatus(ErrAuditUnavailable)
	}
	return nil
}

// Decrypt implements KeylessService.Decrypt.
func (s *Service) Decrypt(ctx context.Context, req *keylessv1.DecryptRequest) (*keylessv1.DecryptResponse, error) {
	return s.decrypt1(ctx, req, nil)
}

// decrypt1 answers one decrypt request, as sign1 does a sign request.
func (s *Service) decrypt1(ctx context.Context, req *keylessv1.DecryptRequest, refused error) (*keylessv1.DecryptResponse, error) {
	c, finish := s.begin(ctx, OpDecrypt)
	c.setRequest(req.GetKeyId(), req.GetContext())
	var pms []byte
	err := refused
	if err == nil {
		pms, err = s.decrypt(ctx, c, req)
	}
	if err = s.answer(c, finish, err); err != nil {
		return nil, err
	}
	return &keylessv1.DecryptResponse{Premaster: pms}, nil
}

func (s *Service) decrypt(ctx context.Context, c *call, req *keylessv1.DecryptRequest) ([]byte, error) {
	pol, identity, release, err := s.start(ctx, c)
	if err != nil {
		return nil, err
	}
	defer release()
	id, err := ValidateDecryptRequest(req)
	if err != nil {
		return nil, err
	}
	key, err := s.key(ctx, identity, id)
	if err != nil {
		return nil, err
	}
	if c.rule, err = pol.authorize(identity, refOf(id, key), OpDecrypt, link.Algorithm{}); err != nil {
		return nil, err
	}
	d, ok := key.(PremasterDecrypter)
	if !ok {
		return nil, &ValidationError{"key_id", fmt.Sprintf("key %s cannot decrypt premaster secrets (it is a %v key)", link.FormatKeyID(id), link.KeyTypeOf(key.Public()))}
	}
	done, err := s.limit.acquire(ctx, identity, c.streamed)
	if err != nil {
		return nil, err
	}
	defer done()
	pms, err := d.DecryptPremaster(ctx, req.GetEncryptedPremaster())
	if err != nil {
		return nil, err
	}
	if len(pms) != link.PremasterLen {
		return nil, fmt.Errorf("signer: key store returned a %d-byte premaster", len(pms))
	}
	return pms, nil
}

// ListKeys implements KeylessService.ListKeys. It lists only the keys the
// caller's policy lets it use, each with the schemes the policy allows it
// and the key can perform, and decrypt_premaster only where the policy
// enables decryption; a key left with neither is not listed.
func (s *Service) ListKeys(ctx context.Context, req *keylessv1.ListKeysRequest) (*keylessv1.ListKeysResponse, error) {
	c, finish := s.begin(ctx, "list_keys")
	resp, err := s.listKeys(ctx, c)
	if err = s.answer(c, finish, err); err != nil {
		return nil, err
	}
	return resp, nil
}

func (s *Service) listKeys(ctx context.Context, c *call) (*keylessv1.ListKeysResponse, error) {
	pol, identity, release, err := s.start(ctx, c)
	if err != nil {
		return nil, err
	}
	defer release()
	keys, err := s.keys.Keys(ctx)
	if err != nil {
		return nil, storeError(ctx, err)
	}
	resp := &keylessv1.ListKeysResponse{}
	for _, k := range keys {
		info, err := Describe(k)
		if err != nil {
			s.logger.Warn("key skipped", "error", err)
			continue
		}
		id, _ := link.KeyIDOf(k.Public())
		g, ok := pol.grantsFor(identity, refOf(id, k))
		if !ok {
			continue
		}
		algs := info.SignatureAlgorithms
		info.SignatureAlgorithms = nil
		if g.sign {
			for _, a := range algs {
				if g.schemes[a] {
					info.SignatureAlgorithms = append(info.SignatureAlgorithms, a)
				}
			}
		}
		info.DecryptPremaster = info.DecryptPremaster && g.decrypt
		if len(info.SignatureAlgorithms) == 0 && !info.DecryptPremaster {
			continue
		}
		resp.Keys = append(resp.Keys, info)
	}
	return resp, nil
}

// Describe returns the wire description of a key.
func Describe(k crypto.Signer) (*keylessv1.Key, error) {
	pub := k.Public()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("signer: describe key: %w", err)
	}
	id, _ := link.KeyIDOf(pub)
	info := &keylessv1.Key{
		KeyId:     id[:],
		Type:      link.KeyTypeOf(pub),
		Bits:      uint32(link.KeyBits(pub)),
		PublicKey: der,
	}
	for _, s := range Schemes(k) {
		info.SignatureAlgorithms = append(info.SignatureAlgorithms, keylessv1.SignatureAlgorithm(s))
	}
	_, info.DecryptPremaster = k.(PremasterDecrypter)
	if d, ok := k.(Describer); ok {
		info.Label, info.ObjectId = d.Label(), d.ObjectID()
	}
	return info, nil
}

// Schemes returns the schemes key can perform: its own list if it is a
// [SchemeLister], else [link.DefaultSchemes].
func Schemes(key crypto.Signer) []tls.SignatureScheme {
	if l, ok := key.(SchemeLister); ok {
		return l.SignatureSchemes()
	}
	return link.DefaultSchemes(key.Public())
}

// key returns the key with id, or a *KeyNotFoundError for identity.
func (s *Service) key(ctx context.Context, identity string, id link.KeyID) (crypto.Signer, error) {
	key, err := s.keys.Key(ctx, id)
	switch {
	case err != nil:
		return nil, storeError(ctx, err)
	case key == nil:
		return nil, &KeyNotFoundError{Identity: identity, Reason: "no such key"}
	}
	return key, nil
}

// storeError classifies an error of a [KeyStore] method: the store could
// not answer (ErrUnavailable), unless it gave up because the request's
// context ended, which is the caller's deadline and not a store failure.
func storeError(ctx context.Context, err error) error {
	if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
		return fmt.Errorf("signer: key store: %w", err)
	}
	return fmt.Errorf("%w: %w", ErrUnavailable, err)
}

// checkAlgorithm reports whether key can perform alg.
func checkAlgorithm(key crypto.Signer, alg link.Algorithm) error {
	if kt := link.KeyTypeOf(key.Public()); kt != alg.KeyType {
		return &ValidationError{"algorithm", fmt.Sprintf("%v needs a %v key; this key is %v", alg, alg.KeyType, kt)}
	}
	if !slices.Contains(Schemes(key), alg.Scheme()) {
		return &ValidationError{"algorithm", fmt.Sprintf("%v is not supported by this key on this keyserver", alg)}
	}
	return nil
}

// signContext signs with key, bounded by ctx, and calls release once the key
// store is done with the operation. A key that cannot take a context is run
// in a goroutine; if ctx ends first, the goroutine finishes on its own, its
// result is dropped, and only then is release called: the operation still
// occupies the key store (an HSM call cannot be cancelled), so its limiter
// slot must stay taken or timed-out calls would pile up in the store
// without bound.
func signContext(ctx context.Context, key crypto.Signer, digest []byte, opts crypto.SignerOpts, release func()) ([]byte, error) {
	if cs, ok := key.(ContextSigner); ok {
		defer release()
		return cs.SignContext(ctx, digest, opts)
	}
	type result struct {
		sig []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		sig, err := key.Sign(rand.Reader, digest, opts)
		// Release before sending, so that a caller that got its answer
		// finds the slot free again.
		release()
		done <- result{sig, err}
	}()
	select {
	case r := <-done:
		return r.sig, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// logFailure logs a failed operation once, at the RPC boundary. Requests that
// were merely malformed are logged at debug level, denials and refusals for
// load at warn level; it never logs a digest, ciphertext or signature.
func (s *Service) logFailure(c *call, err error) {
	var (
		verr  *ValidationError
		perr  *PermissionError
		qerr  *QuotaError
		nferr *KeyNotFoundError
	)
	level := hclog.Error
	switch {
	case errors.As(err, &nferr) && nferr.ByPolicy:
		level = hclog.Warn
	case errors.As(err, &verr), errors.Is(err, ErrKeyNotFound):
		level = hclog.Debug
	case errors.As(err, &perr), errors.As(err, &qerr), errors.Is(err, context.Canceled),
		errors.Is(err, context.DeadlineExceeded), errors.Is(err, ErrOverloaded), errors.Is(err, ErrAuditUnavailable):
		level = hclog.Warn
	}
	id := c.keyID
	if id == "" && c.op != "list_keys" {
		// Not a key id: say only how long it was.
		id = fmt.Sprintf("(%d bytes)", c.keyIDLen)
	}
	s.logger.Log(level, "operation failed", "op", c.op, "identity", c.identity, "key_id", id, "rule", c.rule, "error", err)
}
