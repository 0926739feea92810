package hsm

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/keyless-tls/keyless/internal/premaster"
)

// TestDecryptFallbackErrors injects every PKCS #11 return value into
// C_Decrypt of the masked CKM_RSA_PKCS fallback, for a valid and an invalid
// ciphertext: the codes of decryptGoneCodes (the token, session, login or
// key is gone) are an *UnavailableError for both; every other code is
// answered as a padding failure, by the ciphertext's implicit rejection
// and no error, for both. So no return value tells a valid ciphertext from
// an invalid one.
func TestDecryptFallbackErrors(t *testing.T) {
	priv := testRSAKey()
	secret, err := premaster.Secret(priv)
	if err != nil {
		t.Fatal(err)
	}
	pms := make([]byte, premaster.Len)
	rand.Read(pms)
	valid, err := rsa.EncryptPKCS1v15(rand.Reader, &priv.PublicKey, pms)
	if err != nil {
		t.Fatal(err)
	}
	em := make([]byte, priv.Size())
	em[1] = 1 // block type 1: a padding failure
	for i := 2; i < len(em)-premaster.Len-1; i++ {
		em[i] = 0xff
	}
	invalid := new(big.Int).Exp(new(big.Int).SetBytes(em), big.NewInt(int64(priv.E)), priv.N).FillBytes(make([]byte, priv.Size()))

	for _, code := range decryptGoneCodes {
		if !isTokenFault(pkcs11.Error(code)) {
			t.Errorf("%v is in decryptGoneCodes but not a token fault: it would not be reported as unavailable", pkcs11.Error(code))
		}
	}
	// Every code PKCS #11 3.0 defines lies below 0x200; then two vendor
	// codes.
	var codes []uint
	for c := uint(1); c < 0x200; c++ {
		codes = append(codes, c)
	}
	codes = append(codes, pkcs11.CKR_VENDOR_DEFINED, pkcs11.CKR_VENDOR_DEFINED+0x42)
	ctx := t.Context()
	gone := 0
	for _, code := range codes {
		for _, ct := range []struct {
			name string
			ct   []byte
		}{{"valid", valid}, {"invalid", invalid}} {
			p := newStubP11()
			// Twice, so that the pool's one retry after a broken session
			// or a lost login fails too.
			p.errs = []error{pkcs11.Error(code), pkcs11.Error(code)}
			p.decrypt = func(mech uint, in []byte) ([]byte, error) {
				t.Errorf("code 0x%X: C_Decrypt ran past the injected error", code)
				return rsa.DecryptPKCS1v15(nil, priv, in)
			}
			k := newStubRSAKey(newStubModule(p, 2), false)
			out, err := k.DecryptPremaster(ctx, ct.ct)
			name := fmt.Sprintf("%v, %s ciphertext", pkcs11.Error(code), ct.name)
			if slices.Contains(decryptGoneCodes, code) {
				var ue *UnavailableError
				if !errors.As(err, &ue) || !errors.Is(err, pkcs11.Error(code)) || out != nil {
					t.Errorf("%s: DecryptPremaster() = %x, %v; want an *UnavailableError wrapping the code", name, out, err)
				}
				gone++
				continue
			}
			if want := premaster.Rejection(secret, ct.ct); err != nil || !bytes.Equal(out, want) {
				t.Errorf("%s: DecryptPremaster() = %x, %v; want the rejection %x, as for bad padding", name, out, err, want)
			}
		}
	}
	if want := 2 * len(decryptGoneCodes); gone != want {
		t.Errorf("%d answers were errors, want %d", gone, want)
	}

	// Without an injected error the stub decrypts: the test's ciphertexts
	// are what they claim to be.
	p := newStubP11()
	p.decrypt = func(mech uint, in []byte) ([]byte, error) { return rsa.DecryptPKCS1v15(nil, priv, in) }
	k := newStubRSAKey(newStubModule(p, 2), false)
	if out, err := k.DecryptPremaster(ctx, valid); err != nil || !bytes.Equal(out, pms) {
		t.Errorf("DecryptPremaster(valid) = %x, %v; want the premaster", out, err)
	}
	p.decrypt = func(mech uint, in []byte) ([]byte, error) {
		out, err := rsa.DecryptPKCS1v15(nil, priv, in)
		if err != nil {
			return nil, pkcs11.Error(pkcs11.CKR_ENCRYPTED_DATA_INVALID)
		}
		return out, nil
	}
	if out, err := k.DecryptPremaster(ctx, invalid); err != nil || !bytes.Equal(out, premaster.Rejection(secret, invalid)) {
		t.Errorf("DecryptPremaster(invalid) = %x, %v; want the rejection", out, err)
	}
}
