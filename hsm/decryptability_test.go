package hsm

import (
	"crypto/tls"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/miekg/pkcs11"
)

// TestDecryptionFromMechanisms makes an RSA key, as a scan does (the
// token's mechanism info narrowed for the key, then withDecryption), on
// tokens that report different mechanisms: a token whose CKM_RSA_PKCS
// decrypts but does not sign, and that has no CKM_RSA_X_509, cannot make
// the key's implicit-rejection secret, so the key is served for signing
// only and the log says why, naming the key.
func TestDecryptionFromMechanisms(t *testing.T) {
	priv := testRSAKey()
	info := func(flags uint) pkcs11.MechanismInfo {
		return pkcs11.MechanismInfo{MinKeySize: 1024, MaxKeySize: 4096, Flags: flags}
	}
	for _, tt := range []struct {
		name     string
		mechs    mechanisms
		want     string // "sign only", "raw" or "fallback"
		wantWarn bool
		schemes  []tls.SignatureScheme
	}{
		{"neither raw RSA nor CKM_RSA_PKCS signing", mechanisms{
			pkcs11.CKM_RSA_PKCS:     info(pkcs11.CKF_DECRYPT),
			pkcs11.CKM_RSA_PKCS_PSS: info(pkcs11.CKF_SIGN),
		}, "sign only", true, []tls.SignatureScheme{tls.PSSWithSHA256, tls.PSSWithSHA384, tls.PSSWithSHA512}},
		{"raw RSA without CKM_RSA_PKCS signing", mechanisms{
			pkcs11.CKM_RSA_PKCS:     info(pkcs11.CKF_DECRYPT),
			pkcs11.CKM_RSA_X_509:    info(pkcs11.CKF_DECRYPT),
			pkcs11.CKM_RSA_PKCS_PSS: info(pkcs11.CKF_SIGN),
		}, "raw", false, []tls.SignatureScheme{tls.PSSWithSHA256, tls.PSSWithSHA384, tls.PSSWithSHA512}},
		{"no raw RSA (FIPS mode)", mechanisms{
			pkcs11.CKM_RSA_PKCS:     info(pkcs11.CKF_DECRYPT | pkcs11.CKF_SIGN),
			pkcs11.CKM_RSA_PKCS_PSS: info(pkcs11.CKF_SIGN),
		}, "fallback", false, []tls.SignatureScheme{tls.PSSWithSHA256, tls.PSSWithSHA384, tls.PSSWithSHA512, tls.PKCS1WithSHA256, tls.PKCS1WithSHA384, tls.PKCS1WithSHA512}},
		{"no decryption at all", mechanisms{
			pkcs11.CKM_RSA_PKCS: info(pkcs11.CKF_SIGN),
		}, "sign only", false, []tls.SignatureScheme{tls.PKCS1WithSHA256, tls.PKCS1WithSHA384, tls.PKCS1WithSHA512}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var logs logBuffer
			m := &Module{mechs: tt.mechs, logger: hclog.New(&hclog.LoggerOptions{Output: &logs})}
			pi := &privateInfo{keyType: pkcs11.CKK_RSA, id: []byte{0x0e}, label: "web-rsa", sign: true, decrypt: true}
			km := m.mechs.forKey(pi.keyType, priv.N.BitLen(), pi.sign, pi.decrypt, pi.allowed)
			k := m.withDecryption(&rsaKey{keyBase: keyBase{m: m, label: pi.label, objID: pi.id, schemes: rsaSchemes(km)},
				pub: &priv.PublicKey, mechs: km}, pi.describe())
			got := "sign only"
			if d, ok := k.(*rsaDecryptKey); ok {
				got = map[bool]string{true: "raw", false: "fallback"}[d.rawDecrypt]
			}
			if got != tt.want {
				t.Errorf("the key is %s, want %s", got, tt.want)
			}
			if s := base(k).schemes; !slices.Equal(s, tt.schemes) {
				t.Errorf("schemes = %v, want %v", s, tt.schemes)
			}
			warned := strings.Contains(logs.String(), "RSA premaster decryption disabled for a key: the token can neither sign with CKM_RSA_PKCS nor decrypt with CKM_RSA_X_509")
			if warned != tt.wantWarn || (warned && !strings.Contains(logs.String(), `label \"web-rsa\", CKA_ID 0e`)) {
				t.Errorf("warning naming the key logged: %t, want %t:\n%s", warned, tt.wantWarn, logs.String())
			}
		})
	}
}

func TestInitHint(t *testing.T) {
	const ock = "/usr/lib/x86_64-linux-gnu/opencryptoki/libopencryptoki.so.0.0.0"
	for _, tt := range []struct {
		path string
		err  error
		want bool
	}{
		{ock, pkcs11.Error(pkcs11.CKR_HOST_MEMORY), true},
		{ock, pkcs11.Error(pkcs11.CKR_GENERAL_ERROR), false},
		{"/usr/lib/softhsm/libsofthsm2.so", pkcs11.Error(pkcs11.CKR_HOST_MEMORY), false},
	} {
		if got := strings.Contains(initHint(tt.path, tt.err), "start pkcsslotd"); got != tt.want {
			t.Errorf("initHint(%s, %v) mentions pkcsslotd: %t, want %t", tt.path, tt.err, got, tt.want)
		}
	}
}
