package link

import (
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"slices"
	"testing"

	"github.com/keyless-tls/keyless/internal/pkitest"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// wantAlgorithms is the algorithm table written out independently, with each
// scheme named by its crypto/tls constant, so that a typo in a code point
// or a hash shows up here.
var wantAlgorithms = []struct {
	wire    keylessv1.SignatureAlgorithm
	scheme  tls.SignatureScheme
	keyType keylessv1.KeyType
	hash    crypto.Hash
	pss     bool
	legacy  bool
}{
	{keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ED25519, tls.Ed25519, keylessv1.KeyType_KEY_TYPE_ED25519, 0, false, false},
	{keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA256, tls.ECDSAWithP256AndSHA256, keylessv1.KeyType_KEY_TYPE_ECDSA, crypto.SHA256, false, false},
	{keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA384, tls.ECDSAWithP384AndSHA384, keylessv1.KeyType_KEY_TYPE_ECDSA, crypto.SHA384, false, false},
	{keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA512, tls.ECDSAWithP521AndSHA512, keylessv1.KeyType_KEY_TYPE_ECDSA, crypto.SHA512, false, false},
	{keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA256, tls.PSSWithSHA256, keylessv1.KeyType_KEY_TYPE_RSA, crypto.SHA256, true, false},
	{keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA384, tls.PSSWithSHA384, keylessv1.KeyType_KEY_TYPE_RSA, crypto.SHA384, true, false},
	{keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA512, tls.PSSWithSHA512, keylessv1.KeyType_KEY_TYPE_RSA, crypto.SHA512, true, false},
	{keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256, tls.PKCS1WithSHA256, keylessv1.KeyType_KEY_TYPE_RSA, crypto.SHA256, false, false},
	{keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA384, tls.PKCS1WithSHA384, keylessv1.KeyType_KEY_TYPE_RSA, crypto.SHA384, false, false},
	{keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA512, tls.PKCS1WithSHA512, keylessv1.KeyType_KEY_TYPE_RSA, crypto.SHA512, false, false},
	{keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA1, tls.ECDSAWithSHA1, keylessv1.KeyType_KEY_TYPE_ECDSA, crypto.SHA1, false, true},
	{keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA1, tls.PKCS1WithSHA1, keylessv1.KeyType_KEY_TYPE_RSA, crypto.SHA1, false, true},
}

// testPublicKey returns a public key of type kt.
func testPublicKey(t *testing.T, kt keylessv1.KeyType) crypto.PublicKey {
	t.Helper()
	switch kt {
	case keylessv1.KeyType_KEY_TYPE_RSA:
		return pkitest.RSAKey().Public()
	case keylessv1.KeyType_KEY_TYPE_ECDSA:
		return pkitest.P256Key().Public()
	case keylessv1.KeyType_KEY_TYPE_ED25519:
		return pkitest.Ed25519Key().Public()
	}
	t.Fatalf("no test key of type %v", kt)
	return nil
}

func TestAlgorithmTable(t *testing.T) {
	if got := Algorithms(); len(got) != len(wantAlgorithms) {
		t.Fatalf("len(Algorithms()) = %d, want %d", len(got), len(wantAlgorithms))
	}
	for i, a := range Algorithms() {
		w := wantAlgorithms[i]
		t.Run(w.scheme.String(), func(t *testing.T) {
			if a.Wire != w.wire || a.KeyType != w.keyType || a.Hash != w.hash || a.PSS != w.pss || a.Legacy != w.legacy {
				t.Errorf("Algorithms()[%d] = %+v, want %+v", i, a, w)
			}
			if got := a.Scheme(); got != w.scheme {
				t.Errorf("%v.Scheme() = %#04x, want %#04x", a.Wire, uint16(got), uint16(w.scheme))
			}
			if got, want := a.String(), w.scheme.String(); got != want {
				t.Errorf("%v.String() = %q, want %q", a.Wire, got, want)
			}
			if got, ok := AlgorithmFor(a.Wire); !ok || got != a {
				t.Errorf("AlgorithmFor(%v) = %+v, %t, want %+v, true", a.Wire, got, ok, a)
			}
			if got, ok := AlgorithmForScheme(w.scheme); !ok || got != a {
				t.Errorf("AlgorithmForScheme(%v) = %+v, %t, want %+v, true", w.scheme, got, ok, a)
			}
			pub := testPublicKey(t, a.KeyType)
			if got, err := AlgorithmForOpts(pub, a.SignerOpts()); err != nil || got != a {
				t.Errorf("AlgorithmForOpts(%T, %v.SignerOpts()) = %+v, %v, want %+v", pub, a, got, err, a)
			}
			opts := a.SignerOpts()
			if opts.HashFunc() != a.Hash {
				t.Errorf("%v.SignerOpts().HashFunc() = %v, want %v", a, opts.HashFunc(), a.Hash)
			}
			if pss, ok := opts.(*rsa.PSSOptions); ok != a.PSS || ok && pss.SaltLength != rsa.PSSSaltLengthEqualsHash {
				t.Errorf("%v.SignerOpts() = %#v, want PSS %t with the salt as long as the hash", a, opts, a.PSS)
			}
		})
	}
}

// TestAlgorithmTableCoversWireEnum checks that every SignatureAlgorithm the
// .proto defines has a table entry and that nothing else does.
func TestAlgorithmTableCoversWireEnum(t *testing.T) {
	for v, name := range keylessv1.SignatureAlgorithm_name {
		wire := keylessv1.SignatureAlgorithm(v)
		_, ok := AlgorithmFor(wire)
		if want := wire != keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_UNSPECIFIED; ok != want {
			t.Errorf("AlgorithmFor(%s) found = %t, want %t", name, ok, want)
		}
	}
	for _, a := range Algorithms() {
		if _, ok := keylessv1.SignatureAlgorithm_name[int32(a.Wire)]; !ok {
			t.Errorf("table entry %v is not in the .proto enum", a)
		}
	}
	for _, wire := range []keylessv1.SignatureAlgorithm{0, 1, 0x0403 + 1, 0x0809, 0x080a, 0x0203 + 0x10000, -1} {
		if a, ok := AlgorithmFor(wire); ok {
			t.Errorf("AlgorithmFor(%d) = %v, true, want false", wire, a)
		}
	}
	for _, s := range []tls.SignatureScheme{0, tls.PSSWithSHA256 + 0x100, 0x0809 /* rsa_pss_pss_sha256 */, 0x0808 /* ed448 */} {
		if a, ok := AlgorithmForScheme(s); ok {
			t.Errorf("AlgorithmForScheme(%#04x) = %v, true, want false", uint16(s), a)
		}
	}
}

func TestAlgorithmsReturnsCopy(t *testing.T) {
	a := Algorithms()
	a[0] = Algorithm{}
	if Algorithms()[0] == (Algorithm{}) {
		t.Fatal("modifying the result of Algorithms() changed the table")
	}
}

func TestAlgorithmForOptsTLSShapes(t *testing.T) {
	rsaPub := pkitest.RSAKey().Public()
	tests := []struct {
		name string
		pub  crypto.PublicKey
		opts crypto.SignerOpts
		want tls.SignatureScheme
	}{
		// What crypto/tls passes (auth.go): PSS with PSSSaltLengthEqualsHash.
		{"PSS equals-hash", rsaPub, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA384}, tls.PSSWithSHA384},
		{"PSS explicit salt", rsaPub, &rsa.PSSOptions{SaltLength: 64, Hash: crypto.SHA512}, tls.PSSWithSHA512},
		{"PKCS1", rsaPub, crypto.SHA256, tls.PKCS1WithSHA256},
		{"P-384 with SHA-256 (TLS 1.2)", pkitest.P384Key().Public(), crypto.SHA256, tls.ECDSAWithP256AndSHA256},
		{"P-521 with SHA-512", pkitest.P521Key().Public(), crypto.SHA512, tls.ECDSAWithP521AndSHA512},
		{"Ed25519 Hash(0)", pkitest.Ed25519Key().Public(), crypto.Hash(0), tls.Ed25519},
		{"Ed25519 Options{}", pkitest.Ed25519Key().Public(), &ed25519.Options{}, tls.Ed25519},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := AlgorithmForOpts(tt.pub, tt.opts)
			if err != nil || got.Scheme() != tt.want {
				t.Errorf("AlgorithmForOpts(%T, %#v) = %v, %v, want %v", tt.pub, tt.opts, got, err, tt.want)
			}
		})
	}
}

func TestAlgorithmForOptsErrors(t *testing.T) {
	ecdhKey, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rsaPub, ecPub, edPub := pkitest.RSAKey().Public(), pkitest.P256Key().Public(), pkitest.Ed25519Key().Public()
	tests := []struct {
		name string
		pub  crypto.PublicKey
		opts crypto.SignerOpts
	}{
		{"nil key", nil, crypto.SHA256},
		{"ECDH key", ecdhKey.Public(), crypto.SHA256},
		{"RSA public key by value", *pkitest.RSAKey().Public().(*rsa.PublicKey), crypto.SHA256},
		{"ECDSA public key by value", pkitest.P256Key().PublicKey, crypto.SHA256},
		{"private key", pkitest.RSAKey(), crypto.SHA256},
		{"PSS salt 7", rsaPub, &rsa.PSSOptions{SaltLength: 7, Hash: crypto.SHA256}},
		{"PSS salt hash+1", rsaPub, &rsa.PSSOptions{SaltLength: 33, Hash: crypto.SHA256}},
		{"PSS salt auto", rsaPub, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto, Hash: crypto.SHA256}},
		{"PSS salt of another hash", rsaPub, &rsa.PSSOptions{SaltLength: 48, Hash: crypto.SHA256}},
		// These panicked in crypto.Hash.Size before the salt check moved
		// after the table lookup.
		{"PSS no hash", rsaPub, &rsa.PSSOptions{SaltLength: 32}},
		{"PSS unknown hash", rsaPub, &rsa.PSSOptions{SaltLength: 32, Hash: crypto.Hash(99)}},
		{"PSS no hash on ECDSA", ecPub, &rsa.PSSOptions{SaltLength: 5}},
		{"nil opts", rsaPub, nil},
		{"nil PSS opts", rsaPub, (*rsa.PSSOptions)(nil)},
		{"PSS SHA-1", rsaPub, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA1}},
		{"PSS on ECDSA", ecPub, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}},
		{"PSS on Ed25519", edPub, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}},
		{"RSA SHA-224", rsaPub, crypto.SHA224},
		{"RSA MD5+SHA1 (TLS 1.0)", rsaPub, crypto.MD5SHA1},
		{"RSA no hash", rsaPub, crypto.Hash(0)},
		{"ECDSA MD5", ecPub, crypto.MD5},
		{"ECDSA no hash", ecPub, crypto.Hash(0)},
		{"ECDSA SHA3-256", ecPub, crypto.SHA3_256},
		{"Ed25519 SHA-256", edPub, crypto.SHA256},
		{"Ed25519ph", edPub, &ed25519.Options{Hash: crypto.SHA512}},
		{"Ed25519ctx", edPub, &ed25519.Options{Context: "TLS"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got, err := AlgorithmForOpts(tt.pub, tt.opts); err == nil {
				t.Errorf("AlgorithmForOpts(%T, %#v) = %v, nil, want an error", tt.pub, tt.opts, got)
			}
		})
	}
}

func TestDefaultSchemes(t *testing.T) {
	rsaSchemes := []tls.SignatureScheme{tls.PSSWithSHA256, tls.PSSWithSHA384, tls.PSSWithSHA512, tls.PKCS1WithSHA256, tls.PKCS1WithSHA384, tls.PKCS1WithSHA512}
	ecSchemes := []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256, tls.ECDSAWithP384AndSHA384, tls.ECDSAWithP521AndSHA512}
	tests := []struct {
		name string
		pub  crypto.PublicKey
		want []tls.SignatureScheme
	}{
		{"RSA", pkitest.RSAKey().Public(), rsaSchemes},
		// ECDSA schemes follow TLS 1.2: any curve with any hash.
		{"P-256", pkitest.P256Key().Public(), ecSchemes},
		{"P-384", pkitest.P384Key().Public(), ecSchemes},
		{"P-521", pkitest.P521Key().Public(), ecSchemes},
		{"Ed25519", pkitest.Ed25519Key().Public(), []tls.SignatureScheme{tls.Ed25519}},
		{"unknown", []byte("not a key"), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := DefaultSchemes(tt.pub)
			if !slices.Equal(got, tt.want) {
				t.Errorf("DefaultSchemes(%s) = %v, want %v", tt.name, got, tt.want)
			}
			if slices.Contains(got, tls.PKCS1WithSHA1) || slices.Contains(got, tls.ECDSAWithSHA1) {
				t.Errorf("DefaultSchemes(%s) = %v includes SHA-1", tt.name, got)
			}
		})
	}
}

func TestKeyTypeOfAndKeyBits(t *testing.T) {
	p224, err := ecdsa.GenerateKey(elliptic.P224(), nil)
	if err != nil {
		t.Fatal(err)
	}
	ecdhKey, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		pub      crypto.PublicKey
		wantType keylessv1.KeyType
		wantBits int
	}{
		{"RSA-2048", pkitest.RSAKey().Public(), keylessv1.KeyType_KEY_TYPE_RSA, 2048},
		{"P-224", p224.Public(), keylessv1.KeyType_KEY_TYPE_ECDSA, 224},
		{"P-256", pkitest.P256Key().Public(), keylessv1.KeyType_KEY_TYPE_ECDSA, 256},
		{"P-384", pkitest.P384Key().Public(), keylessv1.KeyType_KEY_TYPE_ECDSA, 384},
		{"P-521", pkitest.P521Key().Public(), keylessv1.KeyType_KEY_TYPE_ECDSA, 521},
		{"Ed25519", pkitest.Ed25519Key().Public(), keylessv1.KeyType_KEY_TYPE_ED25519, 255},
		{"X25519", ecdhKey.Public(), keylessv1.KeyType_KEY_TYPE_UNSPECIFIED, 0},
		{"private RSA key", pkitest.RSAKey(), keylessv1.KeyType_KEY_TYPE_UNSPECIFIED, 0},
		{"private Ed25519 key", pkitest.Ed25519Key(), keylessv1.KeyType_KEY_TYPE_UNSPECIFIED, 0},
		{"nil", nil, keylessv1.KeyType_KEY_TYPE_UNSPECIFIED, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := KeyTypeOf(tt.pub); got != tt.wantType {
				t.Errorf("KeyTypeOf(%s) = %v, want %v", tt.name, got, tt.wantType)
			}
			if got := KeyBits(tt.pub); got != tt.wantBits {
				t.Errorf("KeyBits(%s) = %d, want %d", tt.name, got, tt.wantBits)
			}
		})
	}
}
