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
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// RunConfig is the orchestrator's configuration, from the flags of the
// "run" mode.
type RunConfig struct {
	// Bin is a directory holding keyserver and edge binaries; empty means
	// build them from the module in the current directory.
	Bin string
	// Out is the JSON results file.
	Out string
	// WorkDir holds the token, PKI and logs; empty means a temporary
	// directory, removed at the end unless Keep is set.
	WorkDir string
	Keep    bool
	// Warmup and Duration bound every load run.
	Warmup, Duration time.Duration
	// KeyopsConcurrency and HandshakeConcurrency are the concurrencies of
	// the key-operation and handshake scenarios. Both sides of a key
	// operation run at each of them, so that each side's best is found
	// among the same ones.
	KeyopsConcurrency, HandshakeConcurrency []int
	// Scenarios selects scenarios by name prefix ("keyops",
	// "keyops/rsa2048-decrypt", "handshake/tls13", "resume", "edgemem");
	// nil or "all" means every scenario.
	Scenarios []string
	// Repeat runs every figure and its baseline this many times,
	// alternating, and keeps the median of each.
	Repeat int
	// MemConns is the number of idle connections of the edge memory
	// scenario.
	MemConns int
	// Module is the SoftHSM PKCS #11 module.
	Module string
	// KeyserverFlags and EdgeFlags are added to the keyserver's and the
	// edge's command lines, to try other settings.
	KeyserverFlags, EdgeFlags []string
	// KeyserverEnv and EdgeEnv are added to the keyserver's and the
	// edge's environment (as "GOMAXPROCS=1").
	KeyserverEnv, EdgeEnv []string
}

// parseRunFlags parses the flags of the "run" mode.
func parseRunFlags(args []string, stderr io.Writer) (*RunConfig, error) {
	fs := flag.NewFlagSet("keyless-bench run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	defOut := os.Getenv("BENCH_OUT")
	if defOut == "" {
		defOut = "bench-results.json"
	}
	c := &RunConfig{}
	var keyopsConc, hsConc, conc, scenarios, ksFlags, edgeFlags, ksEnv, edgeEnv string
	fs.StringVar(&c.Bin, "bin", "", "directory with keyserver and edge binaries (default: go build them)")
	fs.StringVar(&c.Out, "out", defOut, "JSON results file (default $BENCH_OUT, else bench-results.json)")
	fs.StringVar(&c.WorkDir, "workdir", "", "directory for the token, PKI and logs (default: a temporary one)")
	fs.BoolVar(&c.Keep, "keep", false, "keep the temporary work directory")
	fs.DurationVar(&c.Warmup, "warmup", 300*time.Millisecond, "warm-up of each run, not measured")
	fs.DurationVar(&c.Duration, "duration", 1500*time.Millisecond, "measured time of each run")
	fs.StringVar(&keyopsConc, "keyops-concurrency", "1,2,4,8,64", "concurrencies of the key-operation scenarios, both sides (SoftHSM's best lies near 2–8)")
	fs.StringVar(&hsConc, "handshake-concurrency", "1,8,32", "concurrencies of the handshake scenarios")
	fs.StringVar(&conc, "concurrency", "", "concurrencies of every scenario (overrides the two above)")
	fs.StringVar(&scenarios, "scenarios", "all", "comma-separated scenario name prefixes: keyops, handshake, resume, edgemem, or finer such as keyops/ecdsa, handshake/tls12")
	fs.IntVar(&c.Repeat, "repeat", 1, "runs of each figure and its baseline, alternating; the median is kept (for noisy machines)")
	fs.IntVar(&c.MemConns, "mem-conns", 5000, "idle connections of the edge memory scenario")
	fs.StringVar(&c.Module, "module", "/usr/lib/softhsm/libsofthsm2.so", "SoftHSM PKCS #11 module")
	fs.StringVar(&ksFlags, "keyserver-flags", "", "extra keyserver serve flags, space-separated")
	fs.StringVar(&edgeFlags, "edge-flags", "", "extra edge flags, space-separated")
	fs.StringVar(&ksEnv, "keyserver-env", "", "extra keyserver environment, space-separated NAME=VALUE")
	fs.StringVar(&edgeEnv, "edge-env", "", "extra edge environment, space-separated NAME=VALUE")
	if err := parseFlags(fs, args); err != nil {
		return nil, err
	}
	var err error
	if conc != "" {
		keyopsConc, hsConc = conc, conc
	}
	if c.KeyopsConcurrency, err = parseInts(keyopsConc); err != nil {
		return nil, fmt.Errorf("bench: -keyops-concurrency: %w", err)
	}
	if c.HandshakeConcurrency, err = parseInts(hsConc); err != nil {
		return nil, fmt.Errorf("bench: -handshake-concurrency: %w", err)
	}
	for s := range strings.SplitSeq(scenarios, ",") {
		if s = strings.TrimSpace(s); s != "" && s != "all" {
			c.Scenarios = append(c.Scenarios, s)
		}
	}
	c.KeyserverFlags, c.EdgeFlags = strings.Fields(ksFlags), strings.Fields(edgeFlags)
	c.KeyserverEnv, c.EdgeEnv = strings.Fields(ksEnv), strings.Fields(edgeEnv)
	switch {
	case c.Warmup < 0 || c.Duration <= 0:
		return nil, errors.New("bench: -warmup must be 0 or more and -duration more than 0")
	case c.MemConns < 1:
		return nil, errors.New("bench: -mem-conns must be at least 1")
	case c.Repeat < 1:
		return nil, errors.New("bench: -repeat must be at least 1")
	case c.Out == "":
		return nil, errors.New("bench: -out is empty")
	}
	return c, nil
}

// parseInts parses a comma-separated list of positive integers.
func parseInts(s string) ([]int, error) {
	var out []int
	for f := range strings.SplitSeq(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q is not a positive integer", f)
		}
		out = append(out, n)
	}
	if len(out) == 0 {
		return nil, errors.New("empty list")
	}
	return out, nil
}

// selected reports whether the scenario item (as "keyops/ecdsa-p256-sign")
// is selected.
func (c *RunConfig) selected(item string) bool {
	if len(c.Scenarios) == 0 {
		return true
	}
	for _, s := range c.Scenarios {
		if strings.HasPrefix(item, s) {
			return true
		}
	}
	return false
}

func (c *RunConfig) anySelected(prefix string, items []string) bool {
	for _, it := range items {
		if c.selected(prefix + "/" + it) {
			return true
		}
	}
	return false
}

// orchestrator is the state of one "run".
type orchestrator struct {
	cfg     *RunConfig
	stderr  io.Writer
	self    string // this binary
	bin     string // keyserver and edge binaries
	dir     string
	logDir  string
	env     []string // SOFTHSM2_CONF
	token   []string // flags that open the token
	pinFile string
	pubs    map[string]string // key operation → public key file
	link    *linkPKI
	policy  string // policy file, if the keyserver takes one
	audit   string // audit log file, if the keyserver takes one
	metrics bool   // the keyserver takes -metrics-listen
	results *Results
	rep     int // the repetition running, recorded with each result
	seq     int
	srv     servers
}

// Token label and key labels of the bench's SoftHSM token.
const benchToken = "keyless-bench"

var (
	readyKeyserver = regexp.MustCompile(`keyserver ready: listen=(\S+)(?: metrics=(\S+))?`)
	readyEdge      = regexp.MustCompile(`edge ready: listen=(\S+)`)
	readySelf      = regexp.MustCompile(`(?m)^ready (\S+)`)
	heldRE         = regexp.MustCompile(`(?m)^held (\d+)`)
)

// runRun is the "run" mode.
func runRun(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseRunFlags(args, stderr)
	if err != nil {
		return err
	}
	o := &orchestrator{cfg: cfg, stderr: stderr, results: newResults(), pubs: map[string]string{}}
	start := time.Now()
	if err := o.setup(ctx); err != nil {
		return err
	}
	if !cfg.Keep && cfg.WorkDir == "" {
		defer os.RemoveAll(o.dir)
	}
	runErr := o.scenarios(ctx)
	rows := o.results.Rows()
	fmt.Fprintf(stdout, "keyless-bench: %s, %d CPUs, %s; %v warm-up + %v per run; total %v\n\n",
		runtime.GOOS+"/"+runtime.GOARCH, runtime.NumCPU(), runtime.Version(), cfg.Warmup, cfg.Duration, time.Since(start).Round(time.Second))
	PrintTable(stdout, rows)
	if err := WriteJSONFile(cfg.Out, rows); err != nil {
		return errors.Join(runErr, err)
	}
	fmt.Fprintf(stdout, "\nresults written to %s", cfg.Out)
	if cfg.Keep || cfg.WorkDir != "" {
		fmt.Fprintf(stdout, "; logs in %s", o.logDir)
	}
	fmt.Fprintln(stdout)
	return runErr
}

func (o *orchestrator) logf(format string, args ...any) {
	fmt.Fprintf(o.stderr, "keyless-bench: "+format+"\n", args...)
}

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
	if !regexp.MustCompile(`(?m)^\s*-policy\b`).Match(help) {
		return nil
	}
	o.policy = filepath.Join(o.dir, "policy.yaml")
	o.logf("the keyserver takes -policy: writing a permissive one for %s", linkClientIdentity)
	return os.WriteFile(o.policy, []byte(benchPolicy), 0o644)
}

// servers are the long-running processes of the scenarios.
type servers struct {
	keyserver, edge, hsmTLS, softTLS    *proc
	ksAddr, edgeAddr, hsmAddr, softAddr string
	ksMetrics                           string // the keyserver's metrics listener, if any
}

func (s *servers) stop() {
	for _, p := range []*proc{s.edge, s.hsmTLS, s.softTLS, s.keyserver} {
		if p != nil {
			p.stop()
		}
	}
}

// startKeyserver starts the keyserver and returns it, its address and its
// metrics listener's ("" for none).
func (o *orchestrator) startKeyserver() (p *proc, addr, metricsAddr string, err error) {
	args := []string{"serve", "-listen", "127.0.0.1:0", "-tls-cert", o.link.serverCert, "-tls-key", o.link.serverKey,
		"-client-ca", o.link.caFile}
	if o.policy != "" {
		args = append(args, "-policy", o.policy)
	}
	if o.audit != "" {
		args = append(args, "-audit-log", o.audit)
	}
	if o.metrics {
		// For the stream counters; see keyserverRun.
		args = append(args, "-metrics-listen", "127.0.0.1:0")
	}
	args = append(append(args, o.token...), o.cfg.KeyserverFlags...)
	p, err = startProc("keyserver", o.logDir, append(slices.Clone(o.env), o.cfg.KeyserverEnv...), filepath.Join(o.bin, "keyserver"), args...)
	if err != nil {
		return nil, "", "", err
	}
	m, err := p.waitFor(readyKeyserver, 30*time.Second)
	if err != nil {
		p.stop()
		return nil, "", "", err
	}
	if m[2] != "off" {
		metricsAddr = m[2]
	}
	return p, m[1], metricsAddr, nil
}

func (o *orchestrator) startEdge(ksAddr string) (*proc, string, error) {
	args := []string{"-listen", "127.0.0.1:0", "-certs", filepath.Join(o.dir, "certs", "keyless"),
		"-default-cert", nameECDSA, "-rsa-key-exchange", nameRSA,
		// Never contacted: the load generator sends no request.
		"-origin", "http://127.0.0.1:9",
		"-keyserver", ksAddr, "-keyserver-name", o.link.serverName, "-keyserver-ca", o.link.caFile,
		"-tls-cert", o.link.clientCert, "-tls-key", o.link.clientKey}
	p, err := startProc("edge", o.logDir, o.cfg.EdgeEnv, filepath.Join(o.bin, "edge"), append(args, o.cfg.EdgeFlags...)...)
	if err != nil {
		return nil, "", err
	}
	m, err := p.waitFor(readyEdge, 30*time.Second)
	if err != nil {
		p.stop()
		return nil, "", err
	}
	return p, m[1], nil
}

func (o *orchestrator) startSelf(name string, env []string, args ...string) (*proc, string, error) {
	p, err := startProc(name, o.logDir, env, o.self, args...)
	if err != nil {
		return nil, "", err
	}
	m, err := p.waitFor(readySelf, 30*time.Second)
	if err != nil {
		p.stop()
		return nil, "", err
	}
	return p, m[1], nil
}

// scenarios starts the servers the selected scenarios need and runs them.
func (o *orchestrator) scenarios(ctx context.Context) error {
	c := o.cfg
	needKeyops := c.anySelected("keyops", keyOps)
	needHS := c.anySelected("handshake", handshakeKinds)
	needResume := c.anySelected("resume", resumeNames())
	needMem := c.anySelected("edgemem", memProtos)

	s := &o.srv
	defer s.stop()
	var err error
	o.logf("starting keyserver")
	if s.keyserver, s.ksAddr, s.ksMetrics, err = o.startKeyserver(); err != nil {
		return err
	}
	if needHS || needResume {
		o.logf("starting edge and the baseline TLS servers")
		if s.edge, s.edgeAddr, err = o.startEdge(s.ksAddr); err != nil {
			return err
		}
		if s.softTLS, s.softAddr, err = o.startSelf("tls-server-soft", nil, "tls-server", "-keys", "soft",
			"-certs", filepath.Join(o.dir, "certs", "soft")); err != nil {
			return err
		}
	}
	if needHS {
		if s.hsmTLS, s.hsmAddr, err = o.startSelf("tls-server-hsm", o.env, append([]string{"tls-server", "-keys", "hsm",
			"-certs", filepath.Join(o.dir, "certs", "keyless")}, o.hsmArgs()...)...); err != nil {
			return err
		}
	}

	var errs []error
	note := func(err error) {
		if err != nil {
			o.logf("%v", err)
			errs = append(errs, err)
		}
	}
	if needKeyops {
		for _, op := range keyOps {
			if !c.selected("keyops/" + op) {
				continue
			}
			for _, n := range c.KeyopsConcurrency {
				for rep := range c.Repeat {
					o.rep = rep
					note(o.keyopsRun(ctx, "inproc", op, n, s.ksAddr, 0))
					note(o.keyopsRun(ctx, "keyless", op, n, s.ksAddr, 0))
					if n == 1 {
						note(o.pausedBaselineRun(ctx, op))
					}
				}
			}
		}
	}
	if needHS {
		for _, kind := range handshakeKinds {
			if !c.selected("handshake/" + kind) {
				continue
			}
			for _, n := range c.HandshakeConcurrency {
				for rep := range c.Repeat {
					o.rep = rep
					note(o.handshakeRun(ctx, "handshake", kind, "hsm", s.hsmAddr, n))
					note(o.handshakeRun(ctx, "handshake", kind, "soft", s.softAddr, n))
					note(o.handshakeRun(ctx, "handshake", kind, "keyless", s.edgeAddr, n))
				}
			}
		}
	}
	if needResume {
		for _, kind := range resumeKinds {
			if !c.selected("resume/" + resumeName(kind)) {
				continue
			}
			for _, n := range c.HandshakeConcurrency {
				for rep := range c.Repeat {
					o.rep = rep
					note(o.handshakeRun(ctx, "resume", kind, "soft", s.softAddr, n))
					note(o.handshakeRun(ctx, "resume", kind, "keyless", s.edgeAddr, n))
				}
			}
		}
	}
	// The other servers are idle from here on; stop them to free memory
	// and CPU for the edge memory scenario.
	for _, p := range []*proc{s.edge, s.hsmTLS, s.softTLS} {
		if p != nil {
			p.stop()
		}
	}
	if needMem {
		for _, proto := range memProtos {
			if c.selected("edgemem/" + proto) {
				note(o.edgememRun(ctx, proto, s.ksAddr))
			}
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return errors.Join(errs...)
}

func (o *orchestrator) hsmArgs() []string {
	return []string{"-module", o.cfg.Module, "-token-label", benchToken, "-pin-file", o.pinFile}
}

func (o *orchestrator) loadArgs(n int) []string {
	return []string{"-concurrency", strconv.Itoa(n), "-warmup", o.cfg.Warmup.String(), "-duration", o.cfg.Duration.String()}
}

func (o *orchestrator) childTimeout() time.Duration {
	return o.cfg.Warmup + 2*o.cfg.Duration + 60*time.Second
}

// runResult runs a self child that prints one Result.
func (o *orchestrator) runResult(ctx context.Context, name string, env []string, args ...string) (Result, error) {
	o.seq++
	out, err := runChild(ctx, fmt.Sprintf("%03d-%s", o.seq, name), o.logDir, env, o.self, o.childTimeout(), args...)
	if err != nil {
		return Result{}, err
	}
	var r Result
	if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &r); err != nil {
		return Result{}, fmt.Errorf("bench: %s printed no result: %v\n%s", name, err, out)
	}
	return r, nil
}

// pausedBaselineRun measures the in-process baseline of op at concurrency
// 1 with each operation following an idle gap as long as the empty call's
// p50 of the keyless run just made. Through a keyserver, each operation at
// concurrency 1 follows such a gap (its request's round trip), which on a
// VM costs the operation itself time; the latency target's note quotes
// this figure beside it, to tell that cost from keyless's own.
func (o *orchestrator) pausedBaselineRun(ctx context.Context, op string) error {
	reps := o.results.runs[keyopsKey("keyless", op, 1)]
	if len(reps) == 0 || reps[len(reps)-1].EmptyP50us <= 0 {
		return nil
	}
	pause := time.Duration(reps[len(reps)-1].EmptyP50us * float64(time.Microsecond)).Round(time.Microsecond)
	return o.keyopsRun(ctx, "inproc-paused", op, 1, "", pause)
}

// keyserverRun is runResult for a run through the keyserver: it reads the
// keyserver's stream counters before and after, and sets the result's
// operations per message from them. Without a metrics listener, or when a
// reading fails (logged), the result has no such figures; the run stands.
func (o *orchestrator) keyserverRun(ctx context.Context, name string, env []string, args ...string) (Result, error) {
	if o.srv.ksMetrics == "" {
		return o.runResult(ctx, name, env, args...)
	}
	before, err1 := scrapeTraffic(ctx, o.srv.ksMetrics)
	r, err := o.runResult(ctx, name, env, args...)
	if err != nil {
		return r, err
	}
	after, err2 := scrapeTraffic(ctx, o.srv.ksMetrics)
	if err := errors.Join(err1, err2); err != nil {
		o.logf("%s: operations per message not measured: %v", name, err)
		return r, nil
	}
	r.sharing(before, after)
	return r, nil
}

// keyopsRun measures key operation op at concurrency n on side "keyless"
// (through the keyserver at ksAddr), "inproc" (the baseline) or
// "inproc-paused" (the baseline with every operation following an idle gap
// of pause; see pausedBaselineRun).
func (o *orchestrator) keyopsRun(ctx context.Context, side, op string, n int, ksAddr string, pause time.Duration) error {
	mode := "inproc"
	if side == "keyless" {
		mode = "keyops"
	}
	args := append([]string{mode, "-op", op, "-pub", o.pubs[op]}, o.loadArgs(n)...)
	if pause > 0 {
		args = append(args, "-pause", pause.String())
	}
	env := o.env
	if side != "keyless" {
		args = append(args, o.hsmArgs()...)
	} else {
		env = nil
		args = append(args, "-watch", watchArg("keyserver", o.srv.keyserver), "-addr", ksAddr, "-ca", o.link.caFile, "-cert", o.link.clientCert, "-key", o.link.clientKey,
			"-server-name", o.link.serverName)
		if n == 1 {
			args = append(args, "-empty", "500ms")
		}
	}
	run := o.runResult
	if side == "keyless" {
		run = o.keyserverRun
	}
	r, err := run(ctx, fmt.Sprintf("%s-%s-c%d", side, op, n), env, args...)
	if err != nil {
		return err
	}
	r.rep = o.rep
	o.results.add(keyopsKey(side, op, n), r)
	o.progress("keyops", op, side, r)
	return nil
}

func (o *orchestrator) handshakeRun(ctx context.Context, group, kind, server, addr string, n int) error {
	var watch string
	switch server {
	case "keyless":
		watch = watchArg("edge", o.srv.edge, "keyserver", o.srv.keyserver)
	case "hsm":
		watch = watchArg("server", o.srv.hsmTLS)
	case "soft":
		watch = watchArg("server", o.srv.softTLS)
	}
	args := append([]string{"loadgen", "-addr", addr, "-kind", kind, "-watch", watch}, o.loadArgs(n)...)
	run := o.runResult
	if server == "keyless" {
		run = o.keyserverRun
	}
	r, err := run(ctx, fmt.Sprintf("loadgen-%s-%s-c%d", kind, server, n), nil, args...)
	if err != nil {
		return err
	}
	r.rep = o.rep
	o.results.add(handshakeKey(group, kind, server, n), r)
	o.progress(group, kind, server, r)
	return nil
}

// watchArg returns a -watch value for name, proc pairs.
func watchArg(pairs ...any) string {
	var items []string
	for i := 0; i+1 < len(pairs); i += 2 {
		if p, ok := pairs[i+1].(*proc); ok && p != nil && p.cmd.Process != nil {
			items = append(items, fmt.Sprintf("%s=%d", pairs[i], p.cmd.Process.Pid))
		}
	}
	return strings.Join(items, ",")
}

func (o *orchestrator) progress(group, what, side string, r Result) {
	extra := ""
	if len(r.CPU) > 0 {
		names := slices.Sorted(maps.Keys(r.CPU))
		var parts []string
		for _, n := range names {
			parts = append(parts, fmt.Sprintf("%s %.0f", n, r.CPU[n]))
		}
		extra = fmt.Sprintf("; CPU µs/op: %s; machine %.0f%% busy", strings.Join(parts, ", "), r.MachineBusy*100)
	}
	if r.EmptyP50us > 0 {
		extra += fmt.Sprintf("; empty call p50 %.0f µs", r.EmptyP50us)
	}
	if r.OpsPerRequest > 0 || r.ResultsPerResponse > 0 {
		extra += fmt.Sprintf("; per stream message: %.1f operations in, %.1f results out", r.OpsPerRequest, r.ResultsPerResponse)
	}
	if r.Errors > 0 {
		extra += fmt.Sprintf(", %d errors (first: %s)", r.Errors, r.FirstError)
	}
	o.logf("%-9s %-18s %-8s c=%-3d %9.0f/s  p50 %7.0f µs  p99 %7.0f µs%s", group, what, side, r.Concurrency, r.OpsPerSec, r.P50us, r.P99us, extra)
}

// memProtos are the edge memory scenario's protocols.
var memProtos = []string{"http1", "h2"}

// edgememRun measures the edge's heap per idle connection: an in-process
// edge, a warm-up of 200 connections, a snapshot, MemConns idle
// connections held by another process, a second snapshot.
func (o *orchestrator) edgememRun(ctx context.Context, proto, ksAddr string) error {
	o.logf("edgemem   %s: %d idle connections", proto, o.cfg.MemConns)
	edge, addr, err := o.startSelf("edgemem-"+proto, nil, "edgemem", "-keyserver", ksAddr,
		"-certs", filepath.Join(o.dir, "certs", "keyless"),
		"-ca", o.link.caFile, "-cert", o.link.clientCert, "-key", o.link.clientKey, "-server-name", o.link.serverName)
	if err != nil {
		return err
	}
	defer edge.stop()
	hold := func(name string, n int) (*proc, error) {
		args := []string{"hold", "-addr", addr, "-n", strconv.Itoa(n)}
		if proto == "h2" {
			args = append(args, "-h2")
		}
		p, err := startProc(name, o.logDir, nil, o.self, args...)
		if err != nil {
			return nil, err
		}
		if _, err := p.waitFor(heldRE, 3*time.Minute); err != nil {
			p.stop()
			return nil, err
		}
		return p, nil
	}
	snap := func(phase string) (MemSnapshot, error) {
		before := strings.Count(edge.stdout.String(), "\n")
		if _, err := fmt.Fprintf(edge.stdin, "snapshot %s\n", phase); err != nil {
			return MemSnapshot{}, err
		}
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			lines := strings.Split(strings.TrimSpace(edge.stdout.String()), "\n")
			if len(lines) > before {
				var s MemSnapshot
				if err := json.Unmarshal([]byte(lines[len(lines)-1]), &s); err != nil {
					return s, fmt.Errorf("bench: edgemem: %v", err)
				}
				return s, nil
			}
			time.Sleep(20 * time.Millisecond)
		}
		return MemSnapshot{}, errors.New("bench: edgemem did not answer")
	}
	warm, err := hold("hold-warmup-"+proto, 200)
	if err != nil {
		return err
	}
	warm.stop()
	// Let the edge see the warm-up connections close.
	for i := 0; i < 100; i++ {
		s, err := snap("wait")
		if err != nil {
			return err
		}
		if s.Conns == 0 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	base, err := snap("base")
	if err != nil {
		return err
	}
	start := time.Now()
	h, err := hold("hold-"+proto, o.cfg.MemConns)
	if err != nil {
		return err
	}
	defer h.stop()
	took := time.Since(start)
	loaded, err := snap("loaded")
	if err != nil {
		return err
	}
	o.results.addMem(proto, base, loaded)
	m := o.results.mem[proto]
	o.logf("edgemem   %s: %d connections (opened in %v): %.1f KiB heap in use per connection, %.1f KiB stack",
		proto, m.Conns, took.Round(time.Millisecond), m.HeapKiBPerConn, m.StackKiBPerConn)
	return nil
}
