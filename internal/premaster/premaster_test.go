package premaster

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
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
	if err := CheckSecret(&priv.PublicKey, secret); err != nil {
		t.Fatal(err)
	}
	// The secret is what no caller can have signed: any PKCS #1 v1.5
	// signature with a DigestInfo differs from it.
	digest := sha256.Sum256(SecretMessage)
	if sig, _ := rsa.SignPKCS1v15(nil, priv, crypto.SHA256, digest[:]); bytes.Equal(sig, secret) {
		t.Fatal("the secret equals a SHA-256 signature of the message")
	}
	bad := append(bytes.Clone(secret), 0)
	if err := CheckSecret(&priv.PublicKey, bad[1:]); err == nil {
		t.Fatal("CheckSecret() accepted a wrong secret")
	}

	ct := bytes.Repeat([]byte{7}, 256)
	a, b := Rejection(secret, ct), Rejection(secret, bytes.Clone(ct))
	if len(a) != Len || !bytes.Equal(a, b) {
		t.Fatalf("Rejection() = %x and %x; want the same %d bytes twice", a, b, Len)
	}
	for name, other := range map[string][]byte{
		"another ciphertext":            Rejection(secret, append(bytes.Clone(ct[1:]), 8)),
		"the ciphertext without a byte": Rejection(secret, ct[1:]),
		"another secret":                Rejection(bad[1:], ct),
	} {
		if bytes.Equal(a, other) {
			t.Errorf("Rejection() with %s gave the same answer", name)
		}
	}
}
