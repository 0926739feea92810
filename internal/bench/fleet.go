package bench

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/keyless-tls/keyless/link"
	"github.com/keyless-tls/keyless/tlscore"
)

// The "fleet" mode is the load generator of the fleet scenario: many edge
// links on one keyserver. It opens one link as the bench's edge identity
// (the single link), then, when told, one link per client certificate of
// -links, each a tlscore.Client of its own, as cmd/edge keeps one per
// keyserver (a connection with one stream, and a second connection for its
// health watch). It answers commands on standard input,
// one JSON line each on standard output:
//
//	snapshot PHASE   the keyserver's memory and goroutines (FleetSnapshot)
//	open             open every fleet link, one operation each (FleetOpened)
//	load SIDE OP     a closed-loop load of OP (a key operation) with one
//	                 worker per fleet link: on the fleet links, one
//	                 operation in flight on each (SIDE "fleet"), or all on
//	                 the single link (SIDE "single"); a Result
//
// It exits when standard input closes or -lifetime passes.

// FleetSnapshot is the keyserver's state read from its metrics after the
// fleet's links have been left alone: the heap found live by garbage
// collections made after the links were set up, and the goroutines once
// every stream worker has ended.
type FleetSnapshot struct {
	Phase string `json:"phase"`
	// HeapLive is go_gc_heap_live_bytes after GCCycles collections that
	// began after the snapshot started (driven by DriveOps operations on
	// the single link).
	HeapLive  float64 `json:"heap_live_bytes"`
	GCCycles  int     `json:"gc_cycles"`
	DriveOps  int64   `json:"drive_ops"`
	StackUsed float64 `json:"stack_inuse_bytes"`
	// Goroutines, StreamWorkers and StreamsOpen are go_goroutines,
	// keyless_keyserver_stream_workers and keyless_keyserver_streams_open
	// once the workers have ended (or WorkersIdleAfter passed without).
	Goroutines    float64 `json:"goroutines"`
	StreamWorkers float64 `json:"stream_workers"`
	StreamsOpen   float64 `json:"streams_open"`
	// WorkersIdleAfter is how long after the last operation the stream
	// workers took to reach 0, in seconds; -1 if they did not within
	// fleetWorkersWait.
	WorkersIdleAfter float64 `json:"workers_idle_after_s"`
}

// FleetOpened is the answer to "open".
type FleetOpened struct {
	Links   int     `json:"links"`
	Seconds float64 `json:"seconds"`
}

// fleetWorkersWait bounds the wait for the keyserver's stream workers to
// end after a load: they end after a second idle.
const fleetWorkersWait = 10 * time.Second

// fleetKeys are the key operations the fleet child can load, with their
// public key files, from its -op-key flags.
type fleetKeys map[string]string

func (k fleetKeys) String() string { return fmt.Sprint(map[string]string(k)) }

func (k fleetKeys) Set(v string) error {
	op, file, ok := strings.Cut(v, "=")
	if !ok || op == "" || file == "" {
		return fmt.Errorf("%q: want OP=PUBLIC-KEY-FILE", v)
	}
	k[op] = file
	return nil
}

// fleetChild is the state of a "fleet" child.
type fleetChild struct {
	addr, metrics string
	lk            linkFlags
	linksFile     string
	keys          fleetKeys
	parallel      int
	warmup        time.Duration
	duration      time.Duration
	timeout       time.Duration
	watch         string

	base   *tls.Config // the single link's, cloned for each fleet link
	single *tlscore.Client
	fleet  []*tlscore.Client
}

// runFleet is the "fleet" mode.
func runFleet(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := newFlagSet("fleet", stderr)
	c := &fleetChild{keys: fleetKeys{}}
	fs.StringVar(&c.addr, "addr", "", "keyserver address host:port (required)")
	fs.StringVar(&c.metrics, "metrics", "", "the keyserver's metrics listener host:port (required): its heap, goroutines and stream workers are read there")
	fs.StringVar(&c.linksFile, "links", "", "PEM file of the fleet links' client certificates, each followed by its private key (required)")
	fs.Var(c.keys, "op-key", "OP=PUBLIC-KEY-FILE: a key operation the loads may ask for, and its key (repeat; at least one)")
	fs.IntVar(&c.parallel, "parallel", 32, "links being opened at once")
	fs.DurationVar(&c.warmup, "warmup", time.Second, "time each load runs before measuring")
	fs.DurationVar(&c.duration, "duration", 2*time.Second, "time each load measures")
	fs.DurationVar(&c.timeout, "op-timeout", tlscore.DefaultCallTimeout, "deadline of each operation")
	fs.StringVar(&c.watch, "watch", "", "other processes whose CPU time to measure, as name=pid,name=pid")
	lifetime := fs.Duration("lifetime", 10*time.Minute, "exit after this long whatever happens")
	c.lk.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	switch {
	case c.addr == "":
		return errors.New("bench: fleet: -addr is required")
	case c.metrics == "":
		return errors.New("bench: fleet: -metrics is required")
	case c.linksFile == "":
		return errors.New("bench: fleet: -links is required")
	case len(c.keys) == 0:
		return errors.New("bench: fleet: give at least one -op-key OP=FILE")
	case c.parallel < 1:
		return fmt.Errorf("bench: fleet: -parallel %d: want at least 1", c.parallel)
	}
	ctx, cancel := context.WithTimeout(ctx, *lifetime)
	defer cancel()
	var err error
	if c.base, err = c.lk.tlsConfig(); err != nil {
		return err
	}
	certs, err := readLinkCerts(c.linksFile)
	if err != nil {
		return err
	}
	// A connection per link, and room for the process's own files.
	if err := raiseNoFile(uint64(len(certs)) + 1000); err != nil {
		return err
	}
	if c.single, err = c.dial(c.base); err != nil {
		return err
	}
	defer func() {
		for _, l := range c.fleet {
			l.Close()
		}
		c.single.Close()
	}()
	// The single link's stream is opened, as the fleet links' are by open.
	if err := c.touch(ctx, c.single); err != nil {
		return fmt.Errorf("bench: fleet: single link: %w", err)
	}
	fmt.Fprintln(stdout, "ready")

	cmds := make(chan string)
	go func() {
		defer close(cmds)
		lines := bufio.NewScanner(stdin)
		for lines.Scan() {
			cmds <- lines.Text()
		}
	}()
	for {
		var line string
		select {
		case <-ctx.Done():
			return ctx.Err()
		case l, ok := <-cmds:
			if !ok {
				return nil
			}
			line = l
		}
		var out any
		switch f := strings.Fields(line); {
		case len(f) == 2 && f[0] == "snapshot":
			out, err = c.snapshot(ctx, f[1])
		case len(f) == 1 && f[0] == "open":
			out, err = c.open(ctx, certs)
		case len(f) == 3 && f[0] == "load":
			out, err = c.load(ctx, f[1], f[2])
		default:
			err = fmt.Errorf("bench: fleet: unknown command %q", line)
		}
		if err != nil {
			return err
		}
		if err := writeJSON(stdout, out); err != nil {
			return err
		}
	}
}

// readLinkCerts reads the fleet's client certificates: PEM CERTIFICATE
// blocks, each followed by the PRIVATE KEY of its certificate.
func readLinkCerts(path string) ([]tls.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("bench: -links: %w", err)
	}
	var certs []tls.Certificate
	for rest := data; ; {
		var cb, kb *pem.Block
		if cb, rest = pem.Decode(rest); cb == nil {
			break
		}
		if kb, rest = pem.Decode(rest); kb == nil || cb.Type != "CERTIFICATE" || !link.IsPrivateKeyBlock(kb) {
			return nil, fmt.Errorf("bench: -links %s: block %d: want a CERTIFICATE followed by its PRIVATE KEY", path, 2*len(certs)+1)
		}
		cert, err := tls.X509KeyPair(pem.EncodeToMemory(cb), pem.EncodeToMemory(kb))
		if err != nil {
			return nil, fmt.Errorf("bench: -links %s: pair %d: %w", path, len(certs)+1, err)
		}
		certs = append(certs, cert)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("bench: -links %s: no certificate", path)
	}
	return certs, nil
}

// dial returns a tlscore.Client for the keyserver with cfg, as cmd/edge
// makes one: with metrics, so also with the second connection on which it
// watches the keyserver's health.
func (c *fleetChild) dial(cfg *tls.Config) (*tlscore.Client, error) {
	return tlscore.Dial(tlscore.ClientConfig{Addresses: []string{c.addr}, TLS: cfg, CallTimeout: c.timeout, WindowSize: c.lk.window,
		Metrics: tlscore.NewMetrics(prometheus.NewRegistry())})
}

// touch performs one operation on l, which opens its stream, retrying
// for up to 20 s while the keyserver is not ready.
func (c *fleetChild) touch(ctx context.Context, l *tlscore.Client) error {
	op, err := c.ops(c.anyOp(), 1, func(int) *tlscore.Client { return l })
	if err != nil {
		return err
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		octx, cancel := context.WithTimeout(ctx, c.timeout)
		err := op(octx, 0)
		cancel()
		if err == nil || time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// anyOp returns the first key operation of the table that -op-key names.
func (c *fleetChild) anyOp() string {
	for _, op := range keyOps {
		if _, ok := c.keys[op]; ok {
			return op
		}
	}
	for op := range c.keys {
		return op
	}
	return ""
}

// ops returns op as an Op for n workers, worker w on client(w).
func (c *fleetChild) ops(op string, n int, client func(w int) *tlscore.Client) (Op, error) {
	pub, ok := c.keys[op]
	if !ok {
		return nil, fmt.Errorf("bench: fleet: no -op-key for %q", op)
	}
	kf := keyFlags{op: op, pub: pub}
	id, ins, err := kf.inputs(n)
	if err != nil {
		return nil, err
	}
	per := make([]Op, n)
	for w := range per {
		per[w] = clientKeyOp(client(w), op, id, ins)
	}
	return func(ctx context.Context, w int) error { return per[w](ctx, w) }, nil
}

// open opens a link per certificate, c.parallel at a time, each with one
// operation so that its stream is open.
func (c *fleetChild) open(ctx context.Context, certs []tls.Certificate) (FleetOpened, error) {
	if len(c.fleet) > 0 {
		return FleetOpened{}, errors.New("bench: fleet: the links are open already")
	}
	start := time.Now()
	c.fleet = make([]*tlscore.Client, len(certs))
	errs := make([]error, len(certs))
	var next atomic.Int64
	var wg sync.WaitGroup
	for range c.parallel {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= len(certs) || ctx.Err() != nil {
					return
				}
				cfg := c.base.Clone()
				cert := &certs[i]
				cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
				l, err := c.dial(cfg)
				if err == nil {
					c.fleet[i] = l
					err = c.touch(ctx, l)
				}
				errs[i] = err
			}
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			return FleetOpened{}, fmt.Errorf("bench: fleet: link %d of %d: %w", i+1, len(certs), err)
		}
	}
	if err := ctx.Err(); err != nil {
		return FleetOpened{}, err
	}
	return FleetOpened{Links: len(c.fleet), Seconds: round3(time.Since(start).Seconds())}, nil
}

// load runs op with one worker per fleet link, on side "fleet" or
// "single".
func (c *fleetChild) load(ctx context.Context, side, op string) (Result, error) {
	n := len(c.fleet)
	if n == 0 {
		return Result{}, errors.New("bench: fleet: load before open")
	}
	var client func(int) *tlscore.Client
	switch side {
	case "fleet":
		client = func(w int) *tlscore.Client { return c.fleet[w] }
	case "single":
		client = func(int) *tlscore.Client { return c.single }
	default:
		return Result{}, fmt.Errorf("bench: fleet: load side %q: want fleet or single", side)
	}
	o, err := c.ops(op, n, client)
	if err != nil {
		return Result{}, err
	}
	watch, err := parseWatch(c.watch)
	if err != nil {
		return Result{}, err
	}
	watch["client"] = os.Getpid()
	load := &Load{Name: "fleet/" + side + "/" + op, Concurrency: n, Warmup: c.warmup, Duration: c.duration, OpTimeout: c.timeout, Op: o, Watch: watch}
	// How many operations share a message, from the keyserver's stream
	// counters: one link batches, a fleet link carries one at a time.
	before, err := scrapeTraffic(ctx, c.metrics)
	if err != nil {
		return Result{}, err
	}
	r, err := load.Run(ctx)
	if err != nil {
		return r, err
	}
	after, err := scrapeTraffic(ctx, c.metrics)
	if err != nil {
		return r, err
	}
	r.sharing(before, after)
	return r, nil
}

// snapshot makes the keyserver collect its garbage twice, with operations
// on the single link (eight at a time) while it reads its metrics, then
// waits for its stream workers to end, and reports its state.
func (c *fleetChild) snapshot(ctx context.Context, phase string) (FleetSnapshot, error) {
	s := FleetSnapshot{Phase: phase, WorkersIdleAfter: -1}
	m, err := scrapeMetrics(ctx, c.metrics)
	if err != nil {
		return s, err
	}
	gc0 := m["go_gc_duration_seconds"]
	const drivers = 8
	op, err := c.ops(c.anyOp(), drivers, func(int) *tlscore.Client { return c.single })
	if err != nil {
		return s, err
	}
	dctx, stop := context.WithCancel(ctx)
	var (
		ops     atomic.Int64
		failed  atomic.Value
		wg      sync.WaitGroup
		timeout = time.Now().Add(60 * time.Second)
	)
	for w := range drivers {
		wg.Go(func() {
			for dctx.Err() == nil {
				octx, cancel := context.WithTimeout(dctx, c.timeout)
				err := op(octx, w)
				cancel()
				if err != nil && dctx.Err() == nil {
					failed.CompareAndSwap(nil, err)
					return
				}
				ops.Add(1)
			}
		})
	}
	for err == nil {
		if m, err = scrapeMetrics(ctx, c.metrics); err != nil {
			break
		}
		if m["go_gc_duration_seconds"] >= gc0+2 {
			break
		}
		if f := failed.Load(); f != nil {
			err = fmt.Errorf("bench: fleet: driving the keyserver's GC: %w", f.(error))
		} else if time.Now().After(timeout) {
			err = errors.New("bench: fleet: the keyserver made fewer than 2 GCs in 60 s of operations")
		}
		time.Sleep(20 * time.Millisecond)
	}
	stop()
	wg.Wait()
	if err != nil {
		return s, err
	}
	ended := time.Now()
	s.HeapLive, s.GCCycles, s.DriveOps = m["go_gc_heap_live_bytes"], int(m["go_gc_duration_seconds"]-gc0), ops.Load()
	for {
		if m, err = scrapeMetrics(ctx, c.metrics); err != nil {
			return s, err
		}
		if m["keyless_keyserver_stream_workers"] == 0 {
			s.WorkersIdleAfter = round3(time.Since(ended).Seconds())
			break
		}
		if time.Since(ended) > fleetWorkersWait {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	s.Goroutines, s.StreamWorkers, s.StreamsOpen = m["go_goroutines"], m["keyless_keyserver_stream_workers"], m["keyless_keyserver_streams_open"]
	s.StackUsed = m["go_memstats_stack_inuse_bytes"]
	return s, nil
}

// fleetMetrics are the keyserver metrics a snapshot reads; scrapeMetrics
// fails unless each is there.
var fleetMetrics = []string{
	"go_gc_duration_seconds", "go_gc_heap_live_bytes", "go_goroutines", "go_memstats_stack_inuse_bytes",
	"keyless_keyserver_stream_workers", "keyless_keyserver_streams_open",
}

// parseFleetMetrics returns the value of each of fleetMetrics in a
// Prometheus text exposition: the sum of its series, and for a summary
// its count.
func parseFleetMetrics(r io.Reader) (map[string]float64, error) {
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(r)
	if err != nil {
		return nil, fmt.Errorf("bench: keyserver metrics: %w", err)
	}
	out := make(map[string]float64, len(fleetMetrics))
	var missing []string
	for _, name := range fleetMetrics {
		mf, ok := families[name]
		if !ok || len(mf.GetMetric()) == 0 {
			missing = append(missing, name)
			continue
		}
		var v float64
		for _, m := range mf.GetMetric() {
			switch {
			case m.GetSummary() != nil:
				v += float64(m.GetSummary().GetSampleCount())
			case m.GetGauge() != nil:
				v += m.GetGauge().GetValue()
			case m.GetCounter() != nil:
				v += m.GetCounter().GetValue()
			case m.GetUntyped() != nil:
				v += m.GetUntyped().GetValue()
			}
		}
		out[name] = v
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("bench: the keyserver's metrics lack %s (an older keyserver?)", strings.Join(missing, ", "))
	}
	return out, nil
}

// scrapeMetrics reads fleetMetrics from the keyserver whose metrics
// listener is addr.
func scrapeMetrics(ctx context.Context, addr string) (map[string]float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("bench: keyserver metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("bench: keyserver metrics: %s", resp.Status)
	}
	return parseFleetMetrics(resp.Body)
}

var _ flag.Value = fleetKeys{}
