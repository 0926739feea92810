package hsm_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"testing"

	"github.com/keyless-tls/keyless/signer"
)

// BenchmarkSign measures one signature through the module, including the
// verification of its result.
func BenchmarkSign(b *testing.B) {
	f := mustFixture(b)
	for _, bc := range []struct {
		name   string
		label  string
		scheme tls.SignatureScheme
	}{
		{"ECDSA-P256", labelP256, tls.ECDSAWithP256AndSHA256},
		{"ECDSA-P384", labelP384, tls.ECDSAWithP384AndSHA384},
		{"RSA-2048-PSS", labelRSA, tls.PSSWithSHA256},
		{"RSA-2048-PKCS1", labelRSA, tls.PKCS1WithSHA256},
		{"Ed25519", labelEd25519, tls.Ed25519},
	} {
		k := f.key(b, bc.label).(signer.ContextSigner)
		input, opts := signInput(bc.scheme, tls13Message(32))
		b.Run(bc.name, func(b *testing.B) {
			ctx := context.Background()
			for b.Loop() {
				if _, err := k.SignContext(ctx, input, opts); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(bc.name+"-parallel", func(b *testing.B) {
			ctx := context.Background()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := k.SignContext(ctx, input, opts); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// BenchmarkDecryptPremaster compares valid and invalid ciphertexts: with
// implicit rejection their costs should be the same.
func BenchmarkDecryptPremaster(b *testing.B) {
	f := mustFixture(b)
	k := f.key(b, labelRSA)
	pub := k.Public().(*rsa.PublicKey)
	d := k.(signer.PremasterDecrypter)
	pms := make([]byte, 48)
	rand.Read(pms)
	valid, _ := rsa.EncryptPKCS1v15(rand.Reader, pub, pms)
	for _, bc := range []struct {
		name       string
		ciphertext []byte
	}{
		{"valid", valid},
		{"invalid-padding", rawEncrypt(pub, block(pub.Size(), pms, func(em []byte) { em[1] = 1 }))},
		{"invalid-payload-length", rawEncrypt(pub, block(pub.Size(), pms[:47], nil))},
		{"invalid-ciphertext-length", valid[1:]},
		{"invalid-above-modulus", append([]byte{0xff}, valid[1:]...)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			ctx := context.Background()
			for b.Loop() {
				if _, err := d.DecryptPremaster(ctx, bc.ciphertext); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
