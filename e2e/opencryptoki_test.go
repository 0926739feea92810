package e2e

import (
	"bufio"
	"crypto/tls"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/hsm/hsmtest"
	"github.com/keyless-tls/keyless/signer"
)

// TestOpenCryptokiDeployment runs the deployment — keyserver, edge and
// origin as processes — on openCryptoki's software token, a second PKCS #11
// implementation: the keyserver command generates RSA keys there (and
// refuses an ECDSA one: the token has no EC mechanism), and real TLS
// clients complete TLS 1.3, TLS 1.2 ECDHE-RSA and TLS 1.2 RSA key exchange
// handshakes through the edge, each making the key operation it needs in
// the token.
func TestOpenCryptokiDeployment(t *testing.T) {
	tok := hsmtest.OpenCryptoki(t)
	// The only user in this binary: hand the machine's token back to
	// other test binaries when done (after the processes stop).
	t.Cleanup(hsmtest.ReleaseOpenCryptoki)
	dir := t.TempDir()
	pin := filepath.Join(dir, "pin")
	if err := os.WriteFile(pin, []byte(tok.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	token := []string{"-module", tok.ModulePath, "-token-label", tok.Label, "-pin-file", pin}

	out, err := run(t, nil, "keyserver", append([]string{"keys", "generate", "-type", "ecdsa", "-label", "ock-ecdsa"}, token...)...)
	if err == nil || !strings.Contains(out, "cannot generate P-256 keys (CKM_EC_KEY_PAIR_GEN)") {
		t.Errorf("keyserver keys generate -type ecdsa = %v:\n%s\nwant a refusal naming CKM_EC_KEY_PAIR_GEN", err, out)
	}

	const rsaName, rsa3072Name = "rsa.e2e.test", "rsa3072.e2e.test"
	d := startDeploymentOn(t, deploymentSpec{token: token, link: newLinkPKI(t), policy: deploymentPolicy, defaultCert: rsaName, names: []webName{
		{rsaName, []string{"-type", "rsa", "-bits", "2048"}},
		{rsa3072Name, []string{"-type", "rsa", "-bits", "3072"}},
	}})
	roots := readCertPool(t, d.caFile)
	for _, tt := range []struct {
		name    string
		host    string
		version uint16
		suite   uint16 // 0: TLS 1.3's choice
		op      string // the key operation the handshake needs
	}{
		{"TLS 1.3", rsaName, tls.VersionTLS13, 0, signer.OpSign},
		{"TLS 1.3, RSA-3072", rsa3072Name, tls.VersionTLS13, 0, signer.OpSign},
		{"TLS 1.2 ECDHE-RSA", rsaName, tls.VersionTLS12, tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, signer.OpSign},
		{"TLS 1.2 RSA key exchange", rsaName, tls.VersionTLS12, tls.TLS_RSA_WITH_AES_128_GCM_SHA256, signer.OpDecrypt},
	} {
		t.Run(tt.name, func(t *testing.T) {
			before := auditOps(t, d.auditFile)[tt.op]
			cfg := &tls.Config{ServerName: tt.host, RootCAs: roots, MinVersion: tt.version, MaxVersion: tt.version}
			if tt.suite != 0 {
				cfg.CipherSuites = []uint16{tt.suite}
			}
			conn, err := tls.Dial("tcp", d.edgeAddr, cfg)
			if err != nil {
				t.Fatalf("handshake: %v", err)
			}
			defer conn.Close()
			st := conn.ConnectionState()
			if st.Version != tt.version || (tt.suite != 0 && st.CipherSuite != tt.suite) {
				t.Fatalf("negotiated %s %s, want %s %s", tls.VersionName(st.Version), tls.CipherSuiteName(st.CipherSuite),
					tls.VersionName(tt.version), tls.CipherSuiteName(tt.suite))
			}
			conn.SetDeadline(time.Now().Add(20 * time.Second))
			io.WriteString(conn, "GET / HTTP/1.1\r\nHost: "+tt.host+"\r\nConnection: close\r\n\r\n")
			resp, err := io.ReadAll(conn)
			if err != nil || !strings.HasPrefix(string(resp), "HTTP/1.1 200 ") {
				t.Fatalf("GET through the edge = %v:\n%.300s", err, resp)
			}
			// The audit trail is written before the answer is sent.
			if after := auditOps(t, d.auditFile)[tt.op]; after != before+1 {
				t.Errorf("the keyserver audited %d %s operations with outcome OK, want 1", after-before, tt.op)
			}
		})
	}
}

// auditOps counts the audit records with outcome OK, by operation.
func auditOps(t *testing.T, file string) map[string]int {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ops := map[string]int{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var rec signer.AuditRecord
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			t.Fatalf("audit record %q: %v", sc.Text(), err)
		}
		if rec.Outcome == "OK" {
			ops[rec.Op]++
		}
	}
	return ops
}
