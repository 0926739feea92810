// Package premaster defines keyless's implicit rejection for the TLS 1.2 RSA
// key exchange: the 48 bytes a keyserver answers for a ciphertext that does
// not decrypt to a premaster secret.
//
// The answer must not tell a valid ciphertext from an invalid one, and the
// keyserver's caller sees it. Fresh random bytes would tell: a valid
// ciphertext gives the same answer twice, an invalid one two different
// answers, and that difference is the padding oracle of Bleichenbacher's
// attack, which lets its holder compute the private-key operation on any
// value. So the answer for an invalid ciphertext is deterministic:
// HMAC-SHA-384 of the ciphertext as received, keyed with a secret that only
// the private key can compute. It is the same on every call and on every
// keyserver holding the key, and unpredictable without the key. This is
// the implicit rejection of draft-irtf-cfrg-rsa-guidance (as in OpenSSL
// 3.2), with its key derived by a private-key operation instead of from the
// private exponent, which an HSM does not reveal.
//
// The secret is the RSA PKCS #1 v1.5 signature of [SecretMessage] with no
// DigestInfo, which is also the raw RSA decryption of that message's type 1
// encoding ([Type1Block]): a token that offers either mechanism can compute
// it, and it can be checked with the public key. A keyserver never makes
// this signature for a caller, since every PKCS #1 v1.5 signature it makes
// for one encodes a DigestInfo. It stays secret only if nothing else that
// can use the key offers raw RSA or DigestInfo-less signing of a caller's
// data (see docs/SECURITY.md).
package premaster

import (
	"bytes"
	"crypto"
	"crypto/hmac"
	"crypto/rsa"
	"crypto/sha512"
	"errors"
	"fmt"
	"math/big"

	"github.com/keyless-tls/keyless/link"
)

// Len is the length of a TLS 1.2 premaster secret, and of every answer.
const Len = link.PremasterLen

// SecretMessage is the message whose signature is a key's rejection secret.
const SecretMessage = "keyless: TLS 1.2 RSA premaster implicit rejection secret, v1"

// Type1Block returns the size-byte PKCS #1 v1.5 signature encoding of
// SecretMessage with no DigestInfo, 0x00 0x01 0xff… 0x00 SecretMessage:
// the value whose raw RSA decryption is the secret.
func Type1Block(size int) []byte {
	em := make([]byte, size)
	em[1] = 1
	for i := 2; i < size-len(SecretMessage)-1; i++ {
		em[i] = 0xff
	}
	copy(em[size-len(SecretMessage):], SecretMessage)
	return em
}

// CheckSecret returns an error unless secret is pub's rejection secret. It
// uses math/big, not crypto/rsa, which refuses signatures with no
// DigestInfo in FIPS 140-only mode.
func CheckSecret(pub *rsa.PublicKey, secret []byte) error {
	if len(secret) != pub.Size() {
		return fmt.Errorf("premaster: the rejection secret is %d bytes; the modulus is %d", len(secret), pub.Size())
	}
	s := new(big.Int).SetBytes(secret)
	if s.Cmp(pub.N) >= 0 {
		return errors.New("premaster: the rejection secret is not less than the modulus")
	}
	em := s.Exp(s, big.NewInt(int64(pub.E)), pub.N).FillBytes(make([]byte, pub.Size()))
	if !bytes.Equal(em, Type1Block(pub.Size())) {
		return errors.New("premaster: the rejection secret is not the key's signature of SecretMessage")
	}
	return nil
}

// Rejection returns the answer for ciphertext, given the key's rejection
// secret: HMAC-SHA-384(secret, ciphertext), exactly Len bytes. Its time
// depends only on the lengths of its arguments.
func Rejection(secret, ciphertext []byte) []byte {
	mac := hmac.New(sha512.New384, secret)
	mac.Write(ciphertext)
	return mac.Sum(make([]byte, 0, Len))
}

// Secret computes a software key's rejection secret. (Keys in an HSM
// compute theirs there.) It fails in FIPS 140-only mode, where crypto/rsa
// signs nothing without a DigestInfo; PKCS #1 v1.5 decryption is refused
// in that mode anyway.
func Secret(priv *rsa.PrivateKey) (secret []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			secret, err = nil, fmt.Errorf("premaster: rejection secret: %v", r)
		}
	}()
	return rsa.SignPKCS1v15(nil, priv, crypto.Hash(0), []byte(SecretMessage))
}
