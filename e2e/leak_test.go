package e2e

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"testing"

	"google.golang.org/grpc/status"

	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
)

// TestNoSecretsLeak runs a whole deployment (keyserver, edge and origin as
// processes, everything logged at trace level, the audit trail in a file),
// makes handshakes through the edge and sends the keyserver every kind of
// request with known digests and premaster secrets, then looks for the
// PIN, the digests, the signatures, the ciphertexts and the premasters,
// raw, in hex and in base64, in every log line, the audit trail, every
// error returned to a client, and each process's argv and environment.
func TestNoSecretsLeak(t *testing.T) {
	d := startDeploymentWith(t, []string{"-log-level", "trace"}, []string{"-log-level", "trace"})
	var secrets [][]byte
	secrets = append(secrets, []byte(procPIN))
	var clientErrors []string

	// Handshakes through the edge: the keyserver signs and decrypts digests
	// and premasters that the test does not know, but logs them no more.
	webCA := readCertPool(t, d.caFile)
	for _, c := range []*tls.Config{
		{ServerName: "ecdsa.e2e.test", MinVersion: tls.VersionTLS13},
		{ServerName: "rsa.e2e.test", MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{tls.TLS_RSA_WITH_AES_128_GCM_SHA256}},
		{ServerName: "ed25519.e2e.test", MinVersion: tls.VersionTLS13},
	} {
		c.RootCAs = webCA
		conn, err := tls.Dial("tcp", d.edgeAddr, c)
		if err != nil {
			t.Fatalf("handshake with %s: %v", c.ServerName, err)
		}
		conn.Close()
	}

	// Requests with known secrets, straight to the keyserver, as the edge.
	cfg, err := link.ClientMTLSConfig(d.link.edgeCert, d.link.edgeKey, d.link.caFile, d.link.serverName)
	if err != nil {
		t.Fatal(err)
	}
	ks := &secKeyserver{addr: d.keyserverAddr, link: d.link}
	client := ks.client(t, cfg)
	resp, err := client.ListKeys(callCtx(t), &keylessv1.ListKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	keys := map[string]*keylessv1.Key{}
	for _, k := range resp.GetKeys() {
		keys[k.GetLabel()] = k
	}
	if len(keys) != len(webNames) {
		t.Fatalf("ListKeys() = %d keys, want %d", len(keys), len(webNames))
	}
	random := func(n int) []byte {
		b := make([]byte, n)
		rand.Read(b)
		secrets = append(secrets, b)
		return b
	}
	sign := func(label string, alg keylessv1.SignatureAlgorithm, digest []byte) {
		resp, err := client.Sign(callCtx(t), &keylessv1.SignRequest{KeyId: keys[label].GetKeyId(), Algorithm: alg, Digest: digest,
			Context: &keylessv1.RequestContext{ServerName: label, ClientAddress: "192.0.2.1:1234", ConnectionId: "leak"}})
		if err != nil {
			clientErrors = append(clientErrors, err.Error())
			return
		}
		secrets = append(secrets, resp.GetSignature())
	}
	sign("ecdsa.e2e.test", keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA256, random(32))
	sign("p384.e2e.test", keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA384, random(48))
	sign("rsa.e2e.test", keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA256, random(32))
	sign("rsa.e2e.test", keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA512, random(64))
	sign("ed25519.e2e.test", keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ED25519,
		append([]byte(strings.Repeat(" ", 64)+"TLS 1.3, server CertificateVerify\x00"), random(32)...))
	// Refusals, each with a secret in the request.
	sign("rsa.e2e.test", keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PKCS1_SHA1, random(20))        // SHA-1: denied
	sign("rsa.e2e.test", keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA256, random(31))   // wrong length
	sign("ecdsa.e2e.test", keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_RSA_PSS_RSAE_SHA256, random(32)) // wrong key type
	sign("ed25519.e2e.test", keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ED25519, random(100))          // not a TLS message
	unknownKey := make([]byte, 32)                                                                           // a key id is public, not a secret
	rand.Read(unknownKey)
	_, err = client.Sign(callCtx(t), &keylessv1.SignRequest{KeyId: unknownKey, Algorithm: keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA256, Digest: random(32)})
	clientErrors = append(clientErrors, fmt.Sprint(err))

	rsaPub, err := x509.ParsePKIXPublicKey(keys["rsa.e2e.test"].GetPublicKey())
	if err != nil {
		t.Fatal(err)
	}
	decrypt := func(label string, ct []byte) {
		secrets = append(secrets, ct)
		resp, err := client.Decrypt(callCtx(t), &keylessv1.DecryptRequest{KeyId: keys[label].GetKeyId(), EncryptedPremaster: ct})
		if err != nil {
			clientErrors = append(clientErrors, err.Error())
			return
		}
		secrets = append(secrets, resp.GetPremaster())
	}
	pms := append([]byte{3, 3}, random(46)...)
	secrets = append(secrets, pms)
	ct, err := rsa.EncryptPKCS1v15(rand.Reader, rsaPub.(*rsa.PublicKey), pms)
	if err != nil {
		t.Fatal(err)
	}
	decrypt("rsa.e2e.test", ct)
	bad := bytes.Clone(ct)
	bad[0] ^= 0x40
	decrypt("rsa.e2e.test", bad)                          // implicit rejection
	decrypt("ecdsa.e2e.test", ct)                         // denied: decryption is enabled for the RSA key only
	decrypt("rsa.e2e.test", append(random(20000), ct...)) // oversize
	if len(clientErrors) < 6 {
		t.Fatalf("only %d requests failed: %q", len(clientErrors), clientErrors)
	}
	// A client that the handshake refuses.
	stranger := newLinkClientTLS(t, d.link, "spiffe://e2e.internal/edge/stranger")
	_, err = ks.client(t, stranger).ListKeys(callCtx(t), &keylessv1.ListKeysRequest{})
	clientErrors = append(clientErrors, status.Convert(err).Message())

	// Every sink of the run. There are no metrics yet (issue 7 adds a
	// Prometheus endpoint): add its scrape here when it exists.
	sinks := map[string]string{"client errors": strings.Join(clientErrors, "\n")}
	for _, p := range []*proc{d.keyserver, d.edge, d.origin} {
		for _, f := range []string{"cmdline", "environ"} {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", p.cmd.Process.Pid, f))
			if err != nil {
				t.Fatalf("%s %s: %v", p.name, f, err)
			}
			sinks[p.name+" "+f] = string(b)
		}
	}
	for _, p := range []*proc{d.keyserver, d.edge, d.origin} {
		p.stop(t) // flushes whatever is left of the logs
		sinks[p.name+" output"] = p.out.String()
	}
	audit, err := os.ReadFile(d.auditFile)
	if err != nil {
		t.Fatal(err)
	}
	sinks["audit trail"] = string(audit)

	// The sinks hold what they should, so that an empty one cannot pass.
	for name, want := range map[string]string{
		"keyserver output":  "[DEBUG]",
		"audit trail":       `"outcome":"PermissionDenied"`,
		"client errors":     "permission denied",
		"keyserver cmdline": "-pin-file",
	} {
		if !strings.Contains(sinks[name], want) {
			t.Errorf("%s does not contain %q; the test would not see a leak there", name, want)
		}
	}
	if !leaks("x"+base64.StdEncoding.EncodeToString(secrets[1])+"x", secrets[1]) {
		t.Fatal("leaks() does not find a planted secret")
	}
	for name, text := range sinks {
		for i, s := range secrets {
			if leaks(text, s) {
				t.Errorf("%s contains secret %d (%x…)", name, i, s[:min(len(s), 8)])
			}
		}
	}
}

// leaks reports whether text holds s, raw or encoded. Secrets shorter than
// 16 bytes are checked raw only when they are the PIN.
func leaks(text string, s []byte) bool {
	if len(s) < 16 {
		return strings.Contains(text, string(s))
	}
	for _, enc := range []string{
		string(s),
		hex.EncodeToString(s),
		strings.ToUpper(hex.EncodeToString(s)),
		base64.StdEncoding.EncodeToString(s),
		base64.RawStdEncoding.EncodeToString(s),
		base64.URLEncoding.EncodeToString(s),
		base64.RawURLEncoding.EncodeToString(s),
		fmt.Sprintf("%v", s),
	} {
		if strings.Contains(text, enc) {
			return true
		}
	}
	return false
}

func readCertPool(t *testing.T, file string) *x509.CertPool {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(b) {
		t.Fatalf("%s: no certificate", file)
	}
	return p
}

// newLinkClientTLS returns an mTLS client configuration for the link with
// a certificate for uri from the link's CA.
func newLinkClientTLS(t *testing.T, link *linkPKI, uri string) *tls.Config {
	t.Helper()
	ks := &secKeyserver{link: link}
	return ks.clientTLS(t, link.ca, uri)
}
