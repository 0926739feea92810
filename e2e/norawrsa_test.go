package e2e

import (
	"bufio"
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"math"
	"math/big"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/keyless-tls/keyless/hsm"
	"github.com/keyless-tls/keyless/hsm/hsmtest"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
	"github.com/keyless-tls/keyless/signer"
)

// The decrypt path on a token without raw RSA (CKM_RSA_X_509), as on
// FIPS-mode HSMs: SoftHSM configured with slots.mechanisms (a real
// configuration, not a test switch), read by keyserver processes. The
// keyserver then decrypts with CKM_RSA_PKCS and masks every error that can
// depend on the ciphertext.

// noRawPolicy lets the link's edge decrypt with any key.
const noRawPolicy = `
rules:
  - name: decrypt
    identities: [spiffe://e2e.internal/edge/1]
    keys: ["*"]
    operations: [sign, decrypt]
    schemes: [default]
`

// noRawKeyserver is a keyserver process on a token seen through
// hsmtest.NoRawRSAConf.
type noRawKeyserver struct {
	proc   *proc
	client keylessv1.KeylessServiceClient
	audit  string // its audit log file
}

// noRawSetup makes a SoftHSM token with an RSA-2048 key, opened in this
// process with raw RSA, and checks with pkcs11-tool that the no-raw
// configuration really takes CKM_RSA_X_509 away.
func noRawSetup(t testing.TB) (tok *hsmtest.Token, conf string, key *rsa.PublicKey, local signer.PremasterDecrypter, token []string) {
	t.Helper()
	tok = hsmtest.New(t)
	conf = hsmtest.NoRawRSAConf(t)
	m := tok.Open(t)
	k, err := m.Generate(t.Context(), hsm.KeySpec{Type: hsm.KeyTypeRSA, Bits: 2048, Label: "rsa.noraw.test"})
	if err != nil {
		t.Fatal(err)
	}
	mechs := func(env string) string {
		out, err := run(t, []string{"SOFTHSM2_CONF=" + env}, "pkcs11-tool", "--module", tok.ModulePath, "--token-label", tok.Label, "-M")
		if err != nil {
			t.Fatalf("pkcs11-tool -M: %v\n%s", err, out)
		}
		return out
	}
	if out := mechs(os.Getenv("SOFTHSM2_CONF")); !strings.Contains(out, "RSA-X-509") {
		t.Fatalf("SoftHSM's usual configuration offers no RSA-X-509:\n%s", out)
	}
	if out := mechs(conf); strings.Contains(out, "RSA-X-509") || !strings.Contains(out, "RSA-PKCS,") {
		t.Fatalf("with slots.mechanisms = %s, pkcs11-tool -M lists:\n%s\nwant RSA-PKCS and no RSA-X-509", hsmtest.NoRawRSAMechanisms, out)
	}
	dir := t.TempDir()
	pin := filepath.Join(dir, "pin")
	if err := os.WriteFile(pin, []byte(tok.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	token = []string{"-module", tok.ModulePath, "-token-label", tok.Label, "-pin-file", pin}
	return tok, conf, k.Public().(*rsa.PublicKey), k.(signer.PremasterDecrypter), token
}

var fallbackWarning = regexp.MustCompile(`CKM_RSA_X_509 is unavailable, so RSA premaster decryption falls back to CKM_RSA_PKCS.*keys_affected=1 token_has_rsa_x_509=false`)

// startNoRawKeyserver starts a keyserver process that sees the token
// through conf, checks that it warns of the fallback, and dials it.
func startNoRawKeyserver(t testing.TB, conf string, token []string, pki *linkPKI) *noRawKeyserver {
	t.Helper()
	return startDecryptKeyserver(t, conf, token, pki, true)
}

// startDecryptKeyserver starts a keyserver process that sees the token
// through conf, checks that it warns of the CKM_RSA_PKCS fallback if and
// only if fallback is set, and dials it.
func startDecryptKeyserver(t testing.TB, conf string, token []string, pki *linkPKI, fallback bool) *noRawKeyserver {
	t.Helper()
	dir := t.TempDir()
	policy := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(policy, []byte(noRawPolicy), 0o644); err != nil {
		t.Fatal(err)
	}
	ks := &noRawKeyserver{audit: filepath.Join(dir, "audit.log")}
	args := append([]string{"serve", "-listen", "127.0.0.1:0",
		"-tls-cert", pki.serverCert, "-tls-key", pki.serverKey, "-client-ca", pki.caFile,
		"-policy", policy, "-audit-log", ks.audit}, token...)
	ks.proc = startProc(t, []string{"SOFTHSM2_CONF=" + conf}, "keyserver", args...)
	addr := ks.proc.waitFor(t, readyKeyserver)[1]
	if fallbackWarning.MatchString(ks.proc.out.String()) != fallback {
		t.Fatalf("the keyserver warned that it decrypts through the CKM_RSA_PKCS fallback: %t, want %t:\n%s",
			!fallback, fallback, ks.proc.out.String())
	}
	clientTLS, err := link.ClientMTLSConfig(pki.edgeCert, pki.edgeKey, pki.caFile, pki.serverName)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(credentials.NewTLS(clientTLS)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ks.client = keylessv1.NewKeylessServiceClient(conn)
	return ks
}

// decrypt asks ks to decrypt ct, which must answer OK with 48 bytes.
func (ks *noRawKeyserver) decrypt(t testing.TB, id link.KeyID, ct []byte) []byte {
	t.Helper()
	resp, err := ks.client.Decrypt(t.Context(), &keylessv1.DecryptRequest{KeyId: id[:], EncryptedPremaster: ct})
	if err != nil {
		t.Fatalf("Decrypt() = %v, want OK whatever the ciphertext", err)
	}
	if n := len(resp.GetPremaster()); n != 48 {
		t.Fatalf("Decrypt() returned %d bytes, want 48", n)
	}
	return resp.GetPremaster()
}

// auditRecords returns ks's audit records, each without its time and
// latency, which differ between any two operations.
func (ks *noRawKeyserver) auditRecords(t testing.TB) []string {
	t.Helper()
	f, err := os.Open(ks.audit)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var rec map[string]any
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			t.Fatalf("audit record %q: %v", sc.Text(), err)
		}
		delete(rec, "time")
		delete(rec, "latency_us")
		b, _ := json.Marshal(rec)
		out = append(out, string(b))
	}
	return out
}

// noRawCiphertexts returns a valid ciphertext of premaster and every kind
// of invalid one.
func noRawCiphertexts(pub *rsa.PublicKey, premaster []byte) (valid []byte, invalid []struct {
	name string
	ct   []byte
}) {
	encrypt := func(msg []byte) []byte {
		ct, err := rsa.EncryptPKCS1v15(rand.Reader, pub, msg)
		if err != nil {
			panic(err)
		}
		return ct
	}
	payload := func(n int) []byte { b := make([]byte, n); rand.Read(b); return b }
	block := func(edit func(em []byte)) []byte {
		em := pkcs1Block(pub, premaster, 2)
		edit(em)
		return rawRSAEncrypt(pub, em)
	}
	valid = encrypt(premaster)
	nPlus := func(d int64) []byte {
		return new(big.Int).Add(pub.N, big.NewInt(d)).FillBytes(make([]byte, pub.Size()))
	}
	k := pub.Size()
	invalid = []struct {
		name string
		ct   []byte
	}{
		{"first byte not zero", block(func(em []byte) { em[0] = 1 })},
		{"block type 1", rawRSAEncrypt(pub, pkcs1Block(pub, premaster, 1))},
		{"block type 0", block(func(em []byte) { em[1] = 0 })},
		{"no separator", block(func(em []byte) { em[k-49] = 0xff })},
		{"padding of 7 bytes", block(func(em []byte) { em[9] = 0 })},
		{"padding of 0 bytes", block(func(em []byte) { em[2] = 0 })},
		{"payload of 47 bytes", encrypt(payload(47))},
		{"payload of 49 bytes", encrypt(payload(49))},
		{"payload of 0 bytes", encrypt(nil)},
		{"ciphertext equal to the modulus", nPlus(0)},
		{"ciphertext above the modulus", nPlus(1)},
		{"ciphertext of all ones", bytes.Repeat([]byte{0xff}, k)},
		{"ciphertext zero", make([]byte, k)},
		{"ciphertext one", append(make([]byte, k-1), 1)},
		{"random below the modulus", func() []byte { c := payload(k); c[0] = 0; return c }()},
		{"short", valid[1:]},
		{"long", append(bytes.Clone(valid), 0)},
		{"empty", nil},
		{"oversize", payload(4096)},
	}
	return valid, invalid
}

// TestNoRawRSADecrypt runs the decrypt path's suite on SoftHSM with raw
// RSA disabled, through two keyserver processes: every invalid ciphertext
// is answered OK with 48 bytes, the same from both processes, twice alike,
// and the same as a module with raw RSA answers (so the rejection secret
// does not depend on the mechanism that made it); a valid ciphertext
// yields its premaster; and the audit records of valid and invalid
// ciphertexts are identical but for time and latency.
func TestNoRawRSADecrypt(t *testing.T) {
	_, conf, pub, local, token := noRawSetup(t)
	pki := newLinkPKI(t)
	ks1 := startNoRawKeyserver(t, conf, token, pki)
	ks2 := startNoRawKeyserver(t, conf, token, pki)
	id, _ := link.KeyIDOf(pub)

	premaster := make([]byte, 48)
	rand.Read(premaster)
	valid, invalid := noRawCiphertexts(pub, premaster)
	for i, ks := range []*noRawKeyserver{ks1, ks2} {
		if got := ks.decrypt(t, id, valid); !bytes.Equal(got, premaster) {
			t.Fatalf("keyserver %d: Decrypt(valid) = %x, want the premaster %x", i+1, got, premaster)
		}
	}
	validRecord := ks1.auditRecords(t)
	if len(validRecord) != 1 || !strings.Contains(validRecord[0], `"outcome":"OK"`) {
		t.Fatalf("audit records for the valid ciphertext: %q, want one with outcome OK", validRecord)
	}
	seen := map[string]string{}
	for _, tt := range invalid {
		t.Run(tt.name, func(t *testing.T) {
			a, b, c := ks1.decrypt(t, id, tt.ct), ks1.decrypt(t, id, tt.ct), ks2.decrypt(t, id, tt.ct)
			if !bytes.Equal(a, b) || !bytes.Equal(a, c) {
				t.Fatalf("answers %x, %x (keyserver 1) and %x (keyserver 2); want the same bytes", a, b, c)
			}
			want, err := local.DecryptPremaster(t.Context(), tt.ct)
			if err != nil || !bytes.Equal(a, want) {
				t.Fatalf("the keyservers answered %x, a module with raw RSA %x (%v); want the same rejection", a, want, err)
			}
			if bytes.Equal(a, premaster) {
				t.Fatal("an invalid ciphertext decrypted to the valid premaster")
			}
			if other, ok := seen[string(a)]; ok {
				t.Fatalf("answered as %q was", other)
			}
			seen[string(a)] = tt.name
		})
	}
	records := ks1.auditRecords(t)
	if want := 1 + 2*len(invalid); len(records) != want {
		t.Fatalf("keyserver 1 wrote %d audit records, want %d", len(records), want)
	}
	for i, rec := range records[1:] {
		if rec != validRecord[0] {
			t.Errorf("audit record %d (invalid ciphertext) = %s\nwant the valid ciphertext's %s", i+2, rec, validRecord[0])
		}
	}

	// Signing is untouched by the missing mechanism.
	digest := sha256.Sum256([]byte("no raw RSA"))
	for _, alg := range []keylessv1.SignatureAlgorithm{
		keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA256,
		keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256,
	} {
		resp, err := ks2.client.Sign(t.Context(), &keylessv1.SignRequest{KeyId: id[:], Algorithm: alg, Digest: digest[:]})
		if err != nil {
			t.Fatalf("Sign(%v) = %v", alg, err)
		}
		if alg == keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256 {
			err = rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], resp.GetSignature())
		} else {
			err = rsa.VerifyPSS(pub, crypto.SHA256, digest[:], resp.GetSignature(), &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
		}
		if err != nil {
			t.Errorf("the %v signature does not verify: %v", alg, err)
		}
	}
}

// BenchmarkDecryptNoRawRSA compares the keyserver's time to answer valid
// and invalid ciphertexts on a token without raw RSA ("fallback", where the
// token's own CKM_RSA_PKCS padding check runs for every ciphertext) and, as
// the baseline in the same run, on the same token with raw RSA ("raw").
// Each iteration decrypts one fresh valid ciphertext and one fresh invalid
// one (kinds in turn: bad block type, a 47-byte payload, no separator,
// random below the modulus), in random order, through gRPC with mutual
// TLS. It reports both medians, their ratio, and the two-sample
// Kolmogorov-Smirnov statistic D with its p-value (a small p: the two
// distributions differ), and logs the median of each invalid kind. Run it
// with at least 2000 iterations:
//
//	go test -run '^$' -bench BenchmarkDecryptNoRawRSA -benchtime 2000x ./e2e
//
// docs/SECURITY.md has a measured result.
func BenchmarkDecryptNoRawRSA(b *testing.B) {
	_, conf, pub, _, token := noRawSetup(b)
	pki := newLinkPKI(b)
	for _, bc := range []struct {
		name     string
		conf     string
		fallback bool
	}{
		{"raw", os.Getenv("SOFTHSM2_CONF"), false},
		{"fallback", conf, true},
	} {
		ks := startDecryptKeyserver(b, bc.conf, token, pki, bc.fallback)
		b.Run(bc.name, func(b *testing.B) { benchValidVsInvalid(b, ks, pub) })
	}
}

func benchValidVsInvalid(b *testing.B, ks *noRawKeyserver, pub *rsa.PublicKey) {
	id, _ := link.KeyIDOf(pub)
	premaster := make([]byte, 48)
	kinds := []struct {
		name string
		make func() []byte
	}{
		{"block type 1", func() []byte { return rawRSAEncrypt(pub, pkcs1Block(pub, premaster, 1)) }},
		{"47-byte payload", func() []byte { ct, _ := rsa.EncryptPKCS1v15(rand.Reader, pub, premaster[:47]); return ct }},
		{"no separator", func() []byte {
			em := pkcs1Block(pub, premaster, 2)
			em[pub.Size()-49] = 0xff
			return rawRSAEncrypt(pub, em)
		}},
		{"random", func() []byte { c := make([]byte, pub.Size()); rand.Read(c[1:]); return c }},
	}
	var tValid, tInvalid []float64
	byKind := make([][]float64, len(kinds))
	timed := func(ct []byte) float64 {
		start := time.Now()
		ks.decrypt(b, id, ct)
		return float64(time.Since(start).Microseconds())
	}
	for i := 0; b.Loop(); i++ {
		b.StopTimer()
		rand.Read(premaster)
		valid, _ := rsa.EncryptPKCS1v15(rand.Reader, pub, premaster)
		kind := i % len(kinds)
		invalid := kinds[kind].make()
		b.StartTimer()
		var tv, ti float64
		if mrand.IntN(2) == 0 {
			tv, ti = timed(valid), timed(invalid)
		} else {
			ti, tv = timed(invalid), timed(valid)
		}
		tValid, tInvalid = append(tValid, tv), append(tInvalid, ti)
		byKind[kind] = append(byKind[kind], ti)
	}
	if len(tValid) < 2000 {
		b.Logf("only %d samples of each; run with -benchtime 2000x or more for the comparison", len(tValid))
	}
	mv, mi := median(tValid), median(tInvalid)
	d, p := ksTest(tValid, tInvalid)
	b.ReportMetric(mv, "valid-µs-median")
	b.ReportMetric(mi, "invalid-µs-median")
	b.ReportMetric(mi/mv, "invalid/valid")
	b.ReportMetric(d, "KS-D")
	b.ReportMetric(p, "KS-p")
	var perKind []string
	for k, ts := range byKind {
		perKind = append(perKind, fmt.Sprintf("%s %.0f", kinds[k].name, median(ts)))
	}
	b.Logf("%d valid, %d invalid: median %.0f µs vs %.0f µs (ratio %.3f), mean %.0f vs %.0f µs, KS D=%.4f p=%.3g; invalid medians by kind (µs): %s",
		len(tValid), len(tInvalid), mv, mi, mi/mv, mean(tValid), mean(tInvalid), d, p, strings.Join(perKind, ", "))
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s) == 0 {
		return math.NaN()
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func mean(xs []float64) float64 {
	var sum float64
	for _, x := range xs {
		sum += x
	}
	return sum / float64(len(xs))
}

// ksTest returns the two-sample Kolmogorov-Smirnov statistic of a and b
// (the largest distance between their empirical distribution functions)
// and its asymptotic p-value.
func ksTest(a, b []float64) (d, p float64) {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	i, j := 0, 0
	for i < len(a) && j < len(b) {
		x := min(a[i], b[j])
		for i < len(a) && a[i] == x {
			i++
		}
		for j < len(b) && b[j] == x {
			j++
		}
		d = max(d, math.Abs(float64(i)/float64(len(a))-float64(j)/float64(len(b))))
	}
	n := float64(len(a)) * float64(len(b)) / float64(len(a)+len(b))
	en := math.Sqrt(n)
	lambda := (en + 0.12 + 0.11/en) * d
	for k := 1; k <= 100; k++ {
		term := 2 * math.Pow(-1, float64(k-1)) * math.Exp(-2*float64(k*k)*lambda*lambda)
		p += term
		if math.Abs(term) < 1e-12 {
			break
		}
	}
	return d, min(max(p, 0), 1)
}
