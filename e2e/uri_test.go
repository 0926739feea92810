package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// uriPolicy lets the link's edge sign with the keys of the certificates
// under uri.test.
const uriPolicy = `rules:
  - name: web
    identities: [spiffe://e2e.internal/edge/1]
    keys: [cert:*.uri.test]
    operations: [sign]
    schemes: [default]
`

// TestTokenURIServesSelectedKey starts a keyserver whose token and key are
// named by one PKCS #11 URI (-token-uri ...;object=a.uri.test), on a token
// that also holds b.uri.test. An edge with a.uri.test's certificate serves
// HTTPS through it; an edge that also has b.uri.test's certificate refuses
// to start, because the keyserver does not serve that key.
func TestTokenURIServesSelectedKey(t *testing.T) {
	env, token := procToken(t)
	module, pinFile := token[1], token[5]
	dir := t.TempDir()
	web := newTestCA(t, "e2e uri web CA")
	both := filepath.Join(dir, "both")
	onlyA := filepath.Join(dir, "only-a")
	os.Mkdir(both, 0o755)
	os.Mkdir(onlyA, 0o755)
	for _, name := range []string{"a.uri.test", "b.uri.test"} {
		if out, err := run(t, env, "keyserver", append([]string{"keys", "generate", "-type", "ecdsa", "-label", name}, token...)...); err != nil {
			t.Fatalf("keyserver keys generate %s: %v\n%s", name, err, out)
		}
		// The CSR names its key by a URI holding the token, module and PIN.
		keyURI := "pkcs11:token=e2e;object=" + name + "?module-path=" + module + "&pin-source=file:" + pinFile
		out, err := run(t, env, "keyserver", "keys", "csr", "-key", keyURI, "-dns", name)
		if err != nil {
			t.Fatalf("keyserver keys csr -key %s: %v\n%s", keyURI, err, out)
		}
		block, _ := pem.Decode([]byte(out))
		if block == nil {
			t.Fatalf("keyserver keys csr printed no PEM:\n%s", out)
		}
		csr, err := x509.ParseCertificateRequest(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		cert := web.issue(t, csr.PublicKey, x509.ExtKeyUsageServerAuth, csr.DNSNames)
		writeCert(t, both, name+".pem", cert)
		if name == "a.uri.test" {
			writeCert(t, onlyA, name+".pem", cert)
		}
	}
	link := newLinkPKI(t)
	policy := filepath.Join(dir, "policy.yaml")
	os.WriteFile(policy, []byte(uriPolicy), 0o644)

	tokenURI := "pkcs11:token=e2e;object=a.uri.test?module-path=" + module + "&pin-source=file:" + pinFile
	ks := startProc(t, env, "keyserver", "serve", "-listen", "127.0.0.1:0", "-token-uri", tokenURI,
		"-tls-cert", link.serverCert, "-tls-key", link.serverKey, "-client-ca", link.caFile,
		"-policy", policy, "-certs", both, "-audit-log", filepath.Join(dir, "audit.log"))
	ksAddr := ks.waitFor(t, readyKeyserver)[1]
	if logs := ks.out.String(); !strings.Contains(logs, "label=a.uri.test") || strings.Contains(logs, "label=b.uri.test") {
		t.Errorf("the keyserver's log does not show a.uri.test alone as served:\n%s", logs)
	}
	if !strings.Contains(ks.out.String(), "keys=1") {
		t.Errorf("the keyserver does not report one key:\n%s", ks.out.String())
	}

	origin := startProc(t, nil, "demo-origin", "-listen", "127.0.0.1:0")
	originAddr := origin.waitFor(t, readyOrigin)[1]
	edgeArgs := func(certs string) []string {
		return []string{"-listen", "127.0.0.1:0", "-certs", certs, "-origin", "http://" + originAddr,
			"-keyserver", ksAddr, "-keyserver-name", link.serverName, "-keyserver-ca", link.caFile,
			"-tls-cert", link.edgeCert, "-tls-key", link.edgeKey}
	}

	edge := startProc(t, nil, "edge", edgeArgs(onlyA)...)
	edgeAddr := edge.waitFor(t, readyEdge)[1]
	roots := x509.NewCertPool()
	roots.AddCert(web.cert)
	c := &chain{edgeAddr: edgeAddr}
	st, body, err := c.get(t, &tls.Config{ServerName: "a.uri.test", RootCAs: roots, MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatalf("HTTPS request for a.uri.test through the edge: %v", err)
	}
	if !st.HandshakeComplete || body == "" {
		t.Errorf("handshake complete %t, body %q", st.HandshakeComplete, body)
	}

	// An edge that also has b.uri.test's certificate must not start when
	// it requires every certificate (by default it skips that one).
	bad := startProc(t, nil, "edge", append(edgeArgs(both), "-require-all-certs")...)
	select {
	case <-bad.done:
	case <-time.After(20 * time.Second):
		t.Fatalf("the edge with b.uri.test's certificate did not exit:\n%s", bad.out.String())
	}
	if bad.err == nil {
		t.Errorf("the edge with b.uri.test's certificate exited with status 0")
	}
	if out := bad.out.String(); !regexp.MustCompile(`no key for .*b\.uri\.test`).MatchString(out) {
		t.Errorf("the edge's error does not name b.uri.test's key as missing:\n%s", out)
	}
}
