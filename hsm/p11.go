package hsm

import (
	"crypto/elliptic"
	"encoding/binary"
	"errors"
	"slices"

	"github.com/ThalesIgnite/crypto11"
	"github.com/miekg/pkcs11"
)

// PKCS #11 3.0 constants that miekg/pkcs11 v1.1.2 lacks.
const (
	ckkECEdwards           = 0x00000040 // CKK_EC_EDWARDS
	ckmECEdwardsKeyPairGen = 0x00001055 // CKM_EC_EDWARDS_KEY_PAIR_GEN
	ckmEdDSA               = 0x00001057 // CKM_EDDSA
)

// c11Context lists the methods of *crypto11.Context the module uses, so
// that tests can put a stub in its place.
type c11Context interface {
	FindKeyPairs(id, label []byte) ([]crypto11.Signer, error)
	GenerateRSAKeyPairWithAttributes(public, private crypto11.AttributeSet, bits int) (crypto11.SignerDecrypter, error)
	GenerateECDSAKeyPairWithAttributes(public, private crypto11.AttributeSet, curve elliptic.Curve) (crypto11.Signer, error)
	Close() error
}

var _ c11Context = (*crypto11.Context)(nil)

// p11API lists the methods of *pkcs11.Ctx the module uses for the
// operations crypto11 cannot do (raw RSA decryption, the implicit-rejection
// secret, EdDSA, discovery, health checks), so that tests can wrap it to
// inject faults.
type p11API interface {
	Initialize(opts ...pkcs11.InitializeOption) error
	Finalize() error
	Destroy()
	GetInfo() (pkcs11.Info, error)
	GetSlotList(tokenPresent bool) ([]uint, error)
	GetSlotInfo(slotID uint) (pkcs11.SlotInfo, error)
	GetTokenInfo(slotID uint) (pkcs11.TokenInfo, error)
	GetMechanismList(slotID uint) ([]*pkcs11.Mechanism, error)
	GetMechanismInfo(slotID uint, m []*pkcs11.Mechanism) (pkcs11.MechanismInfo, error)
	OpenSession(slotID uint, flags uint) (pkcs11.SessionHandle, error)
	CloseSession(sh pkcs11.SessionHandle) error
	GetSessionInfo(sh pkcs11.SessionHandle) (pkcs11.SessionInfo, error)
	Login(sh pkcs11.SessionHandle, userType uint, pin string) error
	FindObjectsInit(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) error
	FindObjects(sh pkcs11.SessionHandle, max int) ([]pkcs11.ObjectHandle, bool, error)
	FindObjectsFinal(sh pkcs11.SessionHandle) error
	GetAttributeValue(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, a []*pkcs11.Attribute) ([]*pkcs11.Attribute, error)
	DecryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Decrypt(sh pkcs11.SessionHandle, cipher []byte) ([]byte, error)
	SignInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Sign(sh pkcs11.SessionHandle, message []byte) ([]byte, error)
	GenerateKeyPair(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, public, private []*pkcs11.Attribute) (pkcs11.ObjectHandle, pkcs11.ObjectHandle, error)
	DestroyObject(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle) error
}

var _ p11API = (*pkcs11.Ctx)(nil)

// isCode reports whether err is the PKCS #11 return value code.
func isCode(err error, code uint) bool {
	var e pkcs11.Error
	return errors.As(err, &e) && uint(e) == code
}

// sessionBroken reports whether err means that the session can no longer
// be used, so that it must be dropped rather than returned to the pool.
func sessionBroken(err error) bool {
	var e pkcs11.Error
	if !errors.As(err, &e) {
		return false
	}
	switch uint(e) {
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED,
		pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_DEVICE_ERROR:
		return true
	}
	return false
}

// decryptGoneCodes are the return values of C_Decrypt that the masked
// CKM_RSA_PKCS fallback reports as errors: each means that the token, the
// library, the session, the login or the key object is gone, a state that
// no ciphertext can bring about, so reporting it tells nothing about the
// ciphertext. They are token faults (isTokenFault), so the caller gets an
// *UnavailableError, for valid and invalid ciphertexts alike, and the
// module reconnects.
//
// Every other return value counts as a padding failure and is answered by
// implicit rejection, because tokens signal bad padding with a variety of
// codes (SoftHSM CKR_GENERAL_ERROR; openCryptoki CKR_ENCRYPTED_DATA_INVALID,
// CKR_ENCRYPTED_DATA_LEN_RANGE or CKR_FUNCTION_FAILED). That includes codes
// that usually mean something else but that a token could return after it
// has looked at the plaintext: CKR_HOST_MEMORY and CKR_DEVICE_MEMORY (an
// allocation that depends on the plaintext's length) and
// CKR_OPERATION_NOT_INITIALIZED (a token that ends the operation when the
// length query meets bad padding). This list is kept apart from
// isTokenFault on purpose: adding a code there must not open an oracle here.
var decryptGoneCodes = []uint{
	pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, // the library was finalised
	pkcs11.CKR_DEVICE_REMOVED,
	pkcs11.CKR_TOKEN_NOT_PRESENT,
	pkcs11.CKR_DEVICE_ERROR,
	pkcs11.CKR_SESSION_HANDLE_INVALID,
	pkcs11.CKR_SESSION_CLOSED,
	pkcs11.CKR_USER_NOT_LOGGED_IN, // the login was lost
	pkcs11.CKR_KEY_HANDLE_INVALID, // the key's handle died with the sessions
	pkcs11.CKR_OBJECT_HANDLE_INVALID,
}

// decryptGone reports whether a failed C_Decrypt returned one of
// decryptGoneCodes.
func decryptGone(err error) bool {
	var e pkcs11.Error
	return errors.As(err, &e) && slices.Contains(decryptGoneCodes, uint(e))
}

// ulongSize is sizeof(CK_ULONG) for this platform, as miekg/pkcs11 encodes
// it (8 on 64-bit Unix, 4 on Windows).
var ulongSize = len(pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, uint(0)).Value)

// attrUlong decodes a CK_ULONG attribute value.
func attrUlong(v []byte) (uint, bool) {
	switch {
	case len(v) != ulongSize:
		return 0, false
	case ulongSize == 8:
		return uint(binary.NativeEndian.Uint64(v)), true
	case ulongSize == 4:
		return uint(binary.NativeEndian.Uint32(v)), true
	}
	return 0, false
}

// attrUlongs decodes a CK_ULONG array attribute value, such as
// CKA_ALLOWED_MECHANISMS.
func attrUlongs(v []byte) ([]uint, bool) {
	if len(v)%ulongSize != 0 {
		return nil, false
	}
	out := make([]uint, 0, len(v)/ulongSize)
	for i := 0; i < len(v); i += ulongSize {
		u, _ := attrUlong(v[i : i+ulongSize])
		out = append(out, u)
	}
	return out, true
}

// attrBool decodes a CK_BBOOL attribute value.
func attrBool(v []byte) (value, ok bool) {
	if len(v) != 1 {
		return false, false
	}
	return v[0] != 0, true
}

// getAttrs reads attributes of an object. An attribute the object lacks
// (or keeps secret) is absent from the result rather than an error, since
// C_GetAttributeValue fails as a whole when any attribute in the template
// is invalid.
func getAttrs(p p11API, sh pkcs11.SessionHandle, obj pkcs11.ObjectHandle, types ...uint) (map[uint][]byte, error) {
	tmpl := make([]*pkcs11.Attribute, len(types))
	for i, t := range types {
		tmpl[i] = pkcs11.NewAttribute(t, nil)
	}
	out := make(map[uint][]byte, len(types))
	attrs, err := p.GetAttributeValue(sh, obj, tmpl)
	if err == nil {
		for _, a := range attrs {
			if a.Value != nil {
				out[a.Type] = a.Value
			}
		}
		return out, nil
	}
	if !isCode(err, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID) && !isCode(err, pkcs11.CKR_ATTRIBUTE_SENSITIVE) {
		return nil, err
	}
	for _, t := range types {
		a, err := p.GetAttributeValue(sh, obj, []*pkcs11.Attribute{pkcs11.NewAttribute(t, nil)})
		switch {
		case isCode(err, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID), isCode(err, pkcs11.CKR_ATTRIBUTE_SENSITIVE):
			continue
		case err != nil:
			return nil, err
		}
		if a[0].Value != nil {
			out[t] = a[0].Value
		}
	}
	return out, nil
}

// findObjects returns the handles of all objects that match tmpl.
func findObjects(p p11API, sh pkcs11.SessionHandle, tmpl []*pkcs11.Attribute) (handles []pkcs11.ObjectHandle, err error) {
	if err := p.FindObjectsInit(sh, tmpl); err != nil {
		return nil, err
	}
	defer func() {
		if ferr := p.FindObjectsFinal(sh); err == nil && ferr != nil {
			err = ferr
		}
	}()
	for {
		hs, _, err := p.FindObjects(sh, 64)
		if err != nil {
			return nil, err
		}
		if len(hs) == 0 {
			return handles, nil
		}
		handles = append(handles, hs...)
	}
}
