package tlscore

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/keyless-tls/keyless/internal/pkitest"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// remoteKeys returns env's keys as RemoteKeys, by key id.
func remoteKeys(t *testing.T, env *testEnv) map[link.KeyID]RemoteKey {
	t.Helper()
	infos, err := env.client.ListKeys(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	keys := make(map[link.KeyID]RemoteKey)
	for _, info := range infos {
		k, err := NewRemoteKey(env.client, info)
		if err != nil {
			t.Fatal(err)
		}
		keys[k.KeyID()] = k
	}
	return keys
}

// tls13Message is a TLS 1.3 server CertificateVerify input, as crypto/tls
// hands it to an Ed25519 key.
func tls13Message() []byte {
	m := bytes.Repeat([]byte{0x20}, 64)
	m = append(m, "TLS 1.3, server CertificateVerify\x00"...)
	h := sha256.Sum256([]byte("transcript"))
	return append(m, h[:]...)
}

func digest(h crypto.Hash) []byte {
	d := h.New()
	d.Write([]byte("handshake transcript"))
	return d.Sum(nil)
}

func TestRemoteKeySign(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	keys := remoteKeys(t, env)
	pss := func(h crypto.Hash) *rsa.PSSOptions {
		return &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: h}
	}
	tests := []struct {
		name    string
		pub     crypto.PublicKey
		digest  []byte
		opts    crypto.SignerOpts
		wantErr string // substring; "" for success
	}{
		{name: "RSA/PSS-SHA256", pub: pkitest.RSAKey().Public(), digest: digest(crypto.SHA256), opts: pss(crypto.SHA256)},
		{name: "RSA/PSS-SHA384", pub: pkitest.RSAKey().Public(), digest: digest(crypto.SHA384), opts: pss(crypto.SHA384)},
		{name: "RSA/PSS-SHA512-explicit-salt", pub: pkitest.RSAKey().Public(), digest: digest(crypto.SHA512), opts: &rsa.PSSOptions{SaltLength: 64, Hash: crypto.SHA512}},
		{name: "RSA/PKCS1-SHA256", pub: pkitest.RSAKey().Public(), digest: digest(crypto.SHA256), opts: crypto.SHA256},
		{name: "RSA/PKCS1-SHA512", pub: pkitest.RSAKey().Public(), digest: digest(crypto.SHA512), opts: crypto.SHA512},
		{name: "P256/SHA256", pub: pkitest.P256Key().Public(), digest: digest(crypto.SHA256), opts: crypto.SHA256},
		{name: "P256/SHA512", pub: pkitest.P256Key().Public(), digest: digest(crypto.SHA512), opts: crypto.SHA512},
		{name: "P384/SHA256", pub: pkitest.P384Key().Public(), digest: digest(crypto.SHA256), opts: crypto.SHA256},
		{name: "P384/SHA384", pub: pkitest.P384Key().Public(), digest: digest(crypto.SHA384), opts: crypto.SHA384},
		{name: "Ed25519/TLS13-message", pub: pkitest.Ed25519Key().Public(), digest: tls13Message(), opts: crypto.Hash(0)},

		{name: "RSA/PSS-auto-salt", pub: pkitest.RSAKey().Public(), digest: digest(crypto.SHA256), opts: &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto, Hash: crypto.SHA256}, wantErr: "salt length"},
		{name: "RSA/SHA1-not-offered", pub: pkitest.RSAKey().Public(), digest: digest(crypto.SHA1), opts: crypto.SHA1, wantErr: "does not offer"},
		{name: "RSA/MD5", pub: pkitest.RSAKey().Public(), digest: digest(crypto.MD5), opts: crypto.MD5, wantErr: "no TLS signature scheme"},
		{name: "RSA/short-digest", pub: pkitest.RSAKey().Public(), digest: digest(crypto.SHA256)[:31], opts: pss(crypto.SHA256), wantErr: "31-byte digest"},
		{name: "P256/PSS", pub: pkitest.P256Key().Public(), digest: digest(crypto.SHA256), opts: pss(crypto.SHA256), wantErr: "no TLS signature scheme"},
		{name: "P256/long-digest", pub: pkitest.P256Key().Public(), digest: digest(crypto.SHA384), opts: crypto.SHA256, wantErr: "48-byte digest"},
		{name: "Ed25519/with-hash", pub: pkitest.Ed25519Key().Public(), digest: digest(crypto.SHA256), opts: crypto.SHA256, wantErr: "no TLS signature scheme"},
		{name: "Ed25519/not-a-TLS-message", pub: pkitest.Ed25519Key().Public(), digest: []byte("sign anything for me"), opts: crypto.Hash(0), wantErr: "InvalidArgument"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := keys[mustKeyID(t, tt.pub)]
			signs0, _ := env.ks.ops.counts()
			sig, err := k.Sign(rand.Reader, tt.digest, tt.opts)
			signs, _ := env.ks.ops.counts()
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Sign() = %v, want an error containing %q", err, tt.wantErr)
				}
				if tt.wantErr != "InvalidArgument" && signs != signs0 {
					t.Errorf("a request refused locally reached the keyserver")
				}
				return
			}
			if err != nil {
				t.Fatalf("Sign() = %v", err)
			}
			if err := verify(tt.pub, tt.digest, sig, tt.opts); err != nil {
				t.Errorf("signature does not verify: %v", err)
			}
		})
	}
}

func verify(pub crypto.PublicKey, digest, sig []byte, opts crypto.SignerOpts) error {
	switch pub := pub.(type) {
	case *rsa.PublicKey:
		if o, ok := opts.(*rsa.PSSOptions); ok {
			return rsa.VerifyPSS(pub, o.Hash, digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
		}
		return rsa.VerifyPKCS1v15(pub, opts.HashFunc(), digest, sig)
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(pub, digest, sig) {
			return errors.New("invalid ECDSA signature")
		}
		return nil
	case ed25519.PublicKey:
		if !ed25519.Verify(pub, digest, sig) {
			return errors.New("invalid Ed25519 signature")
		}
		return nil
	}
	return errors.New("unknown key type")
}

// TestRemoteKeyTypes checks that only RSA keys that can decrypt are
// Decrypters: crypto/tls takes any Decrypter for an RSA key-exchange key.
func TestRemoteKeyTypes(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	infos, err := env.client.ListKeys(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for _, info := range infos {
		k, err := NewRemoteKey(env.client, info)
		if err != nil {
			t.Fatal(err)
		}
		_, isRSA := k.Public().(*rsa.PublicKey)
		bound := k.WithContext(t.Context(), nil)
		for _, k := range []RemoteKey{k, bound} {
			if _, isDecrypter := k.(crypto.Decrypter); isDecrypter != isRSA {
				t.Errorf("%v key: crypto.Decrypter = %t, want %t", info.GetType(), isDecrypter, isRSA)
			}
		}
		if isRSA {
			noDecrypt := proto.Clone(info).(*keylessv1.Key)
			noDecrypt.DecryptPremaster = false
			k, err := NewRemoteKey(env.client, noDecrypt)
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := k.(crypto.Decrypter); ok {
				t.Errorf("RSA key without decrypt_premaster is a crypto.Decrypter")
			}
		}
	}
}

func TestNewRemoteKeyErrors(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	spki, err := x509.MarshalPKIXPublicKey(pkitest.P256Key().Public())
	if err != nil {
		t.Fatal(err)
	}
	id := sha256.Sum256(spki)
	garbage := []byte("not a public key")
	garbageID := sha256.Sum256(garbage)
	tests := []struct {
		name    string
		client  *Client
		info    *keylessv1.Key
		wantErr string
	}{
		{"nil-client", nil, &keylessv1.Key{KeyId: id[:], PublicKey: spki}, "nil client"},
		{"nil-info", env.client, nil, "nil key description"},
		{"wrong-key-id", env.client, &keylessv1.Key{KeyId: garbageID[:], PublicKey: spki}, "not the SHA-256"},
		{"short-key-id", env.client, &keylessv1.Key{KeyId: id[:16], PublicKey: spki}, "not the SHA-256"},
		{"bad-SPKI", env.client, &keylessv1.Key{KeyId: garbageID[:], PublicKey: garbage}, "parse public key"},
		{"type-mismatch", env.client, &keylessv1.Key{KeyId: id[:], PublicKey: spki, Type: keylessv1.KeyType_KEY_TYPE_RSA}, "described as KEY_TYPE_RSA"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewRemoteKey(tt.client, tt.info)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("NewRemoteKey() = %v, want an error containing %q", err, tt.wantErr)
			}
		})
	}
}

// TestRemoteKeyDecrypt checks premaster decryption with implicit rejection:
// every ciphertext gets 48 bytes and no error, the same each time, and only a
// valid one gets the premaster back. Options other than TLS's are refused
// without a call.
func TestRemoteKeyDecrypt(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	key := remoteKeys(t, env)[mustKeyID(t, pkitest.RSAKey().Public())].(crypto.Decrypter)
	pub := &pkitest.RSAKey().PublicKey
	premaster := make([]byte, 48)
	rand.Read(premaster)
	encrypt := func(pt []byte) []byte {
		ct, err := rsa.EncryptPKCS1v15(rand.Reader, pub, pt)
		if err != nil {
			t.Fatal(err)
		}
		return ct
	}
	random := make([]byte, pub.Size())
	rand.Read(random)
	random[0] = 0 // below the modulus, almost surely bad padding
	tlsOpts := &rsa.PKCS1v15DecryptOptions{SessionKeyLen: 48}

	tests := []struct {
		name       string
		ciphertext []byte
		opts       crypto.DecrypterOpts
		wantExact  bool   // the result must be premaster
		wantErr    string // for refused options
	}{
		{name: "valid", ciphertext: encrypt(premaster), opts: tlsOpts, wantExact: true},
		{name: "bad-padding", ciphertext: random, opts: tlsOpts},
		{name: "47-byte-plaintext", ciphertext: encrypt(premaster[:47]), opts: tlsOpts},
		{name: "short-ciphertext", ciphertext: random[:10], opts: tlsOpts},
		{name: "empty-ciphertext", ciphertext: nil, opts: tlsOpts},
		{name: "ciphertext-above-modulus", ciphertext: bytes.Repeat([]byte{0xff}, pub.Size()), opts: tlsOpts},
		{name: "no-session-key-len", ciphertext: encrypt(premaster), opts: &rsa.PKCS1v15DecryptOptions{}, wantErr: "only TLS premaster decryption"},
		{name: "nil-opts", ciphertext: encrypt(premaster), opts: nil, wantErr: "only TLS premaster decryption"},
		{name: "OAEP", ciphertext: encrypt(premaster), opts: &rsa.OAEPOptions{Hash: crypto.SHA256}, wantErr: "only TLS premaster decryption"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, d0 := env.ks.ops.counts()
			got, err := key.Decrypt(rand.Reader, tt.ciphertext, tt.opts)
			_, d1 := env.ks.ops.counts()
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Decrypt() = %v, want an error containing %q", err, tt.wantErr)
				}
				if d1 != d0 {
					t.Errorf("refused options reached the keyserver")
				}
				return
			}
			if err != nil {
				t.Fatalf("Decrypt() = %v; implicit rejection must not fail", err)
			}
			if len(got) != 48 {
				t.Fatalf("Decrypt() returned %d bytes, want 48", len(got))
			}
			if bytes.Equal(got, premaster) != tt.wantExact {
				t.Errorf("Decrypt() == premaster is %t, want %t", !tt.wantExact, tt.wantExact)
			}
			// Asked again, the keyserver answers the same: a rejection
			// looks like a premaster secret.
			if again, err := key.Decrypt(rand.Reader, tt.ciphertext, tt.opts); err != nil || !bytes.Equal(again, got) {
				t.Errorf("Decrypt() again = %x, %v; want %x", again, err, got)
			}
		})
	}
}

// TestRemoteKeyWithContext checks that a bound key uses its context.
func TestRemoteKeyWithContext(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	k := remoteKeys(t, env)[mustKeyID(t, pkitest.P256Key().Public())]
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	rc := &keylessv1.RequestContext{ServerName: "bound.example.com", ConnectionId: "c-1"}
	if _, err := k.WithContext(ctx, rc).Sign(rand.Reader, digest(crypto.SHA256), crypto.SHA256); status.Code(err) != codes.Canceled {
		t.Errorf("Sign() with a canceled context = %v, want code Canceled", err)
	}
	if _, err := k.Sign(rand.Reader, digest(crypto.SHA256), crypto.SHA256); err != nil {
		t.Errorf("Sign() with the unbound key = %v", err)
	}
	if got := env.ks.ops.lastSign().GetContext(); got != nil {
		t.Errorf("unbound key sent context %v, want none", got)
	}
	if _, err := k.WithContext(t.Context(), rc).Sign(rand.Reader, digest(crypto.SHA256), crypto.SHA256); err != nil {
		t.Fatalf("Sign() with a bound key = %v", err)
	}
	if got := env.ks.ops.lastSign().GetContext(); !proto.Equal(got, rc) {
		t.Errorf("bound key sent context %v, want %v", got, rc)
	}
}
