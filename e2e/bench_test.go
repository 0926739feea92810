package e2e

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"math/big"
	"testing"

	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// BenchmarkDecryptValidVsInvalid measures Decrypt through the whole API
// (gRPC over TCP with mutual TLS, the policy, the audit trail, SoftHSM) for
// a valid ciphertext and for invalid ones, which implicit rejection must
// answer in about the same time. Run it with
//
//	go test -run '^$' -bench BenchmarkDecryptValidVsInvalid -benchtime 2000x ./e2e
//
// docs/SECURITY.md has a measured result.
func BenchmarkDecryptValidVsInvalid(b *testing.B) {
	ks := startSecKeyserver(b)
	client := ks.client(b, ks.clientTLS(b, ks.link.ca, secEdgeA))
	pub := ks.rsa.(*rsa.PublicKey)
	id := keyIDOf(b, pub)
	pms := append([]byte{3, 3}, bytes.Repeat([]byte{0x42}, 46)...)
	encrypt := func(msg []byte) []byte {
		ct, err := rsa.EncryptPKCS1v15(rand.Reader, pub, msg)
		if err != nil {
			b.Fatal(err)
		}
		return ct
	}
	// Textbook RSA of a block with the wrong type byte: a PKCS #1 v1.5
	// padding failure.
	block := make([]byte, pub.Size())
	block[1] = 1
	for i := 2; i < len(block)-49; i++ {
		block[i] = 0xff
	}
	copy(block[len(block)-48:], pms)
	badPadding := new(big.Int).Exp(new(big.Int).SetBytes(block), big.NewInt(int64(pub.E)), pub.N).FillBytes(make([]byte, pub.Size()))

	cases := []struct {
		name string
		ct   []byte
	}{
		{"valid", encrypt(pms)},
		{"invalid/padding", badPadding},
		{"invalid/47-byte-secret", encrypt(pms[:47])},
		{"invalid/random", func() []byte { c := encrypt(pms); rand.Read(c[1:]); c[0] = 0; return c }()},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			req := &keylessv1.DecryptRequest{KeyId: id, EncryptedPremaster: c.ct}
			for b.Loop() {
				resp, err := client.Decrypt(b.Context(), req)
				if err != nil || len(resp.GetPremaster()) != 48 {
					b.Fatalf("Decrypt() = %v, %v", resp, err)
				}
			}
		})
	}
}
