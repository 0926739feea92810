package signer

import (
	"context"
	"crypto"
	"crypto/tls"

	"github.com/keyless-tls/keyless/internal/premaster"
	"github.com/keyless-tls/keyless/link"
)

// KeyStore is where the keyserver finds its keys. Its keys are
// [crypto.Signer] values that may also implement [ContextSigner],
// [PremasterDecrypter], [SchemeLister] and [Describer]; a key that is not a
// ContextSigner is called in a goroutine bounded by the request's deadline.
//
// An RSA key must verify each signature before returning it, since a
// faulty RSA-CRT signature reveals the private key (package hsm does;
// crypto/rsa does for in-memory keys). The service does not check again.
//
// Implementations must be safe for concurrent use. An error from either
// method means the store could not answer (the service reports it as
// Unavailable); an unknown key is not an error.
type KeyStore interface {
	// Key returns the key whose id is id, or (nil, nil) if there is none.
	Key(ctx context.Context, id link.KeyID) (crypto.Signer, error)
	// Keys returns every key in the store.
	Keys(ctx context.Context) ([]crypto.Signer, error)
}

// ContextSigner is a key whose signing operation can be bounded by a
// context. digest and opts follow [crypto.Signer]; the service has already
// checked that they suit the key.
type ContextSigner interface {
	SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error)
}

// PremasterDecrypter is an RSA key that can decrypt a TLS 1.2 RSA key
// exchange.
//
// DecryptPremaster must implement implicit rejection: for any ciphertext that
// is not a valid PKCS #1 v1.5 encryption of exactly 48 bytes (including one
// of the wrong length or one not less than the modulus) it returns a nil
// error and [PremasterRejection] of the ciphertext under the key's secret
// (the key's RSA PKCS #1 v1.5 signature of [PremasterRejectionMessage] with
// no DigestInfo), taking as nearly as possible the same time as for a valid
// one. Those bytes are the same on every call for the same ciphertext, so
// that a caller who asks twice cannot tell them from a premaster secret. It
// returns an error only when the key could not be used at all (an HSM
// fault, a secret that could not be computed, or ctx done), never because
// of the ciphertext.
type PremasterDecrypter interface {
	DecryptPremaster(ctx context.Context, ciphertext []byte) ([]byte, error)
}

// SchemeLister is a key that can perform only some of the schemes its type
// allows, as an HSM that lacks a mechanism. Keys that are not SchemeListers
// are taken to support [link.DefaultSchemes].
type SchemeLister interface {
	SignatureSchemes() []tls.SignatureScheme
}

// Describer is a key with a name in its store, as a PKCS #11 object's
// CKA_LABEL and CKA_ID.
type Describer interface {
	Label() string
	ObjectID() []byte
}

// PremasterRejectionMessage is the message whose RSA PKCS #1 v1.5
// signature, with no DigestInfo, is a key's implicit-rejection secret (see
// [PremasterDecrypter]). The service never signs it for a caller.
const PremasterRejectionMessage = premaster.SecretMessage

// PremasterRejection returns what a [PremasterDecrypter] answers for an
// invalid ciphertext, given the key's implicit-rejection secret:
// HMAC-SHA-384(secret, ciphertext), 48 bytes.
func PremasterRejection(secret, ciphertext []byte) []byte {
	return premaster.Rejection(secret, ciphertext)
}

// Checker is a key store that can tell whether it is usable, as an HSM
// that may be unplugged. [WatchHealth] polls it.
type Checker interface {
	Check(ctx context.Context) error
}
