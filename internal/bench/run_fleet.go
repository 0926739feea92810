package bench

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/keyless-tls/keyless/link"
)

// The fleet scenario: FleetLinks edge links on one keyserver, each its own
// connection, stream and client identity, with one operation in flight on
// each, against one link carrying the same number of operations in flight,
// back to back for each of fleetOps; and the keyserver's heap and
// goroutines per idle link. It has a keyserver of its own, whose limits
// are set so that they do not cap the scenario (see fleetKeyserverFlags).

// fleetOps are the key operations of the fleet scenario, in table order.
var fleetOps = []string{OpECDSASign, OpRSASign}

// Sides of the fleet scenario's loads.
const (
	fleetSideSingle = "single" // every operation on one link
	fleetSideFleet  = "fleet"  // one operation in flight on each link
)

// fleetIdentity is the URI name of fleet link i's client certificate.
func fleetIdentity(i int) string { return fmt.Sprintf("spiffe://bench.internal/fleet/%04d", i) }

// FleetResult is what the fleet scenario measured besides its loads.
type FleetResult struct {
	Links       int
	OpenSeconds float64
	// Base is the keyserver with the single link open, Idle with the
	// fleet's links open too and idle, After the same after the loads.
	Base, Idle, After FleetSnapshot
	// KeyserverFlags are the limits the scenario set on its keyserver.
	KeyserverFlags []string
}

// fleetKeyserverFlags are the keyserver limits the scenario sets for n
// links from 127.0.0.1 plus the single link: connections per source and
// in all (each link is two, as cmd/edge makes: the link and its health
// watch), requests in flight for the single link's identity (n) and queued
// in all (n), and streams per identity (each link's identity opens one).
func fleetKeyserverFlags(n int) []string {
	conns := 2*n + 64
	return []string{
		"-max-connections-per-source", strconv.Itoa(conns),
		"-max-connections", strconv.Itoa(max(conns, link.DefaultMaxConnections)),
		"-max-inflight-per-identity", strconv.Itoa(n),
		"-max-streams-per-identity", "4",
		"-max-queued", strconv.Itoa(2 * n),
	}
}

// fleetRun runs the fleet scenario if it is selected.
func (o *orchestrator) fleetRun(ctx context.Context) error {
	ops := o.cfg.selectedOf("fleet", fleetOps)
	if len(ops) == 0 {
		return nil
	}
	n := o.cfg.FleetLinks
	if n < 1 {
		return fmt.Errorf("bench: -fleet-links %d: want at least 1", n)
	}
	if !o.metrics {
		return errors.New("bench: fleet: the keyserver has no -metrics-listen, where the scenario reads its heap and goroutines")
	}
	o.logf("fleet     issuing %d link client certificates, one identity each", n)
	links, policy, err := o.fleetPKI(n)
	if err != nil {
		return err
	}
	flags := fleetKeyserverFlags(n)
	o.logf("fleet     starting a keyserver for the fleet: %s", strings.Join(flags, " "))
	ks, addr, metrics, err := o.startKeyserver("keyserver-fleet", policy, flags...)
	if err != nil {
		return err
	}
	defer ks.stop()
	if metrics == "" {
		return errors.New("bench: fleet: the keyserver reported no metrics listener")
	}
	warmup, duration := max(o.cfg.Warmup, time.Second), max(o.cfg.Duration, 2*time.Second)
	args := []string{"fleet", "-addr", addr, "-metrics", metrics, "-links", links,
		"-ca", o.link.caFile, "-cert", o.link.clientCert, "-key", o.link.clientKey, "-server-name", o.link.serverName,
		"-warmup", warmup.String(), "-duration", duration.String(), "-watch", watchArg("keyserver", ks)}
	for _, op := range ops {
		args = append(args, "-op-key", op+"="+o.pubs[op])
	}
	args = append(args, o.linkWindowArgs()...)
	child, _, err := o.startReady("fleet", nil, fleetReady, time.Minute, o.self, args...)
	if err != nil {
		return err
	}
	defer child.stop()
	f := &fleetProbe{child: child}
	res := &FleetResult{Links: n, KeyserverFlags: flags}
	snapTimeout := 90 * time.Second
	if err := f.ask("snapshot base", &res.Base, snapTimeout); err != nil {
		return err
	}
	var opened FleetOpened
	if err := f.ask("open", &opened, 5*time.Minute); err != nil {
		return err
	}
	res.OpenSeconds = opened.Seconds
	o.logf("fleet     %d links open in %.1f s", opened.Links, opened.Seconds)
	if err := f.ask("snapshot idle", &res.Idle, snapTimeout); err != nil {
		return err
	}
	o.results.fleet = res
	m := res.perLink()
	o.logf("fleet     idle links: %.1f KiB heap live, %.2f goroutines, %.1f KiB stack per link; stream workers %0.f",
		m.heapKiB, m.goroutines, m.stackKiB, res.Idle.StreamWorkers)
	var errs []error
	loadTimeout := warmup + 2*duration + time.Minute
	for _, op := range ops {
		for rep := range o.cfg.Repeat {
			o.rep = rep
			for _, side := range []string{fleetSideSingle, fleetSideFleet} {
				var r Result
				if err := f.ask("load "+side+" "+op, &r, loadTimeout); err != nil {
					return errors.Join(append(errs, err)...)
				}
				r.rep = rep
				o.results.add(fleetKey(side, op, n), r)
				o.progress("fleet", op, side, r)
			}
		}
	}
	if err := f.ask("snapshot after", &res.After, snapTimeout); err != nil {
		errs = append(errs, err)
	}
	o.logf("fleet     after the loads: %.0f stream workers, %.1f s after the last operation, %.0f streams open",
		res.After.StreamWorkers, res.After.WorkersIdleAfter, res.After.StreamsOpen)
	return errors.Join(errs...)
}

func fleetKey(side, op string, n int) runKey { return runKey{"fleet", op, side, n} }

var fleetReady = regexp.MustCompile(`(?m)^ready$`)

// fleetPKI writes the fleet links' client certificates, issued by the link
// CA, each with a key of its own, to one PEM file, and, if the keyserver
// takes a policy, a policy that also lets every fleet identity sign. It
// returns both files ("" for no policy).
func (o *orchestrator) fleetPKI(n int) (links, policy string, err error) {
	var pemData []byte
	ids := make([]string, n)
	for i := range n {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return "", "", err
		}
		ids[i] = fleetIdentity(i + 1)
		cert, err := o.link.ca.issue(key.Public(), x509.ExtKeyUsageClientAuth, []string{linkClientDNS}, ids[i])
		if err != nil {
			return "", "", err
		}
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return "", "", err
		}
		pemData = append(pemData, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})...)
		pemData = append(pemData, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})...)
	}
	links = filepath.Join(o.dir, "pki", "fleet-links.pem")
	if err := os.WriteFile(links, pemData, 0o600); err != nil {
		return "", "", err
	}
	if o.policy == "" {
		return links, "", nil
	}
	policy = filepath.Join(o.dir, "policy-fleet.yaml")
	return links, policy, os.WriteFile(policy, []byte(fleetPolicy(ids)), 0o644)
}

// fleetPolicy is benchPolicy with the fleet's identities added, as a
// group.
func fleetPolicy(ids []string) string {
	var b strings.Builder
	b.WriteString("# keyless-bench fleet: the bench's edge and every fleet link may do everything.\ngroups:\n  fleet:\n")
	for _, id := range ids {
		fmt.Fprintf(&b, "    - %q\n", id)
	}
	b.WriteString(`rules:
  - name: keyless-bench
    identities: ["` + linkClientIdentity + `", "group:fleet"]
    keys: ["*"]
    operations: [sign, decrypt]
    schemes: [default]
`)
	return b.String()
}

// fleetProbe talks to a "fleet" child.
type fleetProbe struct {
	child *proc
}

// ask sends cmd to the child and decodes its one-line JSON answer into v,
// waiting up to timeout.
func (f *fleetProbe) ask(cmd string, v any, timeout time.Duration) error {
	before := strings.Count(f.child.stdout.String(), "\n")
	if _, err := fmt.Fprintln(f.child.stdin, cmd); err != nil {
		return fmt.Errorf("bench: fleet %s: %w", cmd, err)
	}
	deadline := time.Now().Add(timeout)
	for {
		lines := strings.Split(strings.TrimSpace(f.child.stdout.String()), "\n")
		if len(lines) > before {
			if err := json.Unmarshal([]byte(lines[len(lines)-1]), v); err != nil {
				return fmt.Errorf("bench: fleet %s: %v", cmd, err)
			}
			return nil
		}
		select {
		case <-f.child.done:
			return fmt.Errorf("bench: fleet %s: the child exited (%v):\n%s", cmd, f.child.err, f.child.tail())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("bench: fleet %s: no answer within %v:\n%s", cmd, timeout, f.child.tail())
		}
	}
}
