package hsm

import (
	"crypto/rsa"
	"crypto/tls"
	"math/big"
	"slices"
	"strings"
	"testing"

	"github.com/ThalesIgnite/crypto11"
	"github.com/hashicorp/go-hclog"
	"github.com/miekg/pkcs11"
)

// attrStub is a token holding one RSA private key object, whose attributes
// C_GetAttributeValue reads.
type attrStub struct {
	*stubP11
	attrs map[uint][]byte
}

func (s *attrStub) GetAttributeValue(_ pkcs11.SessionHandle, _ pkcs11.ObjectHandle, tmpl []*pkcs11.Attribute) ([]*pkcs11.Attribute, error) {
	out := make([]*pkcs11.Attribute, len(tmpl))
	for i, a := range tmpl {
		out[i] = &pkcs11.Attribute{Type: a.Type, Value: s.attrs[a.Type]}
	}
	return out, nil
}

// c11Stub is crypto11 finding one key pair.
type c11Stub struct {
	c11Context
	signer crypto11.Signer
}

func (c c11Stub) FindKeyPairs(id, label []byte) ([]crypto11.Signer, error) {
	return []crypto11.Signer{c.signer}, nil
}

type deletableKey struct{ *rsa.PrivateKey }

func (deletableKey) Delete() error { return nil }

// TestDecryptionFromMechanisms loads an RSA key, as a scan does, from
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
			p := &attrStub{stubP11: newStubP11(), attrs: map[uint][]byte{
				pkcs11.CKA_KEY_TYPE:        pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA).Value,
				pkcs11.CKA_ID:              {0x0e},
				pkcs11.CKA_LABEL:           []byte("web-rsa"),
				pkcs11.CKA_SIGN:            {1},
				pkcs11.CKA_DECRYPT:         {1},
				pkcs11.CKA_SENSITIVE:       {1},
				pkcs11.CKA_EXTRACTABLE:     {0},
				pkcs11.CKA_MODULUS:         priv.N.Bytes(),
				pkcs11.CKA_PUBLIC_EXPONENT: big.NewInt(int64(priv.E)).Bytes(),
			}}
			var logs logBuffer
			m := newStubModule(p.stubP11, 2)
			m.p11 = p
			m.mechs = tt.mechs
			m.logger = hclog.New(&hclog.LoggerOptions{Output: &logs})
			k, err := m.loadKey(1, 7, c11Stub{signer: deletableKey{priv}}, 0)
			if err != nil {
				t.Fatalf("loadKey() = %v", err)
			}
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
