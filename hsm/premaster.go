package hsm

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"
	"math/big"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/keyless-tls/keyless/internal/premaster"
)

// DecryptPremaster decrypts the RSA-encrypted premaster secret of a TLS 1.2
// RSA key exchange, with implicit rejection: for any ciphertext that is not
// a valid PKCS #1 v1.5 encryption of exactly 48 bytes under this key
// (wrong padding, wrong payload length, wrong ciphertext length, a value
// not less than the modulus, empty or oversized) it returns 48 bytes and a
// nil error. Those bytes are package premaster's rejection: the same for
// the same ciphertext on every call and every Module holding the key, and
// unpredictable without it, so asking twice does not tell either.
//
// The rejection is computed before the token is called, the token performs
// exactly one decryption of an in-range value for each ciphertext, and the
// padding is checked in constant time (the model is crypto/rsa's
// DecryptPKCS1v15SessionKey and BoringSSL), so neither the answer nor its
// timing tells a valid ciphertext from an invalid one. (The key's first
// decryption also computes its rejection secret: see rejectionSecret.)
//
// An error is returned only when the key cannot be used at all: the module
// is closed, the token fails, ctx ends first, or the rejection secret
// cannot be computed (wrapping [ErrFaultySignature] if the token's result
// does not verify).
//
// The key decrypts with CKM_RSA_X_509 (raw RSA) where the token offers it.
// Otherwise it falls back to CKM_RSA_PKCS, treating every failure that can
// depend on the ciphertext as a padding failure; the token's own padding
// check may then take longer for some ciphertexts, so every fallback
// answer is held until a time set by the key's recent decryptions (see
// pace), not by this ciphertext. No raw RSA result ever leaves this
// method.
func (k *rsaDecryptKey) DecryptPremaster(ctx context.Context, ciphertext []byte) ([]byte, error) {
	secret, err := k.rejectionSecret(ctx)
	if err != nil {
		return nil, fmt.Errorf("hsm: decrypt premaster with key %q: %w", k.label, err)
	}
	// The answer for an invalid ciphertext, computed first so that no
	// decision taken after the token's answer costs time.
	out := premaster.Rejection(secret, ciphertext)
	in, valid, err := k.inRange(ciphertext)
	if err != nil {
		return nil, fmt.Errorf("hsm: decrypt premaster: %w", err)
	}
	if k.rawDecrypt {
		em, err := call(ctx, &k.keyBase, "C_Decrypt", func() ([]byte, error) { return k.decrypt(ctx, pkcs11.CKM_RSA_X_509, in) })
		if err != nil {
			return nil, fmt.Errorf("hsm: decrypt premaster with key %q: %w", k.label, err)
		}
		em, err = k.fullLength(em)
		if err != nil {
			return nil, fmt.Errorf("hsm: decrypt premaster with key %q: %w", k.label, err)
		}
		checkPremaster(out, em, valid)
		return out, nil
	}
	start := time.Now()
	pt, err := call(ctx, &k.keyBase, "C_Decrypt", func() ([]byte, error) { return k.decryptMasked(ctx, in) })
	if err != nil {
		return nil, fmt.Errorf("hsm: decrypt premaster with key %q: %w", k.label, err)
	}
	// The token's padding check may take longer for some ciphertexts than
	// for others: answer after a time that does not depend on it.
	k.pace.wait(ctx, start)
	valid &= subtle.ConstantTimeEq(int32(len(pt)), premaster.Len)
	buf := make([]byte, premaster.Len)
	copy(buf, pt)
	subtle.ConstantTimeCopy(valid, out, buf)
	return out, nil
}

// fullLength returns a raw RSA result as a modulus-length big-endian
// number: some tokens strip its leading zero bytes. The copy is made
// whatever the length, so that its cost does not depend on the plaintext.
func (k *rsaDecryptKey) fullLength(em []byte) ([]byte, error) {
	size := k.size()
	if len(em) > size {
		return nil, fmt.Errorf("token returned %d bytes for a %d-byte modulus", len(em), size)
	}
	buf := make([]byte, size)
	copy(buf[size-len(em):], em)
	return buf, nil
}

// rejectionSecret returns the key's implicit-rejection secret (see package
// premaster), computing it in the token on first use: a CKM_RSA_PKCS
// signature of premaster.SecretMessage with no DigestInfo, or, where the key
// cannot sign so or the token refuses it, the same value as a CKM_RSA_X_509
// decryption of premaster.Type1Block. Like a signature, it is checked with
// the public key before use. It does not depend on any ciphertext. Callers
// wait for one computation at a time, each for its own ctx at most; a
// failure is not kept, so the next call tries again.
func (k *rsaDecryptKey) rejectionSecret(ctx context.Context) ([]byte, error) {
	if s := k.secret.Load(); s != nil {
		return *s, nil
	}
	select {
	case k.computing <- struct{}{}:
		defer func() { <-k.computing }()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if s := k.secret.Load(); s != nil {
		return *s, nil
	}
	var (
		s   []byte
		err = fmt.Errorf("key %q can neither sign with CKM_RSA_PKCS nor decrypt with CKM_RSA_X_509", k.label)
	)
	if k.mechs.pkcs1 {
		// With no DigestInfo: callers' signatures go through crypto11,
		// which always adds one.
		s, err = call(ctx, &k.keyBase, "C_Sign", func() ([]byte, error) {
			return k.signWith(ctx, pkcs11.CKM_RSA_PKCS, []byte(premaster.SecretMessage))
		})
	}
	var unavailable *UnavailableError
	if err != nil && k.mechs.rawDecrypt && ctx.Err() == nil && !errors.As(err, &unavailable) {
		s, err = call(ctx, &k.keyBase, "C_Decrypt", func() ([]byte, error) {
			return k.decrypt(ctx, pkcs11.CKM_RSA_X_509, premaster.Type1Block(k.size()))
		})
	}
	if err == nil {
		s, err = k.fullLength(s)
	}
	if err != nil {
		return nil, fmt.Errorf("implicit-rejection secret: %w", err)
	}
	if err := premaster.CheckSecret(k.pub, s); err != nil {
		return nil, fmt.Errorf("implicit-rejection secret: %w: %v", ErrFaultySignature, err)
	}
	k.secret.Store(&s)
	return s, nil
}

func (k *rsaDecryptKey) size() int { return (k.pub.N.BitLen() + 7) / 8 }

// inRange returns the ciphertext to hand to the token and 1 if it is the
// caller's, or 0 and a random value below the modulus if the caller's has
// the wrong length or is not less than the modulus. The token thus always
// gets one in-range decryption, with no error path that depends on the
// ciphertext. (Both conditions are functions of public values alone.)
func (k *rsaDecryptKey) inRange(ciphertext []byte) ([]byte, int, error) {
	size := k.size()
	if len(ciphertext) == size && new(big.Int).SetBytes(ciphertext).Cmp(k.pub.N) < 0 {
		return ciphertext, 1, nil
	}
	// The modulus has size bytes with a non-zero first byte, so any value
	// with a zero first byte is less than it.
	dummy := make([]byte, size)
	if _, err := rand.Read(dummy[1:]); err != nil {
		return nil, 0, err
	}
	return dummy, 0, nil
}

// decrypt runs one C_Decrypt with mechanism mech on a pooled session.
func (k *rsaDecryptKey) decrypt(ctx context.Context, mech uint, in []byte) ([]byte, error) {
	var out []byte
	err := k.m.raw.do(ctx, func(sh pkcs11.SessionHandle) error {
		p := k.m.p11
		if err := p.DecryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, k.handle); err != nil {
			return err
		}
		var err error
		out, err = p.Decrypt(sh, in)
		return err
	})
	return out, err
}

// decryptMasked decrypts with CKM_RSA_PKCS and turns every failure of
// C_Decrypt into an empty result, which the caller rejects, except those
// in decryptGoneCodes (the token, session, login or key is gone), which
// are errors. A failure of C_DecryptInit, which has not seen the
// ciphertext, is an error too.
func (k *rsaDecryptKey) decryptMasked(ctx context.Context, in []byte) ([]byte, error) {
	var out []byte
	err := k.m.raw.do(ctx, func(sh pkcs11.SessionHandle) error {
		p := k.m.p11
		if err := p.DecryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil)}, k.handle); err != nil {
			return err // no ciphertext involved yet
		}
		pt, err := p.Decrypt(sh, in)
		switch {
		case err == nil:
			out = pt
		case decryptGone(err):
			return err
		default:
			out = nil
		}
		return nil
	})
	return out, err
}

// checkPremaster overwrites out (the rejection) with the payload of em,
// a raw RSA decryption, if and only if valid is 1 and em is a PKCS #1 v1.5
// type 2 block, 0x00 0x02 PS 0x00 M, with at least 8 bytes of non-zero
// padding PS and a 48-byte message M. It runs in time that depends only on
// len(em). It follows crypto/rsa's decryptPKCS1v15 and
// DecryptPKCS1v15SessionKey.
func checkPremaster(out, em []byte, valid int) {
	if len(em) < 11+premaster.Len {
		return // a modulus too small for a premaster secret: never valid
	}
	firstByteIsZero := subtle.ConstantTimeByteEq(em[0], 0)
	secondByteIsTwo := subtle.ConstantTimeByteEq(em[1], 2)

	// The separator is the first zero byte after the first two; index is
	// its position. lookingForIndex becomes 0 once it is found.
	lookingForIndex := 1
	index := 0
	for i := 2; i < len(em); i++ {
		equals0 := subtle.ConstantTimeByteEq(em[i], 0)
		index = subtle.ConstantTimeSelect(lookingForIndex&equals0, i, index)
		lookingForIndex = subtle.ConstantTimeSelect(equals0, 0, lookingForIndex)
	}
	// PS must be at least 8 bytes long, so the separator is at index 10 or
	// later.
	validPS := subtle.ConstantTimeLessOrEq(2+8, index)

	valid &= firstByteIsZero & secondByteIsTwo & (^lookingForIndex & 1) & validPS
	valid &= subtle.ConstantTimeEq(int32(len(em)-index-1), premaster.Len)
	subtle.ConstantTimeCopy(valid, out, em[len(em)-premaster.Len:])
}
