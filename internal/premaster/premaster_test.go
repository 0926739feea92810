package premaster

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"testing"
)

func TestRejection(t *testing.T) {
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	secret, err := Secret(priv)
	if err != nil {
		t.Fatal(err)
	}
	// The secret is crypto/rsa's signature of the message, and the raw
	// RSA decryption of Type1Block.
	if err := rsa.VerifyPKCS1v15(&priv.PublicKey, crypto.Hash(0), []byte(SecretMessage), secret); err != nil {
		t.Fatalf("the secret is not a PKCS #1 v1.5 signature of SecretMessage: %v", err)
	}
	if err := CheckSecret(&priv.PublicKey, secret); err != nil {
		t.Fatal(err)
	}
	for name, bad := range map[string][]byte{
		"one bit flipped": func() []byte { b := bytes.Clone(secret); b[len(b)-1] ^= 1; return b }(),
		"a byte short":    secret[1:],
		"the modulus":     priv.N.FillBytes(make([]byte, priv.Size())),
	} {
		if err := CheckSecret(&priv.PublicKey, bad); err == nil {
			t.Errorf("CheckSecret() accepted %s", name)
		}
	}

	ct := bytes.Repeat([]byte{7}, 256)
	a, b := Rejection(secret, ct), Rejection(secret, bytes.Clone(ct))
	if len(a) != Len || !bytes.Equal(a, b) {
		t.Fatalf("Rejection() = %x and %x; want the same %d bytes twice", a, b, Len)
	}
	other := bytes.Clone(secret)
	other[0] ^= 1
	for name, got := range map[string][]byte{
		"another ciphertext":            Rejection(secret, append(bytes.Clone(ct[1:]), 8)),
		"the ciphertext without a byte": Rejection(secret, ct[1:]),
		"another secret":                Rejection(other, ct),
	} {
		if bytes.Equal(a, got) {
			t.Errorf("Rejection() with %s gave the same answer", name)
		}
	}
}
