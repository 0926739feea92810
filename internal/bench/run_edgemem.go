package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// memProtos are the edge memory scenario's protocols.
var memProtos = []string{"http1", "h2"}

// edgememRun measures the edge's heap per idle connection: an in-process
// edge, a warm-up of 200 connections, a snapshot, MemConns idle
// connections held by another process, a second snapshot.
func (o *orchestrator) edgememRun(ctx context.Context, proto, ksAddr string) error {
	o.logf("edgemem   %s: %d idle connections", proto, o.cfg.MemConns)
	edge, addr, err := o.startSelf("edgemem-"+proto, nil, "edgemem", "-keyserver", ksAddr,
		"-certs", filepath.Join(o.dir, "certs", "keyless"),
		"-ca", o.link.caFile, "-cert", o.link.clientCert, "-key", o.link.clientKey, "-server-name", o.link.serverName)
	if err != nil {
		return err
	}
	defer edge.stop()
	e := &memProbe{o: o, proto: proto, edge: edge, addr: addr}
	warm, err := e.hold("hold-warmup-"+proto, 200)
	if err != nil {
		return err
	}
	warm.stop()
	if err := e.waitIdle(); err != nil {
		return err
	}
	base, err := e.snapshot("base")
	if err != nil {
		return err
	}
	start := time.Now()
	h, err := e.hold("hold-"+proto, o.cfg.MemConns)
	if err != nil {
		return err
	}
	defer h.stop()
	took := time.Since(start)
	loaded, err := e.snapshot("loaded")
	if err != nil {
		return err
	}
	o.results.addMem(proto, base, loaded)
	m := o.results.mem[proto]
	o.logf("edgemem   %s: %d connections (opened in %v): %.1f KiB heap in use per connection, %.1f KiB stack",
		proto, m.Conns, took.Round(time.Millisecond), m.HeapKiBPerConn, m.StackKiBPerConn)
	return nil
}

// memProbe is an "edgemem" child being measured with one protocol.
type memProbe struct {
	o     *orchestrator
	proto string // "http1" or "h2"
	edge  *proc
	addr  string
}

// hold starts a "hold" child that opens n idle connections to the edge,
// and returns it once they are open.
func (e *memProbe) hold(name string, n int) (*proc, error) {
	args := []string{"hold", "-addr", e.addr, "-n", strconv.Itoa(n)}
	if e.proto == "h2" {
		args = append(args, "-h2")
	}
	p, _, err := e.o.startReady(name, nil, heldRE, 3*time.Minute, e.o.self, args...)
	return p, err
}

// snapshot asks the edge for a MemSnapshot and waits up to 30 s for it.
func (e *memProbe) snapshot(phase string) (MemSnapshot, error) {
	before := strings.Count(e.edge.stdout.String(), "\n")
	if _, err := fmt.Fprintf(e.edge.stdin, "snapshot %s\n", phase); err != nil {
		return MemSnapshot{}, err
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		lines := strings.Split(strings.TrimSpace(e.edge.stdout.String()), "\n")
		if len(lines) > before {
			var s MemSnapshot
			if err := json.Unmarshal([]byte(lines[len(lines)-1]), &s); err != nil {
				return s, fmt.Errorf("bench: edgemem: %v", err)
			}
			return s, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return MemSnapshot{}, errors.New("bench: edgemem did not answer")
}

// waitIdle lets the edge see the warm-up connections close: it asks for a
// snapshot up to 100 times, 50 ms apart, until the edge counts no open
// connection.
func (e *memProbe) waitIdle() error {
	for i := 0; i < 100; i++ {
		s, err := e.snapshot("wait")
		if err != nil {
			return err
		}
		if s.Conns == 0 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}
