package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"
)

// keyopsRun measures key operation op at concurrency n on side "keyless"
// (through the keyserver at ksAddr), "inproc" (the baseline) or
// "inproc-paused" (the baseline with every operation following an idle gap
// of pause; see pausedBaselineRun).
func (o *orchestrator) keyopsRun(ctx context.Context, side, op string, n int, ksAddr string, pause time.Duration) error {
	env, args := o.keyopsArgs(side, op, n, ksAddr, pause, o.loadArgs(n))
	return o.record(ctx, keyopsKey(side, op, n), op, fmt.Sprintf("%s-%s-c%d", side, op, n), env, args...)
}

// keyopsArgs returns the environment and arguments of a key-operation
// child of keyopsRun, with the load flags load.
func (o *orchestrator) keyopsArgs(side, op string, n int, ksAddr string, pause time.Duration, load []string) (env, args []string) {
	mode := "inproc"
	if side == "keyless" {
		mode = "keyops"
	}
	args = append([]string{mode, "-op", op, "-pub", o.pubs[op]}, load...)
	if pause > 0 {
		args = append(args, "-pause", pause.String())
	}
	env = o.env
	if side != "keyless" {
		args = append(args, o.token...)
	} else {
		env = nil
		args = append(args, "-watch", watchArg("keyserver", o.srv.keyserver), "-addr", ksAddr, "-ca", o.link.caFile, "-cert", o.link.clientCert, "-key", o.link.clientKey,
			"-server-name", o.link.serverName)
		args = append(args, o.linkWindowArgs()...)
		if n == 1 {
			args = append(args, "-empty", "500ms")
		}
	}
	return env, args
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

// handshakeRun measures handshake kind (full or resumed, by group) at
// concurrency n against a TLS server: the edge ("keyless"), or crypto/tls
// with the token's key ("hsm") or a software key ("soft").
func (o *orchestrator) handshakeRun(ctx context.Context, group, kind, server string, n int) error {
	addr, watch, err := o.srv.tls(server)
	if err != nil {
		return err
	}
	args := append([]string{"loadgen", "-addr", addr, "-kind", kind, "-watch", watch}, o.loadArgs(n)...)
	return o.record(ctx, handshakeKey(group, kind, server, n), kind, fmt.Sprintf("loadgen-%s-%s-c%d", kind, server, n), nil, args...)
}

// record runs a child that prints one Result (through keyserverRun when
// the run goes through the keyserver), records the result as run k of the
// current repetition, and logs it under what.
func (o *orchestrator) record(ctx context.Context, k runKey, what, name string, env []string, args ...string) error {
	run := o.runResult
	if k.side == "keyless" {
		run = o.keyserverRun
	}
	r, err := run(ctx, name, env, args...)
	if err != nil {
		return err
	}
	r.rep = o.rep
	o.results.add(k, r)
	o.progress(k.group, what, k.side, r)
	return nil
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

// loadArgs are the flags of a load child at concurrency n.
func (o *orchestrator) loadArgs(n int) []string {
	return []string{"-concurrency", strconv.Itoa(n), "-warmup", o.cfg.Warmup.String(), "-duration", o.cfg.Duration.String()}
}

// childTimeout bounds a load child: its warm-up, twice its measured
// time, and a minute more to start and report, for the longest run of
// any scenario.
func (o *orchestrator) childTimeout() time.Duration {
	warmup, duration := o.cfg.Warmup, o.cfg.Duration
	if rtts := slices.Concat(o.cfg.LinkRTTs, o.cfg.LinkFarRTTs); len(rtts) > 0 {
		warmup = max(warmup, o.cfg.LinkWarmup+2*slices.Max(rtts))
		duration = max(duration, o.cfg.LinkDuration)
	}
	return warmup + 2*duration + 60*time.Second
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

// progress logs one run's figures as it ends.
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
	if r.EdgeShed > 0 || len(r.EdgeCallErrors) > 0 {
		extra += fmt.Sprintf("; edge shed %d, keyserver call errors %v", r.EdgeShed, r.EdgeCallErrors)
	}
	if r.EdgeCallMeanMs > 0 {
		extra += fmt.Sprintf("; mean keyserver call %.1f ms at the edge, %.1f ms in the keyserver; HSM queue mean %.0f max %.0f; edge in flight mean %.0f max %.0f",
			r.EdgeCallMeanMs, r.KeyserverOpMeanMs, r.HSMQueue[0], r.HSMQueue[1], r.EdgeInFlight[0], r.EdgeInFlight[1])
	}
	if r.DrainOps > 0 {
		extra += fmt.Sprintf("; the keyserver answered %d operations in the %.0f ms after the load", r.DrainOps, r.DrainMs)
	}
	if r.LinkMaxUp > 0 || r.LinkMaxDown > 0 {
		extra += fmt.Sprintf("; relay held at most %d B up, %d B down", r.LinkMaxUp, r.LinkMaxDown)
	}
	if len(r.FramesPerOp) > 0 {
		extra += "; frames/op " + framesStr(r.FramesPerOp)
	}
	if r.Errors > 0 {
		extra += fmt.Sprintf(", %d errors (first: %s)", r.Errors, r.FirstError)
	}
	o.logf("%-9s %-18s %-8s c=%-4d %9.0f/s  p50 %7.0f µs  p99 %7.0f µs%s", group, what, side, r.Concurrency, r.OpsPerSec, r.P50us, r.P99us, extra)
}
