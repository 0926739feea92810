package signer

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha512"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/big"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/link"
)

// defaultTestTimeout bounds every call that could hang if the code under
// test is broken. Tests never assert tight timings: this only turns a hang
// into a failure.
const defaultTestTimeout = 5 * time.Second

// Test keys are derived from fixed seeds instead of being generated at
// random. A fuzzing run executes each fuzz target in several processes (the
// coordinator collects the seeds, the workers run them) and the seeds name
// keys by key id, so every process must hold the same keys. Since Go 1.26
// the key generators ignore their io.Reader, hence the derivations below.

// testStream returns n deterministic bytes for label (SHA-512 in counter
// mode).
func testStream(label string, n int) []byte {
	var out []byte
	for i := 0; len(out) < n; i++ {
		h := sha512.Sum512(fmt.Appendf(nil, "keyless signer test %s %d", label, i))
		out = append(out, h[:]...)
	}
	return out[:n]
}

// testRSAKey is the package's RSA-2048 key, built once.
var testRSAKey = sync.OnceValue(func() *rsa.PrivateKey {
	const e = 65537
	bigE := big.NewInt(e)
	one, two := big.NewInt(1), big.NewInt(2)
	prime := func(label string) *big.Int {
		b := testStream(label, 128)
		b[0] |= 0xc0 // so that p*q has exactly 2048 bits
		b[len(b)-1] |= 1
		for p := new(big.Int).SetBytes(b); ; p.Add(p, two) {
			pm1 := new(big.Int).Sub(p, one)
			if p.ProbablyPrime(20) && new(big.Int).GCD(nil, nil, pm1, bigE).Cmp(one) == 0 {
				return p
			}
		}
	}
	p, q := prime("rsa p"), prime("rsa q")
	phi := new(big.Int).Mul(new(big.Int).Sub(p, one), new(big.Int).Sub(q, one))
	k := &rsa.PrivateKey{
		PublicKey: rsa.PublicKey{N: new(big.Int).Mul(p, q), E: e},
		D:         new(big.Int).ModInverse(bigE, phi),
		Primes:    []*big.Int{p, q},
	}
	if err := k.Validate(); err != nil {
		panic(fmt.Sprintf("test RSA key: %v", err))
	}
	k.Precompute()
	if k.N.BitLen() != 2048 {
		panic(fmt.Sprintf("test RSA key has %d bits", k.N.BitLen()))
	}
	return k
})

// testECDSAKey returns a fixed key on curve c (P-256, P-384 or P-521).
func testECDSAKey(c elliptic.Curve) *ecdsa.PrivateKey {
	size := (c.Params().BitSize + 7) / 8
	// A leading zero byte keeps the scalar below the order of every curve.
	d := append([]byte{0}, testStream(c.Params().Name, size-1)...)
	k, err := ecdsa.ParseRawPrivateKey(c, d)
	if err != nil {
		panic(fmt.Sprintf("test %s key: %v", c.Params().Name, err))
	}
	return k
}

var (
	testP256Key    = sync.OnceValue(func() *ecdsa.PrivateKey { return testECDSAKey(elliptic.P256()) })
	testP384Key    = sync.OnceValue(func() *ecdsa.PrivateKey { return testECDSAKey(elliptic.P384()) })
	testP521Key    = sync.OnceValue(func() *ecdsa.PrivateKey { return testECDSAKey(elliptic.P521()) })
	testEd25519Key = sync.OnceValue(func() ed25519.PrivateKey {
		return ed25519.NewKeyFromSeed(testStream("ed25519", ed25519.SeedSize))
	})
)

// testKey is a named in-memory key.
type testKey struct {
	name string
	key  crypto.Signer
	bits int
}

// allTestKeys returns one key of each supported type and size.
func allTestKeys() []testKey {
	return []testKey{
		{"RSA-2048", testRSAKey(), 2048},
		{"P-256", testP256Key(), 256},
		{"P-384", testP384Key(), 384},
		{"P-521", testP521Key(), 521},
		{"Ed25519", testEd25519Key(), 255},
	}
}

// mustKeyID returns the key id of pub as the bytes a request carries.
func mustKeyID(tb testing.TB, pub crypto.PublicKey) []byte {
	tb.Helper()
	id, err := link.KeyIDOf(pub)
	if err != nil {
		tb.Fatalf("link.KeyIDOf(%T) = %v", pub, err)
	}
	return id[:]
}

// newTestMemoryStore returns a MemoryStore of every test key.
func newTestMemoryStore(tb testing.TB) *MemoryStore {
	tb.Helper()
	var keys []crypto.Signer
	for _, k := range allTestKeys() {
		keys = append(keys, k.key)
	}
	s, err := NewMemoryStore(keys...)
	if err != nil {
		tb.Fatalf("NewMemoryStore() = %v", err)
	}
	return s
}

// verifySignature checks sig the way a TLS client would, with the scheme's
// exact parameters (for PSS, a salt as long as the hash).
func verifySignature(pub crypto.PublicKey, alg link.Algorithm, digest, sig []byte) error {
	switch pub := pub.(type) {
	case *rsa.PublicKey:
		if alg.PSS {
			return rsa.VerifyPSS(pub, alg.Hash, digest, sig, &rsa.PSSOptions{SaltLength: alg.Hash.Size()})
		}
		return rsa.VerifyPKCS1v15(pub, alg.Hash, digest, sig)
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(pub, digest, sig) {
			return errors.New("ECDSA signature does not verify")
		}
		return nil
	case ed25519.PublicKey:
		if !ed25519.Verify(pub, digest, sig) {
			return errors.New("Ed25519 signature does not verify")
		}
		return nil
	}
	return fmt.Errorf("unexpected public key %T", pub)
}

// testStore is a KeyStore of arbitrary crypto.Signer values, so that tests
// can wrap keys in blocking, faulty or restricted signers. A non-nil err
// makes every method fail. It is safe for concurrent use.
type testStore struct {
	keys []crypto.Signer
	err  error
	// checkErr is what Check returns; nil means healthy.
	checkErr atomic.Pointer[error]
}

var (
	_ KeyStore = (*testStore)(nil)
	_ Checker  = (*testStore)(nil)
)

func (s *testStore) Key(_ context.Context, id link.KeyID) (crypto.Signer, error) {
	if s.err != nil {
		return nil, s.err
	}
	for _, k := range s.keys {
		if kid, err := link.KeyIDOf(k.Public()); err == nil && kid == id {
			return k, nil
		}
	}
	return nil, nil
}

func (s *testStore) Keys(context.Context) ([]crypto.Signer, error) {
	if s.err != nil {
		return nil, s.err
	}
	return s.keys, nil
}

func (s *testStore) Check(context.Context) error {
	if p := s.checkErr.Load(); p != nil {
		return *p
	}
	return nil
}

// ctxStore is a KeyStore whose lookups wait for the request's context to
// end and return its error, as a store waiting for a busy HSM does.
type ctxStore struct{}

func (ctxStore) Key(ctx context.Context, _ link.KeyID) (crypto.Signer, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

func (ctxStore) Keys(ctx context.Context) ([]crypto.Signer, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

// blockingKey is a key whose Sign, like an uncancellable HSM call, waits
// until it is released.
type blockingKey struct {
	crypto.Signer
	entered chan struct{} // receives once as each Sign call starts
	release chan struct{} // a send lets one Sign call finish (releaseOne); closed by unblock, all
	once    sync.Once
}

func newBlockingKey(t *testing.T, k crypto.Signer) *blockingKey {
	t.Helper()
	b := &blockingKey{Signer: k, entered: make(chan struct{}, 100), release: make(chan struct{})}
	t.Cleanup(b.unblock)
	return b
}

// waitEntered waits for a Sign call to start.
func (k *blockingKey) waitEntered(t *testing.T) {
	t.Helper()
	select {
	case <-k.entered:
	case <-time.After(defaultTestTimeout):
		t.Fatal("the key's Sign was not called")
	}
}

func (k *blockingKey) unblock() { k.once.Do(func() { close(k.release) }) }

// releaseOne lets one waiting Sign call finish.
func (k *blockingKey) releaseOne(t *testing.T) {
	t.Helper()
	select {
	case k.release <- struct{}{}:
	case <-time.After(defaultTestTimeout):
		t.Fatal("no Sign call waited to be released")
	}
}

func (k *blockingKey) Sign(rand io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	k.entered <- struct{}{}
	<-k.release
	return k.Signer.Sign(rand, digest, opts)
}

// restrictedKey is a key that can perform only some schemes and has a PKCS
// #11 label and id, as an HSM key may.
type restrictedKey struct {
	crypto.Signer
	schemes  []tls.SignatureScheme
	label    string
	objectID []byte
}

var (
	_ SchemeLister = restrictedKey{}
	_ Describer    = restrictedKey{}
)

func (k restrictedKey) SignatureSchemes() []tls.SignatureScheme { return k.schemes }
func (k restrictedKey) Label() string                           { return k.label }
func (k restrictedKey) ObjectID() []byte                        { return k.objectID }

// faultyKey returns RSA signatures with one bit flipped, as a CRT fault
// would produce.
type faultyKey struct{ crypto.Signer }

func (k faultyKey) Sign(rand io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	sig, err := k.Signer.Sign(rand, digest, opts)
	if err == nil {
		sig[len(sig)/2] ^= 1
	}
	return sig, err
}
