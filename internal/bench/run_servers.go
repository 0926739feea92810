package bench

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"time"
)

var (
	readyKeyserver = regexp.MustCompile(`keyserver ready: listen=(\S+)(?: metrics=(\S+))?`)
	readyEdge      = regexp.MustCompile(`edge ready: listen=(\S+)`)
	// An edge started with -metrics-listen names its listener further on.
	readyEdgeMetrics = regexp.MustCompile(`edge ready: listen=(\S+).* metrics=(\S+)`)
	readySelf        = regexp.MustCompile(`(?m)^ready (\S+)`)
	heldRE           = regexp.MustCompile(`(?m)^held (\d+)`)
)

// servers are the long-running processes of the scenarios.
type servers struct {
	keyserver, edge, hsmTLS, softTLS    *proc
	ksAddr, edgeAddr, hsmAddr, softAddr string
	// linkAddr is where the keyserver's clients connect: the relay's
	// address with -link-rtt, else ksAddr.
	linkAddr  string
	relay     *Relay
	ksMetrics string // the keyserver's metrics listener, if any
	// linkEdge is the edge of the link scenarios, whose keyserver link
	// always goes through the relay, at linkEdgeAddr with its metrics
	// listener at linkEdgeMetrics.
	linkEdge                      *proc
	linkEdgeAddr, linkEdgeMetrics string
}

// stop stops every server.
func (s *servers) stop() {
	s.stopTLS()
	if s.relay != nil {
		s.relay.Close()
	}
	if s.keyserver != nil {
		s.keyserver.stop()
	}
}

// stopTLS stops the TLS servers (the edge and the baselines), which only
// the handshake and resumption scenarios use.
func (s *servers) stopTLS() {
	for _, p := range []*proc{s.edge, s.linkEdge, s.hsmTLS, s.softTLS} {
		if p != nil {
			p.stop()
		}
	}
}

// tls returns the address of a TLS server by name, "keyless" (the edge),
// "hsm" or "soft", and the -watch value of the processes serving it.
func (s *servers) tls(name string) (addr, watch string, err error) {
	switch name {
	case "keyless":
		return s.edgeAddr, watchArg("edge", s.edge, "keyserver", s.keyserver), nil
	case "hsm":
		return s.hsmAddr, watchArg("server", s.hsmTLS), nil
	case "soft":
		return s.softAddr, watchArg("server", s.softTLS), nil
	}
	return "", "", fmt.Errorf("bench: no TLS server %q", name)
}

// startServers starts the keyserver, and the TLS servers that the
// handshake (hs), resumption and link scenarios need. The link scenarios
// have an edge of their own, through the relay (started for them if
// -link-rtt and -link-relay did not), so that the other scenarios keep
// their direct link unless asked.
func (o *orchestrator) startServers(hs, resume, link bool) error {
	s := &o.srv
	var err error
	o.logf("starting keyserver")
	if s.keyserver, s.ksAddr, s.ksMetrics, err = o.startKeyserver("keyserver", o.policy); err != nil {
		return err
	}
	s.linkAddr = s.ksAddr
	if o.cfg.LinkRTT > 0 || o.cfg.LinkRelay || link {
		// Stopped by stop; the orchestrator always calls it.
		if s.relay, err = StartRelay(context.Background(), RelayConfig{Target: s.ksAddr, RTT: o.cfg.LinkRTT}); err != nil {
			return err
		}
		o.logf("relay %s adds %v round trip to the keyserver link", s.relay.Addr(), o.cfg.LinkRTT)
	}
	if o.cfg.LinkRTT > 0 || o.cfg.LinkRelay {
		s.linkAddr = s.relay.Addr()
	}
	if link {
		o.logf("starting the link scenarios' edge, through the relay")
		if s.linkEdge, s.linkEdgeAddr, s.linkEdgeMetrics, err = o.startEdge("edge-link", s.relay.Addr(), true); err != nil {
			return err
		}
	}
	if hs || resume {
		o.logf("starting edge and the baseline TLS servers")
		if s.edge, s.edgeAddr, _, err = o.startEdge("edge", s.linkAddr, false); err != nil {
			return err
		}
		if s.softTLS, s.softAddr, err = o.startSelf("tls-server-soft", nil, "tls-server", "-keys", "soft",
			"-certs", filepath.Join(o.dir, "certs", "soft")); err != nil {
			return err
		}
	}
	if hs {
		if s.hsmTLS, s.hsmAddr, err = o.startSelf("tls-server-hsm", o.env, append([]string{"tls-server", "-keys", "hsm",
			"-certs", filepath.Join(o.dir, "certs", "keyless")}, o.token...)...); err != nil {
			return err
		}
	}
	return nil
}

// startKeyserver starts a keyserver, whose log is named name, with the
// policy file policy ("" for none) and the flags extra, and returns it, its
// address and its metrics listener's ("" for none).
func (o *orchestrator) startKeyserver(name, policy string, extra ...string) (p *proc, addr, metricsAddr string, err error) {
	args := []string{"serve", "-listen", "127.0.0.1:0", "-tls-cert", o.link.serverCert, "-tls-key", o.link.serverKey,
		"-client-ca", o.link.caFile}
	if policy != "" {
		args = append(args, "-policy", policy)
	}
	if o.audit != "" {
		args = append(args, "-audit-log", o.audit)
	}
	if o.metrics {
		// For the stream counters; see keyserverRun.
		args = append(args, "-metrics-listen", "127.0.0.1:0")
	}
	args = append(append(append(append(args, o.token...), o.linkWindowArgs()...), extra...), o.cfg.KeyserverFlags...)
	p, m, err := o.startReady(name, append(slices.Clone(o.env), o.cfg.KeyserverEnv...), readyKeyserver, readyTimeout,
		filepath.Join(o.bin, "keyserver"), args...)
	if err != nil {
		return nil, "", "", err
	}
	if m[2] != "off" {
		metricsAddr = m[2]
	}
	return p, m[1], metricsAddr, nil
}

// startEdge starts the edge binary as name against the keyserver at
// ksAddr and returns it, its address and, with metrics, its metrics
// listener's.
func (o *orchestrator) startEdge(name, ksAddr string, metrics bool) (p *proc, addr, metricsAddr string, err error) {
	args := []string{"-listen", "127.0.0.1:0", "-certs", filepath.Join(o.dir, "certs", "keyless"),
		"-default-cert", nameECDSA, "-rsa-key-exchange", nameRSA,
		// Never contacted: the load generator sends no request.
		"-origin", "http://127.0.0.1:9",
		"-keyserver", ksAddr, "-keyserver-name", o.link.serverName, "-keyserver-ca", o.link.caFile,
		"-tls-cert", o.link.clientCert, "-tls-key", o.link.clientKey,
		// The load generator is one address making thousands of full
		// handshakes a second: the per-client limit would measure itself.
		"-handshakes-per-client", "0"}
	args = append(args, o.linkWindowArgs()...)
	if o.edgeOwnTickets {
		args = append(args, "-ticket-keys-from-keyserver=false")
	}
	ready := readyEdge
	if metrics {
		// For the refusal counters; see linkRecord.
		args, ready = append(args, "-metrics-listen", "127.0.0.1:0"), readyEdgeMetrics
	}
	p, m, err := o.startReady(name, o.cfg.EdgeEnv, ready, readyTimeout, filepath.Join(o.bin, "edge"), append(args, o.cfg.EdgeFlags...)...)
	if err != nil {
		return nil, "", "", err
	}
	if metrics {
		metricsAddr = m[2]
	}
	return p, m[1], metricsAddr, nil
}

// startSelf starts this binary in a server mode, which prints "ready ADDR",
// and returns it and ADDR.
func (o *orchestrator) startSelf(name string, env []string, args ...string) (*proc, string, error) {
	p, m, err := o.startReady(name, env, readySelf, readyTimeout, o.self, args...)
	if err != nil {
		return nil, "", err
	}
	return p, m[1], nil
}

// readyTimeout bounds a server's start.
const readyTimeout = 30 * time.Second

// startReady starts path with args and the extra environment env, and
// waits up to timeout for its output to match ready. It returns the
// process and the submatches; on error the process has been stopped.
func (o *orchestrator) startReady(name string, env []string, ready *regexp.Regexp, timeout time.Duration, path string, args ...string) (*proc, []string, error) {
	p, err := startProc(name, o.logDir, env, path, args...)
	if err != nil {
		return nil, nil, err
	}
	m, err := p.waitFor(ready, timeout)
	if err != nil {
		p.stop()
		return nil, nil, err
	}
	return p, m, nil
}

// linkWindowArgs returns the -link-window flag of -link-window, if set.
func (o *orchestrator) linkWindowArgs() []string {
	if o.cfg.LinkWindow == 0 {
		return nil
	}
	return []string{"-link-window", strconv.Itoa(o.cfg.LinkWindow)}
}
