package tlscore

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/tls"
	"errors"
	"fmt"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// certificateSchemes returns what to set as a certificate's
// SupportedSignatureAlgorithms for a key with public key pub, of which the
// keyserver reports offered (in its order of preference), and whether TLS 1.3
// is possible with it.
//
// The list keeps the offered schemes that suit the key's type, without the
// SHA-1 ones. For ECDSA it keeps every hash: in TLS 1.2 any hash may be used
// with any curve (crypto/tls asks a P-384 key for a SHA-256 signature when
// the client prefers it), while in TLS 1.3 crypto/tls offers only the
// curve's own scheme. So a P-256 key whose keyserver does not offer
// ECDSA_SHA256 cannot do TLS 1.3; an RSA key without PSS neither.
//
// An empty list is an error, never returned: crypto/tls reads an empty
// SupportedSignatureAlgorithms as "no restriction".
func certificateSchemes(pub crypto.PublicKey, offered []keylessv1.SignatureAlgorithm) (schemes []tls.SignatureScheme, tls13 bool, err error) {
	kt := link.KeyTypeOf(pub)
	var tls13Scheme func(link.Algorithm) bool
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		want, ok := curveScheme(pub)
		if !ok {
			return nil, false, fmt.Errorf("ECDSA curve %s is not usable in TLS", pub.Curve.Params().Name)
		}
		tls13Scheme = func(a link.Algorithm) bool { return a.Wire == want }
	case *rsa.PublicKey:
		tls13Scheme = func(a link.Algorithm) bool { return a.PSS }
	default:
		tls13Scheme = func(link.Algorithm) bool { return true }
	}
	for _, w := range offered {
		a, ok := link.AlgorithmFor(w)
		if !ok || a.KeyType != kt || a.Legacy {
			continue
		}
		schemes = append(schemes, a.Scheme())
		tls13 = tls13 || tls13Scheme(a)
	}
	if len(schemes) == 0 {
		return nil, false, errors.New("the keyserver offers no TLS signature scheme (other than SHA-1) for this key")
	}
	return schemes, tls13, nil
}

// curveScheme returns the TLS 1.3 scheme of an ECDSA key's curve.
func curveScheme(pub *ecdsa.PublicKey) (keylessv1.SignatureAlgorithm, bool) {
	switch pub.Curve.Params().Name {
	case "P-256":
		return keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA256, true
	case "P-384":
		return keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA384, true
	case "P-521":
		return keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA512, true
	}
	return 0, false
}
