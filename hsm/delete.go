package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"fmt"
	"slices"

	"github.com/miekg/pkcs11"
)

// Delete destroys one of the module's keys in the token: first its private
// key object, then the public key object a scan pairs with it (same key
// type and CKA_ID, or lacking an ID the same CKA_LABEL), if there is one.
// It cannot be undone. key must come from this module's [Module.Key] or
// [Module.Keys] since its last reconnection; afterwards the module no
// longer serves it. Errors: [ErrClosed], an *[UnavailableError] while the
// module is faulty or for a key from before a reconnection, ctx.Err(), and
// the token's own (a token may refuse to destroy objects of a read-only
// session or a protected key).
func (m *Module) Delete(ctx context.Context, key crypto.Signer) error {
	k, ok := m.owns(key)
	if !ok {
		return fmt.Errorf("hsm: delete: the key is not one of this module's")
	}
	var keyType uint
	switch key.Public().(type) {
	case *rsa.PublicKey:
		keyType = pkcs11.CKK_RSA
	case *ecdsa.PublicKey:
		keyType = pkcs11.CKK_EC
	case ed25519.PublicKey:
		keyType = ckkECEdwards
	}
	if err := k.ready(ctx); err != nil {
		return err
	}
	m.scanMu.Lock()
	defer m.scanMu.Unlock()
	// A key deleted before, or replaced by a scan, has a handle that may
	// now name another object.
	m.mu.RLock()
	current := m.keys[k.keyID]
	m.mu.RUnlock()
	if current == nil || base(current) != k {
		return fmt.Errorf("hsm: delete key %q: the module no longer serves this key object (deleted, or the token was scanned again): look it up again", k.label)
	}
	destroyedPrivate := false
	err := m.raw.do(ctx, func(sh pkcs11.SessionHandle) error {
		// do runs this again after a broken session: the private key
		// object may be gone already.
		if !destroyedPrivate {
			if err := m.p11.DestroyObject(sh, k.handle); err != nil {
				return fmt.Errorf("destroy the private key object: %w", err)
			}
			destroyedPrivate = true
		}
		ph, ok, err := findPublic(m.p11, sh, &privateInfo{keyType: keyType, id: k.objID, label: k.label})
		if err != nil || !ok {
			return err
		}
		if err := m.p11.DestroyObject(sh, ph); err != nil {
			return fmt.Errorf("destroy the public key object: %w", err)
		}
		return nil
	})
	if destroyedPrivate {
		m.remove(k.keyID)
		m.logger.Info("key deleted", "token", m.token.Label, "label", k.label, "object_id", fmt.Sprintf("%x", k.objID), "key_id", fmt.Sprintf("%x", k.keyID))
	}
	if err != nil {
		return fmt.Errorf("hsm: delete key %q: %w", k.label, m.unavailable(err))
	}
	return nil
}

// owns returns the shared part of key if key is one of m's keys.
func (m *Module) owns(key crypto.Signer) (*keyBase, bool) {
	switch key.(type) {
	case *rsaKey, *rsaDecryptKey, *ecdsaKey, *ed25519Key:
	default:
		return nil, false
	}
	k := base(key)
	return k, k.m == m
}

// remove stops serving the key with the given id.
func (m *Module) remove(id [32]byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	k, ok := m.keys[id]
	if !ok {
		return
	}
	delete(m.keys, id)
	m.list = slices.DeleteFunc(m.list, func(s crypto.Signer) bool { return s == k })
}
