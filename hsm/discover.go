package hsm

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"

	"github.com/keyless-tls/keyless/link"
	"github.com/miekg/pkcs11"
)

// Object identifiers and names of curves in CKA_EC_PARAMS.
var (
	oidP256    = asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7}
	oidP384    = asn1.ObjectIdentifier{1, 3, 132, 0, 34}
	oidP521    = asn1.ObjectIdentifier{1, 3, 132, 0, 35}
	oidEd25519 = asn1.ObjectIdentifier{1, 3, 101, 112}
)

// skipError explains why a private key on the token is not served. It is
// logged as a warning and the scan goes on.
type skipError struct{ reason string }

func (e *skipError) Error() string { return e.reason }

func skipf(format string, args ...any) error { return &skipError{fmt.Sprintf(format, args...)} }

// privateInfo is what the module reads from a private key object.
type privateInfo struct {
	handle      pkcs11.ObjectHandle
	keyType     uint
	id          []byte
	label       string
	sign        bool
	decrypt     bool
	sensitive   bool
	extractable bool
	alwaysAuth  bool   // CKA_ALWAYS_AUTHENTICATE
	allowed     []uint // CKA_ALLOWED_MECHANISMS; nil if absent or empty
	modulus     []byte // RSA only; may be absent
	exponent    []byte
	ecParams    []byte // EC and EC_EDWARDS; may be absent
}

func (pi *privateInfo) describe() string {
	return fmt.Sprintf("label %q, CKA_ID %s", pi.label, hex.EncodeToString(pi.id))
}

func keyTypeName(kt uint) string {
	switch kt {
	case pkcs11.CKK_RSA:
		return "rsa"
	case pkcs11.CKK_EC:
		return "ecdsa"
	case ckkECEdwards:
		return "ed25519"
	}
	return fmt.Sprintf("CKK_0x%X", kt)
}

func readPrivate(p p11API, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle) (*privateInfo, error) {
	a, err := getAttrs(p, sh, h,
		pkcs11.CKA_KEY_TYPE, pkcs11.CKA_ID, pkcs11.CKA_LABEL, pkcs11.CKA_SIGN, pkcs11.CKA_DECRYPT,
		pkcs11.CKA_SENSITIVE, pkcs11.CKA_EXTRACTABLE, pkcs11.CKA_ALWAYS_AUTHENTICATE, pkcs11.CKA_ALLOWED_MECHANISMS,
		pkcs11.CKA_MODULUS, pkcs11.CKA_PUBLIC_EXPONENT, pkcs11.CKA_EC_PARAMS)
	if err != nil {
		return nil, err
	}
	pi := &privateInfo{
		handle:   h,
		id:       a[pkcs11.CKA_ID],
		label:    string(a[pkcs11.CKA_LABEL]),
		modulus:  a[pkcs11.CKA_MODULUS],
		exponent: a[pkcs11.CKA_PUBLIC_EXPONENT],
		ecParams: a[pkcs11.CKA_EC_PARAMS],
	}
	var ok bool
	if pi.keyType, ok = attrUlong(a[pkcs11.CKA_KEY_TYPE]); !ok {
		return pi, skipf("private key (%s) has no readable CKA_KEY_TYPE", pi.describe())
	}
	// Absent booleans take the PKCS #11 defaults, except that a key whose
	// sensitivity cannot be read is treated as not sensitive.
	pi.sign, _ = attrBool(a[pkcs11.CKA_SIGN])
	pi.decrypt, _ = attrBool(a[pkcs11.CKA_DECRYPT])
	pi.sensitive, _ = attrBool(a[pkcs11.CKA_SENSITIVE])
	pi.alwaysAuth, _ = attrBool(a[pkcs11.CKA_ALWAYS_AUTHENTICATE])
	if v, ok := attrBool(a[pkcs11.CKA_EXTRACTABLE]); ok {
		pi.extractable = v
	} else {
		pi.extractable = true
	}
	if v := a[pkcs11.CKA_ALLOWED_MECHANISMS]; len(v) > 0 {
		if pi.allowed, ok = attrUlongs(v); !ok {
			return pi, skipf("private key (%s) has a malformed CKA_ALLOWED_MECHANISMS", pi.describe())
		}
	}
	return pi, nil
}

// findPublic returns the public key object that belongs to a private key:
// the one with the same key type and CKA_ID (preferring the same label
// when several have that ID), else, for a key without CKA_ID, the one with
// the same label. It returns false if there is none.
func findPublic(p p11API, sh pkcs11.SessionHandle, pi *privateInfo) (pkcs11.ObjectHandle, bool, error) {
	base := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pi.keyType),
	}
	if len(pi.id) > 0 {
		hs, err := findObjects(p, sh, append(base, pkcs11.NewAttribute(pkcs11.CKA_ID, pi.id)))
		if err != nil || len(hs) == 0 {
			return 0, false, err
		}
		for _, h := range hs {
			a, err := getAttrs(p, sh, h, pkcs11.CKA_LABEL)
			if err != nil {
				return 0, false, err
			}
			if string(a[pkcs11.CKA_LABEL]) == pi.label {
				return h, true, nil
			}
		}
		return hs[0], true, nil
	}
	if pi.label == "" {
		return 0, false, nil
	}
	hs, err := findObjects(p, sh, append(base, pkcs11.NewAttribute(pkcs11.CKA_LABEL, pi.label)))
	if err != nil || len(hs) == 0 {
		return 0, false, err
	}
	return hs[0], true, nil
}

// publicKey works out the public key of a private key object.
func publicKey(p p11API, sh pkcs11.SessionHandle, pi *privateInfo) (crypto.PublicKey, error) {
	// An RSA private key carries its own modulus and exponent, which is
	// more trustworthy than a public key object found by ID or label.
	if pi.keyType == pkcs11.CKK_RSA && len(pi.modulus) > 0 && len(pi.exponent) > 0 {
		return parseRSAPublic(pi.modulus, pi.exponent)
	}
	ph, ok, err := findPublic(p, sh, pi)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, skipf("no public key object matches private key (%s)", pi.describe())
	}
	switch pi.keyType {
	case pkcs11.CKK_RSA:
		a, err := getAttrs(p, sh, ph, pkcs11.CKA_MODULUS, pkcs11.CKA_PUBLIC_EXPONENT)
		if err != nil {
			return nil, err
		}
		return parseRSAPublic(a[pkcs11.CKA_MODULUS], a[pkcs11.CKA_PUBLIC_EXPONENT])
	case pkcs11.CKK_EC, ckkECEdwards:
		a, err := getAttrs(p, sh, ph, pkcs11.CKA_EC_PARAMS, pkcs11.CKA_EC_POINT)
		if err != nil {
			return nil, err
		}
		params := a[pkcs11.CKA_EC_PARAMS]
		if len(pi.ecParams) > 0 && !sameCurve(pi.keyType, pi.ecParams, params) {
			return nil, skipf("public key object for private key (%s) is on another curve", pi.describe())
		}
		if pi.keyType == ckkECEdwards {
			return parseEd25519Public(params, a[pkcs11.CKA_EC_POINT])
		}
		return parseECDSAPublic(params, a[pkcs11.CKA_EC_POINT])
	}
	return nil, skipf("key type %s of private key (%s) is not supported", keyTypeName(pi.keyType), pi.describe())
}

func parseRSAPublic(modulus, exponent []byte) (*rsa.PublicKey, error) {
	n := new(big.Int).SetBytes(modulus)
	e := new(big.Int).SetBytes(exponent)
	if n.Sign() == 0 || !e.IsInt64() || e.Int64() < 3 || e.Int64() > 1<<31-1 || e.Bit(0) == 0 {
		return nil, skipf("malformed RSA public key")
	}
	bits := n.BitLen()
	if bits < MinRSABits || bits > MaxRSABits {
		return nil, skipf("RSA key has %d bits; only %d to %d are served", bits, MinRSABits, MaxRSABits)
	}
	return &rsa.PublicKey{N: n, E: int(e.Int64())}, nil
}

// parseECDSAPublic parses CKA_EC_PARAMS (a named curve OID) and CKA_EC_POINT
// (a DER OCTET STRING holding the uncompressed point, or on some tokens the
// bare point).
func parseECDSAPublic(params, point []byte) (*ecdsa.PublicKey, error) {
	var oid asn1.ObjectIdentifier
	if rest, err := asn1.Unmarshal(params, &oid); err != nil || len(rest) > 0 {
		return nil, skipf("ECDSA key has CKA_EC_PARAMS that are not a named curve")
	}
	var curve elliptic.Curve
	switch {
	case oid.Equal(oidP256):
		curve = elliptic.P256()
	case oid.Equal(oidP384):
		curve = elliptic.P384()
	case oid.Equal(oidP521):
		curve = elliptic.P521()
	default:
		return nil, skipf("ECDSA curve %v is not supported", oid)
	}
	var inner []byte
	if rest, err := asn1.Unmarshal(point, &inner); err == nil && len(rest) == 0 {
		if pub, err := ecdsa.ParseUncompressedPublicKey(curve, inner); err == nil {
			return pub, nil
		}
	}
	// The bare point also starts with 0x04, the OCTET STRING tag, so it is
	// tried second rather than told apart up front.
	pub, err := ecdsa.ParseUncompressedPublicKey(curve, point)
	if err != nil {
		return nil, skipf("malformed ECDSA public point: %v", err)
	}
	return pub, nil
}

// parseEd25519Public parses CKA_EC_PARAMS, which SoftHSM sets to the DER
// PrintableString "edwards25519" and other tokens to the OID 1.3.101.112,
// and CKA_EC_POINT, a DER OCTET STRING of the 32-byte key or the bare key.
func parseEd25519Public(params, point []byte) (ed25519.PublicKey, error) {
	if !isEd25519Params(params) {
		return nil, skipf("Edwards curve with CKA_EC_PARAMS %x is not Ed25519", params)
	}
	switch {
	case len(point) == ed25519.PublicKeySize:
		return ed25519.PublicKey(bytes.Clone(point)), nil
	case len(point) == ed25519.PublicKeySize+2 && point[0] == 0x04 && point[1] == ed25519.PublicKeySize:
		return ed25519.PublicKey(bytes.Clone(point[2:])), nil
	}
	return nil, skipf("malformed Ed25519 public key (%d bytes)", len(point))
}

// sameCurve reports whether two CKA_EC_PARAMS values name the same curve.
// They may differ in form: SoftHSM gives an Ed25519 private key the curve
// name even when the key pair was generated with the OID.
func sameCurve(keyType uint, a, b []byte) bool {
	if bytes.Equal(a, b) {
		return true
	}
	if keyType == ckkECEdwards {
		return isEd25519Params(a) && isEd25519Params(b)
	}
	var oa, ob asn1.ObjectIdentifier
	_, ea := asn1.Unmarshal(a, &oa)
	_, eb := asn1.Unmarshal(b, &ob)
	return ea == nil && eb == nil && oa.Equal(ob)
}

func isEd25519Params(params []byte) bool {
	var oid asn1.ObjectIdentifier
	if rest, err := asn1.Unmarshal(params, &oid); err == nil && len(rest) == 0 {
		return oid.Equal(oidEd25519)
	}
	var name string
	if rest, err := asn1.Unmarshal(params, &name); err == nil && len(rest) == 0 {
		return name == "edwards25519"
	}
	return false
}

// loadKey turns a private key object into one of the module's key types.
// A *skipError means the key is not served, for the reason it gives.
func (m *Module) loadKey(sh pkcs11.SessionHandle, h pkcs11.ObjectHandle, c11 c11Context, gen uint64) (crypto.Signer, error) {
	pi, err := readPrivate(m.p11, sh, h)
	if err != nil {
		return nil, err
	}
	switch pi.keyType {
	case pkcs11.CKK_RSA, pkcs11.CKK_EC, ckkECEdwards:
	default:
		return nil, skipf("key type %s of private key (%s) is not supported", keyTypeName(pi.keyType), pi.describe())
	}
	if (pi.extractable || !pi.sensitive) && !m.cfg.AllowExtractable {
		return nil, skipf("private key (%s) is extractable or not sensitive, so anyone with the PIN could copy it out of the token; it is served only with keyserver serve -allow-extractable (hsm.Config.AllowExtractable)", pi.describe())
	}
	if !pi.sign {
		return nil, skipf("private key (%s) has CKA_SIGN false", pi.describe())
	}
	if pi.alwaysAuth {
		// Each operation would need its own C_Login as
		// CKU_CONTEXT_SPECIFIC with the PIN, between C_SignInit and
		// C_Sign, which crypto11 does not do.
		return nil, skipf("private key (%s) has CKA_ALWAYS_AUTHENTICATE (a login before every operation), which is not supported; "+
			"make a key with CKA_ALWAYS_AUTHENTICATE false to serve it", pi.describe())
	}
	pub, err := publicKey(m.p11, sh, pi)
	if err != nil {
		var skip *skipError
		if errors.As(err, &skip) {
			return nil, skipf("%s (%s)", skip.reason, pi.describe())
		}
		return nil, err
	}
	keyID, err := link.KeyIDOf(pub)
	if err != nil {
		return nil, skipf("public key of private key (%s): %v", pi.describe(), err)
	}
	base := keyBase{m: m, gen: gen, handle: h, label: pi.label, objID: pi.id, keyID: keyID,
		attrs: KeyAttributes{Sensitive: pi.sensitive, Extractable: pi.extractable, AllowedMechanisms: mechanismList(pi.allowed)}}

	switch pub := pub.(type) {
	case *rsa.PublicKey:
		km := m.mechs.forKey(pi.keyType, pub.N.BitLen(), pi.sign, pi.decrypt, pi.allowed)
		signer, err := c11Signer(c11, pi, pub)
		if err != nil {
			return nil, err
		}
		base.schemes = rsaSchemes(km)
		return m.withDecryption(&rsaKey{keyBase: base, signer: signer, pub: pub, mechs: km}, pi.describe()), nil
	case *ecdsa.PublicKey:
		if !curveOK(pub) {
			return nil, skipf("ECDSA curve %s of private key (%s) is not supported", pub.Curve.Params().Name, pi.describe())
		}
		bits := pub.Curve.Params().BitSize
		km := m.mechs.forKey(pi.keyType, bits, pi.sign, pi.decrypt, pi.allowed)
		signer, err := c11Signer(c11, pi, pub)
		if err != nil {
			return nil, err
		}
		base.schemes = ecdsaSchemes(km, bits)
		return &ecdsaKey{keyBase: base, signer: signer, pub: pub}, nil
	case ed25519.PublicKey:
		km := m.mechs.forKey(pi.keyType, 256, pi.sign, pi.decrypt, pi.allowed)
		base.schemes = ed25519Schemes(km)
		return &ed25519Key{keyBase: base, pub: pub}, nil
	}
	return nil, skipf("unexpected public key type %T (%s)", pub, pi.describe())
}

// c11Signer asks crypto11 for its key object for an RSA or ECDSA private
// key and checks that crypto11 paired it with the right public key.
// crypto11 finds key pairs by CKA_ID (and CKA_LABEL) and needs a public key
// object with the same CKA_ID; it returns no key, not an error, when none
// matches.
func c11Signer(c11 c11Context, pi *privateInfo, pub crypto.PublicKey) (crypto.Signer, error) {
	if len(pi.id) == 0 {
		return nil, skipf("private key (%s) has no CKA_ID, which crypto11 needs", pi.describe())
	}
	var label []byte
	if pi.label != "" {
		label = []byte(pi.label)
	}
	signers, err := c11.FindKeyPairs(pi.id, label)
	if err != nil {
		return nil, skipf("crypto11 cannot load private key (%s): %v", pi.describe(), err)
	}
	type equaler interface{ Equal(crypto.PublicKey) bool }
	for _, s := range signers {
		if s != nil && pub.(equaler).Equal(s.Public()) {
			return s, nil
		}
	}
	return nil, skipf("crypto11 finds no key pair for private key (%s) with its public key; is there a public key object with the same CKA_ID?", pi.describe())
}

// withDecryption returns k as an *rsaDecryptKey if the token lets it
// decrypt premaster secrets and compute its implicit-rejection secret (see
// rejectionSecret), else k itself, with a warning when only the secret is
// missing: serving decryption would then need random rejections, an oracle
// to a caller who asks twice.
func (m *Module) withDecryption(k *rsaKey, describe string) crypto.Signer {
	km := k.mechs
	switch {
	case !km.rawDecrypt && !km.pkcsDecrypt:
		return k
	case !km.pkcs1 && !km.rawDecrypt:
		m.logger.Warn("RSA premaster decryption disabled for a key: the token can neither sign with CKM_RSA_PKCS nor decrypt with CKM_RSA_X_509 with it, so its implicit rejection could not be deterministic",
			"key", describe)
		return k
	}
	return &rsaDecryptKey{rsaKey: k, rawDecrypt: km.rawDecrypt && !m.forcePKCSDecrypt, computing: make(chan struct{}, 1)}
}
