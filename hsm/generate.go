package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"encoding/asn1"
	"errors"
	"fmt"

	"github.com/ThalesIgnite/crypto11"
	"github.com/miekg/pkcs11"
)

// Generate creates a key pair inside the token and returns it as one of the
// module's keys, which [Module.Keys] lists from then on.
//
// Both halves are token objects (CKA_TOKEN) with the spec's CKA_LABEL and
// CKA_ID. The private key is CKA_PRIVATE, CKA_SENSITIVE, not
// CKA_EXTRACTABLE, and has CKA_SIGN (RSA also CKA_DECRYPT) and no other
// usage; the public key has CKA_VERIFY (RSA also CKA_ENCRYPT). RSA keys
// have the public exponent 65537. RSA and ECDSA keys are generated through
// crypto11, Ed25519 keys with CKM_EC_EDWARDS_KEY_PAIR_GEN directly, with
// CKA_EC_PARAMS set to the OID 1.3.101.112 (or, for tokens that refuse it,
// the curve name "edwards25519").
//
// ctx bounds the wait for a session; once started, generation (which can
// take seconds for RSA) is not interrupted. Errors come from
// [KeySpec.Validate], from an ID already in use, from a token that lacks
// the mechanism, and from the token.
func (m *Module) Generate(ctx context.Context, spec KeySpec) (crypto.Signer, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	if m.closed.Load() {
		return nil, ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	m.scanMu.Lock()
	defer m.scanMu.Unlock()

	id := bytes.Clone(spec.ID)
	if id == nil {
		id = make([]byte, generatedIDLength)
		if _, err := rand.Read(id); err != nil {
			return nil, fmt.Errorf("hsm: generate key %q: %w", spec.Label, err)
		}
	}
	exists, err := m.privateKeysWithID(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("hsm: generate key %q: %w", spec.Label, err)
	}
	if len(exists) > 0 {
		return nil, fmt.Errorf("hsm: generate key %q: a private key with CKA_ID %x already exists", spec.Label, id)
	}

	switch spec.Type {
	case KeyTypeRSA:
		err = m.generateRSA(spec, id)
	case KeyTypeECDSA:
		err = m.generateECDSA(spec, id)
	case KeyTypeEd25519:
		err = m.generateEd25519(ctx, spec, id)
	}
	if err != nil {
		return nil, fmt.Errorf("hsm: generate %s key %q: %w", spec.Type, spec.Label, err)
	}

	// Load the new key the way a scan would, so it gets the same checks.
	var key crypto.Signer
	err = m.raw.do(context.WithoutCancel(ctx), func(sh pkcs11.SessionHandle) error {
		hs, err := findObjects(m.p11, sh, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		})
		if err != nil {
			return err
		}
		if len(hs) != 1 {
			return fmt.Errorf("found %d private keys with the new CKA_ID", len(hs))
		}
		m.mu.RLock()
		c11, gen := m.c11, m.gen
		m.mu.RUnlock()
		key, err = m.loadKey(sh, hs[0], c11, gen)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("hsm: load generated %s key %q: %w", spec.Type, spec.Label, err)
	}
	m.add(key)
	m.logger.Info("key generated", "type", spec.Type, "label", spec.Label, "object_id", fmt.Sprintf("%x", id), "key_id", fmt.Sprintf("%x", base(key).keyID))
	return key, nil
}

func (m *Module) privateKeysWithID(ctx context.Context, id []byte) ([]pkcs11.ObjectHandle, error) {
	var hs []pkcs11.ObjectHandle
	err := m.raw.do(ctx, func(sh pkcs11.SessionHandle) error {
		var err error
		hs, err = findObjects(m.p11, sh, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		})
		return err
	})
	return hs, err
}

// c11Templates returns the crypto11 attribute sets for a key pair.
// crypto11 adds CKA_TOKEN, CKA_SIGN, CKA_SENSITIVE, CKA_EXTRACTABLE false
// (and for RSA CKA_DECRYPT, CKA_ENCRYPT and the exponent) only when absent,
// and never CKA_PRIVATE, whose default is token-specific. Tokens fill in
// unset usages as they like (SoftHSM makes EC keys CKA_DECRYPT, CKA_ENCRYPT
// and CKA_UNWRAP), so every attribute that matters is set here explicitly.
func c11Templates(spec KeySpec, id []byte, decrypt bool) (public, private crypto11.AttributeSet, err error) {
	if public, err = crypto11.NewAttributeSetWithIDAndLabel(id, []byte(spec.Label)); err != nil {
		return nil, nil, err
	}
	private = public.Copy()
	set := func(a crypto11.AttributeSet, t crypto11.AttributeType, v any) {
		if err == nil {
			err = a.Set(t, v)
		}
	}
	set(public, crypto11.CkaToken, true)
	set(public, crypto11.CkaPrivate, false)
	set(public, crypto11.CkaVerify, true)
	set(public, crypto11.CkaEncrypt, decrypt)
	set(public, crypto11.CkaWrap, false)
	set(public, crypto11.CkaDerive, false)
	set(private, crypto11.CkaToken, true)
	set(private, crypto11.CkaPrivate, true)
	set(private, crypto11.CkaSensitive, true)
	set(private, crypto11.CkaExtractable, false)
	set(private, crypto11.CkaSign, true)
	set(private, crypto11.CkaDecrypt, decrypt)
	set(private, crypto11.CkaUnwrap, false)
	set(private, crypto11.CkaDerive, false)
	return public, private, err
}

func (m *Module) generateRSA(spec KeySpec, id []byte) error {
	bits := spec.Bits
	if bits == 0 {
		bits = DefaultRSABits
	}
	if !m.mechs.can(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, pkcs11.CKF_GENERATE_KEY_PAIR, bits) {
		return fmt.Errorf("the token cannot generate %d-bit RSA keys (CKM_RSA_PKCS_KEY_PAIR_GEN)", bits)
	}
	public, private, err := c11Templates(spec, id, true)
	if err != nil {
		return err
	}
	_, err = m.crypto11().GenerateRSAKeyPairWithAttributes(public, private, bits)
	return err
}

func (m *Module) generateECDSA(spec KeySpec, id []byte) error {
	curve, err := specCurve(spec.Curve)
	if err != nil {
		return err
	}
	bits := curve.Params().BitSize
	if !m.mechs.can(pkcs11.CKM_EC_KEY_PAIR_GEN, pkcs11.CKF_GENERATE_KEY_PAIR, bits) {
		return fmt.Errorf("the token cannot generate %s keys (CKM_EC_KEY_PAIR_GEN)", curve.Params().Name)
	}
	public, private, err := c11Templates(spec, id, false)
	if err != nil {
		return err
	}
	_, err = m.crypto11().GenerateECDSAKeyPairWithAttributes(public, private, curve)
	return err
}

func (m *Module) generateEd25519(ctx context.Context, spec KeySpec, id []byte) error {
	if !m.mechs.can(ckmECEdwardsKeyPairGen, pkcs11.CKF_GENERATE_KEY_PAIR, 256) {
		return errors.New("the token cannot generate Ed25519 keys (CKM_EC_EDWARDS_KEY_PAIR_GEN)")
	}
	oid, _ := asn1.Marshal(oidEd25519)
	name, _ := asn1.MarshalWithParams("edwards25519", "printable")
	return m.raw.do(ctx, func(sh pkcs11.SessionHandle) error {
		var err error
		for _, params := range [][]byte{oid, name} {
			public := []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
				pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, ckkECEdwards),
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
				pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
				pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false),
				pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
				pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
				pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, params),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, spec.Label),
				pkcs11.NewAttribute(pkcs11.CKA_ID, id),
			}
			private := []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
				pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, ckkECEdwards),
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
				pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
				pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
				pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
				pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
				pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
				pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, spec.Label),
				pkcs11.NewAttribute(pkcs11.CKA_ID, id),
			}
			mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(ckmECEdwardsKeyPairGen, nil)}
			_, _, err = m.p11.GenerateKeyPair(sh, mech, public, private)
			if !isCode(err, pkcs11.CKR_ATTRIBUTE_VALUE_INVALID) && !isCode(err, pkcs11.CKR_CURVE_NOT_SUPPORTED) &&
				!isCode(err, pkcs11.CKR_DOMAIN_PARAMS_INVALID) && !isCode(err, pkcs11.CKR_TEMPLATE_INCONSISTENT) {
				return err
			}
		}
		return err
	})
}
