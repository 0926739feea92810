package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// twoEdgePolicy lets two edges, 1 and 2, use every key.
const twoEdgePolicy = `
rules:
  - name: web
    identities: [spiffe://e2e.internal/edge/1, spiffe://e2e.internal/edge/2]
    keys: [cert:*.e2e.test]
    operations: [sign]
    schemes: [default]
`

// writeCRL writes to path a PEM CRL of ca that revokes certs.
func writeCRL(t testing.TB, ca *testCA, path string, certs ...*x509.Certificate) {
	t.Helper()
	tmpl := &x509.RevocationList{Number: big.NewInt(time.Now().UnixNano()), ThisUpdate: time.Now().Add(-time.Minute), NextUpdate: time.Now().Add(24 * time.Hour)}
	for _, c := range certs {
		tmpl.RevokedCertificateEntries = append(tmpl.RevokedCertificateEntries, x509.RevocationListEntry{SerialNumber: c.SerialNumber, RevocationTime: time.Now()})
	}
	der, err := x509.CreateRevocationList(rand.Reader, tmpl, ca.cert, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
}

func readCert(t testing.TB, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(b)
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestStolenEdgeDrill revokes edge A's link certificate with a CRL and
// SIGHUP while both A and B serve handshakes: A's keyserver connection is
// closed and its next key operation refused, B goes on without a failure.
func TestStolenEdgeDrill(t *testing.T) {
	lp := newLinkPKI(t)
	crl := filepath.Join(t.TempDir(), "link-ca.crl")
	writeCRL(t, lp.ca, crl)
	// The load on each edge comes from one address, far above the edge's
	// default per-client limit of full handshakes: turn that off.
	unlimited := []string{"-handshakes-per-client", "0"}
	d := startDeploymentOf(t, lp, twoEdgePolicy, []string{"-client-crl", crl}, unlimited)

	bKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	dir := t.TempDir()
	bCert := writeCert(t, dir, "edge-b.pem", lp.ca.issue(t, bKey.Public(), x509.ExtKeyUsageClientAuth, []string{"edge-b.e2e.internal"}, "spiffe://e2e.internal/edge/2"))
	_, bAddr := d.startEdge(t, bCert, writeKey(t, dir, "edge-b.key", bKey), unlimited...)

	web := &tls.Config{ServerName: "ecdsa.e2e.test", RootCAs: x509.NewCertPool()}
	web.RootCAs.AddCert(readCert(t, d.caFile))
	loadA, loadB := startLoad(d.edgeAddr, 4, web), startLoad(bAddr, 4, web)
	defer loadA.halt()
	defer loadB.halt()
	loadA.waitOK(t, 50)
	loadB.waitOK(t, 50)

	writeCRL(t, lp.ca, crl, readCert(t, lp.edgeCert))
	revokedAt := time.Now()
	d.keyserver.cmd.Process.Signal(syscall.SIGHUP)
	d.keyserver.waitFor(t, regexp.MustCompile(`closing an edge.s connection: its client certificate revoked`))

	// A's handshakes fail from now on: its connection is gone and a new one
	// is refused in the handshake.
	deadline := time.Now().Add(10 * time.Second)
	for loadA.failed.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("edge A still served %d handshakes after its revocation, none failed", loadA.ok.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(time.Second) // handshakes in flight at revocation end
	okA := loadA.ok.Load()
	loadB.waitOK(t, 100)
	if got := loadA.ok.Load(); got != okA {
		t.Errorf("edge A served %d more handshakes after its revocation", got-okA)
	}
	if n := loadB.failed.Load(); n != 0 {
		t.Errorf("edge B: %d handshakes failed, want 0: %s", n, loadB.firstErrors())
	}
	if !strings.Contains(d.keyserver.out.String(), "revoked by a CRL") {
		t.Errorf("the keyserver did not log A's refused reconnection:\n%s", d.keyserver.out.String())
	}
	t.Logf("edge A cut off %v after SIGHUP (first failure); edge B: %d handshakes, 0 failed", time.Since(revokedAt).Round(time.Millisecond), loadB.ok.Load())
}
