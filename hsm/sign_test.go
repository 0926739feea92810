package hsm_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/md5"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/signer"
)

func TestGenerate(t *testing.T) {
	f := mustFixture(t)
	ctx := testContext(t)
	specs := slices.Clone(generatedSpecs)
	if !testing.Short() {
		specs = append(specs, hsm.KeySpec{Type: hsm.KeyTypeRSA, Bits: 3072, Label: "rsa3072", ID: []byte("rsa3072")})
	}
	list := f.tok.PKCS11Tool(t, "--list-objects")
	for _, spec := range specs {
		t.Run(spec.Label, func(t *testing.T) {
			k, ok := f.keys[spec.Label]
			if ok {
				k = f.key(t, spec.Label)
			} else {
				var err error
				if k, err = f.m.Generate(ctx, spec); err != nil {
					t.Fatalf("Generate(%+v) = %v", spec, err)
				}
				list = f.tok.PKCS11Tool(t, "--list-objects")
			}
			d := k.(signer.Describer)
			if d.Label() != spec.Label {
				t.Errorf("Label() = %q, want %q", d.Label(), spec.Label)
			}
			id := d.ObjectID()
			if spec.ID != nil && !bytes.Equal(id, spec.ID) {
				t.Errorf("ObjectID() = %x, want %x", id, spec.ID)
			}
			if spec.ID == nil && len(id) != 16 {
				t.Errorf("ObjectID() = %x, want 16 random bytes", id)
			}

			// The key is in Keys() and found by Key(id).
			got, err := f.m.Key(ctx, keyIDOf(t, k.Public()))
			if err != nil || got != k {
				t.Errorf("Key(id) = %v, %v; want the generated key", got, err)
			}
			keys, _ := f.m.Keys(ctx)
			if !slices.Contains(keys, k) {
				t.Error("Keys() does not contain the generated key")
			}

			// Attributes, read back from the token.
			priv := tokenObject(t, f.tok, pkcs11.CKO_PRIVATE_KEY, id,
				pkcs11.CKA_TOKEN, pkcs11.CKA_PRIVATE, pkcs11.CKA_SENSITIVE, pkcs11.CKA_EXTRACTABLE,
				pkcs11.CKA_ALWAYS_SENSITIVE, pkcs11.CKA_NEVER_EXTRACTABLE, pkcs11.CKA_SIGN, pkcs11.CKA_DECRYPT,
				pkcs11.CKA_DERIVE, pkcs11.CKA_UNWRAP, pkcs11.CKA_LABEL)
			pub := tokenObject(t, f.tok, pkcs11.CKO_PUBLIC_KEY, id,
				pkcs11.CKA_TOKEN, pkcs11.CKA_VERIFY, pkcs11.CKA_ENCRYPT, pkcs11.CKA_LABEL)
			isRSA := spec.Type == hsm.KeyTypeRSA
			for _, c := range []struct {
				name string
				v    []byte
				want bool
			}{
				{"private CKA_TOKEN", priv[pkcs11.CKA_TOKEN], true},
				{"private CKA_PRIVATE", priv[pkcs11.CKA_PRIVATE], true},
				{"private CKA_SENSITIVE", priv[pkcs11.CKA_SENSITIVE], true},
				{"private CKA_EXTRACTABLE", priv[pkcs11.CKA_EXTRACTABLE], false},
				{"private CKA_ALWAYS_SENSITIVE", priv[pkcs11.CKA_ALWAYS_SENSITIVE], true},
				{"private CKA_NEVER_EXTRACTABLE", priv[pkcs11.CKA_NEVER_EXTRACTABLE], true},
				{"private CKA_SIGN", priv[pkcs11.CKA_SIGN], true},
				{"private CKA_DECRYPT", priv[pkcs11.CKA_DECRYPT], isRSA},
				{"private CKA_DERIVE", priv[pkcs11.CKA_DERIVE], false},
				{"private CKA_UNWRAP", priv[pkcs11.CKA_UNWRAP], false},
				{"public CKA_TOKEN", pub[pkcs11.CKA_TOKEN], true},
				{"public CKA_VERIFY", pub[pkcs11.CKA_VERIFY], true},
				{"public CKA_ENCRYPT", pub[pkcs11.CKA_ENCRYPT], isRSA},
			} {
				if got := len(c.v) == 1 && c.v[0] != 0; got != c.want {
					t.Errorf("%s = %x, want %t", c.name, c.v, c.want)
				}
			}
			if string(priv[pkcs11.CKA_LABEL]) != spec.Label || string(pub[pkcs11.CKA_LABEL]) != spec.Label {
				t.Errorf("CKA_LABEL = %q (private), %q (public); want %q", priv[pkcs11.CKA_LABEL], pub[pkcs11.CKA_LABEL], spec.Label)
			}

			// An independent tool lists it.
			if !strings.Contains(list, "label:      "+spec.Label+"\n") {
				t.Errorf("pkcs11-tool --list-objects does not list %q:\n%s", spec.Label, list)
			}
		})
	}
}

func TestGenerateErrors(t *testing.T) {
	f := mustFixture(t)
	ctx := testContext(t)
	existing := f.key(t, labelP256).(signer.Describer).ObjectID()
	for _, tt := range []struct {
		name string
		spec hsm.KeySpec
		want string
	}{
		{"invalid spec", hsm.KeySpec{Type: "dsa", Label: "x"}, "KeySpec.Type"},
		{"no label", hsm.KeySpec{Type: "ecdsa"}, "KeySpec.Label"},
		{"duplicate ID", hsm.KeySpec{Type: "ecdsa", Label: "dup", ID: existing}, "already exists"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			before, _ := f.m.Keys(ctx)
			k, err := f.m.Generate(ctx, tt.spec)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Generate(%+v) = %v, %v; want an error containing %q", tt.spec, k, err, tt.want)
			}
			if after, _ := f.m.Keys(ctx); len(after) != len(before) {
				t.Errorf("Keys() went from %d to %d keys", len(before), len(after))
			}
		})
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := f.m.Generate(cctx, hsm.KeySpec{Type: "ecdsa", Label: "cancelled"}); !errors.Is(err, context.Canceled) {
		t.Errorf("Generate(cancelled ctx) = %v, want context.Canceled", err)
	}
}

func TestKeyLookup(t *testing.T) {
	f := mustFixture(t)
	ctx := testContext(t)
	keys, err := f.m.Keys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Every key of the fixture is served: none is skipped.
	if want := len(generatedSpecs) + 5; len(keys) < want {
		t.Errorf("Keys() has %d keys, want at least %d", len(keys), want)
	}
	for _, k := range keys {
		got, err := f.m.Key(ctx, keyIDOf(t, k.Public()))
		if err != nil || got != k {
			t.Errorf("Key(id of %q) = %v, %v", k.(signer.Describer).Label(), got, err)
		}
	}
	var unknown [32]byte
	rand.Read(unknown[:])
	if k, err := f.m.Key(ctx, unknown); k != nil || err != nil {
		t.Errorf("Key(unknown) = %v, %v; want nil, nil", k, err)
	}
	keys[0] = nil // the caller owns the returned slice
	if again, _ := f.m.Keys(ctx); again[0] == nil {
		t.Error("modifying the slice returned by Keys changed the module")
	}
}

func TestKeyTypes(t *testing.T) {
	f := mustFixture(t)
	allRSA := []tls.SignatureScheme{tls.PSSWithSHA256, tls.PSSWithSHA384, tls.PSSWithSHA512, tls.PKCS1WithSHA256, tls.PKCS1WithSHA384, tls.PKCS1WithSHA512}
	for _, tt := range []struct {
		label   string
		schemes []tls.SignatureScheme
		decrypt bool
	}{
		{labelRSA, allRSA, true},
		{labelToolRSA, allRSA, true},
		{labelToolRSAPKCS, []tls.SignatureScheme{tls.PKCS1WithSHA256, tls.PKCS1WithSHA384, tls.PKCS1WithSHA512}, true},
		{labelP256, []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256, tls.ECDSAWithP384AndSHA384, tls.ECDSAWithP521AndSHA512}, false},
		{labelToolP256, []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256, tls.ECDSAWithP384AndSHA384, tls.ECDSAWithP521AndSHA512}, false},
		{labelP384, []tls.SignatureScheme{tls.ECDSAWithP384AndSHA384, tls.ECDSAWithP256AndSHA256, tls.ECDSAWithP521AndSHA512}, false},
		{labelToolP521, []tls.SignatureScheme{tls.ECDSAWithP521AndSHA512, tls.ECDSAWithP256AndSHA256, tls.ECDSAWithP384AndSHA384}, false},
		{labelEd25519, []tls.SignatureScheme{tls.Ed25519}, false},
		{labelToolEd25519, []tls.SignatureScheme{tls.Ed25519}, false},
	} {
		t.Run(tt.label, func(t *testing.T) {
			k := f.key(t, tt.label)
			if got := k.(signer.SchemeLister).SignatureSchemes(); !slices.Equal(got, tt.schemes) {
				t.Errorf("SignatureSchemes() = %v, want %v", got, tt.schemes)
			}
			if _, ok := k.(signer.ContextSigner); !ok {
				t.Error("key is not a signer.ContextSigner")
			}
			if _, ok := k.(signer.PremasterDecrypter); ok != tt.decrypt {
				t.Errorf("key is a signer.PremasterDecrypter: %t, want %t", ok, tt.decrypt)
			}
			// crypto/tls treats any crypto.Decrypter as an RSA decryption
			// key; the module's keys never are one.
			if _, ok := k.(crypto.Decrypter); ok {
				t.Error("key implements crypto.Decrypter")
			}
			if _, ok := k.(signer.Describer); !ok {
				t.Error("key is not a signer.Describer")
			}
			if signer.KeyTypeOf(k.Public()) == 0 {
				t.Errorf("Public() is a %T", k.Public())
			}
		})
	}
	// The allowed-mechanisms key cannot do raw RSA, so it uses the masked
	// fallback; the others use CKM_RSA_X_509.
	if raw, _ := hsm.RawDecrypt(f.key(t, labelToolRSAPKCS)); raw {
		t.Error("key restricted to CKM_RSA_PKCS decrypts with CKM_RSA_X_509")
	}
	if raw, _ := hsm.RawDecrypt(f.key(t, labelRSA)); !raw {
		t.Error("RSA key does not decrypt with CKM_RSA_X_509")
	}
}

// TestSign signs with every scheme of every key, as crypto/tls would, and
// verifies each signature with the standard library.
func TestSign(t *testing.T) {
	f := mustFixture(t)
	ctx := testContext(t)
	for _, label := range []string{labelRSA, labelToolRSA, labelToolRSAPKCS, labelP256, labelToolP256, labelP384, labelToolP521, labelEd25519, labelToolEd25519} {
		k := f.key(t, label)
		for _, s := range k.(signer.SchemeLister).SignatureSchemes() {
			t.Run(label+"/"+s.String(), func(t *testing.T) {
				// Ed25519 gets a TLS 1.3 CertificateVerify message, the
				// others its digest.
				input, opts := signInput(s, tls13Message(48))
				sig, err := k.(signer.ContextSigner).SignContext(ctx, input, opts)
				if err != nil {
					t.Fatalf("SignContext(%v) = %v", s, err)
				}
				if err := verify(k.Public(), s, input, sig); err != nil {
					t.Fatalf("signature does not verify: %v", err)
				}
				// Sign, without a context, gives a valid signature too.
				sig, err = k.Sign(rand.Reader, input, opts)
				if err != nil {
					t.Fatalf("Sign(%v) = %v", s, err)
				}
				if err := verify(k.Public(), s, input, sig); err != nil {
					t.Fatalf("signature from Sign does not verify: %v", err)
				}
			})
		}
	}
	// A salt length given as the hash size is the same as EqualsHash.
	k := f.key(t, labelRSA)
	input, _ := signInput(tls.PSSWithSHA384, []byte("salt"))
	sig, err := k.Sign(rand.Reader, input, &rsa.PSSOptions{SaltLength: 48, Hash: crypto.SHA384})
	if err != nil {
		t.Fatalf("Sign(PSS, salt 48) = %v", err)
	}
	if err := verify(k.Public(), tls.PSSWithSHA384, input, sig); err != nil {
		t.Fatal(err)
	}
	// A TLS 1.2 ServerKeyExchange-shaped Ed25519 message.
	msg := make([]byte, 64+4+32)
	rand.Read(msg)
	msg[64], msg[65], msg[66], msg[67] = 3, 0, 29, 32
	sig, err = f.key(t, labelEd25519).Sign(rand.Reader, msg, crypto.Hash(0))
	if err != nil || !ed25519.Verify(f.key(t, labelEd25519).Public().(ed25519.PublicKey), msg, sig) {
		t.Fatalf("Ed25519 TLS 1.2 signature: %v", err)
	}
}

func TestSignRejects(t *testing.T) {
	f := mustFixture(t)
	ctx := testContext(t)
	d256 := make([]byte, 32)
	d384 := make([]byte, 48)
	sha1Digest := sha1.Sum([]byte("x"))
	md5Digest := md5.Sum([]byte("x"))
	pss := func(salt int, h crypto.Hash) *rsa.PSSOptions { return &rsa.PSSOptions{SaltLength: salt, Hash: h} }
	for _, tt := range []struct {
		name   string
		label  string
		digest []byte
		opts   crypto.SignerOpts
	}{
		{"RSA digest too long", labelRSA, d384, crypto.SHA256},
		{"RSA digest too short", labelRSA, d256[:31], crypto.SHA256},
		{"RSA SHA-1", labelRSA, sha1Digest[:], crypto.SHA1},
		{"RSA MD5", labelRSA, md5Digest[:], crypto.MD5},
		{"RSA MD5+SHA1", labelRSA, make([]byte, 36), crypto.MD5SHA1},
		{"RSA no hash", labelRSA, d256, crypto.Hash(0)},
		{"RSA unknown hash", labelRSA, d256, crypto.Hash(99)},
		{"RSA SHA-224", labelRSA, make([]byte, 28), crypto.SHA224},
		{"RSA nil opts", labelRSA, d256, nil},
		{"RSA nil PSS opts", labelRSA, d256, (*rsa.PSSOptions)(nil)},
		{"RSA PSS salt auto", labelRSA, d256, pss(rsa.PSSSaltLengthAuto, crypto.SHA256)},
		{"RSA PSS salt 20", labelRSA, d256, pss(20, crypto.SHA256)},
		{"RSA PSS salt of another hash", labelRSA, d256, pss(48, crypto.SHA256)},
		{"RSA PSS SHA-1", labelRSA, sha1Digest[:], pss(rsa.PSSSaltLengthEqualsHash, crypto.SHA1)},
		{"RSA PSS digest too long", labelRSA, d384, pss(rsa.PSSSaltLengthEqualsHash, crypto.SHA256)},
		{"RSA PSS on a PKCS#1-only key", labelToolRSAPKCS, d256, pss(rsa.PSSSaltLengthEqualsHash, crypto.SHA256)},
		{"ECDSA digest too long", labelP256, d384, crypto.SHA256},
		{"ECDSA SHA-1", labelP256, sha1Digest[:], crypto.SHA1},
		{"ECDSA no hash", labelP384, d256, crypto.Hash(0)},
		{"ECDSA PSS opts", labelP256, d256, pss(rsa.PSSSaltLengthEqualsHash, crypto.SHA256)},
		{"ECDSA nil opts", labelP256, d256, nil},
		{"Ed25519 with SHA-256", labelEd25519, d256, crypto.SHA256},
		{"Ed25519 with SHA-512 (Ed25519ph)", labelEd25519, make([]byte, 64), crypto.SHA512},
		{"Ed25519ph options", labelEd25519, make([]byte, 64), &ed25519.Options{Hash: crypto.SHA512}},
		{"Ed25519 context", labelEd25519, []byte("m"), &ed25519.Options{Context: "ctx"}},
		{"Ed25519 nil opts", labelEd25519, []byte("m"), nil},
		{"Ed25519 typed nil opts", labelEd25519, []byte("m"), (*ed25519.Options)(nil)},
		{"ECDSA typed nil Ed25519 opts", labelP256, d256, (*ed25519.Options)(nil)},
		{"Ed25519 huge message", labelEd25519, make([]byte, 1<<17), crypto.Hash(0)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			k := f.key(t, tt.label)
			sig, err := k.(signer.ContextSigner).SignContext(ctx, tt.digest, tt.opts)
			if !errors.Is(err, hsm.ErrInvalidRequest) {
				t.Fatalf("SignContext() = %x, %v; want an error wrapping ErrInvalidRequest", sig, err)
			}
			if _, err := k.Sign(rand.Reader, tt.digest, tt.opts); !errors.Is(err, hsm.ErrInvalidRequest) {
				t.Fatalf("Sign() error = %v; want ErrInvalidRequest", err)
			}
		})
	}
}

func TestSignContextDone(t *testing.T) {
	f := mustFixture(t)
	input, opts := signInput(tls.PSSWithSHA256, []byte("m"))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for _, label := range []string{labelRSA, labelP256, labelEd25519} {
		k := f.key(t, label).(signer.ContextSigner)
		if label == labelP256 {
			opts = crypto.SHA256
		}
		if label == labelEd25519 {
			input, opts = []byte("m"), crypto.Hash(0)
		}
		start := time.Now()
		sig, err := k.SignContext(ctx, input, opts)
		if !errors.Is(err, context.Canceled) || sig != nil {
			t.Errorf("%s: SignContext(cancelled) = %x, %v; want context.Canceled", label, sig, err)
		}
		if d := time.Since(start); d > 100*time.Millisecond {
			t.Errorf("%s: SignContext(cancelled) took %v", label, d)
		}
	}
	dctx, dcancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer dcancel()
	if _, err := f.key(t, labelRSA).(signer.PremasterDecrypter).DecryptPremaster(dctx, make([]byte, 256)); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("DecryptPremaster(expired) = %v, want context.DeadlineExceeded", err)
	}
	if err := f.m.Check(dctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Check(expired) = %v, want context.DeadlineExceeded", err)
	}
}

// TestStandalone uses the keys as plain crypto.Signers with the standard
// library: a certificate request from each, and a self-signed RSA-PSS
// certificate.
func TestStandalone(t *testing.T) {
	f := mustFixture(t)
	for _, label := range []string{labelRSA, labelP256, labelP384, labelToolP521, labelEd25519} {
		t.Run(label, func(t *testing.T) {
			k := f.key(t, label)
			der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: label}}, k)
			if err != nil {
				t.Fatalf("CreateCertificateRequest() = %v", err)
			}
			csr, err := x509.ParseCertificateRequest(der)
			if err != nil {
				t.Fatal(err)
			}
			if err := csr.CheckSignature(); err != nil {
				t.Fatalf("CSR signature: %v", err)
			}
		})
	}
	k := f.key(t, labelRSA)
	cert := selfSigned(t, k, x509.SHA384WithRSAPSS)
	if err := cert.CheckSignatureFrom(cert); err != nil {
		t.Fatalf("self-signed RSA-PSS certificate: %v", err)
	}
}

func selfSigned(t *testing.T, k crypto.Signer, alg x509.SignatureAlgorithm) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "keyless.test"},
		DNSNames:              []string{"keyless.test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		SignatureAlgorithm:    alg,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		t.Fatalf("CreateCertificate() = %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// TestTLSHandshake completes crypto/tls handshakes whose server key is in
// the token, restricted to the schemes the key reports.
func TestTLSHandshake(t *testing.T) {
	f := mustFixture(t)
	for _, tt := range []struct {
		label   string
		version uint16
		alg     x509.SignatureAlgorithm
	}{
		{labelRSA, tls.VersionTLS13, x509.SHA256WithRSA},
		{labelRSA, tls.VersionTLS12, x509.SHA256WithRSA},
		{labelToolRSAPKCS, tls.VersionTLS12, x509.SHA256WithRSA},
		{labelP256, tls.VersionTLS13, x509.ECDSAWithSHA256},
		{labelP384, tls.VersionTLS13, x509.ECDSAWithSHA384},
		{labelP384, tls.VersionTLS12, x509.ECDSAWithSHA384},
		{labelEd25519, tls.VersionTLS13, x509.PureEd25519},
		{labelToolEd25519, tls.VersionTLS12, x509.PureEd25519},
	} {
		t.Run(tt.label+"/"+tls.VersionName(tt.version), func(t *testing.T) {
			k := f.key(t, tt.label)
			cert := selfSigned(t, k, tt.alg)
			pool := x509.NewCertPool()
			pool.AddCert(cert)
			server := &tls.Config{
				Certificates: []tls.Certificate{{
					Certificate:                  [][]byte{cert.Raw},
					PrivateKey:                   k,
					SupportedSignatureAlgorithms: k.(signer.SchemeLister).SignatureSchemes(),
				}},
				MinVersion: tt.version,
				MaxVersion: tt.version,
			}
			client := &tls.Config{RootCAs: pool, ServerName: "keyless.test", MinVersion: tt.version, MaxVersion: tt.version}
			handshake(t, server, client)
		})
	}
}

func handshake(t *testing.T, server, client *tls.Config) {
	t.Helper()
	c, s := net.Pipe()
	defer c.Close()
	defer s.Close()
	ctx := testContext(t)
	errc := make(chan error, 1)
	go func() {
		errc <- tls.Server(s, server).HandshakeContext(ctx)
	}()
	if err := tls.Client(c, client).HandshakeContext(ctx); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("server handshake: %v", err)
	}
}

// A key generated in software and one in the token are told apart by id.
func TestKeyIDIsSPKIHash(t *testing.T) {
	f := mustFixture(t)
	k := f.key(t, labelP256)
	id := keyIDOf(t, k.Public())
	if got, err := signer.KeyIDOf(k.Public()); err != nil || got != id {
		t.Errorf("signer.KeyIDOf = %x, %v; want %x", got, err, id)
	}
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if k, _ := f.m.Key(testContext(t), keyIDOf(t, other.Public())); k != nil {
		t.Error("Key() found a key that is not on the token")
	}
}
