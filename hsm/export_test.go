package hsm

import (
	"context"
	"crypto"
)

// UsePKCSDecryptFallback makes m's RSA keys decrypt with the masked
// CKM_RSA_PKCS fallback, as on a token without CKM_RSA_X_509, and scans the
// token again so that its keys pick it up.
func UsePKCSDecryptFallback(ctx context.Context, m *Module) error {
	m.forcePKCSDecrypt = true
	m.mu.Lock()
	clear(m.keys)
	m.list = nil
	m.mu.Unlock()
	return m.Refresh(ctx)
}

// RawDecrypt reports whether k decrypts premaster secrets with
// CKM_RSA_X_509 (true) or the CKM_RSA_PKCS fallback (false). ok is false if
// k cannot decrypt.
func RawDecrypt(k crypto.Signer) (raw, ok bool) {
	d, ok := k.(*rsaDecryptKey)
	if !ok {
		return false, false
	}
	return d.rawDecrypt, true
}

// RejectionSecret returns k's implicit-rejection secret, computing it in
// the token if need be.
func RejectionSecret(ctx context.Context, k crypto.Signer) ([]byte, error) {
	return k.(*rsaDecryptKey).rejectionSecret(ctx)
}
