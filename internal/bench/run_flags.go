package bench

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/keyless-tls/keyless/link"
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
	// "keyops/rsa2048-decrypt", "handshake/tls13", "resume", "edgemem",
	// "fleet/ecdsa-p256-sign");
	// nil or "all" means every scenario.
	Scenarios []string
	// Repeat runs every figure and its baseline this many times,
	// alternating, and keeps the median of each.
	Repeat int
	// MemConns is the number of idle connections of the edge memory
	// scenario.
	MemConns int
	// FleetLinks is the number of edge links of the fleet scenario.
	FleetLinks int
	// Module is the SoftHSM PKCS #11 module.
	Module string
	// KeyserverFlags and EdgeFlags are added to the keyserver's and the
	// edge's command lines, to try other settings.
	KeyserverFlags, EdgeFlags []string
	// LinkRTT, if positive, puts a [Relay] with this round-trip time
	// between the keyserver and the clients of the keyops, handshake and
	// resume scenarios (their edge and the key-operation load), as if the
	// keyserver were far away. The link scenarios use the same relay with
	// their own RTTs, and set it back to LinkRTT when they end.
	LinkRTT time.Duration
	// LinkRelay puts the relay in even when LinkRTT is zero, so that runs
	// at RTT 0 and above go through the same code.
	LinkRelay bool
	// LinkWindow, if positive, is the -link-window of the keyserver, the
	// edge and the key-operation client; zero leaves their default.
	LinkWindow int
	// KeyserverEnv and EdgeEnv are added to the keyserver's and the
	// edge's environment (as "GOMAXPROCS=1").
	KeyserverEnv, EdgeEnv []string
	// LinkRTTs are the round-trip times of the link scenarios, each
	// measured at every LinkConcurrency, through one relay whose RTT is
	// changed between runs; the smallest and the largest are the W1 and
	// W2 pair. LinkFarRTTs are measured at the highest concurrency only
	// (W3).
	LinkRTTs, LinkFarRTTs []time.Duration
	// LinkConcurrency are the concurrencies of the link scenarios: the
	// highest is W1's and W3's, the one below it W1's baseline, and 1
	// W2's.
	LinkConcurrency []int
	// LinkWarmup and LinkDuration bound every link run; a run's warm-up
	// is LinkWarmup plus two RTTs.
	LinkWarmup, LinkDuration time.Duration
}

// parseRunFlags parses the flags of the "run" mode.
func parseRunFlags(args []string, stderr io.Writer) (*RunConfig, error) {
	fs := newFlagSet("run", stderr)
	defOut := os.Getenv("BENCH_OUT")
	if defOut == "" {
		defOut = "bench-results.json"
	}
	c := &RunConfig{}
	var keyopsConc, hsConc, conc, scenarios, ksFlags, edgeFlags, ksEnv, edgeEnv, linkRTTs, linkFar, linkConc string
	fs.StringVar(&c.Bin, "bin", "", "directory with keyserver and edge binaries (default: go build them)")
	fs.StringVar(&c.Out, "out", defOut, "JSON results file (default $BENCH_OUT, else bench-results.json)")
	fs.StringVar(&c.WorkDir, "workdir", "", "directory for the token, PKI and logs (default: a temporary one)")
	fs.BoolVar(&c.Keep, "keep", false, "keep the temporary work directory")
	fs.DurationVar(&c.Warmup, "warmup", 300*time.Millisecond, "warm-up of each run, not measured")
	fs.DurationVar(&c.Duration, "duration", 1500*time.Millisecond, "measured time of each run")
	fs.StringVar(&keyopsConc, "keyops-concurrency", "1,4,64", "concurrencies of the key-operation scenarios, both sides (SoftHSM's best lies near 2–8)")
	fs.StringVar(&hsConc, "handshake-concurrency", "1,32", "concurrencies of the handshake scenarios")
	fs.StringVar(&conc, "concurrency", "", "concurrencies of every scenario (overrides the two above)")
	fs.StringVar(&scenarios, "scenarios", "all", "comma-separated scenario name prefixes: keyops, handshake, resume, link, edgemem, fleet, or finer such as keyops/ecdsa, handshake/tls12, link/tls13-rsa, link/keyops, fleet/ecdsa")
	fs.IntVar(&c.Repeat, "repeat", 1, "runs of each figure and its baseline, alternating; the median is kept (for noisy machines)")
	fs.IntVar(&c.MemConns, "mem-conns", 5000, "idle connections of the edge memory scenario")
	fs.IntVar(&c.FleetLinks, "fleet-links", 1000, "edge links of the fleet scenario, each its own connections (link and health watch, as cmd/edge), stream and identity")
	fs.StringVar(&c.Module, "module", "/usr/lib/softhsm/libsofthsm2.so", "SoftHSM PKCS #11 module")
	fs.DurationVar(&c.LinkRTT, "link-rtt", 0, "put a relay on 127.0.0.1 that adds this round-trip time between the keyserver and the clients of the keyops, handshake and resume scenarios (0: none); the link scenarios set their own (-link-rtts)")
	fs.BoolVar(&c.LinkRelay, "link-relay", false, "put the relay in even at -link-rtt 0, to compare runs through the same relay")
	fs.IntVar(&c.LinkWindow, "link-window", 0, "-link-window of the keyserver, the edges and keyops, in bytes (0: their default)")
	fs.StringVar(&linkRTTs, "link-rtts", "0,20ms,80ms", "link scenarios: round-trip times through the relay, each at every -link-concurrency (the smallest and largest are compared by W1 and W2)")
	fs.StringVar(&linkFar, "link-far-rtts", "300ms", "link scenarios: further round-trip times, at the highest -link-concurrency only (W3); empty for none")
	fs.StringVar(&linkConc, "link-concurrency", "1,32,1024", "link scenarios: concurrencies (the highest is W1's and W3's, the next one down W1's baseline)")
	fs.DurationVar(&c.LinkWarmup, "link-warmup", time.Second, "link scenarios: warm-up of each run, plus two RTTs")
	fs.DurationVar(&c.LinkDuration, "link-duration", 3*time.Second, "link scenarios: measured time of each run")
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
	if c.LinkRTTs, err = parseDurations(linkRTTs, false); err != nil {
		return nil, fmt.Errorf("bench: -link-rtts: %w", err)
	}
	if c.LinkFarRTTs, err = parseDurations(linkFar, true); err != nil {
		return nil, fmt.Errorf("bench: -link-far-rtts: %w", err)
	}
	if c.LinkConcurrency, err = parseInts(linkConc); err != nil {
		return nil, fmt.Errorf("bench: -link-concurrency: %w", err)
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
	case c.LinkWarmup < 0 || c.LinkDuration <= 0:
		return nil, errors.New("bench: -link-warmup must be 0 or more and -link-duration more than 0")
	case c.MemConns < 1:
		return nil, errors.New("bench: -mem-conns must be at least 1")
	case c.Repeat < 1:
		return nil, errors.New("bench: -repeat must be at least 1")
	case c.Out == "":
		return nil, errors.New("bench: -out is empty")
	case c.LinkRTT < 0:
		return nil, fmt.Errorf("bench: -link-rtt %v: must not be negative", c.LinkRTT)
	case c.LinkWindow != 0 && link.ValidateWindowSize(c.LinkWindow) != nil:
		return nil, fmt.Errorf("bench: -link-window %d: %w", c.LinkWindow, link.ValidateWindowSize(c.LinkWindow))
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

// parseDurations parses a comma-separated list of durations, each 0 or
// more ("0" needs no unit); empty is an error unless emptyOK.
func parseDurations(s string, emptyOK bool) ([]time.Duration, error) {
	var out []time.Duration
	for f := range strings.SplitSeq(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		d, err := time.ParseDuration(f)
		if err != nil || d < 0 {
			return nil, fmt.Errorf("%q is not a duration of 0 or more (as 80ms)", f)
		}
		out = append(out, d)
	}
	if len(out) == 0 && !emptyOK {
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

// selectedOf returns the items of group that are selected, in order. A
// resume kind is selected by its short name ("resume/tls13").
func (c *RunConfig) selectedOf(group string, items []string) []string {
	var out []string
	for _, it := range items {
		name := it
		if group == "resume" {
			name = resumeName(it)
		}
		if c.selected(group + "/" + name) {
			out = append(out, it)
		}
	}
	return out
}
