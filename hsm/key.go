package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync/atomic"

	"github.com/miekg/pkcs11"
)

// maxEd25519Message bounds a message given to an Ed25519 key. TLS signs at
// most a few hundred bytes; certificate requests and certificates signed
// with the key are larger but still far below this.
const maxEd25519Message = 64 << 10

// keyBase holds what every key type shares. Keys are immutable and safe for
// concurrent use.
type keyBase struct {
	m       *Module
	gen     uint64              // the module's connection generation
	handle  pkcs11.ObjectHandle // the private key object
	label   string              // CKA_LABEL
	objID   []byte              // CKA_ID
	keyID   [32]byte            // SHA-256 of the SubjectPublicKeyInfo
	schemes []tls.SignatureScheme
	attrs   KeyAttributes
}

// KeyAttributes is what the token reports of a private key object's
// protection and permitted use.
type KeyAttributes struct {
	// Sensitive and Extractable are CKA_SENSITIVE and CKA_EXTRACTABLE. A
	// key is served only if it is sensitive and not extractable, unless
	// [Config.AllowExtractable] is set.
	Sensitive, Extractable bool
	// AllowedMechanisms names the mechanisms of the key's
	// CKA_ALLOWED_MECHANISMS ("CKM_0x..." for those the module does not
	// use), or is nil when the key has none: any mechanism is allowed.
	AllowedMechanisms []string
}

// Attributes returns what the token reported of the key when it was
// loaded. The caller may modify the result.
func (k *keyBase) Attributes() KeyAttributes {
	a := k.attrs
	a.AllowedMechanisms = slices.Clone(a.AllowedMechanisms)
	return a
}

// signWith runs one C_Sign of msg with mechanism mech, through miekg/pkcs11
// on a pooled session, for what crypto11 cannot do.
func (k *keyBase) signWith(ctx context.Context, mech uint, msg []byte) ([]byte, error) {
	var sig []byte
	err := k.m.raw.do(ctx, func(sh pkcs11.SessionHandle) error {
		p := k.m.p11
		if err := p.SignInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, k.handle); err != nil {
			return err
		}
		var err error
		sig, err = p.Sign(sh, msg)
		return err
	})
	return sig, err
}

// Label returns the private key object's CKA_LABEL.
func (k *keyBase) Label() string { return k.label }

// ObjectID returns a copy of the private key object's CKA_ID.
func (k *keyBase) ObjectID() []byte { return slices.Clone(k.objID) }

// SignatureSchemes returns the TLS signature schemes this key can perform
// on this token, in order of preference. The caller may modify the result.
func (k *keyBase) SignatureSchemes() []tls.SignatureScheme { return slices.Clone(k.schemes) }

// ready fails, before any PKCS #11 call, when ctx is already done, when
// the module is closed or faulty, and when the key is from before a
// reconnection (its handles are stale): the last three with an
// *UnavailableError.
func (k *keyBase) ready(ctx context.Context) error {
	m := k.m
	if err := ctx.Err(); err != nil {
		return err
	}
	if m.closed.Load() {
		return m.unavailable(ErrClosed)
	}
	if m.staleEpoch() {
		m.markFaulty(errLibraryReset)
	}
	if err := m.downError(); err != nil {
		return err
	}
	m.mu.RLock()
	gen := m.gen
	m.mu.RUnlock()
	if k.gen != gen {
		return &UnavailableError{Reason: fmt.Sprintf("key %q is from before the module reconnected to the token; look it up again", k.label)}
	}
	return nil
}

// signWithTimeout is Sign for keys whose SignContext takes a context.
func signWithTimeout(signContext func(context.Context, []byte, crypto.SignerOpts) ([]byte, error), digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), DefaultSignTimeout)
	defer cancel()
	return signContext(ctx, digest, opts)
}

// bounded runs f, which cannot be interrupted (a PKCS #11 call), in a
// goroutine and waits for it until ctx is done. If ctx ends first, f runs
// to completion on its own and its result is dropped. Key operations use
// call, which also bounds and watches such calls.
func bounded[T any](ctx context.Context, f func() (T, error)) (T, error) {
	var zero T
	if err := ctx.Err(); err != nil {
		return zero, err
	}
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	go func() {
		v, err := f()
		done <- result{v, err}
	}()
	select {
	case r := <-done:
		return r.v, r.err
	case <-ctx.Done():
		return zero, ctx.Err()
	}
}

// hashOf returns opts.HashFunc(), or an error for nil options, including a
// typed nil pointer whose HashFunc would panic.
func hashOf(opts crypto.SignerOpts) (h crypto.Hash, err error) {
	if opts == nil {
		return 0, fmt.Errorf("%w: signer options are nil", ErrInvalidRequest)
	}
	defer func() {
		if recover() != nil {
			h, err = 0, fmt.Errorf("%w: signer options %T are nil", ErrInvalidRequest, opts)
		}
	}()
	return opts.HashFunc(), nil
}

// tlsHash checks a hash for RSA or ECDSA signing: only SHA-256, SHA-384 and
// SHA-512 are allowed, and the digest must have its size. crypto11 checks
// neither: it signs an unknown hash's digest raw, and a digest of any
// length.
func tlsHash(h crypto.Hash, digest []byte) error {
	switch h {
	case crypto.SHA256, crypto.SHA384, crypto.SHA512:
	case 0:
		return fmt.Errorf("%w: a hash function is required", ErrInvalidRequest)
	default:
		return fmt.Errorf("%w: hash %v is not allowed; use SHA-256, SHA-384 or SHA-512", ErrInvalidRequest, h)
	}
	if len(digest) != h.Size() {
		return fmt.Errorf("%w: digest is %d bytes; %v needs %d", ErrInvalidRequest, len(digest), h, h.Size())
	}
	return nil
}

// rsaKey is an RSA private key in the token. It signs through crypto11
// and verifies every signature before returning it.
type rsaKey struct {
	keyBase
	signer crypto.Signer // crypto11's key
	pub    *rsa.PublicKey
	mechs  keyMechanisms
}

// Public returns the key's *rsa.PublicKey.
func (k *rsaKey) Public() crypto.PublicKey { return k.pub }

// Sign is SignContext bounded by [DefaultSignTimeout]; rand is ignored.
func (k *rsaKey) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signWithTimeout(k.SignContext, digest, opts)
}

// SignContext signs digest with RSASSA-PSS (opts is *rsa.PSSOptions, with a
// salt as long as the hash) or PKCS #1 v1.5 (opts is the hash), bounded
// by ctx. It returns an error wrapping [ErrInvalidRequest] for anything but
// SHA-256/384/512 and a digest of that size, or a scheme the token cannot
// do with this key; [ErrFaultySignature] if the token's signature does not
// verify; ctx.Err() if ctx ends first.
func (k *rsaKey) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	h, pss, err := k.checkOpts(digest, opts)
	if err != nil {
		return nil, err
	}
	var c11opts crypto.SignerOpts = h
	if pss {
		// crypto11 refuses PSSSaltLengthAuto; checkOpts allows only a salt
		// as long as the hash, which TLS uses.
		c11opts = &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: h}
	}
	sig, err := callCrypto11(ctx, &k.keyBase, "C_Sign", func() ([]byte, error) { return k.signer.Sign(rand.Reader, digest, c11opts) })
	if err != nil {
		return nil, fmt.Errorf("hsm: sign with key %q: %w", k.label, err)
	}
	// A faulty RSA-CRT signature reveals the private key: check it before
	// it leaves.
	if pss {
		err = rsa.VerifyPSS(k.pub, h, digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
	} else {
		err = rsa.VerifyPKCS1v15(k.pub, h, digest, sig)
	}
	if err != nil {
		return nil, fmt.Errorf("%w (key %q)", ErrFaultySignature, k.label)
	}
	return sig, nil
}

func (k *rsaKey) checkOpts(digest []byte, opts crypto.SignerOpts) (crypto.Hash, bool, error) {
	h, err := hashOf(opts)
	if err != nil {
		return 0, false, err
	}
	if o, ok := opts.(*rsa.PSSOptions); ok {
		if err := tlsHash(o.Hash, digest); err != nil {
			return 0, false, err
		}
		if o.SaltLength != rsa.PSSSaltLengthEqualsHash && o.SaltLength != o.Hash.Size() {
			return 0, false, fmt.Errorf("%w: RSA-PSS salt length %d is not supported; use rsa.PSSSaltLengthEqualsHash", ErrInvalidRequest, o.SaltLength)
		}
		if !k.mechs.pss {
			return 0, false, fmt.Errorf("%w: key %q cannot sign with RSA-PSS on this token", ErrInvalidRequest, k.label)
		}
		return o.Hash, true, nil
	}
	if err := tlsHash(h, digest); err != nil {
		return 0, false, err
	}
	if !k.mechs.pkcs1 {
		return 0, false, fmt.Errorf("%w: key %q cannot sign with RSA PKCS #1 v1.5 on this token", ErrInvalidRequest, k.label)
	}
	return h, false, nil
}

// rsaDecryptKey is an RSA key that can also decrypt TLS 1.2 premaster
// secrets. It is a separate type because crypto/tls and package signer
// discover decryption by type assertion.
type rsaDecryptKey struct {
	*rsaKey
	// rawDecrypt is true when the key decrypts with CKM_RSA_X_509 and a
	// constant-time padding check, false for the masked CKM_RSA_PKCS
	// fallback.
	rawDecrypt bool
	// pace evens out the time of the fallback's answers.
	pace pace

	// secret is the key's implicit-rejection secret, computed in the
	// token on first use (see rejectionSecret), the one field of a key
	// set after it is made; computing, a one-slot semaphore, lets one
	// caller compute it at a time.
	secret    atomic.Pointer[[]byte]
	computing chan struct{}
}

// DecryptMechanism names how the key decrypts premaster secrets:
// "CKM_RSA_X_509" (raw RSA and a constant-time padding check in the
// keyserver) or "CKM_RSA_PKCS" (the token's padding check, its errors
// masked).
func (k *rsaDecryptKey) DecryptMechanism() string {
	if k.rawDecrypt {
		return "CKM_RSA_X_509"
	}
	return "CKM_RSA_PKCS"
}

// ecdsaKey is an ECDSA private key in the token. It signs through crypto11
// (CKM_ECDSA; crypto11 encodes the signature in ASN.1 DER) and verifies
// every signature before returning it.
type ecdsaKey struct {
	keyBase
	signer crypto.Signer
	pub    *ecdsa.PublicKey
}

// Public returns the key's *ecdsa.PublicKey.
func (k *ecdsaKey) Public() crypto.PublicKey { return k.pub }

// Sign is SignContext bounded by [DefaultSignTimeout]; rand is ignored.
func (k *ecdsaKey) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signWithTimeout(k.SignContext, digest, opts)
}

// SignContext signs a SHA-256, SHA-384 or SHA-512 digest (any of them with
// any curve, as TLS 1.2 allows) and returns an ASN.1 DER signature. Errors
// are as for RSA keys.
func (k *ecdsaKey) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	h, err := hashOf(opts)
	if err != nil {
		return nil, err
	}
	if _, ok := opts.(*rsa.PSSOptions); ok {
		return nil, fmt.Errorf("%w: RSA-PSS options for an ECDSA key", ErrInvalidRequest)
	}
	if err := tlsHash(h, digest); err != nil {
		return nil, err
	}
	if len(k.schemes) == 0 {
		return nil, fmt.Errorf("%w: key %q cannot sign with ECDSA on this token", ErrInvalidRequest, k.label)
	}
	sig, err := callCrypto11(ctx, &k.keyBase, "C_Sign", func() ([]byte, error) { return k.signer.Sign(rand.Reader, digest, h) })
	if err != nil {
		return nil, fmt.Errorf("hsm: sign with key %q: %w", k.label, err)
	}
	if !ecdsa.VerifyASN1(k.pub, digest, sig) {
		return nil, fmt.Errorf("%w (key %q)", ErrFaultySignature, k.label)
	}
	return sig, nil
}

// ed25519Key is an Ed25519 private key in the token. crypto11 v1.2.5 has no
// Ed25519, so it signs with CKM_EDDSA on the module's own sessions.
type ed25519Key struct {
	keyBase
	pub ed25519.PublicKey
}

// Public returns the key's ed25519.PublicKey.
func (k *ed25519Key) Public() crypto.PublicKey { return k.pub }

// Sign is SignContext bounded by [DefaultSignTimeout]; rand is ignored.
func (k *ed25519Key) Sign(_ io.Reader, message []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signWithTimeout(k.SignContext, message, opts)
}

// SignContext signs message, the whole message as for ed25519.PrivateKey
// (pure Ed25519): opts.HashFunc() must be 0, and *ed25519.Options must not
// ask for Ed25519ph or a context. The signature is verified before it is
// returned.
func (k *ed25519Key) SignContext(ctx context.Context, message []byte, opts crypto.SignerOpts) ([]byte, error) {
	h, err := hashOf(opts)
	if err != nil {
		return nil, err
	}
	if o, ok := opts.(*ed25519.Options); ok && o.Context != "" {
		return nil, fmt.Errorf("%w: Ed25519 contexts are not supported", ErrInvalidRequest)
	}
	if h != 0 {
		return nil, fmt.Errorf("%w: an Ed25519 key signs the whole message; got hash %v (Ed25519ph is not supported)", ErrInvalidRequest, h)
	}
	if len(message) > maxEd25519Message {
		return nil, fmt.Errorf("%w: message is %d bytes; at most %d are allowed", ErrInvalidRequest, len(message), maxEd25519Message)
	}
	if len(k.schemes) == 0 {
		return nil, fmt.Errorf("%w: key %q cannot sign with EdDSA on this token", ErrInvalidRequest, k.label)
	}
	sig, err := call(ctx, &k.keyBase, "C_Sign", func() ([]byte, error) { return k.signWith(ctx, ckmEdDSA, message) })
	if err != nil {
		return nil, fmt.Errorf("hsm: sign with key %q: %w", k.label, err)
	}
	if !ed25519.Verify(k.pub, message, sig) {
		return nil, fmt.Errorf("%w (key %q)", ErrFaultySignature, k.label)
	}
	return sig, nil
}

// Errors returned by the keys and the module.
var (
	// ErrClosed is returned by every operation after [Module.Close].
	ErrClosed = errors.New("hsm: module is closed")

	// ErrInvalidRequest is wrapped by the errors for a signing request the
	// module refuses before it reaches the token: an unsupported hash or
	// option, a digest of the wrong size, a scheme the key cannot perform.
	ErrInvalidRequest = errors.New("hsm: invalid request")

	// ErrFaultySignature is wrapped by the error returned when the token
	// produced a signature that does not verify with the key's public key.
	// The signature is withheld, because a faulty RSA-CRT signature can
	// reveal the private key. It means the token is faulty, or the public
	// key found for the private key is wrong.
	ErrFaultySignature = errors.New("hsm: the token returned a signature that does not verify")
)

// Compile-time checks of the method sets package signer looks for.
var (
	_ crypto.Signer = (*rsaKey)(nil)
	_ crypto.Signer = (*rsaDecryptKey)(nil)
	_ crypto.Signer = (*ecdsaKey)(nil)
	_ crypto.Signer = (*ed25519Key)(nil)
)
