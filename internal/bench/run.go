package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"time"
)

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
	// edgeOwnTickets: the edge takes -ticket-keys-from-keyserver, set to
	// false (see writePolicy).
	edgeOwnTickets bool
	results        *Results
	rep            int // the repetition running, recorded with each result
	seq            int
	srv            servers
	parts          []string // how long each group of scenarios took, as "link 2m50s"
}

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
	if len(o.parts) > 0 {
		fmt.Fprintf(stdout, "scenarios: %s\n\n", strings.Join(o.parts, ", "))
	}
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

// noteErr logs err, if it is not nil, and returns errs with it added: a
// failed run is reported at the end, and the runs after it still run.
func (o *orchestrator) noteErr(errs []error, err error) []error {
	if err == nil {
		return errs
	}
	o.logf("%v", err)
	return append(errs, err)
}
