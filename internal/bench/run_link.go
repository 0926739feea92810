package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"time"
)

// The link scenarios: full handshakes through an edge whose keyserver
// link goes through the relay, and key operations on one link through it,
// at several round-trip times set on the same relay between runs (so the
// edge, its connection to the keyserver and the keyserver stay the same).
var (
	linkKinds = []string{HandshakeTLS13ECDSA, HandshakeTLS13RSA, HandshakeTLS12RSAKex, HandshakeTLS12ECDHERSA}
	linkOps   = []string{OpECDSASign, OpRSASign}
)

// linkClientTimeout bounds a handshake of the link scenarios' load
// generator, as a patient client would: a handshake that fails is then
// refused by the edge (shed, or its keyserver call past the edge's
// deadline), not given up by the client.
const linkClientTimeout = 10 * time.Second

// linkShape is what the link scenarios measure and what the W targets
// compare: handshakes at every concurrency at each of rtts, at top only
// at each of far; W1 compares top at the largest of rtts with base at the
// smallest, W2 concurrency 1 at the same two, and W3 counts the failures
// at top at the largest of rtts and at each of far.
type linkShape struct {
	rtts, far []time.Duration
	conc      []int
}

func (s linkShape) near() time.Duration { return slices.Min(s.rtts) }
func (s linkShape) farthest() time.Duration {
	return slices.Max(s.rtts)
}
func (s linkShape) top() int { return slices.Max(s.conc) }

// base is the highest concurrency below top, or top if there is none.
func (s linkShape) base() int {
	b := 0
	for _, n := range s.conc {
		if n < s.top() && n > b {
			b = n
		}
	}
	if b == 0 {
		return s.top()
	}
	return b
}

// all returns every RTT measured, in increasing order, once each.
func (s linkShape) all() []time.Duration {
	out := slices.Concat(s.rtts, s.far)
	slices.Sort(out)
	return slices.Compact(out)
}

// w3 returns the RTTs whose failures W3 counts.
func (s linkShape) w3() []time.Duration {
	out := append([]time.Duration{s.farthest()}, s.far...)
	slices.Sort(out)
	return slices.Compact(out)
}

// rttName names an RTT in row and run names: "rtt80" for 80 ms.
func rttName(d time.Duration) string {
	return "rtt" + strconv.FormatFloat(float64(d)/float64(time.Millisecond), 'f', -1, 64)
}

// linkWhat is a link run's runKey.what: the handshake kind or key
// operation and the RTT, as "tls13-ecdsa/rtt80".
func linkWhat(item string, rtt time.Duration) string { return item + "/" + rttName(rtt) }

// linkPlan is the selected link scenarios.
type linkPlan struct {
	kinds, ops []string
	shape      linkShape
}

func (p linkPlan) empty() bool { return len(p.kinds) == 0 && len(p.ops) == 0 }

// linkPlan returns the selected link scenarios: kinds by "link/KIND", key
// operations by "link/keyops/OP".
func (o *orchestrator) linkPlan() linkPlan {
	p := linkPlan{kinds: o.cfg.selectedOf("link", linkKinds),
		shape: linkShape{rtts: o.cfg.LinkRTTs, far: o.cfg.LinkFarRTTs, conc: o.cfg.LinkConcurrency}}
	for _, op := range linkOps {
		if o.cfg.selected("link/keyops/" + op) {
			p.ops = append(p.ops, op)
		}
	}
	return p
}

// measureLink runs the link scenarios of p, kind by kind: each kind at
// every RTT, so that the runs a target compares are measured close
// together in time (the machine's other load drifts); then each key
// operation at every concurrency, at the nearest and the farthest of the
// full RTTs, on one link (a key-operation client through
// the relay). hs and ops measure one run (linkHandshakeRun and
// linkKeyopsRun). It sets the relay back to -link-rtt at the end.
func (o *orchestrator) measureLink(ctx context.Context, p linkPlan, hs, ops linkRun) []error {
	if p.empty() {
		return nil
	}
	relay := o.srv.relay
	defer relay.SetRTT(o.cfg.LinkRTT)
	s := p.shape
	var errs []error
	at := func(rtt time.Duration, item string, conc []int, run linkRun) {
		if relay.RTT() != rtt {
			if err := relay.SetRTT(rtt); err != nil {
				errs = o.noteErr(errs, err)
				return
			}
			o.logf("link: relay RTT %v", rtt)
		}
		for _, n := range conc {
			for rep := range o.cfg.Repeat {
				o.rep = rep
				errs = o.noteErr(errs, run(ctx, item, n, rtt))
			}
		}
	}
	for _, kind := range p.kinds {
		for _, rtt := range s.all() {
			conc := s.conc
			if !slices.Contains(s.rtts, rtt) {
				conc = []int{s.top()}
			}
			at(rtt, kind, conc, hs)
		}
	}
	for _, op := range p.ops {
		for _, rtt := range slices.Compact([]time.Duration{s.near(), s.farthest()}) {
			at(rtt, op, s.conc, ops)
		}
	}
	return errs
}

// linkRun measures item (a handshake kind or key operation) at
// concurrency n with the relay at rtt.
type linkRun func(ctx context.Context, item string, n int, rtt time.Duration) error

// linkLoadArgs are the flags of a link load child at concurrency n and
// round trip rtt: the warm-up has two more round trips, for the first
// operations to come back.
func (o *orchestrator) linkLoadArgs(n int, rtt time.Duration) []string {
	return []string{"-concurrency", strconv.Itoa(n), "-warmup", (o.cfg.LinkWarmup + 2*rtt).String(),
		"-duration", o.cfg.LinkDuration.String()}
}

// linkHandshakeRun measures full handshakes of kind through the link edge
// at concurrency n, the relay at rtt.
func (o *orchestrator) linkHandshakeRun(ctx context.Context, kind string, n int, rtt time.Duration) error {
	args := append([]string{"loadgen", "-addr", o.srv.linkEdgeAddr, "-kind", kind, "-op-timeout", linkClientTimeout.String(),
		"-watch", watchArg("edge", o.srv.linkEdge, "keyserver", o.srv.keyserver) + o.relayWatch()}, o.linkLoadArgs(n, rtt)...)
	return o.linkRecord(ctx, runKey{"link", linkWhat(kind, rtt), "keyless", n}, rtt, true,
		fmt.Sprintf("link-%s-%s-c%d", kind, rttName(rtt), n), args...)
}

// linkKeyopsRun measures key operation op on one link through the relay
// at concurrency n, the relay at rtt.
func (o *orchestrator) linkKeyopsRun(ctx context.Context, op string, n int, rtt time.Duration) error {
	_, args := o.keyopsArgs("keyless", op, n, o.srv.relay.Addr(), 0, o.linkLoadArgs(n, rtt))
	for i := range args {
		if args[i] == "-watch" && i+1 < len(args) {
			args[i+1] += o.relayWatch()
		}
	}
	return o.linkRecord(ctx, runKey{"linkops", linkWhat(op, rtt), "keyless", n}, rtt, false,
		fmt.Sprintf("linkops-%s-%s-c%d", op, rttName(rtt), n), args...)
}

// relayWatch is the -watch item of the relay, which runs in this process
// (with the orchestrator, idle during a run), so that its copies are not
// counted among the other processes of the machine.
func (o *orchestrator) relayWatch() string {
	return fmt.Sprintf(",relay=%d", os.Getpid())
}

// linkRecord runs a link child through keyserverRun and records its
// result as run k, with the relay's RTT and most bytes in flight during
// the run and, for handshakes (edge), where the time went: the link edge's
// refusals, failed keyserver calls and mean call time, the keyserver's
// mean operation time, and samples of the keyserver's HSM queue and the
// edge's operations in flight, read from their metrics (a failed reading
// is logged; the run stands).
func (o *orchestrator) linkRecord(ctx context.Context, k runKey, rtt time.Duration, edge bool, name string, args ...string) error {
	var before edgeCounters
	var ksBefore keyserverTime
	var err1, err3 error
	var queues queueSampler
	stop := func() {}
	if edge {
		before, err1 = scrapeEdge(ctx, o.srv.linkEdgeMetrics)
		ksBefore, err3 = scrape(ctx, o.srv.ksMetrics, "keyserver", parseKeyserverTime)
		sctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			queues.run(sctx, time.Now().Add(o.cfg.LinkWarmup+2*rtt), o.srv.ksMetrics, o.srv.linkEdgeMetrics)
		}()
		stop = func() { cancel(); <-done }
	}
	o.srv.relay.ResetMaxInFlight()
	r, err := o.keyserverRun(ctx, name, nil, args...)
	stop()
	if err != nil {
		return err
	}
	r.LinkRTTms = float64(rtt) / float64(time.Millisecond)
	r.LinkMaxUp, r.LinkMaxDown = o.srv.relay.MaxInFlight()
	if edge {
		after, err2 := scrapeEdge(ctx, o.srv.linkEdgeMetrics)
		if err := errors.Join(err1, err2); err != nil {
			o.logf("%s: edge refusals not measured: %v", name, err)
		} else {
			r.edgeDelta(before, after)
		}
		ksAfter, err4 := scrape(ctx, o.srv.ksMetrics, "keyserver", parseKeyserverTime)
		if err := errors.Join(err3, err4); err != nil {
			o.logf("%s: keyserver time not measured: %v", name, err)
		} else {
			r.keyserverDelta(ksBefore, ksAfter)
			d, n, err := waitDrained(ctx, o.srv.ksMetrics, ksAfter)
			if err != nil {
				o.logf("%s: %v", name, err)
			}
			r.DrainMs, r.DrainOps = float64(d.Milliseconds()), int64(n)
		}
		r.HSMQueue[0], r.HSMQueue[1] = meanMax(queues.hsmQueue)
		r.EdgeInFlight[0], r.EdgeInFlight[1] = meanMax(queues.edgeInFlight)
	}
	r.rep = o.rep
	o.results.add(k, r)
	o.progress(k.group, k.what, k.side, r)
	return nil
}
