package signer

import (
	"bytes"
	"crypto/sha256"
	"fmt"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// MaxEd25519MessageLen bounds an Ed25519 message, far above what TLS needs,
// so that a peer cannot make the keyserver hold or hash large inputs. A TLS
// 1.3 CertificateVerify input is at most 162 bytes and a TLS 1.2
// ServerKeyExchange input at most 68+133 bytes (a P-521 point).
const MaxEd25519MessageLen = 512

// tls12PointLen maps the named groups an edge can negotiate for TLS 1.2
// ECDHE (RFC 8422, RFC 7748) to the length of their public point: 32 bytes
// for X25519, and an uncompressed point (0x04, x, y) for the NIST curves,
// the only form crypto/tls sends. X25519MLKEM768 is TLS 1.3 only.
var tls12PointLen = map[uint16]int{
	23: 65,  // secp256r1
	24: 97,  // secp384r1
	25: 133, // secp521r1
	29: 32,  // x25519
}

// tls13ServerContext is the prefix of every TLS 1.3 server CertificateVerify
// signature input (RFC 8446, section 4.4.3).
var tls13ServerContext = append(bytes.Repeat([]byte{0x20}, 64), "TLS 1.3, server CertificateVerify\x00"...)

// ValidateSignRequest checks a SignRequest on its own, without looking at
// the key, and returns the key id and scheme it names. On success the digest
// is exactly as long as the scheme's hash output, or, for Ed25519, is a TLS
// server signature input. Errors are *[ValidationError].
func ValidateSignRequest(req *keylessv1.SignRequest) (link.KeyID, link.Algorithm, error) {
	id, err := validateKeyID(req.GetKeyId())
	if err != nil {
		return id, link.Algorithm{}, err
	}
	alg, ok := link.AlgorithmFor(req.GetAlgorithm())
	if !ok {
		return id, alg, &ValidationError{"algorithm", fmt.Sprintf("%v is not a supported signature algorithm", req.GetAlgorithm())}
	}
	d := req.GetDigest()
	if alg.Hash == 0 {
		if err := validateEd25519Message(d); err != nil {
			return id, alg, err
		}
	} else if len(d) != alg.Hash.Size() {
		return id, alg, &ValidationError{"digest", fmt.Sprintf("is %d bytes; %v needs a %d-byte %v digest", len(d), alg, alg.Hash.Size(), alg.Hash)}
	}
	return id, alg, validateContext(req.GetContext())
}

// ValidateDecryptRequest checks a DecryptRequest and returns the key id it
// names. The ciphertext is not checked: every defect of it is answered by
// implicit rejection, not by an error. Errors are *[ValidationError].
func ValidateDecryptRequest(req *keylessv1.DecryptRequest) (link.KeyID, error) {
	id, err := validateKeyID(req.GetKeyId())
	if err != nil {
		return id, err
	}
	return id, validateContext(req.GetContext())
}

func validateKeyID(b []byte) (link.KeyID, error) {
	var id link.KeyID
	if len(b) != len(id) {
		return id, &ValidationError{"key_id", fmt.Sprintf("is %d bytes; a key id is the %d-byte SHA-256 of the key's SubjectPublicKeyInfo", len(b), sha256.Size)}
	}
	copy(id[:], b)
	return id, nil
}

// validateEd25519Message accepts only what a TLS server signs with Ed25519:
// a TLS 1.3 CertificateVerify input or TLS 1.2 ServerKeyExchange parameters.
// Anything else would make the keyserver a general-purpose Ed25519 oracle.
func validateEd25519Message(m []byte) error {
	switch {
	case len(m) == 0:
		return &ValidationError{"digest", "is empty; Ed25519 needs the message to sign"}
	case len(m) > MaxEd25519MessageLen:
		return &ValidationError{"digest", fmt.Sprintf("is %d bytes; an Ed25519 TLS message is at most %d", len(m), MaxEd25519MessageLen)}
	case bytes.HasPrefix(m, tls13ServerContext):
		switch len(m) - len(tls13ServerContext) {
		case 32, 48, 64:
			return nil
		}
		return &ValidationError{"digest", "is a TLS 1.3 CertificateVerify input with a transcript hash of the wrong length"}
	case len(m) > 68 && m[64] == 3:
		// client_random, server_random, then ECParameters with
		// curve_type named_curve (3), the curve, and the length-prefixed
		// public point (RFC 8422, section 5.4).
		return validateTLS12Params(m[65:])
	}
	return &ValidationError{"digest", "is not a TLS server signature input (TLS 1.3 CertificateVerify or TLS 1.2 ServerKeyExchange)"}
}

// validateTLS12Params checks the ServerKeyExchange parameters after
// curve_type: a named group the edge can negotiate and exactly its point.
func validateTLS12Params(p []byte) error {
	group := uint16(p[0])<<8 | uint16(p[1])
	want, ok := tls12PointLen[group]
	switch {
	case !ok:
		return &ValidationError{"digest", fmt.Sprintf("is a TLS 1.2 ServerKeyExchange input for named group %d; an edge negotiates only x25519 (29), secp256r1 (23), secp384r1 (24) and secp521r1 (25)", group)}
	case int(p[2]) != want || len(p)-3 != want:
		return &ValidationError{"digest", fmt.Sprintf("is a TLS 1.2 ServerKeyExchange input whose point is not the %d bytes of named group %d", want, group)}
	case group != 29 && p[3] != 4:
		return &ValidationError{"digest", fmt.Sprintf("is a TLS 1.2 ServerKeyExchange input whose point for named group %d is not uncompressed", group)}
	}
	return nil
}

func validateContext(c *keylessv1.RequestContext) error {
	for _, f := range []struct{ name, value string }{
		{"context.server_name", c.GetServerName()},
		{"context.client_address", c.GetClientAddress()},
		{"context.connection_id", c.GetConnectionId()},
	} {
		if len(f.value) > link.MaxContextFieldLen {
			return &ValidationError{f.name, fmt.Sprintf("is %d bytes; at most %d are allowed", len(f.value), link.MaxContextFieldLen)}
		}
	}
	return nil
}
