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
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// Config configures a [Service]. A Config must not be modified after it is
// passed to [NewService].
type Config struct {
	// Keys is where the keys live. Required.
	Keys KeyStore

	// MaxConcurrent bounds the key operations running in the key store at
	// once; more wait in a queue. Zero means no bound.
	MaxConcurrent int

	// MaxQueued bounds the operations waiting for the key store when
	// MaxConcurrent are running; beyond it requests fail at once with
	// ResourceExhausted. Waits are bounded by each request's deadline.
	MaxQueued int

	// Logger receives one line per failed operation. Nil means no logging.
	Logger hclog.Logger
}

// Validate reports whether the configuration is usable.
func (c *Config) Validate() error {
	switch {
	case c.Keys == nil:
		return errors.New("signer: Config.Keys is nil")
	case c.MaxConcurrent < 0:
		return fmt.Errorf("signer: Config.MaxConcurrent is %d; it must be 0 (no bound) or more", c.MaxConcurrent)
	case c.MaxQueued < 0:
		return fmt.Errorf("signer: Config.MaxQueued is %d; it must be 0 or more", c.MaxQueued)
	}
	return nil
}

// Service implements keylessv1.KeylessServiceServer over a [KeyStore]. Its
// handlers validate each request, find the key, perform the operation and
// map errors to gRPC codes; they know nothing of the transport. It is safe
// for concurrent use.
type Service struct {
	keylessv1.UnimplementedKeylessServiceServer

	keys   KeyStore
	limit  *limiter
	logger hclog.Logger
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
	return &Service{
		keys:   cfg.Keys,
		limit:  newLimiter(cfg.MaxConcurrent, cfg.MaxQueued),
		logger: logger,
	}, nil
}

// Sign implements KeylessService.Sign.
func (s *Service) Sign(ctx context.Context, req *keylessv1.SignRequest) (*keylessv1.SignResponse, error) {
	sig, err := s.sign(ctx, req)
	if err != nil {
		s.logFailure("sign", req.GetKeyId(), err)
		return nil, toStatus(err)
	}
	return &keylessv1.SignResponse{Signature: sig}, nil
}

func (s *Service) sign(ctx context.Context, req *keylessv1.SignRequest) ([]byte, error) {
	id, alg, err := ValidateSignRequest(req)
	if err != nil {
		return nil, err
	}
	key, err := s.key(ctx, id)
	if err != nil {
		return nil, err
	}
	if err := checkAlgorithm(key, alg); err != nil {
		return nil, err
	}
	if err := s.limit.acquire(ctx); err != nil {
		return nil, err
	}
	return signContext(ctx, key, req.GetDigest(), alg.SignerOpts(), s.limit.release)
}

// Decrypt implements KeylessService.Decrypt.
func (s *Service) Decrypt(ctx context.Context, req *keylessv1.DecryptRequest) (*keylessv1.DecryptResponse, error) {
	pms, err := s.decrypt(ctx, req)
	if err != nil {
		s.logFailure("decrypt", req.GetKeyId(), err)
		return nil, toStatus(err)
	}
	return &keylessv1.DecryptResponse{Premaster: pms}, nil
}

func (s *Service) decrypt(ctx context.Context, req *keylessv1.DecryptRequest) ([]byte, error) {
	id, err := ValidateDecryptRequest(req)
	if err != nil {
		return nil, err
	}
	key, err := s.key(ctx, id)
	if err != nil {
		return nil, err
	}
	d, ok := key.(PremasterDecrypter)
	if !ok {
		return nil, &ValidationError{"key_id", fmt.Sprintf("key %s cannot decrypt premaster secrets (it is a %v key)", FormatKeyID(id), KeyTypeOf(key.Public()))}
	}
	if err := s.limit.acquire(ctx); err != nil {
		return nil, err
	}
	defer s.limit.release()
	pms, err := d.DecryptPremaster(ctx, req.GetEncryptedPremaster())
	if err != nil {
		return nil, err
	}
	if len(pms) != PremasterLen {
		return nil, fmt.Errorf("signer: key store returned a %d-byte premaster", len(pms))
	}
	return pms, nil
}

// ListKeys implements KeylessService.ListKeys.
func (s *Service) ListKeys(ctx context.Context, req *keylessv1.ListKeysRequest) (*keylessv1.ListKeysResponse, error) {
	keys, err := s.keys.Keys(ctx)
	if err != nil {
		err = storeError(ctx, err)
		s.logFailure("list_keys", nil, err)
		return nil, toStatus(err)
	}
	resp := &keylessv1.ListKeysResponse{}
	for _, k := range keys {
		info, err := Describe(k)
		if err != nil {
			s.logger.Warn("key skipped", "error", err)
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
	id, _ := KeyIDOf(pub)
	info := &keylessv1.Key{
		KeyId:     id[:],
		Type:      KeyTypeOf(pub),
		Bits:      uint32(KeyBits(pub)),
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
// [SchemeLister], else [DefaultSchemes].
func Schemes(key crypto.Signer) []tls.SignatureScheme {
	if l, ok := key.(SchemeLister); ok {
		return l.SignatureSchemes()
	}
	return DefaultSchemes(key.Public())
}

func (s *Service) key(ctx context.Context, id KeyID) (crypto.Signer, error) {
	key, err := s.keys.Key(ctx, id)
	switch {
	case err != nil:
		return nil, storeError(ctx, err)
	case key == nil:
		return nil, ErrKeyNotFound
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
func checkAlgorithm(key crypto.Signer, alg Algorithm) error {
	if kt := KeyTypeOf(key.Public()); kt != alg.KeyType {
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
// were merely malformed are logged at debug level; it never logs a digest,
// ciphertext or signature.
func (s *Service) logFailure(op string, keyID []byte, err error) {
	var verr *ValidationError
	level := hclog.Error
	switch {
	case errors.As(err, &verr), errors.Is(err, ErrKeyNotFound):
		level = hclog.Debug
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded), errors.Is(err, ErrOverloaded):
		level = hclog.Warn
	}
	id := fmt.Sprintf("%x", keyID)
	if len(keyID) != len(KeyID{}) {
		// Not a key id: say only how long it was.
		id = fmt.Sprintf("(%d bytes)", len(keyID))
	}
	s.logger.Log(level, "operation failed", "op", op, "key_id", id, "error", err)
}

// DefaultHealthInterval is how often [WatchHealth] checks the key store
// when it is given no interval.
const DefaultHealthInterval = 2 * time.Second

// WatchHealth sets the serving status of the KeylessService (and of the
// server as a whole, the "" service) in hs from the key store's [Checker],
// every interval until ctx is done. A store that is not a Checker is always
// SERVING. An interval of zero or less means DefaultHealthInterval.
func WatchHealth(ctx context.Context, keys KeyStore, hs *health.Server, interval time.Duration) {
	if interval <= 0 {
		interval = DefaultHealthInterval
	}
	set := func(st healthpb.HealthCheckResponse_ServingStatus) {
		hs.SetServingStatus("", st)
		hs.SetServingStatus(keylessv1.KeylessService_ServiceDesc.ServiceName, st)
	}
	c, ok := keys.(Checker)
	if !ok {
		set(healthpb.HealthCheckResponse_SERVING)
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		cctx, cancel := context.WithTimeout(ctx, interval)
		err := c.Check(cctx)
		cancel()
		if err != nil {
			set(healthpb.HealthCheckResponse_NOT_SERVING)
		} else {
			set(healthpb.HealthCheckResponse_SERVING)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
