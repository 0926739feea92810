package link

import (
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
)

// KeyID names a key: the SHA-256 digest of the DER encoding of its X.509
// SubjectPublicKeyInfo. Both ends compute it from the public key alone, so
// an edge names a key by its certificate without any key material. It is an
// alias so that key stores need not import this package to hold one.
type KeyID = [sha256.Size]byte

// KeyIDOf returns the key id of a public key. It fails only for a key type
// that has no X.509 encoding.
func KeyIDOf(pub crypto.PublicKey) (KeyID, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return KeyID{}, fmt.Errorf("link: key id: %w", err)
	}
	return sha256.Sum256(der), nil
}

// FormatKeyID returns the lower-case hex form of a key id, as logs and the
// command line show it.
func FormatKeyID(id KeyID) string { return hex.EncodeToString(id[:]) }

// ParseKeyID parses the hex form of a key id.
func ParseKeyID(s string) (KeyID, error) {
	var id KeyID
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(id) {
		return id, fmt.Errorf("link: key id %q is not %d hex-encoded bytes", s, len(id))
	}
	copy(id[:], b)
	return id, nil
}
