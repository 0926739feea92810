package bench

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"io"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/keyless-tls/keyless/internal/opsserver"
	"github.com/keyless-tls/keyless/link"
	keylessv1 "github.com/keyless-tls/keyless/proto/keyless/v1"
	"github.com/keyless-tls/keyless/signer"
	"github.com/keyless-tls/keyless/tlscore"
)

// newFleetTestPKI returns an orchestrator with the link PKI and, for n
// fleet links, their certificates and policy, in a temporary directory.
func newFleetTestPKI(t testing.TB, n int) (o *orchestrator, links, policy string) {
	t.Helper()
	o = &orchestrator{dir: t.TempDir(), policy: "set"}
	if err := os.MkdirAll(filepath.Join(o.dir, "pki"), 0o700); err != nil {
		t.Fatal(err)
	}
	var err error
	if o.link, err = newLinkPKI(filepath.Join(o.dir, "pki")); err != nil {
		t.Fatalf("newLinkPKI() = %v", err)
	}
	if links, policy, err = o.fleetPKI(n); err != nil {
		t.Fatalf("fleetPKI(%d) = %v", n, err)
	}
	return o, links, policy
}

// TestFleetPKI: each fleet link has its own certificate and key, issued by
// the link CA with the link's identity, and the policy lets every one of
// them (and the bench's edge) sign.
func TestFleetPKI(t *testing.T) {
	const n = 3
	o, links, policyFile := newFleetTestPKI(t, n)
	certs, err := readLinkCerts(links)
	if err != nil {
		t.Fatalf("readLinkCerts() = %v", err)
	}
	if len(certs) != n {
		t.Fatalf("%d certificates, want %d", len(certs), n)
	}
	caPEM, _ := os.ReadFile(o.link.caFile)
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	seen := map[string]bool{}
	for i, c := range certs {
		if _, err := c.Leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
			t.Errorf("link %d: certificate does not chain to the link CA: %v", i+1, err)
		}
		if len(c.Leaf.URIs) != 1 || c.Leaf.URIs[0].String() != fleetIdentity(i+1) {
			t.Errorf("link %d: URIs %v, want %s", i+1, c.Leaf.URIs, fleetIdentity(i+1))
		}
		pub := string(c.Leaf.RawSubjectPublicKeyInfo)
		if seen[pub] {
			t.Errorf("link %d shares its key with another link", i+1)
		}
		seen[pub] = true
	}
	if fi, err := os.Stat(links); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("links file mode = %v, %v; want 0600 (it holds private keys)", fi.Mode().Perm(), err)
	}
	data, _ := os.ReadFile(policyFile)
	policy, err := signer.ParsePolicy(policyFile, data)
	if err != nil {
		t.Fatalf("ParsePolicy(fleet policy) = %v", err)
	}
	for _, id := range []string{linkClientIdentity, fleetIdentity(1), fleetIdentity(n)} {
		if !strings.Contains(string(data), id) {
			t.Errorf("fleet policy does not name %s", id)
		}
	}
	if policy == nil {
		t.Fatal("ParsePolicy returned no policy")
	}
}

// TestReadLinkCerts: a links file must pair each certificate with its key.
func TestReadLinkCerts(t *testing.T) {
	_, links, _ := newFleetTestPKI(t, 2)
	good, _ := os.ReadFile(links)
	blocks := func(data []byte) []*pem.Block {
		var out []*pem.Block
		for b, rest := pem.Decode(data); b != nil; b, rest = pem.Decode(rest) {
			out = append(out, b)
		}
		return out
	}
	bs := blocks(good)
	enc := func(bs ...*pem.Block) []byte {
		var out []byte
		for _, b := range bs {
			out = append(out, pem.EncodeToMemory(b)...)
		}
		return out
	}
	dir := t.TempDir()
	for _, tt := range []struct {
		name    string
		data    []byte
		wantErr string
	}{
		{"empty", nil, "no certificate"},
		{"key first", enc(bs[1], bs[0]), "want a CERTIFICATE followed by its PRIVATE KEY"},
		{"certificate alone", enc(bs[0]), "want a CERTIFICATE followed by its PRIVATE KEY"},
		{"key of another link", enc(bs[0], bs[3]), "pair 1"},
	} {
		path := filepath.Join(dir, strings.ReplaceAll(tt.name, " ", "-")+".pem")
		if err := os.WriteFile(path, tt.data, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := readLinkCerts(path); err == nil || !strings.Contains(err.Error(), tt.wantErr) {
			t.Errorf("%s: readLinkCerts() = %v, want an error containing %q", tt.name, err, tt.wantErr)
		}
	}
}

// TestParseFleetMetrics reads each metric a snapshot needs, the GC count
// from the summary's count, and names what is missing.
func TestParseFleetMetrics(t *testing.T) {
	const exposition = `# TYPE go_gc_duration_seconds summary
go_gc_duration_seconds{quantile="0.5"} 1e-05
go_gc_duration_seconds_sum 0.01
go_gc_duration_seconds_count 42
# TYPE go_gc_heap_live_bytes gauge
go_gc_heap_live_bytes 3.5e+06
# TYPE go_goroutines gauge
go_goroutines 27
# TYPE go_memstats_stack_inuse_bytes gauge
go_memstats_stack_inuse_bytes 655360
# TYPE keyless_keyserver_stream_workers gauge
keyless_keyserver_stream_workers 3
# TYPE keyless_keyserver_streams_open gauge
keyless_keyserver_streams_open 2
`
	m, err := parseFleetMetrics(strings.NewReader(exposition))
	if err != nil {
		t.Fatalf("parseFleetMetrics() = %v", err)
	}
	want := map[string]float64{"go_gc_duration_seconds": 42, "go_gc_heap_live_bytes": 3.5e6, "go_goroutines": 27,
		"go_memstats_stack_inuse_bytes": 655360, "keyless_keyserver_stream_workers": 3, "keyless_keyserver_streams_open": 2}
	for k, v := range want {
		if m[k] != v {
			t.Errorf("%s = %v, want %v", k, m[k], v)
		}
	}
	cut := strings.Replace(exposition, "go_gc_heap_live_bytes 3.5e+06\n", "", 1)
	if _, err := parseFleetMetrics(strings.NewReader(cut)); err == nil || !strings.Contains(err.Error(), "go_gc_heap_live_bytes") {
		t.Errorf("parseFleetMetrics(without heap live) = %v, want an error naming it", err)
	}
}

// TestFleetTargets checks the W4 rows from made-up results.
func TestFleetTargets(t *testing.T) {
	r := newResults()
	r.add(fleetKey(fleetSideSingle, OpECDSASign, 1000), Result{Concurrency: 1000, OpsPerSec: 5000, P50us: 190000, P99us: 250000,
		CPU: map[string]float64{"keyserver": 240, "client": 30, "other": 20}, OpsPerRequest: 9.5, ResultsPerResponse: 12})
	r.add(fleetKey(fleetSideFleet, OpECDSASign, 1000), Result{Concurrency: 1000, OpsPerSec: 4000, P50us: 240000, P99us: 300000,
		CPU: map[string]float64{"keyserver": 300, "client": 70, "other": 20}, OpsPerRequest: 1, ResultsPerResponse: 1})
	r.add(fleetKey(fleetSideSingle, OpRSASign, 1000), Result{Concurrency: 1000, OpsPerSec: 2000})
	r.add(fleetKey(fleetSideFleet, OpRSASign, 1000), Result{Concurrency: 1000, OpsPerSec: 1900})
	r.fleet = &FleetResult{Links: 1000, KeyserverFlags: []string{"-max-connections-per-source", "2064"},
		Base:  FleetSnapshot{HeapLive: 4 << 20, Goroutines: 30, GCCycles: 2},
		Idle:  FleetSnapshot{HeapLive: 4<<20 + 1000*40*1024, Goroutines: 6030, GCCycles: 3, StreamsOpen: 1001},
		After: FleetSnapshot{StreamsOpen: 1001, StreamWorkers: 0, WorkersIdleAfter: 1.1},
	}
	byName := map[string]Row{}
	for _, row := range r.Rows() {
		byName[row.Name] = row
	}
	for _, tt := range []struct {
		name  string
		value float64
		met   bool
	}{
		{"W4/fleet-ratio/ecdsa-p256-sign", 0.8, false},
		{"W4/fleet-ratio/rsa2048-pss-sign", 0.95, true},
		{"W4/heap-per-idle-link", 40, true},
		{"W4/goroutines-per-idle-link", 6, true},
		{"W4/idle-stream-workers", 0, true},
	} {
		row, ok := byName[tt.name]
		if !ok {
			t.Errorf("no row %s", tt.name)
			continue
		}
		if row.Kind != "target" || row.Value == nil || *row.Value != tt.value || row.Met == nil || *row.Met != tt.met {
			t.Errorf("%s = kind %s, value %v, met %v; want target, %v, %t", tt.name, row.Kind, deref(row.Value), deref(row.Met), tt.value, tt.met)
		}
	}
	note := byName["W4/fleet-ratio/ecdsa-p256-sign"].Note
	for _, want := range []string{"-max-connections-per-source 2064", "keyserver 300 vs 240", "load generator 70 vs 30", "in/out 1.0/1.0 vs 9.5/12.0"} {
		if !strings.Contains(note, want) {
			t.Errorf("fleet ratio note %q lacks %q", note, want)
		}
	}
	row := byName["fleet/ecdsa-p256-sign/c1000"]
	if row.Kind != "fleet" || row.OpsPerSec != 4000 || row.Baseline == nil || *row.Baseline != 5000 || row.BaselineP50us != 190000 || row.P99us != 300000 {
		t.Errorf("fleet row = %+v", row)
	}
	// Workers still running, or ending late, miss the target.
	r.fleet.After.StreamWorkers = 2
	for _, row := range r.fleetTargets() {
		if row.Name == "W4/idle-stream-workers" && *row.Met {
			t.Errorf("idle-stream-workers met with 2 workers left")
		}
	}
}

func deref[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}

// fleetTestKeyserver is an in-process keyserver for the fleet tests:
// signer.Service with one in-memory P-256 key, over TCP with mutual TLS,
// the keyserver's transport options, health and metrics.
type fleetTestKeyserver struct {
	ln      net.Listener
	ops     *httptest.Server
	key     *ecdsa.PrivateKey
	pubFile string // the key's public key, PEM
}

func startFleetTestKeyserver(t testing.TB, o *orchestrator, policyFile string) *fleetTestKeyserver {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pubDER, _ := x509.MarshalPKIXPublicKey(key.Public())
	pubFile := filepath.Join(o.dir, "p256.pub.pem")
	if err := os.WriteFile(pubFile, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), 0o644); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(policyFile)
	policy, err := signer.ParsePolicy(policyFile, data)
	if err != nil {
		t.Fatal(err)
	}
	store, err := signer.NewMemoryStore(key)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := signer.NewService(signer.Config{Keys: store, Policy: policy, MaxConcurrent: 2, MaxQueued: 4096})
	if err != nil {
		t.Fatal(err)
	}
	creds, err := link.LoadMTLSCredentials(o.link.serverCert, o.link.serverKey, o.link.caFile)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(append(link.ServerOptions(), grpc.Creds(creds.ServerCredentials(svc.CheckPeer, nil, link.HandshakeObserver{})),
		grpc.StatsHandler(svc.StatsHandler()))...)
	keylessv1.RegisterKeylessServiceServer(srv, svc)
	hs := health.NewServer()
	hs.SetServingStatus(keylessv1.KeylessService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)
	reg := opsserver.NewRegistry()
	svc.RegisterQueueMetrics(reg)
	ops := httptest.NewServer(opsserver.Handler(reg, func(context.Context) error { return nil }))
	t.Cleanup(ops.Close)
	return &fleetTestKeyserver{ln: ln, ops: ops, key: key, pubFile: pubFile}
}

// TestFleetChild runs the "fleet" mode against an in-process keyserver
// (signer.Service over TCP with mutual TLS, the keyserver's transport
// options, health and metrics) with a few links: snapshots, open, both
// loads, each answered with one JSON line; then a fleet identity signs,
// and the signature verifies.
func TestFleetChild(t *testing.T) {
	const n = 4
	o, links, policyFile := newFleetTestPKI(t, n)
	ks := startFleetTestKeyserver(t, o, policyFile)
	ln, ops, key, pubFile := ks.ln, ks.ops, ks.key, ks.pubFile

	stdinR, stdinW := io.Pipe()
	var stdout, stderr syncBuffer
	done := make(chan error, 1)
	go func() {
		done <- runFleet(t.Context(), []string{"-addr", ln.Addr().String(), "-metrics", strings.TrimPrefix(ops.URL, "http://"),
			"-links", links, "-ca", o.link.caFile, "-cert", o.link.clientCert, "-key", o.link.clientKey,
			"-op-key", OpECDSASign + "=" + pubFile, "-warmup", "50ms", "-duration", "300ms"}, stdinR, &stdout, &stderr)
	}()
	t.Cleanup(func() { stdinW.Close() })
	lines := 0
	next := func(what string) string {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for {
			out := strings.Split(strings.TrimSuffix(stdout.String(), "\n"), "\n")
			if len(out) > lines && out[0] != "" {
				lines++
				return out[lines-1]
			}
			select {
			case err := <-done:
				t.Fatalf("fleet ended (%v) before %s; stderr:\n%s", err, what, stderr.String())
			case <-time.After(10 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %s within 60 s", what)
			}
		}
	}
	ask := func(cmd string, v any) {
		t.Helper()
		if _, err := io.WriteString(stdinW, cmd+"\n"); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal([]byte(next(cmd)), v); err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
	}
	if l := next("ready"); l != "ready" {
		t.Fatalf("first line %q, want ready", l)
	}
	var base, idle FleetSnapshot
	ask("snapshot base", &base)
	if base.GCCycles < 2 || base.HeapLive <= 0 || base.StreamsOpen != 1 || base.StreamWorkers != 0 || base.WorkersIdleAfter < 0 {
		t.Errorf("base snapshot = %+v; want 2 GCs or more, a heap, the single link's stream, no worker", base)
	}
	var opened FleetOpened
	ask("open", &opened)
	if opened.Links != n {
		t.Errorf("opened %d links, want %d", opened.Links, n)
	}
	ask("snapshot idle", &idle)
	if idle.StreamsOpen != n+1 || idle.StreamWorkers != 0 || idle.Goroutines <= base.Goroutines {
		t.Errorf("idle snapshot = %+v; want %d streams, no worker, more goroutines than %v", idle, n+1, base.Goroutines)
	}
	for _, side := range []string{fleetSideSingle, fleetSideFleet} {
		var r Result
		ask("load "+side+" "+OpECDSASign, &r)
		if r.Concurrency != n || r.Ops == 0 || r.Errors != 0 || r.OpsPerRequest <= 0 || r.ResultsPerResponse <= 0 {
			t.Errorf("load %s = %+v; want %d workers, operations, no error, operations per message", side, r, n)
		}
	}
	if _, err := io.WriteString(stdinW, "load nowhere "+OpECDSASign+"\n"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), `side "nowhere"`) {
			t.Errorf("fleet after a bad command = %v, want an error naming the side", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("fleet did not end after a bad command")
	}

	// A fleet identity's signature verifies.
	certs, _ := readLinkCerts(links)
	cfg, err := link.ClientMTLSConfig(o.link.clientCert, o.link.clientKey, o.link.caFile, o.link.serverName)
	if err != nil {
		t.Fatal(err)
	}
	cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &certs[n-1], nil }
	client, err := tlscore.Dial(tlscore.ClientConfig{Addresses: []string{ln.Addr().String()}, TLS: cfg})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	id, _ := link.KeyIDOf(key.Public())
	alg, _ := link.AlgorithmFor(keylessv1.SignatureAlgorithm_SIGNATURE_ALGORITHM_ECDSA_SHA256)
	digest := sha256.Sum256([]byte("fleet"))
	sig, err := client.Sign(t.Context(), id, alg, digest[:], nil)
	if err != nil {
		t.Fatalf("Sign() as %s = %v", fleetIdentity(n), err)
	}
	if !ecdsa.VerifyASN1(&key.PublicKey, digest[:], sig) {
		t.Error("the fleet identity's signature does not verify")
	}
}
