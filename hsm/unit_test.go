package hsm

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"encoding/asn1"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/miekg/pkcs11"
)

var errDeadline = context.DeadlineExceeded

func contextWithTimeout(t *testing.T, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(t.Context(), d)
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

func writeFile(name string) error { return os.WriteFile(name, []byte("stub"), 0o600) }

func TestConfigValidate(t *testing.T) {
	slot, neg := 0, -1
	valid := Config{ModulePath: "/lib.so", TokenLabel: "t", PIN: "1234"}
	for _, tt := range []struct {
		name string
		edit func(c *Config)
		want string // "" for valid
	}{
		{"valid", func(c *Config) {}, ""},
		{"valid by slot 0", func(c *Config) { c.TokenLabel, c.SlotNumber = "", &slot }, ""},
		{"valid by serial", func(c *Config) { c.TokenLabel, c.TokenSerial = "", "abc" }, ""},
		{"valid with sessions and wait", func(c *Config) { c.MaxSessions, c.PoolWaitTimeout = 2, time.Second }, ""},
		{"no module", func(c *Config) { c.ModulePath = "" }, "hsm: Config.ModulePath is empty"},
		{"no token", func(c *Config) { c.TokenLabel = "" }, "none is set"},
		{"label and serial", func(c *Config) { c.TokenSerial = "abc" }, "TokenLabel and TokenSerial are set"},
		{"label and slot", func(c *Config) { c.SlotNumber = &slot }, "TokenLabel and SlotNumber are set"},
		{"long label", func(c *Config) { c.TokenLabel = strings.Repeat("x", 33) }, "Config.TokenLabel is 33 bytes"},
		{"negative slot", func(c *Config) { c.TokenLabel, c.SlotNumber = "", &neg }, "Config.SlotNumber is -1"},
		{"no PIN", func(c *Config) { c.PIN = "" }, "Config.PIN is empty"},
		{"NUL in PIN", func(c *Config) { c.PIN = "12\x0034" }, "Config.PIN contains a NUL byte"},
		{"one session", func(c *Config) { c.MaxSessions = 1 }, "Config.MaxSessions is 1"},
		{"negative sessions", func(c *Config) { c.MaxSessions = -3 }, "Config.MaxSessions is -3"},
		{"negative wait", func(c *Config) { c.PoolWaitTimeout = -time.Second }, "Config.PoolWaitTimeout is -1s"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := valid
			tt.edit(&c)
			err := c.Validate()
			if tt.want == "" {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate() = %v, want an error containing %q", err, tt.want)
			}
			if strings.Contains(err.Error(), "1234") {
				t.Errorf("error %q contains the PIN", err)
			}
		})
	}
}

func TestConfigString(t *testing.T) {
	slot := 3
	c := Config{ModulePath: "/lib.so", SlotNumber: &slot, PIN: "s3cr3t-PIN", MaxSessions: 4}
	for _, s := range []string{c.String(), fmt.Sprint(c), fmt.Sprintf("%+v", c), fmt.Sprintf("%#v", c), fmt.Sprint(&c)} {
		if strings.Contains(s, "s3cr3t") || !strings.Contains(s, "PIN:<redacted>") || !strings.Contains(s, "SlotNumber:3") {
			t.Errorf("formatted Config = %s", s)
		}
	}
	c.PIN = ""
	if s := c.String(); !strings.Contains(s, `PIN:""`) {
		t.Errorf("String() with no PIN = %s", s)
	}
}

func TestKeySpecValidate(t *testing.T) {
	for _, tt := range []struct {
		spec KeySpec
		want string
	}{
		{KeySpec{Type: "rsa", Label: "k"}, ""},
		{KeySpec{Type: "rsa", Bits: 3072, Label: "k", ID: []byte{1}}, ""},
		{KeySpec{Type: "rsa", Bits: 4096, Label: "k"}, ""},
		{KeySpec{Type: "ecdsa", Label: "k"}, ""},
		{KeySpec{Type: "ecdsa", Curve: "P-384", Label: "k"}, ""},
		{KeySpec{Type: "ed25519", Label: "k"}, ""},
		{KeySpec{Type: "RSA", Label: "k"}, "KeySpec.Type"},
		{KeySpec{Label: "k"}, "KeySpec.Type"},
		{KeySpec{Type: "rsa", Bits: 1024, Label: "k"}, "KeySpec.Bits is 1024"},
		{KeySpec{Type: "rsa", Bits: 8192, Label: "k"}, "KeySpec.Bits is 8192"},
		{KeySpec{Type: "rsa", Bits: 2049, Label: "k"}, "KeySpec.Bits is 2049"},
		{KeySpec{Type: "rsa", Curve: "P-256", Label: "k"}, "KeySpec.Curve"},
		{KeySpec{Type: "ecdsa", Curve: "P-521", Label: "k"}, "KeySpec.Curve"},
		{KeySpec{Type: "ecdsa", Curve: "secp256k1", Label: "k"}, "KeySpec.Curve"},
		{KeySpec{Type: "ecdsa", Bits: 256, Label: "k"}, "KeySpec.Bits"},
		{KeySpec{Type: "ed25519", Curve: "P-256", Label: "k"}, "KeySpec.Curve is \"P-256\"; an Ed25519 key has no curve"},
		{KeySpec{Type: "ecdsa"}, "KeySpec.Label is empty"},
		{KeySpec{Type: "ecdsa", Label: strings.Repeat("l", 129)}, "KeySpec.Label is 129 bytes"},
		{KeySpec{Type: "ecdsa", Label: "\xff"}, "UTF-8"},
		{KeySpec{Type: "ecdsa", Label: "k", ID: []byte{}}, "KeySpec.ID is empty"},
		{KeySpec{Type: "ecdsa", Label: "k", ID: make([]byte, 65)}, "KeySpec.ID is 65 bytes"},
	} {
		err := tt.spec.Validate()
		if (tt.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.want)) {
			t.Errorf("%+v.Validate() = %v, want %q", tt.spec, err, tt.want)
		}
	}
}

func TestParsePublicKeys(t *testing.T) {
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	point, _ := p256.PublicKey.Bytes()
	point384, _ := p384.PublicKey.Bytes()
	der := func(v any, params ...string) []byte {
		b, err := asn1.MarshalWithParams(v, strings.Join(params, ","))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	oid256, oid384 := der(oidP256), der(oidP384)

	for _, tt := range []struct {
		name          string
		params, point []byte
		want          *ecdsa.PublicKey
	}{
		{"P-256 DER point", oid256, der(point), &p256.PublicKey},
		{"P-256 bare point", oid256, point, &p256.PublicKey},
		{"P-384 DER point", oid384, der(point384), &p384.PublicKey},
		{"point on another curve", oid384, der(point), nil},
		{"compressed point", oid256, der(append([]byte{2}, point[1:33]...)), nil},
		{"unknown curve", der(asn1.ObjectIdentifier{1, 3, 132, 0, 10}), der(point), nil},
		{"curve by name", der("prime256v1", "printable"), der(point), nil},
		{"garbage point", oid256, []byte{4, 1, 2}, nil},
	} {
		got, err := parseECDSAPublic(tt.params, tt.point)
		if tt.want == nil {
			var skip *skipError
			if !errors.As(err, &skip) {
				t.Errorf("%s: parseECDSAPublic() = %v, %v; want a skipError", tt.name, got, err)
			}
			continue
		}
		if err != nil || !got.Equal(tt.want) {
			t.Errorf("%s: parseECDSAPublic() = %v, %v", tt.name, got, err)
		}
	}

	edPub, _, _ := ed25519.GenerateKey(rand.Reader)
	name, oid := der("edwards25519", "printable"), der(oidEd25519)
	for _, tt := range []struct {
		name          string
		params, point []byte
		ok            bool
	}{
		{"SoftHSM: curve name, DER point", name, der([]byte(edPub)), true},
		{"OID, DER point", oid, der([]byte(edPub)), true},
		{"OID, bare point", oid, []byte(edPub), true},
		{"UTF8String curve name", der("edwards25519", "utf8"), der([]byte(edPub)), true},
		{"Ed448 OID", der(asn1.ObjectIdentifier{1, 3, 101, 113}), der([]byte(edPub)), false},
		{"Ed448 name", der("edwards448", "printable"), der([]byte(edPub)), false},
		{"short point", oid, []byte(edPub)[:31], false},
	} {
		got, err := parseEd25519Public(tt.params, tt.point)
		if tt.ok != (err == nil) || (tt.ok && !got.Equal(edPub)) {
			t.Errorf("%s: parseEd25519Public() = %x, %v; want ok %t", tt.name, got, err, tt.ok)
		}
	}
	if !sameCurve(ckkECEdwards, name, oid) || sameCurve(pkcs11.CKK_EC, oid256, oid384) || !sameCurve(pkcs11.CKK_EC, oid256, oid256) {
		t.Error("sameCurve is wrong")
	}

	priv := testRSAKey()
	e := []byte{1, 0, 1}
	if got, err := parseRSAPublic(priv.N.Bytes(), e); err != nil || !got.Equal(&priv.PublicKey) {
		t.Errorf("parseRSAPublic() = %v, %v", got, err)
	}
	small, _ := rsa.GenerateKey(rand.Reader, 1024)
	for name, args := range map[string][2][]byte{
		"1024 bits":     {small.N.Bytes(), e},
		"even exponent": {priv.N.Bytes(), {1, 0, 0}},
		"exponent 1":    {priv.N.Bytes(), {1}},
		"huge exponent": {priv.N.Bytes(), make([]byte, 9)},
		"no modulus":    {nil, e},
	} {
		if _, err := parseRSAPublic(args[0], args[1]); err == nil {
			t.Errorf("parseRSAPublic(%s) succeeded", name)
		}
	}
}

func TestAttrDecoding(t *testing.T) {
	v := pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, uint(ckkECEdwards)).Value
	if got, ok := attrUlong(v); !ok || got != ckkECEdwards {
		t.Errorf("attrUlong() = %d, %t", got, ok)
	}
	if _, ok := attrUlong(v[:3]); ok {
		t.Error("attrUlong accepted 3 bytes")
	}
	list := append(append([]byte(nil), pkcs11.NewAttribute(0, uint(pkcs11.CKM_RSA_PKCS)).Value...), pkcs11.NewAttribute(0, uint(ckmEdDSA)).Value...)
	if got, ok := attrUlongs(list); !ok || !slices.Equal(got, []uint{pkcs11.CKM_RSA_PKCS, ckmEdDSA}) {
		t.Errorf("attrUlongs() = %v, %t", got, ok)
	}
	if _, ok := attrUlongs(list[1:]); ok {
		t.Error("attrUlongs accepted a ragged array")
	}
	if b, ok := attrBool([]byte{1}); !b || !ok {
		t.Error("attrBool(1)")
	}
	if _, ok := attrBool(nil); ok {
		t.Error("attrBool(nil) ok")
	}
}

func TestMechanismsForKey(t *testing.T) {
	ms := mechanisms{
		pkcs11.CKM_RSA_PKCS:     {MinKeySize: 1024, MaxKeySize: 4096, Flags: pkcs11.CKF_SIGN | pkcs11.CKF_DECRYPT},
		pkcs11.CKM_RSA_PKCS_PSS: {MinKeySize: 1024, MaxKeySize: 2048, Flags: pkcs11.CKF_SIGN},
		pkcs11.CKM_RSA_X_509:    {Flags: pkcs11.CKF_DECRYPT},
		pkcs11.CKM_ECDSA:        {MinKeySize: 256, MaxKeySize: 384, Flags: pkcs11.CKF_SIGN},
		ckmEdDSA:                {Flags: pkcs11.CKF_VERIFY},
	}
	for _, tt := range []struct {
		name    string
		keyType uint
		bits    int
		sign    bool
		decrypt bool
		allowed []uint
		want    keyMechanisms
	}{
		{"RSA-2048", pkcs11.CKK_RSA, 2048, true, true, nil, keyMechanisms{pkcs1: true, pss: true, rawDecrypt: true, pkcsDecrypt: true}},
		{"RSA-3072: PSS limited to 2048", pkcs11.CKK_RSA, 3072, true, true, nil, keyMechanisms{pkcs1: true, rawDecrypt: true, pkcsDecrypt: true}},
		{"RSA without CKA_DECRYPT", pkcs11.CKK_RSA, 2048, true, false, nil, keyMechanisms{pkcs1: true, pss: true}},
		{"RSA allowed PKCS only", pkcs11.CKK_RSA, 2048, true, true, []uint{pkcs11.CKM_RSA_PKCS}, keyMechanisms{pkcs1: true, pkcsDecrypt: true}},
		{"RSA allowed hash-and-sign only", pkcs11.CKK_RSA, 2048, true, true, []uint{pkcs11.CKM_SHA256_RSA_PKCS}, keyMechanisms{}},
		{"P-256", pkcs11.CKK_EC, 256, true, false, nil, keyMechanisms{ecdsa: true}},
		{"P-521 beyond MaxKeySize", pkcs11.CKK_EC, 521, true, false, nil, keyMechanisms{}},
		{"EdDSA without CKF_SIGN", ckkECEdwards, 256, true, false, nil, keyMechanisms{}},
	} {
		if got := ms.forKey(tt.keyType, tt.bits, tt.sign, tt.decrypt, tt.allowed); got != tt.want {
			t.Errorf("%s: forKey() = %+v, want %+v", tt.name, got, tt.want)
		}
	}
	if got := ms.names(); !slices.Equal(got, []string{"CKM_ECDSA", "CKM_EDDSA", "CKM_RSA_PKCS", "CKM_RSA_PKCS_PSS", "CKM_RSA_X_509"}) {
		t.Errorf("names() = %v", got)
	}
	if got := rsaSchemes(keyMechanisms{pkcs1: true, pss: true}); !slices.Equal(got, []tls.SignatureScheme{tls.PSSWithSHA256, tls.PSSWithSHA384, tls.PSSWithSHA512, tls.PKCS1WithSHA256, tls.PKCS1WithSHA384, tls.PKCS1WithSHA512}) {
		t.Errorf("rsaSchemes() = %v", got)
	}
	if got := ecdsaSchemes(keyMechanisms{ecdsa: true}, 384); !slices.Equal(got, []tls.SignatureScheme{tls.ECDSAWithP384AndSHA384, tls.ECDSAWithP256AndSHA256, tls.ECDSAWithP521AndSHA512}) {
		t.Errorf("ecdsaSchemes(384) = %v", got)
	}
	if got := ecdsaSchemes(keyMechanisms{}, 256); got != nil {
		t.Errorf("ecdsaSchemes(no ECDSA) = %v", got)
	}
}

func TestBounded(t *testing.T) {
	v, err := bounded(t.Context(), func() (int, error) { return 7, nil })
	if v != 7 || err != nil {
		t.Errorf("bounded() = %d, %v", v, err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	ran := false
	if _, err := bounded(ctx, func() (int, error) { ran = true; return 0, nil }); !errors.Is(err, context.Canceled) || ran {
		t.Errorf("bounded(cancelled) = %v, ran %t; want context.Canceled without running", err, ran)
	}
}

// TestWithDecryption: an RSA key decrypts premaster secrets only if the
// token lets it decrypt and compute its implicit-rejection secret; the one
// that could decrypt but not compute the secret is logged.
func TestWithDecryption(t *testing.T) {
	for _, tt := range []struct {
		name     string
		mechs    keyMechanisms
		force    bool
		want     string // "sign only", "raw" or "fallback"
		wantWarn bool
	}{
		{"no decryption", keyMechanisms{pkcs1: true, pss: true}, false, "sign only", false},
		{"raw RSA", keyMechanisms{pss: true, rawDecrypt: true, pkcsDecrypt: true}, false, "raw", false},
		{"CKM_RSA_PKCS both ways", keyMechanisms{pkcs1: true, pkcsDecrypt: true}, false, "fallback", false},
		{"fallback forced", keyMechanisms{pkcs1: true, rawDecrypt: true, pkcsDecrypt: true}, true, "fallback", false},
		{"decrypt but no secret", keyMechanisms{pss: true, pkcsDecrypt: true}, false, "sign only", true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var logs logBuffer
			m := &Module{logger: hclog.New(&hclog.LoggerOptions{Output: &logs}), forcePKCSDecrypt: tt.force}
			got := "sign only"
			if d, ok := m.withDecryption(&rsaKey{mechs: tt.mechs}, "label x").(*rsaDecryptKey); ok {
				got = map[bool]string{true: "raw", false: "fallback"}[d.rawDecrypt]
				if cap(d.computing) != 1 {
					t.Error("the key has no semaphore for its secret")
				}
			}
			if got != tt.want {
				t.Errorf("withDecryption() = %s, want %s", got, tt.want)
			}
			if warned := strings.Contains(logs.String(), "decryption disabled"); warned != tt.wantWarn {
				t.Errorf("warning logged: %t, want %t:\n%s", warned, tt.wantWarn, logs.String())
			}
		})
	}
}

// TestCallTrackerAbandon checks that abandonBefore gives back the slots of
// calls through crypto11 of earlier generations, not those on the
// module's own sessions nor those of the current generation; that a call
// given up and returning later does not give its slot back twice; and
// that waitGen stops waiting for a generation whose calls are all given
// up, and says so.
func TestCallTrackerAbandon(t *testing.T) {
	tr := newCallTracker(3, 10*time.Millisecond)
	ctx := context.Background()
	for range 3 {
		if err := tr.acquire(ctx, time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	stale := tr.start("C_Sign", "a", 1, true)   // through crypto11, old generation
	own := tr.start("C_Decrypt", "b", 1, false) // own session, old generation
	cur := tr.start("C_Sign", "c", 2, true)     // through crypto11, current generation
	if err := tr.acquire(ctx, time.Hour); !errors.Is(err, errPoolTimeout) {
		t.Fatalf("acquire() with every slot held = %v, want errPoolTimeout", err)
	}
	if n := tr.abandonBefore(2); n != 1 {
		t.Fatalf("abandonBefore(2) = %d, want 1 (only the old call through crypto11)", n)
	}
	if err := tr.acquire(ctx, time.Hour); err != nil {
		t.Fatalf("acquire() after abandonBefore = %v, want the given-back slot", err)
	}
	if n := tr.abandonBefore(2); n != 0 {
		t.Errorf("abandonBefore(2) again = %d, want 0", n)
	}
	if n := tr.stuck(0); n != 2 {
		t.Errorf("stuck(0) = %d, want 2: an abandoned call no longer counts", n)
	}

	done := make(chan bool, 1)
	go func() { done <- tr.waitGen(1) }()
	tr.finish(own)
	select {
	case ok := <-done:
		if ok {
			t.Error("waitGen(1) = true while an abandoned call of generation 1 runs, want false")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("waitGen(1) still waiting with only an abandoned call left")
	}

	// The abandoned call returns: no second slot is given back.
	if r := tr.finish(stale); !r.abandoned {
		t.Error("the finished call is not marked abandoned")
	}
	if len(tr.slots) != 2 {
		t.Errorf("%d slots held, want 2 (the current call and the one taken after abandonBefore)", len(tr.slots))
	}
	if !tr.waitGen(1) {
		t.Error("waitGen(1) = false with no call of generation 1 left")
	}
	tr.finish(cur)
}
