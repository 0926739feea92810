package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"io"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThalesIgnite/crypto11"
	"github.com/hashicorp/go-hclog"
	"github.com/miekg/pkcs11"

	"github.com/keyless-tls/keyless/internal/premaster"
)

// stubP11 is a PKCS #11 library in memory, for the module's raw
// operations and Open's checks. Methods it does not implement panic (the
// embedded interface is nil).
type stubP11 struct {
	p11API

	mu         sync.Mutex
	initErr    error
	loginErr   error
	slots      []uint
	tokens     map[uint]pkcs11.TokenInfo
	nextHandle pkcs11.SessionHandle
	open       map[pkcs11.SessionHandle]bool
	loggedIn   bool
	logins     int
	mech       uint
	finalized  int
	destroyed  int

	// errs is a queue of errors that the next Sign or Decrypt calls return
	// instead of calling sign or decrypt.
	errs    []error
	sign    func(msg []byte) ([]byte, error)
	decrypt func(mech uint, in []byte) ([]byte, error)
}

func newStubP11() *stubP11 {
	return &stubP11{open: map[pkcs11.SessionHandle]bool{}, tokens: map[uint]pkcs11.TokenInfo{}}
}

func (s *stubP11) Initialize(...pkcs11.InitializeOption) error { return s.initErr }
func (s *stubP11) Finalize() error                             { s.finalized++; return nil }
func (s *stubP11) Destroy()                                    { s.destroyed++ }
func (s *stubP11) GetSlotList(bool) ([]uint, error)            { return s.slots, nil }
func (s *stubP11) GetTokenInfo(slot uint) (pkcs11.TokenInfo, error) {
	return s.tokens[slot], nil
}

func (s *stubP11) OpenSession(uint, uint) (pkcs11.SessionHandle, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nextHandle++
	s.open[s.nextHandle] = true
	return s.nextHandle, nil
}

func (s *stubP11) CloseSession(sh pkcs11.SessionHandle) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.open, sh)
	return nil
}

func (s *stubP11) Login(pkcs11.SessionHandle, uint, string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.logins++
	if s.loginErr != nil {
		return s.loginErr
	}
	if s.loggedIn {
		return pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)
	}
	s.loggedIn = true
	return nil
}

func (s *stubP11) popErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.errs) == 0 {
		return nil
	}
	err := s.errs[0]
	s.errs = s.errs[1:]
	return err
}

func (s *stubP11) SignInit(_ pkcs11.SessionHandle, m []*pkcs11.Mechanism, _ pkcs11.ObjectHandle) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mech = m[0].Mechanism
	return nil
}

func (s *stubP11) Sign(_ pkcs11.SessionHandle, msg []byte) ([]byte, error) {
	if err := s.popErr(); err != nil {
		return nil, err
	}
	return s.sign(msg)
}

func (s *stubP11) DecryptInit(_ pkcs11.SessionHandle, m []*pkcs11.Mechanism, _ pkcs11.ObjectHandle) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mech = m[0].Mechanism
	return nil
}

func (s *stubP11) Decrypt(_ pkcs11.SessionHandle, in []byte) ([]byte, error) {
	if err := s.popErr(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	mech := s.mech
	s.mu.Unlock()
	return s.decrypt(mech, in)
}

func newStubModule(p *stubP11, sessions int) *Module {
	return &Module{
		p11:    p,
		raw:    newSessionPool(p, 0, "pin", sessions, 200*time.Millisecond),
		calls:  newCallTracker(sessions, 200*time.Millisecond),
		logger: hclog.NewNullLogger(),
	}
}

var testRSAKey = sync.OnceValue(func() *rsa.PrivateKey {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err)
	}
	return k
})

// rawRSA is CKM_RSA_X_509 decryption in Go.
func rawRSA(k *rsa.PrivateKey, in []byte, stripZeros bool) []byte {
	m := new(big.Int).Exp(new(big.Int).SetBytes(in), k.D, k.N)
	if stripZeros {
		return m.Bytes()
	}
	return m.FillBytes(make([]byte, k.Size()))
}

// newStubRSAKey returns testRSAKey as a key of m, its implicit-rejection
// secret already known, so that the stub sees only decryptions.
func newStubRSAKey(m *Module, raw bool) *rsaDecryptKey {
	priv := testRSAKey()
	k := &rsaDecryptKey{
		rsaKey:     &rsaKey{keyBase: keyBase{m: m, label: "stub"}, pub: &priv.PublicKey, signer: priv, mechs: keyMechanisms{pss: true, pkcs1: true, rawDecrypt: raw}},
		rawDecrypt: raw,
		computing:  make(chan struct{}, 1),
	}
	secret, err := premaster.Secret(priv)
	if err != nil {
		panic(err)
	}
	k.secret.Store(&secret)
	return k
}

// TestRejectionSecretStub checks how a key computes its implicit-rejection
// secret in the token: with CKM_RSA_PKCS signing of the bare message, once
// however many callers ask; with CKM_RSA_X_509 where the key cannot sign so
// or the token refuses; again after a failure; never a secret that does not
// verify; and a caller waiting for another's computation waits only as long
// as its own context.
func TestRejectionSecretStub(t *testing.T) {
	priv := testRSAKey()
	want, err := premaster.Secret(priv)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	var signs, decrypts atomic.Int32
	// newKey returns a key of p without its secret, and zeroes the counts.
	newKey := func(p *stubP11, pkcs1, raw bool) *rsaDecryptKey {
		signs.Store(0)
		decrypts.Store(0)
		k := newStubRSAKey(newStubModule(p, 2), raw)
		k.secret.Store(nil)
		k.mechs.pkcs1 = pkcs1
		return k
	}
	rawSign := func(msg []byte) ([]byte, error) {
		signs.Add(1)
		return rsa.SignPKCS1v15(nil, priv, 0, msg)
	}
	rawDecrypt := func(mech uint, in []byte) ([]byte, error) {
		decrypts.Add(1)
		if mech != pkcs11.CKM_RSA_X_509 {
			t.Errorf("C_Decrypt mechanism 0x%x; want CKM_RSA_X_509", mech)
		}
		return rawRSA(priv, in, true), nil // a token that strips leading zeros
	}
	// token returns a token that signs and decrypts as the key does, after
	// failing with errs.
	token := func(errs ...error) *stubP11 {
		p := newStubP11()
		p.errs, p.sign, p.decrypt = errs, rawSign, rawDecrypt
		return p
	}
	check := func(t *testing.T, k *rsaDecryptKey, wantSigns, wantDecrypts int32) {
		t.Helper()
		got, err := k.rejectionSecret(ctx)
		if err != nil || string(got) != string(want) {
			t.Fatalf("rejectionSecret() = %x, %v; want %x", got, err, want)
		}
		if signs.Load() != wantSigns || decrypts.Load() != wantDecrypts {
			t.Errorf("the token signed %d and decrypted %d times; want %d and %d", signs.Load(), decrypts.Load(), wantSigns, wantDecrypts)
		}
	}

	t.Run("signed with CKM_RSA_PKCS, once for many callers", func(t *testing.T) {
		p := newStubP11()
		p.sign = func(msg []byte) ([]byte, error) {
			if p.mech != pkcs11.CKM_RSA_PKCS || string(msg) != premaster.SecretMessage {
				t.Errorf("C_Sign(0x%x, %q); want CKM_RSA_PKCS of the bare SecretMessage", p.mech, msg)
			}
			time.Sleep(10 * time.Millisecond) // callers arrive meanwhile
			return rawSign(msg)
		}
		k := newKey(p, true, true)
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				if got, err := k.rejectionSecret(ctx); err != nil || string(got) != string(want) {
					t.Errorf("rejectionSecret() = %x, %v; want %x", got, err, want)
				}
			})
		}
		wg.Wait()
		check(t, k, 1, 0)
	})

	t.Run("raw decryption where the key cannot sign with CKM_RSA_PKCS", func(t *testing.T) {
		check(t, newKey(token(), false, true), 0, 1)
	})

	t.Run("raw decryption where the token refuses the signature", func(t *testing.T) {
		check(t, newKey(token(pkcs11.Error(pkcs11.CKR_FUNCTION_FAILED)), true, true), 0, 1)
	})

	t.Run("a failure is an error, and the next call tries again", func(t *testing.T) {
		k := newKey(token(pkcs11.Error(pkcs11.CKR_FUNCTION_FAILED)), true, false)
		if _, err := k.DecryptPremaster(ctx, make([]byte, priv.Size())); err == nil {
			t.Fatal("DecryptPremaster() succeeded though the secret could not be computed")
		}
		check(t, k, 1, 0)
	})

	t.Run("a secret that does not verify is refused", func(t *testing.T) {
		p := newStubP11()
		p.sign = func(msg []byte) ([]byte, error) {
			sig, err := rsa.SignPKCS1v15(nil, priv, 0, msg)
			sig[len(sig)-1] ^= 1 // a faulty computation
			return sig, err
		}
		k := newKey(p, true, false)
		if _, err := k.rejectionSecret(ctx); !errors.Is(err, ErrFaultySignature) {
			t.Fatalf("rejectionSecret() = %v; want ErrFaultySignature", err)
		}
		if k.secret.Load() != nil {
			t.Fatal("a faulty secret was kept")
		}
	})

	t.Run("a waiting caller's context bounds its wait", func(t *testing.T) {
		k := newKey(newStubP11(), true, false)
		k.computing <- struct{}{} // another caller is computing
		defer func() { <-k.computing }()
		short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
		defer cancel()
		if _, err := k.rejectionSecret(short); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("rejectionSecret() = %v; want context.DeadlineExceeded", err)
		}
	})
}

func TestDecryptPremasterStub(t *testing.T) {
	priv := testRSAKey()
	pms := make([]byte, 48)
	rand.Read(pms)
	valid, _ := rsa.EncryptPKCS1v15(rand.Reader, &priv.PublicKey, pms)
	ctx := t.Context()

	t.Run("token sees only in-range ciphertexts", func(t *testing.T) {
		p := newStubP11()
		var bad int
		p.decrypt = func(mech uint, in []byte) ([]byte, error) {
			if mech != pkcs11.CKM_RSA_X_509 || len(in) != priv.Size() || new(big.Int).SetBytes(in).Cmp(priv.N) >= 0 {
				bad++
			}
			return rawRSA(priv, in, true), nil // a token that strips leading zeros
		}
		k := newStubRSAKey(newStubModule(p, 2), true)
		for _, ct := range [][]byte{nil, {}, valid[1:], append([]byte{0}, valid...), make([]byte, 4096), priv.N.Bytes(), bytesOf(0xff, priv.Size())} {
			out, err := k.DecryptPremaster(ctx, ct)
			if err != nil || len(out) != 48 {
				t.Fatalf("DecryptPremaster(%d bytes) = %d bytes, %v", len(ct), len(out), err)
			}
		}
		if bad != 0 {
			t.Errorf("the token was given %d malformed ciphertexts", bad)
		}
		out, err := k.DecryptPremaster(ctx, valid)
		if err != nil || string(out) != string(pms) {
			t.Errorf("DecryptPremaster(valid) = %x, %v; want %x", out, err, pms)
		}
	})

	tests := []struct {
		name    string
		raw     bool
		errs    []error
		result  func(in []byte) []byte
		wantErr bool
		wantPMS bool
	}{
		{"raw: device error", true, []error{pkcs11.Error(pkcs11.CKR_DEVICE_ERROR), pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)}, nil, true, false},
		{"raw: device removed", true, []error{pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED)}, nil, true, false},
		{"raw: session closed by someone else, healed", true, []error{pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID)}, nil, false, true},
		{"raw: logged out, healed", true, []error{pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN)}, nil, false, true},
		{"raw: result longer than the modulus", true, nil, func([]byte) []byte { return make([]byte, 300) }, true, false},
		{"fallback: valid", false, nil, nil, false, true},
		{"fallback: bad padding (SoftHSM)", false, []error{pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)}, nil, false, false},
		{"fallback: bad padding", false, []error{pkcs11.Error(pkcs11.CKR_ENCRYPTED_DATA_INVALID)}, nil, false, false},
		{"fallback: wrong length", false, nil, func([]byte) []byte { return make([]byte, 47) }, false, false},
		{"fallback: device removed", false, []error{pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED)}, nil, true, false},
		{"fallback: session closed, healed", false, []error{pkcs11.Error(pkcs11.CKR_SESSION_CLOSED)}, nil, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := newStubP11()
			p.errs = tt.errs
			p.decrypt = func(mech uint, in []byte) ([]byte, error) {
				if tt.result != nil {
					return tt.result(in), nil
				}
				if mech == pkcs11.CKM_RSA_PKCS {
					return rsa.DecryptPKCS1v15(nil, priv, in)
				}
				return rawRSA(priv, in, false), nil
			}
			k := newStubRSAKey(newStubModule(p, 2), tt.raw)
			out, err := k.DecryptPremaster(ctx, valid)
			if (err != nil) != tt.wantErr {
				t.Fatalf("DecryptPremaster() = %x, %v; want error %t", out, err, tt.wantErr)
			}
			if err != nil {
				return
			}
			if len(out) != 48 || (string(out) == string(pms)) != tt.wantPMS {
				t.Fatalf("DecryptPremaster() = %x; want the premaster: %t", out, tt.wantPMS)
			}
			if !tt.raw && p.mech != pkcs11.CKM_RSA_PKCS {
				t.Errorf("fallback used mechanism 0x%x", p.mech)
			}
		})
	}
}

func bytesOf(b byte, n int) []byte {
	out := make([]byte, n)
	for i := range out {
		out[i] = b
	}
	return out
}

func TestCheckPremaster(t *testing.T) {
	const k = 256
	msg := bytesOf(0xab, 48)
	blockWith := func(edit func(em []byte)) []byte {
		em := bytesOf(0x11, k)
		em[0], em[1], em[k-49] = 0, 2, 0
		copy(em[k-48:], msg)
		if edit != nil {
			edit(em)
		}
		return em
	}
	for _, tt := range []struct {
		name  string
		em    []byte
		valid int
		want  bool
	}{
		{"valid", blockWith(nil), 1, true},
		{"input flagged invalid", blockWith(nil), 0, false},
		{"first byte", blockWith(func(em []byte) { em[0] = 1 }), 1, false},
		{"second byte", blockWith(func(em []byte) { em[1] = 1 }), 1, false},
		{"no separator", blockWith(func(em []byte) { em[k-49] = 1 }), 1, false},
		{"separator at 9 (7 bytes of padding)", blockWith(func(em []byte) { em[9] = 0 }), 1, false},
		{"separator at 10 (8 bytes of padding), 245-byte message", blockWith(func(em []byte) { em[10] = 0 }), 1, false},
		{"payload 49", blockWith(func(em []byte) { em[k-50], em[k-49] = 0, 0xab }), 1, false},
		{"payload 47", blockWith(func(em []byte) { em[k-49], em[k-48] = 0x11, 0 }), 1, false},
		{"valid payload starting with zero", blockWith(func(em []byte) { em[k-48] = 0 }), 1, true},
		{"payload 0", blockWith(func(em []byte) { em[k-49], em[k-1] = 0xab, 0 }), 1, false},
		{"too short for a premaster", blockWith(nil)[k-58:], 1, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			random := bytesOf(0x5a, 48)
			out := append([]byte(nil), random...)
			checkPremaster(out, tt.em, tt.valid)
			if got := string(out) == string(tt.em[len(tt.em)-48:]); got != tt.want {
				t.Errorf("accepted = %t, want %t", got, tt.want)
			}
			if !tt.want && string(out) != string(random) {
				t.Errorf("rejected block changed the output to %x", out)
			}
		})
	}
	// Eight bytes of padding and a 48-byte message is the smallest valid
	// block.
	em := append([]byte{0, 2}, bytesOf(1, 8)...)
	em = append(append(em, 0), msg...)
	out := make([]byte, 48)
	if checkPremaster(out, em, 1); string(out) != string(msg) {
		t.Error("minimal valid block rejected")
	}
}

// faultySigner signs with a real key and can corrupt or delay the result.
type faultySigner struct {
	crypto.Signer
	corrupt bool
	block   chan struct{}
	opts    crypto.SignerOpts
}

func (s *faultySigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	s.opts = opts
	if s.block != nil {
		<-s.block
	}
	sig, err := s.Signer.Sign(r, digest, opts)
	if s.corrupt && err == nil {
		sig[len(sig)/2] ^= 1
	}
	return sig, err
}

func TestFaultySignatures(t *testing.T) {
	m := newStubModule(newStubP11(), 2)
	ctx := t.Context()
	digest := make([]byte, 32)
	rand.Read(digest)
	pssOpts := &rsa.PSSOptions{SaltLength: 32, Hash: crypto.SHA256}

	priv := testRSAKey()
	ecPriv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for _, corrupt := range []bool{false, true} {
		rs := &faultySigner{Signer: priv, corrupt: corrupt}
		rk := &rsaKey{keyBase: keyBase{m: m, label: "r"}, pub: &priv.PublicKey, signer: rs, mechs: keyMechanisms{pss: true, pkcs1: true}}
		es := &faultySigner{Signer: ecPriv, corrupt: corrupt}
		ek := &ecdsaKey{keyBase: keyBase{m: m, label: "e", schemes: ecdsaSchemes(keyMechanisms{ecdsa: true}, 256)}, pub: &ecPriv.PublicKey, signer: es}
		for name, sign := range map[string]func() ([]byte, error){
			"RSA-PSS":   func() ([]byte, error) { return rk.SignContext(ctx, digest, pssOpts) },
			"RSA-PKCS1": func() ([]byte, error) { return rk.SignContext(ctx, digest, crypto.SHA256) },
			"ECDSA":     func() ([]byte, error) { return ek.SignContext(ctx, digest, crypto.SHA256) },
		} {
			sig, err := sign()
			if corrupt && (!errors.Is(err, ErrFaultySignature) || sig != nil) {
				t.Errorf("%s with a faulty token = %x, %v; want ErrFaultySignature", name, sig, err)
			}
			if !corrupt && err != nil {
				t.Errorf("%s = %v", name, err)
			}
		}
		// crypto11 refuses PSSSaltLengthAuto and interprets a salt
		// length literally: it is always given EqualsHash.
		if o, ok := rs.opts.(*rsa.PSSOptions); ok && o.SaltLength != rsa.PSSSaltLengthEqualsHash {
			t.Errorf("crypto11 was given salt length %d", o.SaltLength)
		}
	}

	// Ed25519 through the module's own sessions.
	edPub, edPriv, _ := ed25519.GenerateKey(rand.Reader)
	for _, corrupt := range []bool{false, true} {
		p := newStubP11()
		p.sign = func(msg []byte) ([]byte, error) {
			sig := ed25519.Sign(edPriv, msg)
			if corrupt {
				sig[0] ^= 1
			}
			return sig, nil
		}
		k := &ed25519Key{keyBase: keyBase{m: newStubModule(p, 2), label: "ed", schemes: ed25519Schemes(keyMechanisms{eddsa: true})}, pub: edPub}
		sig, err := k.SignContext(ctx, []byte("message"), crypto.Hash(0))
		if corrupt != errors.Is(err, ErrFaultySignature) || (err == nil && !ed25519.Verify(edPub, []byte("message"), sig)) {
			t.Errorf("Ed25519 (corrupt %t) = %x, %v", corrupt, sig, err)
		}
		if p.mech != ckmEdDSA {
			t.Errorf("Ed25519 used mechanism 0x%x", p.mech)
		}
	}
}

func TestSignDeadline(t *testing.T) {
	m := newStubModule(newStubP11(), 2)
	priv := testRSAKey()
	s := &faultySigner{Signer: priv, block: make(chan struct{})}
	defer close(s.block)
	k := &rsaKey{keyBase: keyBase{m: m, label: "slow"}, pub: &priv.PublicKey, signer: s, mechs: keyMechanisms{pkcs1: true}}
	ctx, cancel := contextWithTimeout(t, 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := k.SignContext(ctx, make([]byte, 32), crypto.SHA256)
	if !errors.Is(err, errDeadline) {
		t.Fatalf("SignContext() = %v, want context.DeadlineExceeded", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("SignContext() returned after %v, want about 50ms", d)
	}
}

func TestSessionPool(t *testing.T) {
	p := newStubP11()
	pool := newSessionPool(p, 0, "pin", 1, 50*time.Millisecond)
	ctx := t.Context()
	sh, err := pool.get(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pool.get(ctx); !errors.Is(err, errPoolTimeout) {
		t.Errorf("get() from a full pool = %v, want errPoolTimeout", err)
	}
	cctx, cancel := contextWithTimeout(t, time.Millisecond)
	defer cancel()
	pool.wait = time.Minute
	if _, err := pool.get(cctx); !errors.Is(err, errDeadline) {
		t.Errorf("get() from a full pool = %v, want the context's error", err)
	}
	pool.put(sh, false)
	sh2, err := pool.get(ctx)
	if err != nil || sh2 != sh {
		t.Errorf("get() = %v, %v; want the idle session %v", sh2, err, sh)
	}
	pool.put(sh2, true) // broken: closed, not kept
	if p.open[sh.sh] {
		t.Error("a broken session was not closed")
	}
	if p.logins != 1 {
		t.Errorf("logins = %d, want 1", p.logins)
	}
	sh3, _ := pool.get(ctx)
	pool.put(sh3, false)
	pool.close()
	if len(p.open) != 0 {
		t.Errorf("%d sessions open after close", len(p.open))
	}
	if _, err := pool.get(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("get() after close = %v, want ErrClosed", err)
	}
}

// TestOpenChecksBeforeCrypto11 checks that Open finds the token and checks
// the PIN before it calls crypto11.Configure, whose failure would finalise
// the library under every other Module.
func TestOpenChecksBeforeCrypto11(t *testing.T) {
	lib := t.TempDir() + "/lib.so"
	if err := writeFile(lib); err != nil {
		t.Fatal(err)
	}
	path, _ := canonicalPath(lib)
	newLib := func() *stubP11 {
		p := newStubP11()
		p.slots = []uint{7}
		p.tokens[7] = pkcs11.TokenInfo{Label: "tok", SerialNumber: "s1", Flags: pkcs11.CKF_TOKEN_INITIALIZED}
		return p
	}
	cfg := Config{ModulePath: lib, TokenLabel: "tok", PIN: "secret-pin"}
	for _, tt := range []struct {
		name          string
		edit          func(p *stubP11, c *Config)
		configureErr  error
		openBefore    int
		wantErr       string
		wantConfigure bool
	}{
		{"wrong PIN", func(p *stubP11, c *Config) { p.loginErr = pkcs11.Error(pkcs11.CKR_PIN_INCORRECT) }, nil, 0, "CKR_PIN_INCORRECT", false},
		{"wrong PIN, library in use", func(p *stubP11, c *Config) {
			p.loginErr = pkcs11.Error(pkcs11.CKR_PIN_INCORRECT)
			p.initErr = pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)
		}, nil, 1, "CKR_PIN_INCORRECT", false},
		{"no such token", func(p *stubP11, c *Config) { c.TokenLabel = "other" }, nil, 0, `no token with label "other" in module`, false},
		{"two tokens with the label", func(p *stubP11, c *Config) {
			p.slots = append(p.slots, 8)
			p.tokens[8] = p.tokens[7]
		}, nil, 0, "2 tokens have label", false},
		{"PIN locked", func(p *stubP11, c *Config) {
			ti := p.tokens[7]
			ti.Flags |= pkcs11.CKF_USER_PIN_LOCKED
			p.tokens[7] = ti
		}, nil, 0, "locked", false},
		{"library initialised by someone else", func(p *stubP11, c *Config) {
			p.initErr = pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)
		}, nil, 0, "initialised outside package hsm", false},
		{"crypto11 fails", func(p *stubP11, c *Config) {}, errors.New("boom"), 0, "crypto11: open token \"tok\": boom", true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := newLib()
			c := cfg
			tt.edit(p, &c)
			configured := false
			loaded := 0
			d := deps{
				// Every instance shares the library's state, as SoftHSM's
				// do; only the first is the module's (Open looks at a
				// second to tell a per-instance library apart).
				newP11: func(string) p11API {
					if loaded++; loaded == 1 {
						return p
					}
					return &sharedInstance{p}
				},
				configure: func(c11cfg *crypto11.Config) (c11Context, error) {
					configured = true
					if *c11cfg.SlotNumber != 7 || c11cfg.PoolWaitTimeout == 0 {
						t.Errorf("crypto11 config: slot %d, wait %v", *c11cfg.SlotNumber, c11cfg.PoolWaitTimeout)
					}
					return nil, tt.configureErr
				},
			}
			libraries.Lock()
			libraries.open[path] = tt.openBefore
			libraries.Unlock()
			defer func() {
				libraries.Lock()
				delete(libraries.open, path)
				libraries.Unlock()
			}()
			m, err := open(c, d)
			if err == nil {
				m.Close()
				t.Fatal("open() succeeded")
			}
			if !contains(err.Error(), tt.wantErr) || contains(err.Error(), c.PIN) {
				t.Errorf("open() = %v; want an error containing %q and not the PIN", err, tt.wantErr)
			}
			if configured != tt.wantConfigure {
				t.Errorf("crypto11.Configure called: %t, want %t", configured, tt.wantConfigure)
			}
			if p.destroyed != 1 || len(p.open) != 0 {
				t.Errorf("Destroy called %d times, %d sessions left open", p.destroyed, len(p.open))
			}
			// A library this Open initialised is finalised again, one
			// that was in use is not.
			owned := p.initErr == nil
			if owned != (p.finalized == 1) {
				t.Errorf("Finalize called %d times (library initialised by Open: %t)", p.finalized, owned)
			}
			libraries.Lock()
			n := libraries.open[path]
			libraries.Unlock()
			if n != tt.openBefore {
				t.Errorf("open module count = %d, want %d", n, tt.openBefore)
			}
		})
	}
}

// sharedInstance is another instance of a stub library that shares its
// state, as every C_GetFunctionList of SoftHSM does, but is loaded and
// destroyed on its own.
type sharedInstance struct{ *stubP11 }

func (sharedInstance) Destroy() {}

// separateInstance is another instance of a per-instance stub library, as
// p11-kit's client gives each C_GetFunctionList: not initialised, whatever
// the first instance's state.
type separateInstance struct{ *stubP11 }

func (separateInstance) GetSlotList(bool) ([]uint, error) {
	return nil, pkcs11.Error(pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED)
}
func (separateInstance) Destroy() {}

// TestOpenPerInstanceLibrary checks how Open treats a library whose
// instances do not share their initialisation (p11-kit's client): crypto11
// is given a path of its own, a symlink to the library in a private
// directory, so that it initialises and finalises an instance of its own;
// the process-wide count of crypto11 contexts is left alone; and when
// crypto11 fails, the module's own instance is finalised and the path is
// removed.
func TestOpenPerInstanceLibrary(t *testing.T) {
	lib := t.TempDir() + "/lib.so"
	if err := writeFile(lib); err != nil {
		t.Fatal(err)
	}
	path, _ := canonicalPath(lib)
	p := newStubP11()
	p.slots = []uint{7}
	p.tokens[7] = pkcs11.TokenInfo{Label: "tok", Flags: pkcs11.CKF_TOKEN_INITIALIZED}
	loaded := 0
	var c11Path string
	d := deps{
		newP11: func(string) p11API {
			if loaded++; loaded == 1 {
				return p
			}
			return separateInstance{p}
		},
		configure: func(c *crypto11.Config) (c11Context, error) {
			c11Path = c.Path
			if c.Path == path {
				t.Errorf("crypto11 got the library's own path %s; want one of its own", path)
			}
			if real, err := filepath.EvalSymlinks(c.Path); err != nil || real != path {
				t.Errorf("crypto11's path %s leads to %q (%v); want %s", c.Path, real, err, path)
			}
			if fi, err := os.Stat(filepath.Dir(c.Path)); err != nil || fi.Mode().Perm() != 0o700 {
				t.Errorf("crypto11's path is in %s (%v, %v); want a 0700 directory", filepath.Dir(c.Path), fi.Mode(), err)
			}
			return nil, errors.New("boom")
		},
	}
	_, err := open(Config{ModulePath: lib, TokenLabel: "tok", PIN: "secret-pin"}, d)
	if err == nil || !contains(err.Error(), "boom") {
		t.Fatalf("open() = %v; want crypto11's error", err)
	}
	if c11Path == "" {
		t.Fatal("crypto11.Configure was not called")
	}
	if _, err := os.Lstat(filepath.Dir(c11Path)); !os.IsNotExist(err) {
		t.Errorf("crypto11's path %s was not removed: %v", c11Path, err)
	}
	if p.finalized != 1 || p.destroyed != 1 || len(p.open) != 0 {
		t.Errorf("the module's instance: Finalize %d, Destroy %d, %d sessions open; want 1, 1, 0", p.finalized, p.destroyed, len(p.open))
	}
	libraries.Lock()
	n := libraries.open[path]
	libraries.Unlock()
	if n != 0 {
		t.Errorf("libraries.open[%s] = %d, want 0: a per-instance library is not shared", path, n)
	}
}

// TestSessionsFor checks how MaxSessions is fitted to the token's session
// limit: crypto11's MaxSessions and the module's MaxSessions-1 stay within
// the lower of ulMaxSessionCount and ulMaxRwSessionCount, never below 2;
// 0, all ones and values of 2^32 and above (openCryptoki's
// 0xFFFFFFFFFFFFFFFE) are no limit.
func TestSessionsFor(t *testing.T) {
	const huge = uint(0xFFFFFFFFFFFFFFFE)
	for _, tt := range []struct {
		want       int
		max, maxRW uint
		got        int
		limit      uint
	}{
		{8, pkcs11.CK_EFFECTIVELY_INFINITE, pkcs11.CK_EFFECTIVELY_INFINITE, 8, 0},
		{8, pkcs11.CK_UNAVAILABLE_INFORMATION, pkcs11.CK_UNAVAILABLE_INFORMATION, 8, 0},
		{8, huge, huge, 8, 0},
		{8, 15, 0, 8, 15},  // 8 + 7 fit exactly
		{8, 14, 0, 7, 14},  // 7 + 6
		{8, 0, 10, 5, 10},  // the read-write limit counts too
		{8, 20, 6, 3, 6},   // the lower of the two
		{8, 2, huge, 2, 2}, // never below 2
		{1024, 100, 0, 50, 100},
	} {
		got, limit := sessionsFor(tt.want, pkcs11.TokenInfo{MaxSessionCount: tt.max, MaxRwSessionCount: tt.maxRW})
		if got != tt.got || limit != tt.limit {
			t.Errorf("sessionsFor(%d, max %#x, max rw %#x) = %d, %d; want %d, %d", tt.want, tt.max, tt.maxRW, got, limit, tt.got, tt.limit)
		}
	}
}

// TestOpenFitsSessionsToToken checks that Open gives crypto11 the
// MaxSessions fitted to the token's limit.
func TestOpenFitsSessionsToToken(t *testing.T) {
	lib := t.TempDir() + "/lib.so"
	if err := writeFile(lib); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		limit uint
		want  int
	}{{10, 5}, {0xFFFFFFFFFFFFFFFE, DefaultMaxSessions}} {
		p := newStubP11()
		p.slots = []uint{7}
		p.tokens[7] = pkcs11.TokenInfo{Label: "tok", Flags: pkcs11.CKF_TOKEN_INITIALIZED, MaxSessionCount: tt.limit, MaxRwSessionCount: tt.limit}
		got := 0
		d := deps{
			newP11: func(string) p11API { return sharedInstance{p} },
			configure: func(c *crypto11.Config) (c11Context, error) {
				got = c.MaxSessions
				return nil, errors.New("boom")
			},
		}
		if _, err := open(Config{ModulePath: lib, TokenLabel: "tok", PIN: "secret-pin"}, d); err == nil {
			t.Fatal("open() succeeded with a failing crypto11")
		}
		if got != tt.want {
			t.Errorf("token limit %#x: crypto11 MaxSessions = %d, want %d", tt.limit, got, tt.want)
		}
	}
}
