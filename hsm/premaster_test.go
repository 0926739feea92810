package hsm_test

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"math/big"
	"slices"
	"testing"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/hsm/hsmtest"
	"github.com/keyless-tls/keyless/internal/premaster"
	"github.com/keyless-tls/keyless/signer"
)

// rawEncrypt returns em^e mod n as a modulus-sized big-endian value: RSA
// encryption without padding, to build malformed ciphertexts.
func rawEncrypt(pub *rsa.PublicKey, em []byte) []byte {
	c := new(big.Int).Exp(new(big.Int).SetBytes(em), big.NewInt(int64(pub.E)), pub.N)
	return c.FillBytes(make([]byte, pub.Size()))
}

// block returns a PKCS #1 v1.5 type 2 block 00 02 PS 00 msg of size k, with
// random non-zero padding PS, then lets edit change it.
func block(k int, msg []byte, edit func(em []byte)) []byte {
	em := make([]byte, k)
	em[1] = 2
	ps := em[2 : k-len(msg)-1]
	rand.Read(ps)
	for i := range ps {
		for ps[i] == 0 {
			rand.Read(ps[i : i+1])
		}
	}
	copy(em[k-len(msg):], msg)
	if edit != nil {
		edit(em)
	}
	return em
}

type premasterCase struct {
	name       string
	ciphertext []byte
	want       []byte // nil: implicit rejection
}

func premasterCases(t testing.TB, pub *rsa.PublicKey) []premasterCase {
	k := pub.Size()
	pms := make([]byte, 48)
	rand.Read(pms)
	valid, err := rsa.EncryptPKCS1v15(rand.Reader, pub, pms)
	if err != nil {
		t.Fatal(err)
	}
	// A valid ciphertext that starts with a zero byte, which a lax length
	// check would accept without it; a ciphertext has one 1 time in 256.
	zeroFirst := valid
	for zeroFirst[0] != 0 {
		if zeroFirst, err = rsa.EncryptPKCS1v15(rand.Reader, pub, pms); err != nil {
			t.Fatal(err)
		}
	}
	payload := func(n int) []byte { b := make([]byte, n); rand.Read(b); return b }
	nPlus := func(d int64) []byte {
		return new(big.Int).Add(pub.N, big.NewInt(d)).FillBytes(make([]byte, k))
	}
	return []premasterCase{
		{"valid", valid, pms},
		{"valid (manual padding)", rawEncrypt(pub, block(k, pms, nil)), pms},
		{"first byte not zero", rawEncrypt(pub, block(k, pms, func(em []byte) { em[0] = 1 })), nil},
		{"block type 1", rawEncrypt(pub, block(k, pms, func(em []byte) { em[1] = 1 })), nil},
		{"block type 0", rawEncrypt(pub, block(k, pms, func(em []byte) { em[1] = 0 })), nil},
		{"no separator", rawEncrypt(pub, block(k, pms, func(em []byte) { em[k-49] = 0xff })), nil},
		{"padding of 7 bytes", rawEncrypt(pub, block(k, pms, func(em []byte) { em[9] = 0 })), nil},
		{"padding of 0 bytes", rawEncrypt(pub, block(k, pms, func(em []byte) { em[2] = 0 })), nil},
		{"payload of 47 bytes", rawEncrypt(pub, block(k, payload(47), nil)), nil},
		{"payload of 49 bytes", rawEncrypt(pub, block(k, payload(49), nil)), nil},
		{"payload of 0 bytes", rawEncrypt(pub, block(k, nil, nil)), nil},
		{"payload of 100 bytes", rawEncrypt(pub, block(k, payload(100), nil)), nil},
		{"ciphertext equal to the modulus", nPlus(0), nil},
		{"ciphertext above the modulus", nPlus(1), nil},
		{"ciphertext of all ones", bytes.Repeat([]byte{0xff}, k), nil},
		{"ciphertext zero", make([]byte, k), nil},
		{"ciphertext one", append(make([]byte, k-1), 1), nil},
		{"short ciphertext", valid[1:], nil},
		{"short ciphertext, valid but for its leading zero byte", zeroFirst[1:], nil},
		{"valid ciphertext with a leading zero byte", append([]byte{0}, valid...), nil},
		{"long ciphertext", append(bytes.Clone(valid), 0), nil},
		{"empty ciphertext", []byte{}, nil},
		{"nil ciphertext", nil, nil},
		{"oversize ciphertext", payload(4096), nil},
		{"one byte", []byte{2}, nil},
	}
}

// testDecryptPremaster runs every case through k. A rejection must be
// package premaster's: HMAC-SHA-384 of the ciphertext under the key's secret,
// which must be the key's own signature of premaster.SecretMessage. Since
// that signature is unique, every Module with the key answers the same.
func testDecryptPremaster(t *testing.T, k signer.PremasterDecrypter, pub *rsa.PublicKey) {
	ctx := testContext(t)
	secret, err := hsm.RejectionSecret(ctx, k.(crypto.Signer))
	if err != nil {
		t.Fatal(err)
	}
	if err := premaster.CheckSecret(pub, secret); err != nil {
		t.Fatal(err)
	}
	for _, tt := range premasterCases(t, pub) {
		t.Run(tt.name, func(t *testing.T) {
			got, err := k.DecryptPremaster(ctx, tt.ciphertext)
			if err != nil {
				t.Fatalf("DecryptPremaster() error = %v; want implicit rejection, never an error", err)
			}
			if len(got) != 48 {
				t.Fatalf("DecryptPremaster() = %d bytes, want 48", len(got))
			}
			if tt.want != nil {
				if !bytes.Equal(got, tt.want) {
					t.Fatalf("DecryptPremaster() = %x, want %x", got, tt.want)
				}
				return
			}
			if want := premaster.Rejection(secret, tt.ciphertext); !bytes.Equal(got, want) {
				t.Fatalf("DecryptPremaster() = %x; want the rejection %x", got, want)
			}
			again, err := k.DecryptPremaster(ctx, tt.ciphertext)
			if err != nil || !bytes.Equal(got, again) {
				t.Fatalf("second DecryptPremaster() = %x, %v; want the same rejection %x", again, err, got)
			}
		})
	}
}

func TestDecryptPremaster(t *testing.T) {
	f := mustFixture(t)
	for _, label := range []string{labelRSA, labelToolRSA, labelToolRSAPKCS} {
		t.Run(label, func(t *testing.T) {
			k := f.key(t, label)
			testDecryptPremaster(t, k.(signer.PremasterDecrypter), k.Public().(*rsa.PublicKey))
		})
	}
}

// TestDecryptPremasterFallback runs the same cases through the masked
// CKM_RSA_PKCS fallback that tokens without CKM_RSA_X_509 use; SoftHSM
// answers bad padding there with CKR_GENERAL_ERROR.
func TestDecryptPremasterFallback(t *testing.T) {
	f := mustFixture(t)
	m := f.tok.Open(t) // a second Module on the same token
	ctx := testContext(t)
	if err := hsm.UsePKCSDecryptFallback(ctx, m); err != nil {
		t.Fatal(err)
	}
	want := f.key(t, labelRSA)
	k, err := m.Key(ctx, keyIDOf(t, want.Public()))
	if err != nil || k == nil {
		t.Fatalf("Key() = %v, %v", k, err)
	}
	if raw, ok := hsm.RawDecrypt(k); raw || !ok {
		t.Fatalf("RawDecrypt() = %t, %t; want the fallback", raw, ok)
	}
	testDecryptPremaster(t, k.(signer.PremasterDecrypter), k.Public().(*rsa.PublicKey))

	// The two Modules, one decrypting raw and one through the fallback,
	// reject a ciphertext alike: a caller who asks both learns nothing.
	invalid := bytes.Repeat([]byte{0x42}, k.Public().(*rsa.PublicKey).Size())
	a, errA := want.(signer.PremasterDecrypter).DecryptPremaster(ctx, invalid)
	b, errB := k.(signer.PremasterDecrypter).DecryptPremaster(ctx, invalid)
	if errA != nil || errB != nil || !bytes.Equal(a, b) {
		t.Fatalf("the two Modules rejected a ciphertext with %x, %v and %x, %v; want the same bytes", a, errA, b, errB)
	}
}

// TestDecryptPremasterSecretByRawRSA runs the cases with a key that may not
// sign with CKM_RSA_PKCS (CKA_ALLOWED_MECHANISMS has only CKM_RSA_X_509 and
// CKM_RSA_PKCS_PSS), so that its rejection secret comes from a raw RSA
// decryption; it must be the same value all the same.
func TestDecryptPremasterSecretByRawRSA(t *testing.T) {
	tok := hsmtest.New(t)
	tok.PKCS11Tool(t, "--keypairgen", "--key-type", "rsa:2048", "--label", "raw-only", "--id", "0f",
		"--allowed-mechanisms", "RSA-X-509,RSA-PKCS-PSS")
	m := tok.Open(t)
	ctx := testContext(t)
	keys, err := m.Keys(ctx)
	if err != nil || len(keys) != 1 {
		t.Fatalf("Keys() = %d keys, %v; want 1", len(keys), err)
	}
	k := keys[0]
	if raw, ok := hsm.RawDecrypt(k); !raw || !ok {
		t.Fatalf("RawDecrypt() = %t, %t; want raw RSA", raw, ok)
	}
	if slices.Contains(k.(signer.SchemeLister).SignatureSchemes(), tls.PKCS1WithSHA256) {
		t.Fatal("the key may sign with PKCS #1 v1.5; the test needs one that may not")
	}
	testDecryptPremaster(t, k.(signer.PremasterDecrypter), k.Public().(*rsa.PublicKey))
}
