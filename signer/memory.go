package signer

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"fmt"

	"github.com/keyless-tls/keyless/internal/premaster"
	"github.com/keyless-tls/keyless/link"
)

// MemoryStore is a [KeyStore] of in-memory private keys, for tests and
// examples. It is immutable after construction and safe for concurrent use.
type MemoryStore struct {
	keys map[link.KeyID]crypto.Signer
	list []crypto.Signer
}

var _ KeyStore = (*MemoryStore)(nil)

// NewMemoryStore returns a store of the given keys, which must be
// *rsa.PrivateKey, *ecdsa.PrivateKey or ed25519.PrivateKey. RSA keys can
// decrypt premaster secrets.
func NewMemoryStore(keys ...crypto.Signer) (*MemoryStore, error) {
	s := &MemoryStore{keys: make(map[link.KeyID]crypto.Signer)}
	for _, k := range keys {
		var key crypto.Signer
		switch k := k.(type) {
		case *rsa.PrivateKey:
			secret, err := premaster.Secret(k)
			if err != nil {
				return nil, fmt.Errorf("signer: memory store: RSA key: %w", err)
			}
			key = memoryRSAKey{k, secret}
		case *ecdsa.PrivateKey, ed25519.PrivateKey:
			key = k
		default:
			return nil, fmt.Errorf("signer: memory store: unsupported key type %T", k)
		}
		id, err := link.KeyIDOf(k.Public())
		if err != nil {
			return nil, err
		}
		s.keys[id] = key
		s.list = append(s.list, key)
	}
	return s, nil
}

// Key implements [KeyStore].
func (s *MemoryStore) Key(_ context.Context, id link.KeyID) (crypto.Signer, error) {
	return s.keys[id], nil
}

// Keys implements [KeyStore].
func (s *MemoryStore) Keys(context.Context) ([]crypto.Signer, error) {
	return append([]crypto.Signer(nil), s.list...), nil
}

// memoryRSAKey adds premaster decryption to an RSA key.
type memoryRSAKey struct {
	*rsa.PrivateKey
	secret []byte // the implicit-rejection secret (see package premaster)
}

var _ PremasterDecrypter = memoryRSAKey{}

// DecryptPremaster implements [PremasterDecrypter] with crypto/rsa's
// constant-time padding check: the result starts as package premaster's
// rejection and is overwritten, in constant time, only by a valid 48-byte
// plaintext. (Unlike the HSM's, its timing does show a ciphertext of the
// wrong length or not less than the modulus, both public properties.)
func (k memoryRSAKey) DecryptPremaster(_ context.Context, ciphertext []byte) ([]byte, error) {
	pms := premaster.Rejection(k.secret, ciphertext)
	// RFC 8017 §7.2.2 step 1: a ciphertext is exactly as long as the
	// modulus. crypto/rsa would accept a shorter one (a valid ciphertext
	// whose leading zero byte was dropped).
	if len(ciphertext) != k.Size() {
		return pms, nil
	}
	// The only error left is for a key too small for a 48-byte secret;
	// then pms stays the rejection.
	_ = rsa.DecryptPKCS1v15SessionKey(nil, k.PrivateKey, ciphertext, pms)
	return pms, nil
}
