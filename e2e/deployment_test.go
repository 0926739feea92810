package e2e

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// deployment is a keyserver, an edge and the demo origin running as
// separate processes, built from this repository, with keys in a fresh
// SoftHSM token that the keyserver command created.
type deployment struct {
	edgeAddr, originAddr    string
	caFile                  string // the web CA that issued the edge's certificates
	keyserverAddr           string
	link                    *linkPKI // the mTLS files of the edge-keyserver link
	policyFile, auditFile   string
	certsDir                string
	defaultCert             string // the edges' -default-cert
	keyserver, edge, origin *proc
}

// deploymentPolicy is the keyserver's policy in a deployment: the edge may
// sign with every key of a certificate under e2e.test (matched through
// -certs) and decrypt with the RSA one.
const deploymentPolicy = `# The deployment's edge, by its SPIFFE id.
rules:
  - name: web
    identities: [spiffe://e2e.internal/edge/1]
    keys: [cert:*.e2e.test]
    operations: [sign]
    schemes: [default]
  - name: rsa-kex
    identities: [spiffe://e2e.internal/edge/1]
    keys: [cert:rsa.e2e.test]
    operations: [decrypt]
`

// webName is a test hostname and the key that serves it.
type webName struct {
	name string
	gen  []string // keyserver keys generate flags
}

// webNames maps each test hostname to the key that serves it.
var webNames = []webName{
	{"rsa.e2e.test", []string{"-type", "rsa", "-bits", "2048"}},
	{"ecdsa.e2e.test", []string{"-type", "ecdsa", "-curve", "P-256"}},
	{"p384.e2e.test", []string{"-type", "ecdsa", "-curve", "P-384"}},
	{"ed25519.e2e.test", []string{"-type", "ed25519"}},
}

var (
	readyKeyserver = regexp.MustCompile(`keyserver ready: listen=(\S+)`)
	readyOrigin    = regexp.MustCompile(`listening on (\S+)`)
	readyEdge      = regexp.MustCompile(`edge ready: listen=(\S+)`)
)

// procPIN is the user PIN of the tokens that procToken makes.
const procPIN = "e2e-user-pin-4711"

// procToken makes a fresh SoftHSM token for programs started by the test
// and returns the environment they need and the flags that open it.
func procToken(t testing.TB) (env, flags []string) {
	t.Helper()
	module := softhsmModule(t)
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "tokens"), 0o700); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	os.WriteFile(conf, []byte("directories.tokendir = "+filepath.Join(dir, "tokens")+"\nobjectstore.backend = file\nlog.level = ERROR\n"), 0o600)
	pin := filepath.Join(dir, "pin")
	os.WriteFile(pin, []byte(procPIN+"\n"), 0o600)
	so := filepath.Join(dir, "so-pin")
	os.WriteFile(so, []byte("e2e-so-pin-4711\n"), 0o600)
	env = []string{"SOFTHSM2_CONF=" + conf}
	if out, err := run(t, env, "keyserver", "token", "init", "-module", module, "-label", "e2e", "-pin-file", pin, "-so-pin-file", so); err != nil {
		t.Fatalf("keyserver token init: %v\n%s", err, out)
	}
	return env, []string{"-module", module, "-token-label", "e2e", "-pin-file", pin}
}

func startDeployment(t testing.TB, edgeArgs ...string) *deployment {
	t.Helper()
	return startDeploymentWith(t, nil, edgeArgs)
}

// startDeploymentWith starts a deployment with extra flags for the
// keyserver and the edge.
func startDeploymentWith(t testing.TB, keyserverArgs, edgeArgs []string) *deployment {
	t.Helper()
	return startDeploymentOf(t, newLinkPKI(t), deploymentPolicy, keyserverArgs, edgeArgs)
}

// startDeploymentOf starts a deployment on the given link PKI, with the
// given keyserver policy.
func startDeploymentOf(t testing.TB, link *linkPKI, policy string, keyserverArgs, edgeArgs []string) *deployment {
	t.Helper()
	env, token := procToken(t)
	return startDeploymentOn(t, deploymentSpec{env: env, token: token, names: webNames, defaultCert: "ecdsa.e2e.test",
		link: link, policy: policy, keyserverArgs: keyserverArgs, edgeArgs: edgeArgs})
}

// deploymentSpec says what startDeploymentOn starts.
type deploymentSpec struct {
	env, token    []string  // the keyserver's environment and the flags that open its token
	names         []webName // the keys to generate, one certificate each
	defaultCert   string    // the edge's -default-cert
	link          *linkPKI
	policy        string // the keyserver's policy
	keyserverArgs []string
	edgeArgs      []string
}

// startDeploymentOn starts a deployment on a token that exists already,
// generating its keys with the keyserver command.
func startDeploymentOn(t testing.TB, spec deploymentSpec) *deployment {
	t.Helper()
	env, token, link, policy := spec.env, spec.token, spec.link, spec.policy
	keyserverArgs, edgeArgs := spec.keyserverArgs, spec.edgeArgs
	dir := t.TempDir()
	certs := filepath.Join(dir, "certs")
	os.Mkdir(certs, 0o755)
	web := newTestCA(t, "e2e web CA")
	for _, n := range spec.names {
		args := append([]string{"keys", "generate", "-label", n.name}, n.gen...)
		if out, err := run(t, env, "keyserver", append(args, token...)...); err != nil {
			t.Fatalf("keyserver %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		out, err := run(t, env, "keyserver", append([]string{"keys", "csr", "-key", n.name, "-dns", n.name}, token...)...)
		if err != nil {
			t.Fatalf("keyserver keys csr: %v\n%s", err, out)
		}
		block, _ := pem.Decode([]byte(out))
		if block == nil {
			t.Fatalf("keyserver keys csr printed no PEM:\n%s", out)
		}
		csr, err := x509.ParseCertificateRequest(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if err := csr.CheckSignature(); err != nil {
			t.Fatalf("CSR signed in the token does not verify: %v", err)
		}
		writeCert(t, certs, n.name+".pem", web.issue(t, csr.PublicKey, x509.ExtKeyUsageServerAuth, csr.DNSNames))
	}
	d := &deployment{caFile: writeCert(t, dir, "web-ca.pem", web.cert), link: link, certsDir: certs, defaultCert: spec.defaultCert,
		policyFile: filepath.Join(dir, "policy.yaml"), auditFile: filepath.Join(dir, "audit.log")}
	if err := os.WriteFile(d.policyFile, []byte(policy), 0o644); err != nil {
		t.Fatal(err)
	}

	args := append([]string{"serve", "-listen", "127.0.0.1:0",
		"-tls-cert", link.serverCert, "-tls-key", link.serverKey, "-client-ca", link.caFile,
		"-policy", d.policyFile, "-certs", certs, "-audit-log", d.auditFile}, token...)
	d.keyserver = startProc(t, env, "keyserver", append(args, keyserverArgs...)...)
	ksAddr := d.keyserver.waitFor(t, readyKeyserver)[1]
	d.keyserverAddr = ksAddr

	d.origin = startProc(t, nil, "demo-origin", "-listen", "127.0.0.1:0")
	d.originAddr = d.origin.waitFor(t, readyOrigin)[1]

	d.edge, d.edgeAddr = d.startEdge(t, link.edgeCert, link.edgeKey, edgeArgs...)
	return d
}

// startEdge starts an edge of the deployment with the given client
// certificate for the keyserver link, and returns it and its address. Its
// origin is the deployment's, unless extra has a -tcp-origin.
func (d *deployment) startEdge(t testing.TB, certFile, keyFile string, extra ...string) (*proc, string) {
	t.Helper()
	args := []string{"-listen", "127.0.0.1:0", "-certs", d.certsDir, "-default-cert", d.defaultCert,
		"-rsa-key-exchange", "rsa.e2e.test",
		"-keyserver", d.keyserverAddr, "-keyserver-name", d.link.serverName, "-keyserver-ca", d.link.caFile,
		"-tls-cert", certFile, "-tls-key", keyFile}
	if !slices.Contains(extra, "-tcp-origin") {
		args = append(args, "-origin", "http://"+d.originAddr)
	}
	edge := startProc(t, nil, "edge", append(args, extra...)...)
	return edge, edge.waitFor(t, readyEdge)[1]
}

// url returns the https URL of name on the edge.
func (d *deployment) url(name string) string {
	_, port, _ := strings.Cut(d.edgeAddr, ":")
	return fmt.Sprintf("https://%s:%s/", name, port)
}

// resolve returns curl's --resolve argument for name.
func (d *deployment) resolve(name string) string {
	_, port, _ := strings.Cut(d.edgeAddr, ":")
	return fmt.Sprintf("%s:%s:127.0.0.1", name, port)
}
