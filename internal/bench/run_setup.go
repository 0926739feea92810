package bench

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"time"
)

// Token label and key labels of the bench's SoftHSM token.
const benchToken = "keyless-bench"

// setup makes the work directory, the binaries, the token with its keys,
// and the PKI.
func (o *orchestrator) setup(ctx context.Context) error {
	var err error
	if o.self, err = os.Executable(); err != nil {
		return err
	}
	o.dir = o.cfg.WorkDir
	if o.dir == "" {
		if o.dir, err = os.MkdirTemp("", "keyless-bench-"); err != nil {
			return err
		}
	} else if err := os.MkdirAll(o.dir, 0o700); err != nil {
		return err
	}
	o.logDir = filepath.Join(o.dir, "logs")
	for _, d := range []string{o.logDir, filepath.Join(o.dir, "tokens"), filepath.Join(o.dir, "pki"),
		filepath.Join(o.dir, "certs", "keyless"), filepath.Join(o.dir, "certs", "soft")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	if err := o.binaries(ctx); err != nil {
		return err
	}
	if err := o.makeToken(ctx); err != nil {
		return err
	}
	if o.link, err = newLinkPKI(filepath.Join(o.dir, "pki")); err != nil {
		return err
	}
	if err := o.webCerts(); err != nil {
		return err
	}
	return o.writePolicy(ctx)
}

// binaries builds keyserver and edge, unless -bin names them.
func (o *orchestrator) binaries(ctx context.Context) error {
	if o.cfg.Bin != "" {
		o.bin = o.cfg.Bin
		for _, b := range []string{"keyserver", "edge"} {
			if _, err := os.Stat(filepath.Join(o.bin, b)); err != nil {
				return fmt.Errorf("bench: -bin: %w", err)
			}
		}
		return nil
	}
	o.bin = filepath.Join(o.dir, "bin")
	o.logf("building keyserver and edge")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", o.bin+string(filepath.Separator), "./cmd/keyserver", "./cmd/edge")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("bench: go build (run from the repository root, or pass -bin): %v\n%s", err, out)
	}
	return nil
}

// keyserverCmd runs a keyserver subcommand to completion.
func (o *orchestrator) keyserverCmd(ctx context.Context, args ...string) (string, error) {
	o.seq++
	return runChild(ctx, fmt.Sprintf("%03d-keyserver-%s", o.seq, args[len(args)-1]), o.logDir, o.env,
		filepath.Join(o.bin, "keyserver"), time.Minute, args...)
}

// makeToken creates a fresh SoftHSM token with the keyserver command, and
// an ECDSA P-256 and an RSA-2048 key in it.
func (o *orchestrator) makeToken(ctx context.Context) error {
	conf := filepath.Join(o.dir, "softhsm2.conf")
	if err := os.WriteFile(conf, []byte("directories.tokendir = "+filepath.Join(o.dir, "tokens")+
		"\nobjectstore.backend = file\nlog.level = ERROR\n"), 0o600); err != nil {
		return err
	}
	o.env = []string{"SOFTHSM2_CONF=" + conf}
	o.pinFile = filepath.Join(o.dir, "pin")
	soPIN := filepath.Join(o.dir, "so-pin")
	for _, f := range []string{o.pinFile, soPIN} {
		var b [16]byte
		rand.Read(b[:])
		if err := os.WriteFile(f, []byte(hex.EncodeToString(b[:])+"\n"), 0o600); err != nil {
			return err
		}
	}
	o.logf("creating SoftHSM token %q with an ECDSA P-256 and an RSA-2048 key", benchToken)
	if _, err := o.keyserverCmd(ctx, "token", "init", "-module", o.cfg.Module, "-label", benchToken,
		"-pin-file", o.pinFile, "-so-pin-file", soPIN); err != nil {
		return err
	}
	o.token = []string{"-module", o.cfg.Module, "-token-label", benchToken, "-pin-file", o.pinFile}
	for _, k := range []struct {
		label string
		gen   []string
		ops   []string
	}{
		{nameECDSA, []string{"-type", "ecdsa", "-curve", "P-256"}, []string{OpECDSASign}},
		{nameRSA, []string{"-type", "rsa", "-bits", "2048"}, []string{OpRSASign, OpRSADecrypt}},
	} {
		args := append([]string{"keys", "generate", "-label", k.label}, k.gen...)
		if _, err := o.keyserverCmd(ctx, append(args, o.token...)...); err != nil {
			return err
		}
		pub := filepath.Join(o.dir, "pki", k.label+".pub.pem")
		args = append([]string{"keys", "export", "-key", k.label, "-out", pub}, o.token...)
		if _, err := o.keyserverCmd(ctx, args...); err != nil {
			return err
		}
		for _, op := range k.ops {
			o.pubs[op] = pub
		}
	}
	return nil
}

// webCerts issues the web certificates: for the token's keys (served by
// the edge and the in-process SoftHSM server) and for software keys.
func (o *orchestrator) webCerts() error {
	web, err := newCA("keyless-bench web CA")
	if err != nil {
		return err
	}
	if err := writeCerts(filepath.Join(o.dir, "pki", "web-ca.pem"), web.cert); err != nil {
		return err
	}
	for _, name := range []string{nameECDSA, nameRSA} {
		data, err := os.ReadFile(filepath.Join(o.dir, "pki", name+".pub.pem"))
		if err != nil {
			return err
		}
		pub, err := readPublicKey(data)
		if err != nil {
			return err
		}
		cert, err := web.issue(pub, x509.ExtKeyUsageServerAuth, []string{name})
		if err != nil {
			return err
		}
		if err := writeCerts(filepath.Join(o.dir, "certs", "keyless", name+".pem"), cert); err != nil {
			return err
		}
	}
	return writeSoftCerts(filepath.Join(o.dir, "certs", "soft"), web)
}

// writeSoftCerts writes, for each web name, a software key (NAME.key) and
// a certificate for it issued by web (NAME.pem).
func writeSoftCerts(dir string, web *ca) error {
	for _, name := range []string{nameECDSA, nameRSA} {
		var key crypto.Signer
		var err error
		if name == nameRSA {
			key, err = rsa.GenerateKey(rand.Reader, 2048)
		} else {
			key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		}
		if err != nil {
			return err
		}
		cert, err := web.issue(key.Public(), x509.ExtKeyUsageServerAuth, []string{name})
		if err != nil {
			return err
		}
		if err := writeCerts(filepath.Join(dir, name+".pem"), cert); err != nil {
			return err
		}
		if err := writeKey(filepath.Join(dir, name+".key"), key); err != nil {
			return err
		}
	}
	return nil
}

// benchPolicy lets the bench's client identity use every key for every
// operation, for keyservers that require a policy.
const benchPolicy = `# keyless-bench: the bench's edge and keyops client may do everything.
rules:
  - name: keyless-bench
    identities: ["` + linkClientIdentity + `"]
    keys: ["*"]
    operations: [sign, decrypt]
    schemes: [default]
`

// writePolicy writes a permissive policy if "keyserver serve" has a
// -policy flag, and notes whether it takes -audit-log and -metrics-listen
// (a -bin keyserver may be an older one).
func (o *orchestrator) writePolicy(ctx context.Context) error {
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	help, _ := exec.CommandContext(hctx, filepath.Join(o.bin, "keyserver"), "serve", "-h").CombinedOutput()
	if regexp.MustCompile(`(?m)^\s*-audit-log\b`).Match(help) {
		// A file, as in production; the default, standard error, would
		// fill the orchestrator's memory with one line per operation.
		o.audit = filepath.Join(o.dir, "audit.jsonl")
	}
	o.metrics = regexp.MustCompile(`(?m)^\s*-metrics-listen\b`).Match(help)
	// The bench's keyserver has no ticket secret: an edge that asks it for
	// session ticket keys is refused, every few seconds, and each refusal
	// would count among the link's failed calls. Its own keys serve the
	// resumption scenarios as well.
	edgeHelp, _ := exec.CommandContext(hctx, filepath.Join(o.bin, "edge"), "-h").CombinedOutput()
	o.edgeOwnTickets = regexp.MustCompile(`(?m)^\s*-ticket-keys-from-keyserver\b`).Match(edgeHelp)
	if !regexp.MustCompile(`(?m)^\s*-policy\b`).Match(help) {
		return nil
	}
	o.policy = filepath.Join(o.dir, "policy.yaml")
	o.logf("the keyserver takes -policy: writing a permissive one for %s", linkClientIdentity)
	return os.WriteFile(o.policy, []byte(benchPolicy), 0o644)
}
