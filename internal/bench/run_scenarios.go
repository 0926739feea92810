package bench

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// A family is a group of scenarios measured the same way: for each item
// (a key operation or a handshake kind) and each concurrency, Repeat
// repetitions, each of which runs every side once, one after the other. A
// figure and its baseline are thus measured next to each other, under the
// same load from the rest of the machine, and the repetitions of a pair
// can be told apart (Result.rep).
type family struct {
	group         string
	items         []string // the selected ones, in table order
	concurrencies []int
	sides         []sideRun // in the order they run
}

// sideRun measures one side of item at concurrency n.
type sideRun func(ctx context.Context, item string, n int) error

// keyopsFamily is the key operations through the keyserver, next to the
// same key in-process, back to back and, at concurrency 1, after idle gaps
// (see pausedBaselineRun).
func (o *orchestrator) keyopsFamily() family {
	return family{
		group:         "keyops",
		items:         o.cfg.selectedOf("keyops", keyOps),
		concurrencies: o.cfg.KeyopsConcurrency,
		sides: []sideRun{
			func(ctx context.Context, op string, n int) error {
				return o.keyopsRun(ctx, "inproc", op, n, o.srv.ksAddr, 0)
			},
			func(ctx context.Context, op string, n int) error {
				return o.keyopsRun(ctx, "keyless", op, n, o.srv.linkAddr, 0)
			},
			func(ctx context.Context, op string, n int) error {
				if n != 1 {
					return nil
				}
				return o.pausedBaselineRun(ctx, op)
			},
		},
	}
}

// handshakeFamily is full handshakes through the edge and keyserver, next
// to crypto/tls with the same SoftHSM key in-process and with a software
// key.
func (o *orchestrator) handshakeFamily() family {
	return o.tlsFamily("handshake", handshakeKinds, "hsm", "soft", "keyless")
}

// resumeFamily is resumed handshakes through the edge, next to crypto/tls
// with a software key: no private-key operation on either side.
func (o *orchestrator) resumeFamily() family {
	return o.tlsFamily("resume", resumeKinds, "soft", "keyless")
}

// tlsFamily is handshakes of group with the given kinds against each of
// the TLS servers named (see servers.tls), in that order.
func (o *orchestrator) tlsFamily(group string, kinds []string, servers ...string) family {
	f := family{group: group, items: o.cfg.selectedOf(group, kinds), concurrencies: o.cfg.HandshakeConcurrency}
	for _, server := range servers {
		f.sides = append(f.sides, func(ctx context.Context, kind string, n int) error {
			return o.handshakeRun(ctx, group, kind, server, n)
		})
	}
	return f
}

// measure runs family f and returns the errors of its runs, each logged
// as it happens.
func (o *orchestrator) measure(ctx context.Context, f family) []error {
	var errs []error
	for _, item := range f.items {
		for _, n := range f.concurrencies {
			for rep := range o.cfg.Repeat {
				o.rep = rep
				for _, side := range f.sides {
					errs = o.noteErr(errs, side(ctx, item, n))
				}
			}
		}
	}
	return errs
}

// took logs how long the scenarios of group took since start, and keeps
// it for the table's header.
func (o *orchestrator) took(group string, start time.Time) {
	d := time.Since(start).Round(time.Second)
	o.logf("%s scenarios took %v", group, d)
	o.parts = append(o.parts, fmt.Sprintf("%s %v", group, d))
}

// scenarios starts the servers the selected scenarios need and runs them.
func (o *orchestrator) scenarios(ctx context.Context) error {
	keyops, hs, resume := o.keyopsFamily(), o.handshakeFamily(), o.resumeFamily()
	link := o.linkPlan()
	mem := o.cfg.selectedOf("edgemem", memProtos)

	defer o.srv.stop()
	if err := o.startServers(len(hs.items) > 0, len(resume.items) > 0, !link.empty()); err != nil {
		return err
	}
	var errs []error
	for _, f := range []family{keyops, hs, resume} {
		if len(f.items) > 0 {
			start := time.Now()
			errs = append(errs, o.measure(ctx, f)...)
			o.took(f.group, start)
		}
	}
	if !link.empty() {
		start := time.Now()
		o.results.link = &link.shape
		errs = append(errs, o.measureLink(ctx, link, o.linkHandshakeRun, o.linkKeyopsRun)...)
		o.took("link", start)
	}
	// The TLS servers are idle from here on; stop them to free memory and
	// CPU for the edge memory scenario.
	o.srv.stopTLS()
	if len(mem) > 0 {
		start := time.Now()
		for _, proto := range mem {
			errs = o.noteErr(errs, o.edgememRun(ctx, proto, o.srv.ksAddr))
		}
		o.took("edgemem", start)
	}
	if len(o.cfg.selectedOf("fleet", fleetOps)) > 0 {
		start := time.Now()
		errs = o.noteErr(errs, o.fleetRun(ctx))
		o.took("fleet", start)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return errors.Join(errs...)
}
