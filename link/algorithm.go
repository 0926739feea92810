package link

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/tls"
	"errors"
	"fmt"

	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// Algorithm describes one TLS signature scheme: the key type it needs and
// the [crypto.SignerOpts] a [crypto.Signer] must be given for it.
type Algorithm struct {
	// Wire is the scheme's value on the wire: its TLS code point.
	Wire keylessv1.SignatureAlgorithm
	// KeyType is the type of key the scheme needs.
	KeyType keylessv1.KeyType
	// Hash is the hash whose digest is signed; 0 for Ed25519, which signs
	// the whole message.
	Hash crypto.Hash
	// PSS is whether the scheme is RSASSA-PSS (with a salt as long as the
	// hash), rather than PKCS #1 v1.5.
	PSS bool
	// Legacy is whether the scheme uses SHA-1, which is refused unless the
	// caller's policy names it.
	Legacy bool
}

// SignerOpts returns the options a [crypto.Signer] takes for the scheme.
func (a Algorithm) SignerOpts() crypto.SignerOpts {
	if a.PSS {
		return &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: a.Hash}
	}
	return a.Hash
}

// String returns the scheme's TLS name, such as "PSSWithSHA256".
func (a Algorithm) String() string { return a.Scheme().String() }

// algorithms is the one table that maps wire values, TLS schemes, key types
// and signer options to each other. It is ordered by preference.
var algorithms = []Algorithm{
	{Wire: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ED25519, KeyType: keylessv1.KeyType_KEY_TYPE_ED25519},
	{Wire: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA256, KeyType: keylessv1.KeyType_KEY_TYPE_ECDSA, Hash: crypto.SHA256},
	{Wire: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA384, KeyType: keylessv1.KeyType_KEY_TYPE_ECDSA, Hash: crypto.SHA384},
	{Wire: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA512, KeyType: keylessv1.KeyType_KEY_TYPE_ECDSA, Hash: crypto.SHA512},
	{Wire: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA256, KeyType: keylessv1.KeyType_KEY_TYPE_RSA, Hash: crypto.SHA256, PSS: true},
	{Wire: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA384, KeyType: keylessv1.KeyType_KEY_TYPE_RSA, Hash: crypto.SHA384, PSS: true},
	{Wire: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA512, KeyType: keylessv1.KeyType_KEY_TYPE_RSA, Hash: crypto.SHA512, PSS: true},
	{Wire: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256, KeyType: keylessv1.KeyType_KEY_TYPE_RSA, Hash: crypto.SHA256},
	{Wire: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA384, KeyType: keylessv1.KeyType_KEY_TYPE_RSA, Hash: crypto.SHA384},
	{Wire: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA512, KeyType: keylessv1.KeyType_KEY_TYPE_RSA, Hash: crypto.SHA512},
	{Wire: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA1, KeyType: keylessv1.KeyType_KEY_TYPE_ECDSA, Hash: crypto.SHA1, Legacy: true},
	{Wire: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA1, KeyType: keylessv1.KeyType_KEY_TYPE_RSA, Hash: crypto.SHA1, Legacy: true},
}

// Scheme returns the TLS SignatureScheme, whose code point is the wire value.
func (a Algorithm) Scheme() tls.SignatureScheme { return tls.SignatureScheme(a.Wire) }

// Algorithms returns every scheme the keyserver knows, in its order of
// preference. The caller may modify the returned slice.
func Algorithms() []Algorithm { return append([]Algorithm(nil), algorithms...) }

// AlgorithmFor returns the scheme with the given wire value.
// It returns false for SIGNATURE_ALGORITHM_UNSPECIFIED and unknown values.
func AlgorithmFor(wire keylessv1.SignatureAlgorithm) (Algorithm, bool) {
	for _, a := range algorithms {
		if a.Wire == wire {
			return a, true
		}
	}
	return Algorithm{}, false
}

// AlgorithmForScheme returns the scheme with the given TLS code point.
func AlgorithmForScheme(s tls.SignatureScheme) (Algorithm, bool) {
	return AlgorithmFor(keylessv1.SignatureAlgorithm(s))
}

// AlgorithmForOpts returns the scheme a crypto/tls server means when it asks
// a key with public key pub to sign with opts. It is the inverse of
// [Algorithm.SignerOpts] for a given key type. It returns an error for a key
// type other than RSA, ECDSA and Ed25519, for nil opts, for RSA-PSS with a
// salt length other than the hash length, for Ed25519ctx and Ed25519ph
// options, and for a hash that no scheme of the key type uses.
func AlgorithmForOpts(pub crypto.PublicKey, opts crypto.SignerOpts) (Algorithm, error) {
	kt := KeyTypeOf(pub)
	if kt == keylessv1.KeyType_KEY_TYPE_UNSPECIFIED {
		return Algorithm{}, fmt.Errorf("link: unsupported public key type %T", pub)
	}
	// A nil interface or a nil *rsa.PSSOptions would panic in HashFunc.
	pss, isPSS := opts.(*rsa.PSSOptions)
	if opts == nil || isPSS && pss == nil {
		return Algorithm{}, errors.New("link: nil signer options")
	}
	// Ed25519ctx signs something other than the message alone: signing it
	// as PureEdDSA would give a signature that does not verify.
	if o, ok := opts.(*ed25519.Options); ok && o.Context != "" {
		return Algorithm{}, errors.New("link: Ed25519ctx is not a TLS signature scheme")
	}
	h := opts.HashFunc()
	for _, a := range algorithms {
		if a.KeyType != kt || a.Hash != h || a.PSS != isPSS {
			continue
		}
		// Compare the salt only once h is known to be a table hash:
		// crypto.Hash.Size panics for 0 and unknown values.
		if isPSS && pss.SaltLength != rsa.PSSSaltLengthEqualsHash && pss.SaltLength != h.Size() {
			return Algorithm{}, fmt.Errorf("link: unsupported RSA-PSS salt length %d (TLS uses the hash length)", pss.SaltLength)
		}
		return a, nil
	}
	return Algorithm{}, fmt.Errorf("link: no TLS signature scheme for a %v key with hash %v (PSS %t)", kt, h, isPSS)
}

// KeyTypeOf returns the type of a public key, or KEY_TYPE_UNSPECIFIED if it
// is not an RSA, ECDSA or Ed25519 key.
func KeyTypeOf(pub crypto.PublicKey) keylessv1.KeyType {
	switch pub.(type) {
	case *rsa.PublicKey:
		return keylessv1.KeyType_KEY_TYPE_RSA
	case *ecdsa.PublicKey:
		return keylessv1.KeyType_KEY_TYPE_ECDSA
	case ed25519.PublicKey:
		return keylessv1.KeyType_KEY_TYPE_ED25519
	}
	return keylessv1.KeyType_KEY_TYPE_UNSPECIFIED
}

// KeyBits returns the size of a public key in bits: the RSA modulus size, the
// curve size, or 255 for Ed25519. It returns 0 for other keys.
func KeyBits(pub crypto.PublicKey) int {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		return k.N.BitLen()
	case *ecdsa.PublicKey:
		return k.Curve.Params().BitSize
	case ed25519.PublicKey:
		return 255
	}
	return 0
}

// DefaultSchemes returns the schemes a key of pub's type can use in
// principle, in order of preference, without the SHA-1 ones. A key store
// whose keys cannot perform all of them reports its own list (see
// [SchemeLister]).
func DefaultSchemes(pub crypto.PublicKey) []tls.SignatureScheme {
	kt := KeyTypeOf(pub)
	var out []tls.SignatureScheme
	for _, a := range algorithms {
		if a.KeyType == kt && !a.Legacy {
			out = append(out, a.Scheme())
		}
	}
	return out
}
