package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// cluster is an edge in front of several keyservers, all processes built
// from this repository, sharing one SoftHSM token (SoftHSM serialises
// processes with file locks), with an origin in the test process. It is the
// setting of the resilience tests and the soak.
type cluster struct {
	env, token []string // the keyservers' environment and token flags
	tokenDir   string   // SoftHSM's token directory
	dir        string
	link       *linkPKI
	webCA      *testCA
	certsDir   string
	policyFile string

	keyservers []*clusterKeyserver
	edge       *proc
	edgeArgs   []string
	edgeAddr   string
	origin     *httptest.Server
	originHits atomic.Int64 // requests that reached the origin
}

// clusterKeyserver is one keyserver of a cluster. It can be killed and
// started again on the same address; each run writes its own audit file.
type clusterKeyserver struct {
	addr  string
	runs  int
	proc  *proc
	audit string // the current run's audit trail
}

// clusterPolicy lets the cluster's edge use every key for everything.
const clusterPolicy = `rules:
  - name: cluster-edge
    identities: [spiffe://e2e.internal/edge/1]
    keys: ["*"]
    operations: [sign, decrypt]
    schemes: [default]
`

// Names served by a cluster and the keys behind them.
const (
	clusterECDSA = "ecdsa.cluster.test" // P-256, the default certificate
	clusterRSA   = "rsa.cluster.test"   // RSA-2048, RSA key exchange enabled
)

var (
	clusterReadyKeyserver = regexp.MustCompile(`keyserver ready: listen=(\S+)`)
	clusterReadyEdge      = regexp.MustCompile(`edge ready: listen=(\S+)`)
)

// clusterOptions say what a cluster holds.
type clusterOptions struct {
	keyservers int
	rsa        bool     // also an RSA key and certificate (slow to generate)
	keyserver  []string // extra keyserver flags
	edge       []string // extra edge flags
	// policy replaces clusterPolicy when set.
	policy string
	// slowOrigin delays the origin's answer to paths starting with /slow.
	slowOrigin time.Duration
}

// startCluster makes a token with the keys, certificates for them and the
// link PKI, then starts the keyservers, the origin and the edge.
func startCluster(t testing.TB, o clusterOptions) *cluster {
	t.Helper()
	module := softhsmModule(t)
	c := &cluster{dir: t.TempDir()}
	c.tokenDir = filepath.Join(c.dir, "tokens")
	if err := os.Mkdir(c.tokenDir, 0o700); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(c.dir, "softhsm2.conf")
	mustWrite(t, conf, "directories.tokendir = "+c.tokenDir+"\nobjectstore.backend = file\nlog.level = ERROR\n", 0o600)
	pin := filepath.Join(c.dir, "pin")
	mustWrite(t, pin, "cluster-user-pin-0815\n", 0o600)
	so := filepath.Join(c.dir, "so-pin")
	mustWrite(t, so, "cluster-so-pin-0815\n", 0o600)
	c.env = []string{"SOFTHSM2_CONF=" + conf}
	if out, err := run(t, c.env, "keyserver", "token", "init", "-module", module, "-label", "cluster", "-pin-file", pin, "-so-pin-file", so); err != nil {
		t.Fatalf("keyserver token init: %v\n%s", err, out)
	}
	c.token = []string{"-module", module, "-token-label", "cluster", "-pin-file", pin}

	c.certsDir = filepath.Join(c.dir, "certs")
	os.Mkdir(c.certsDir, 0o755)
	c.webCA = newTestCA(t, "cluster web CA")
	c.addKey(t, clusterECDSA, "-type", "ecdsa", "-curve", "P-256")
	if o.rsa {
		c.addKey(t, clusterRSA, "-type", "rsa", "-bits", "2048")
	}
	c.link = newLinkPKI(t)
	c.policyFile = filepath.Join(c.dir, "policy.yaml")
	policy := clusterPolicy
	if o.policy != "" {
		policy = o.policy
	}
	mustWrite(t, c.policyFile, policy, 0o644)

	var addrs []string
	for i := range o.keyservers {
		ks := &clusterKeyserver{addr: "127.0.0.1:0"}
		c.keyservers = append(c.keyservers, ks)
		c.startKeyserver(t, i, o.keyserver...)
		addrs = append(addrs, ks.addr)
	}

	c.origin = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.originHits.Add(1)
		if strings.HasPrefix(r.URL.Path, "/slow") {
			time.Sleep(o.slowOrigin)
		}
		fmt.Fprintf(w, "ok %s", r.URL.Path)
	}))
	t.Cleanup(c.origin.Close)

	args := []string{"-listen", "127.0.0.1:0", "-certs", c.certsDir, "-default-cert", clusterECDSA + ".pem",
		"-origin", c.origin.URL, "-keyserver", strings.Join(addrs, ","), "-keyserver-name", c.link.serverName,
		"-keyserver-ca", c.link.caFile, "-tls-cert", c.link.edgeCert, "-tls-key", c.link.edgeKey,
		"-reconnect-backoff", "500ms",
		// The load comes from one address, far above the per-client
		// default; that limit is tested in tlscore and cmd/edge.
		"-handshakes-per-client", "0"}
	if o.rsa {
		args = append(args, "-rsa-key-exchange", clusterRSA)
	}
	c.edgeArgs = append(args, o.edge...)
	c.startEdge(t)
	return c
}

// addKey generates a key in the token and issues a certificate for name.
func (c *cluster) addKey(t testing.TB, name string, gen ...string) {
	t.Helper()
	args := append([]string{"keys", "generate", "-label", name}, gen...)
	if out, err := run(t, c.env, "keyserver", append(args, c.token...)...); err != nil {
		t.Fatalf("keyserver %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	out, err := run(t, c.env, "keyserver", append([]string{"keys", "csr", "-key", name, "-dns", name}, c.token...)...)
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
	writeCert(t, c.certsDir, name+".pem", c.webCA.issue(t, csr.PublicKey, x509.ExtKeyUsageServerAuth, csr.DNSNames))
}

// startKeyserver starts keyserver i, on its address (a new one the first
// time), and waits until it is ready.
func (c *cluster) startKeyserver(t testing.TB, i int, extra ...string) {
	t.Helper()
	ks := c.keyservers[i]
	ks.runs++
	ks.audit = filepath.Join(c.dir, fmt.Sprintf("audit-%d-%d.log", i, ks.runs))
	args := append([]string{"serve", "-listen", ks.addr,
		"-tls-cert", c.link.serverCert, "-tls-key", c.link.serverKey, "-client-ca", c.link.caFile,
		"-policy", c.policyFile, "-audit-log", ks.audit, "-health-interval", "250ms", "-grace", "5s"}, c.token...)
	ks.proc = startProc(t, c.env, "keyserver", append(args, extra...)...)
	ks.addr = ks.proc.waitFor(t, clusterReadyKeyserver)[1]
}

// startEdge starts the edge and waits until it is ready.
func (c *cluster) startEdge(t testing.TB) {
	t.Helper()
	c.edge = startProc(t, nil, "edge", c.edgeArgs...)
	c.edgeAddr = c.edge.waitFor(t, clusterReadyEdge)[1]
}

// kill sends sig to keyserver i and waits for it to exit.
func (c *cluster) kill(t testing.TB, i int, sig syscall.Signal) {
	t.Helper()
	p := c.keyservers[i].proc
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		t.Fatalf("keyserver %d did not exit within 20 s of %v", i, sig)
	}
}

// signs returns the number of successful and failed Sign requests in the
// audit trail of keyserver i's current run.
func (c *cluster) signs(t testing.TB, i int) (ok, failed int) {
	t.Helper()
	f, err := os.Open(c.keyservers[i].audit)
	if os.IsNotExist(err) {
		return 0, 0
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var rec struct{ Op, Outcome string }
		if json.Unmarshal(sc.Bytes(), &rec) != nil || rec.Op != "sign" {
			continue // a line being written
		}
		if rec.Outcome == "OK" {
			ok++
		} else {
			failed++
		}
	}
	return ok, failed
}

// waitSigns waits until keyserver i's current run has answered at least n
// Sign requests successfully.
func (c *cluster) waitSigns(t testing.TB, i, n int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ok, _ := c.signs(t, i)
		if ok >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("keyserver %d answered %d Sign requests within 30 s, want %d", i, ok, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// clientConfig returns a TLS client configuration for name on the edge,
// without a session cache, so that every connection makes a full
// handshake.
func (c *cluster) clientConfig(name string) *tls.Config {
	return &tls.Config{ServerName: name, RootCAs: c.webCA.pool()}
}

// load keeps a number of clients making full TLS handshakes with the edge,
// each with the next of its configurations, until stopped. It counts
// successes, failures and handshakes in flight.
type load struct {
	addr     string
	configs  []*tls.Config
	ok       atomic.Int64
	failed   atomic.Int64
	inflight atomic.Int64
	// slow counts handshakes that took longer than a second.
	slow atomic.Int64

	mu        sync.Mutex
	errors    []string    // the first failures, for the test log
	failTimes []time.Time // when each failure happened
	byCfg     map[int]int64

	stop chan struct{}
	wg   sync.WaitGroup
}

func startLoad(addr string, clients int, configs ...*tls.Config) *load {
	l := &load{addr: addr, configs: configs, stop: make(chan struct{}), byCfg: make(map[int]int64)}
	var next atomic.Int64
	for range clients {
		l.wg.Go(func() {
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				i := int(next.Add(1)-1) % len(l.configs)
				l.handshake(i)
			}
		})
	}
	return l
}

func (l *load) handshake(i int) {
	l.inflight.Add(1)
	defer l.inflight.Add(-1)
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	d := tls.Dialer{Config: l.configs[i].Clone()}
	conn, err := d.DialContext(ctx, "tcp", l.addr)
	if time.Since(start) > time.Second {
		l.slow.Add(1)
	}
	if err != nil {
		l.failed.Add(1)
		l.mu.Lock()
		l.failTimes = append(l.failTimes, time.Now())
		if len(l.errors) < 20 {
			l.errors = append(l.errors, fmt.Sprintf("%s %s: %v", time.Now().Format("15:04:05.000"), l.configs[i].ServerName, err))
		}
		l.mu.Unlock()
		return
	}
	conn.Close()
	l.ok.Add(1)
	l.mu.Lock()
	l.byCfg[i]++
	l.mu.Unlock()
}

// halt stops the clients and waits for their last handshakes.
func (l *load) halt() {
	close(l.stop)
	l.wg.Wait()
}

// waitOK waits until n more handshakes have succeeded.
func (l *load) waitOK(t testing.TB, n int64) {
	t.Helper()
	want := l.ok.Load() + n
	deadline := time.Now().Add(30 * time.Second)
	for l.ok.Load() < want {
		if time.Now().After(deadline) {
			t.Fatalf("%d handshakes within 30 s, want %d more (%d failed: %s)", l.ok.Load(), n, l.failed.Load(), l.firstErrors())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (l *load) firstErrors() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.errors, "; ")
}

func mustWrite(t testing.TB, path, data string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), mode); err != nil {
		t.Fatal(err)
	}
}

// rssKiB returns the resident set size of process pid, from /proc.
func rssKiB(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// dialKeepAlive opens a TLS connection to the edge for name and returns an
// HTTP client that sends every request over it, and the connection.
func (c *cluster) dialKeepAlive(t testing.TB, name string) (*http.Client, *tls.Conn) {
	t.Helper()
	conn, err := tls.Dial("tcp", c.edgeAddr, c.clientConfig(name))
	if err != nil {
		t.Fatalf("handshake with %s: %v", name, err)
	}
	used := false
	client := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			DialTLSContext: func(context.Context, string, string) (net.Conn, error) {
				if used {
					return nil, fmt.Errorf("the test's connection to %s was closed", name)
				}
				used = true
				return conn, nil
			},
			MaxConnsPerHost: 1,
		},
	}
	t.Cleanup(func() { conn.Close() })
	return client, conn
}
