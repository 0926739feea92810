package e2e

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// ocspResponder is openssl's OCSP responder (openssl ocsp -index) behind
// an HTTP listener on 127.0.0.1: openssl ocsp -port binds every interface,
// so each request is handed to openssl ocsp -reqin/-respout, which answers
// from the same index, CA and signing key as the -port mode would.
type ocspResponder struct {
	url                   string
	dir, index, ca, caKey string
	mu                    sync.Mutex // one openssl at a time: they share files
	requests              int
}

func startOCSPResponder(t *testing.T, caFile, caKey, index string) *ocspResponder {
	t.Helper()
	needTool(t, "openssl")
	r := &ocspResponder{dir: t.TempDir(), index: index, ca: caFile, caKey: caKey}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: r, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	r.url = "http://" + ln.Addr().String() + "/"
	return r
}

func (r *ocspResponder) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	body, err := io.ReadAll(io.LimitReader(req.Body, 1<<16))
	if err != nil || req.Method != http.MethodPost {
		http.Error(w, "want a POSTed OCSP request", http.StatusBadRequest)
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.requests++
	reqFile, respFile := filepath.Join(r.dir, "req.der"), filepath.Join(r.dir, "resp.der")
	os.Remove(respFile)
	if err := os.WriteFile(reqFile, body, 0o600); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	out, err := exec.Command("openssl", "ocsp", "-index", r.index, "-CA", r.ca, "-rsigner", r.ca, "-rkey", r.caKey,
		"-reqin", reqFile, "-respout", respFile, "-nmin", "10").CombinedOutput()
	resp, rerr := os.ReadFile(respFile)
	if err != nil || rerr != nil {
		http.Error(w, fmt.Sprintf("openssl ocsp: %v %v\n%s", err, rerr, out), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/ocsp-response")
	w.Write(resp)
}

// ocspCert issues a certificate for pub naming responder as its OCSP
// responder.
func ocspCert(t *testing.T, ca *testCA, pub crypto.PublicKey, name, responder string) *x509.Certificate {
	t.Helper()
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		OCSPServer:   []string{responder},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// indexLine is a line of an openssl ca index for c: V (valid) or R
// (revoked an hour ago).
func indexLine(c *x509.Certificate, revoked bool) string {
	serial := fmt.Sprintf("%X", c.SerialNumber)
	if len(serial)%2 == 1 {
		serial = "0" + serial
	}
	status, revokedAt := "V", ""
	if revoked {
		status, revokedAt = "R", time.Now().Add(-time.Hour).UTC().Format("060102150405Z")
	}
	return strings.Join([]string{status, c.NotAfter.UTC().Format("060102150405Z"), revokedAt, serial, "unknown", "/CN=" + c.Subject.CommonName}, "\t") + "\n"
}

// deploymentPublicKey returns the public key of a deployment's
// certificate for name (its key is in the keyserver's token).
func deploymentPublicKey(t *testing.T, d *deployment, name string) crypto.PublicKey {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(d.certsDir, name+".pem"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(data)
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c.PublicKey
}

// sClient runs openssl s_client against addr for name with extra args and
// returns its output.
func sClient(t *testing.T, addr, name string, args ...string) string {
	t.Helper()
	args = append([]string{"s_client", "-connect", addr, "-servername", name}, args...)
	cmd := exec.Command("openssl", args...)
	cmd.Stdin = strings.NewReader("")
	out, _ := cmd.CombinedOutput()
	return string(out)
}

// TestOCSPStaplingOpenSSL staples responses of openssl's OCSP responder:
// openssl s_client -status sees a good response for a valid certificate,
// and none for a revoked one, which the edge logs as an error.
func TestOCSPStaplingOpenSSL(t *testing.T) {
	needTool(t, "openssl")
	d := startDeployment(t)
	dir := t.TempDir()
	ca := newTestCA(t, "e2e OCSP CA")
	caFile := writeCert(t, dir, "ocsp-ca.pem", ca.cert)
	caKey := writeKey(t, dir, "ocsp-ca.key", ca.key)
	index := filepath.Join(dir, "index.txt")
	resp := startOCSPResponder(t, caFile, caKey, index)

	pub := deploymentPublicKey(t, d, "ecdsa.e2e.test")
	good := ocspCert(t, ca, pub, "good.e2e.test", resp.url)
	revoked := ocspCert(t, ca, pub, "revoked.e2e.test", resp.url)
	if err := os.WriteFile(index, []byte(indexLine(good, false)+indexLine(revoked, true)), 0o644); err != nil {
		t.Fatal(err)
	}
	writeCert(t, d.certsDir, "good.pem", good, ca.cert)
	writeCert(t, d.certsDir, "revoked.pem", revoked, ca.cert)
	edge, addr := d.startEdge(t, d.link.edgeCert, d.link.edgeKey, "-handshakes-per-client", "0")
	edge.waitFor(t, regexp.MustCompile(`OCSP response stapled: file=\S*good.pem`))
	edge.waitFor(t, regexp.MustCompile(`\[ERROR\] +edge\.ocsp: CERTIFICATE REVOKED: .*file=\S*revoked.pem`))

	out := sClient(t, addr, "good.e2e.test", "-status", "-CAfile", caFile, "-verify_return_error")
	for _, w := range []string{"OCSP Response Status: successful", "Cert Status: good", "Verify return code: 0 (ok)"} {
		if !strings.Contains(out, w) {
			t.Errorf("openssl s_client -status for good.e2e.test lacks %q:\n%s", w, out)
		}
	}
	out = sClient(t, addr, "revoked.e2e.test", "-status", "-CAfile", caFile)
	if !strings.Contains(out, "OCSP response: no response sent") || strings.Contains(out, "Cert Status") {
		t.Errorf("openssl s_client -status for revoked.e2e.test: want no response stapled:\n%s", out)
	}
	// A certificate without a responder staples nothing.
	if out := sClient(t, addr, "ecdsa.e2e.test", "-status", "-CAfile", d.caFile); !strings.Contains(out, "OCSP response: no response sent") {
		t.Errorf("openssl s_client -status for ecdsa.e2e.test: want no response:\n%s", out)
	}
}

// TestUnrecognizedNameOpenSSL checks the alert an unknown server name gets
// from an edge without a default certificate.
func TestUnrecognizedNameOpenSSL(t *testing.T) {
	needTool(t, "openssl")
	d := startDeployment(t)
	_, addr := d.startEdge(t, d.link.edgeCert, d.link.edgeKey, "-default-cert=")
	for _, v := range []string{"-tls1_2", "-tls1_3"} {
		out := sClient(t, addr, "unknown.example.org", v)
		if !strings.Contains(out, "alert number 112") && !strings.Contains(out, "unrecognized name") {
			t.Errorf("openssl s_client %s for an unknown name: want the unrecognized_name alert (112):\n%s", v, out)
		}
		if strings.Contains(out, "internal error") {
			t.Errorf("openssl s_client %s got internal_error:\n%s", v, out)
		}
	}
}

// TestPartialCertificates starts an edge whose certificate directory holds
// a broken file and a certificate whose key no keyserver holds: it serves
// the rest, names both files in its log and counts them; with
// -require-all-certs it refuses to start.
func TestPartialCertificates(t *testing.T) {
	needTool(t, "curl")
	d := startDeployment(t)
	certs := t.TempDir()
	for _, n := range webNames {
		data, err := os.ReadFile(filepath.Join(d.certsDir, n.name+".pem"))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(certs, n.name+".pem"), data, 0o644)
	}
	os.WriteFile(filepath.Join(certs, "broken.pem"), []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), 0o644)
	ca := newTestCA(t, "stray CA")
	writeCert(t, certs, "nokey.pem", ca.issue(t, ca.key.Public(), x509.ExtKeyUsageServerAuth, []string{"nokey.e2e.test"}))

	edge, addr := d.startEdge(t, d.link.edgeCert, d.link.edgeKey, "-certs", certs, "-metrics-listen", "127.0.0.1:0")
	out := edge.out.String()
	for _, f := range []string{"broken.pem", "nokey.pem"} {
		if !regexp.MustCompile(`\[ERROR\] +edge\.certstore: certificate not served: .*file=\S*` + regexp.QuoteMeta(f)).MatchString(out) {
			t.Errorf("the edge's log has no error naming %s:\n%s", f, out)
		}
	}
	metricsAddr := readyEdgeMetrics.FindStringSubmatch(out)[1]
	text := scrape(t, metricsAddr)
	for _, s := range []string{`keyless_edge_certificates_not_served{reason="invalid"}`, `keyless_edge_certificates_not_served{reason="missing_key"}`} {
		if v, ok := metricValue(text, s); !ok || v != 1 {
			t.Errorf("%s = %v (present %v), want 1", s, v, ok)
		}
	}
	_, port, _ := net.SplitHostPort(addr)
	curl := exec.Command("curl", "-sS", "--cacert", d.caFile, "--resolve", "rsa.e2e.test:"+port+":127.0.0.1", "https://rsa.e2e.test:"+port+"/")
	if b, err := curl.CombinedOutput(); err != nil || !strings.Contains(string(b), "hostname:    rsa.e2e.test") {
		t.Errorf("curl https://rsa.e2e.test/: %v\n%s", err, b)
	}

	strict := startProc(t, nil, "edge", "-listen", "127.0.0.1:0", "-certs", certs, "-require-all-certs",
		"-origin", "http://"+d.originAddr, "-keyserver", d.keyserverAddr, "-keyserver-name", d.link.serverName,
		"-keyserver-ca", d.link.caFile, "-tls-cert", d.link.edgeCert, "-tls-key", d.link.edgeKey)
	select {
	case <-strict.done:
	case <-time.After(20 * time.Second):
		t.Fatal("the edge with -require-all-certs did not exit")
	}
	if strict.err == nil || !strings.Contains(strict.out.String(), "broken.pem") || !strings.Contains(strict.out.String(), "nokey.pem") {
		t.Errorf("edge -require-all-certs exited with %v, want an error naming both files:\n%s", strict.err, strict.out.String())
	}
}

// TestClientCertificateCurl requires a client certificate for one name:
// curl without one is refused, with one the origin receives its subject,
// and a forged subject header never reaches the origin.
func TestClientCertificateCurl(t *testing.T) {
	needTool(t, "curl")
	dir := t.TempDir()
	clientCA := newTestCA(t, "e2e client CA")
	caFile := writeCert(t, dir, "client-ca.pem", clientCA.cert)
	alice, aliceKey := newClientCert(t, clientCA, "alice")
	certFile := writeCert(t, dir, "alice.pem", alice)
	keyFile := writeKey(t, dir, "alice.key", aliceKey)

	d := startDeployment(t, "-client-auth", "ecdsa.e2e.test=require:"+caFile)
	_, port, _ := net.SplitHostPort(d.edgeAddr)
	curl := func(host string, extra ...string) (string, error) {
		args := append([]string{"-sS", "--cacert", d.caFile, "--resolve", host + ":" + port + ":127.0.0.1",
			"-H", "X-Keyless-Client-Subject: CN=forged"}, extra...)
		b, err := exec.Command("curl", append(args, "https://"+host+":"+port+"/")...).CombinedOutput()
		return string(b), err
	}
	if out, err := curl("ecdsa.e2e.test"); err == nil {
		t.Errorf("curl without a client certificate succeeded:\n%s", out)
	}
	out, err := curl("ecdsa.e2e.test", "--cert", certFile, "--key", keyFile)
	if err != nil || !strings.Contains(out, "client cert: CN=alice") || strings.Contains(out, "forged") {
		t.Errorf("curl with a client certificate: %v\n%s", err, out)
	}
	out, err = curl("rsa.e2e.test")
	if err != nil || strings.Contains(out, "client cert:") {
		t.Errorf("curl for a name without client certificates: %v\n%s", err, out)
	}
}

// newClientCert issues a client certificate with common name cn.
func newClientCert(t *testing.T, ca *testCA, cn string) (*x509.Certificate, crypto.Signer) {
	t.Helper()
	other := newTestCA(t, cn) // for its fresh key pair
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, other.key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, other.key
}

// checkDemoCertificates checks what `make demo` serves: its leaf
// certificates last 90 days or more, and the edge staples a good OCSP
// response, as openssl s_client -status shows.
func checkDemoCertificates(t *testing.T, dir, addr string) {
	t.Helper()
	for _, name := range []string{"rsa.localhost", "ecdsa.localhost"} {
		data, err := os.ReadFile(filepath.Join(dir, "certs", name+".pem"))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := pem.Decode(data)
		leaf, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if d := leaf.NotAfter.Sub(leaf.NotBefore); d < 90*24*time.Hour {
			t.Errorf("the demo certificate for %s lasts %v, want 90 days or more", name, d)
		}
		out := sClient(t, addr, name, "-status", "-CAfile", filepath.Join(dir, "ca.pem"))
		for _, w := range []string{"OCSP Response Status: successful", "Cert Status: good"} {
			if !strings.Contains(out, w) {
				t.Errorf("openssl s_client -status for the demo's %s lacks %q:\n%s", name, w, out)
			}
		}
	}
}
