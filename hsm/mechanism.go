package hsm

import (
	"crypto/tls"
	"fmt"
	"slices"

	"github.com/miekg/pkcs11"
)

// mechanismNames names the mechanisms the module probes for.
var mechanismNames = map[uint]string{
	pkcs11.CKM_RSA_PKCS:              "CKM_RSA_PKCS",
	pkcs11.CKM_RSA_PKCS_PSS:          "CKM_RSA_PKCS_PSS",
	pkcs11.CKM_RSA_X_509:             "CKM_RSA_X_509",
	pkcs11.CKM_ECDSA:                 "CKM_ECDSA",
	ckmEdDSA:                         "CKM_EDDSA",
	pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN: "CKM_RSA_PKCS_KEY_PAIR_GEN",
	pkcs11.CKM_EC_KEY_PAIR_GEN:       "CKM_EC_KEY_PAIR_GEN",
	ckmECEdwardsKeyPairGen:           "CKM_EC_EDWARDS_KEY_PAIR_GEN",
}

// mechanismList names mechanisms, as mechanismNames does or as
// "CKM_0x<hex>"; nil stays nil.
func mechanismList(ms []uint) []string {
	if ms == nil {
		return nil
	}
	out := make([]string, 0, len(ms))
	for _, m := range ms {
		name, ok := mechanismNames[m]
		if !ok {
			name = fmt.Sprintf("CKM_0x%X", m)
		}
		out = append(out, name)
	}
	return out
}

// mechanisms is what the token reports (C_GetMechanismInfo) for the
// mechanisms in mechanismNames that it has. It is immutable.
type mechanisms map[uint]pkcs11.MechanismInfo

// probeMechanisms asks the token which of the mechanisms the module uses
// it supports.
func probeMechanisms(p p11API, slot uint) (mechanisms, error) {
	list, err := p.GetMechanismList(slot)
	if err != nil {
		return nil, err
	}
	ms := make(mechanisms)
	for _, m := range list {
		if _, ok := mechanismNames[m.Mechanism]; !ok {
			continue
		}
		info, err := p.GetMechanismInfo(slot, []*pkcs11.Mechanism{pkcs11.NewMechanism(m.Mechanism, nil)})
		if err != nil {
			return nil, err
		}
		ms[m.Mechanism] = info
	}
	return ms, nil
}

// can reports whether the token can use mechanism m for the operation
// flag (CKF_SIGN, CKF_DECRYPT, CKF_GENERATE_KEY_PAIR) with a key of the
// given size in bits. Sizes outside a non-zero [MinKeySize, MaxKeySize] are
// refused.
func (ms mechanisms) can(m, flag uint, bits int) bool {
	info, ok := ms[m]
	if !ok || info.Flags&flag == 0 {
		return false
	}
	if info.MinKeySize != 0 && uint(bits) < info.MinKeySize {
		return false
	}
	if info.MaxKeySize != 0 && info.MaxKeySize != pkcs11.CK_UNAVAILABLE_INFORMATION && uint(bits) > info.MaxKeySize {
		return false
	}
	return true
}

// names returns the names of the mechanisms the token has, sorted.
func (ms mechanisms) names() []string {
	out := make([]string, 0, len(ms))
	for m := range ms {
		out = append(out, mechanismNames[m])
	}
	slices.Sort(out)
	return out
}

// keyMechanisms is what one key can do: the token's mechanisms, narrowed
// by the key's size, CKA_SIGN/CKA_DECRYPT and CKA_ALLOWED_MECHANISMS.
type keyMechanisms struct {
	pkcs1, pss, ecdsa, eddsa bool // signing
	rawDecrypt, pkcsDecrypt  bool // premaster decryption
}

// forKey narrows ms for a key of the given size. allowed is the key's
// CKA_ALLOWED_MECHANISMS, nil when it has none (any mechanism is allowed).
func (ms mechanisms) forKey(keyType uint, bits int, sign, decrypt bool, allowed []uint) keyMechanisms {
	ok := func(m, flag uint) bool {
		return ms.can(m, flag, bits) && (allowed == nil || slices.Contains(allowed, m))
	}
	var km keyMechanisms
	switch keyType {
	case pkcs11.CKK_RSA:
		km.pkcs1 = sign && ok(pkcs11.CKM_RSA_PKCS, pkcs11.CKF_SIGN)
		km.pss = sign && ok(pkcs11.CKM_RSA_PKCS_PSS, pkcs11.CKF_SIGN)
		km.rawDecrypt = decrypt && ok(pkcs11.CKM_RSA_X_509, pkcs11.CKF_DECRYPT)
		km.pkcsDecrypt = decrypt && ok(pkcs11.CKM_RSA_PKCS, pkcs11.CKF_DECRYPT)
	case pkcs11.CKK_EC:
		km.ecdsa = sign && ok(pkcs11.CKM_ECDSA, pkcs11.CKF_SIGN)
	case ckkECEdwards:
		km.eddsa = sign && ok(ckmEdDSA, pkcs11.CKF_SIGN)
	}
	return km
}

// rsaSchemes lists the TLS schemes of an RSA key: PSS before PKCS #1 v1.5,
// never SHA-1.
func rsaSchemes(km keyMechanisms) []tls.SignatureScheme {
	var s []tls.SignatureScheme
	if km.pss {
		s = append(s, tls.PSSWithSHA256, tls.PSSWithSHA384, tls.PSSWithSHA512)
	}
	if km.pkcs1 {
		s = append(s, tls.PKCS1WithSHA256, tls.PKCS1WithSHA384, tls.PKCS1WithSHA512)
	}
	return s
}

// ecdsaSchemes lists the TLS schemes of an ECDSA key on a curve of the
// given size. TLS 1.2 lets any curve sign with any hash; TLS 1.3 ties the
// scheme to the curve, so the curve's own scheme comes first.
func ecdsaSchemes(km keyMechanisms, curveBits int) []tls.SignatureScheme {
	if !km.ecdsa {
		return nil
	}
	s := []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256, tls.ECDSAWithP384AndSHA384, tls.ECDSAWithP521AndSHA512}
	own := map[int]tls.SignatureScheme{256: tls.ECDSAWithP256AndSHA256, 384: tls.ECDSAWithP384AndSHA384, 521: tls.ECDSAWithP521AndSHA512}[curveBits]
	if i := slices.Index(s, own); i > 0 {
		s = slices.Insert(slices.Delete(s, i, i+1), 0, own)
	}
	return s
}

func ed25519Schemes(km keyMechanisms) []tls.SignatureScheme {
	if !km.eddsa {
		return nil
	}
	return []tls.SignatureScheme{tls.Ed25519}
}
