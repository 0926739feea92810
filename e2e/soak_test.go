package e2e

import (
	"crypto/tls"
	"fmt"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Environment variables of the soak test.
const (
	// envSoak is the soak's duration, such as "10m"; without it TestSoak is
	// skipped. `make soak` sets it.
	envSoak = "KEYLESS_SOAK"
	// envSoakReport names a file the soak's report is written to.
	envSoakReport = "KEYLESS_SOAK_REPORT"
)

// TestSoak runs mixed full handshakes (TLS 1.3 and 1.2; ECDSA, RSA-PSS,
// RSA PKCS #1 v1.5 and RSA key exchange) through an edge in front of two
// keyservers for KEYLESS_SOAK, with a keyserver killed and restarted at a
// third of the time and the token directory moved away for three seconds
// at 60%. It reports handshakes and failures by phase and the resident
// memory of the processes, and fails if a handshake fails outside the two
// fault windows or more fail at the kill than were in flight.
//
// It is not part of CI: run `make soak` (SOAKTIME=10m by default).
func TestSoak(t *testing.T) {
	d, err := time.ParseDuration(os.Getenv(envSoak))
	if err != nil || d <= 0 {
		t.Skipf("set %s to a duration (make soak) to run the soak test", envSoak)
	}
	c := startCluster(t, clusterOptions{keyservers: 2, rsa: true})
	configs := []*tls.Config{
		{ServerName: clusterECDSA, MinVersion: tls.VersionTLS13},
		{ServerName: clusterRSA, MinVersion: tls.VersionTLS13},
		{ServerName: clusterECDSA, MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256}},
		{ServerName: clusterRSA, MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256}},
		{ServerName: clusterRSA, MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{tls.TLS_RSA_WITH_AES_128_GCM_SHA256}},
	}
	names := []string{"TLS1.3 ECDSA", "TLS1.3 RSA-PSS", "TLS1.2 ECDHE-ECDSA", "TLS1.2 ECDHE-RSA", "TLS1.2 RSA-kex"}
	for _, cfg := range configs {
		cfg.RootCAs = c.webCA.pool()
	}
	start := time.Now()
	l := startLoad(c.edgeAddr, 8, configs...)
	halted := false
	defer func() {
		if !halted {
			l.halt()
		}
	}()
	at := func(f float64) { time.Sleep(time.Until(start.Add(time.Duration(f * float64(d))))) }

	type sample struct{ edge, ks0, ks1 int64 }
	rss := func() sample {
		var s sample
		s.edge, _ = rssKiB(c.edge.cmd.Process.Pid)
		s.ks0, _ = rssKiB(c.keyservers[0].proc.cmd.Process.Pid)
		s.ks1, _ = rssKiB(c.keyservers[1].proc.cmd.Process.Pid)
		return s
	}

	at(0.1) // warmed up
	rssStart := rss()

	at(1.0 / 3)
	killAt := time.Now()
	inflight := l.inflight.Load()
	c.kill(t, 0, syscall.SIGKILL)
	inflight = max(inflight, l.inflight.Load())
	time.Sleep(2 * time.Second)
	c.startKeyserver(t, 0)
	restartedAt := time.Now()
	killEnd := restartedAt.Add(10 * time.Second)

	at(0.5)
	rssMid := rss()

	at(0.6)
	away := c.tokenDir + ".away"
	faultAt := time.Now()
	if err := os.Rename(c.tokenDir, away); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	if err := os.Rename(away, c.tokenDir); err != nil {
		t.Fatal(err)
	}
	backAt := time.Now()
	okAtBack := l.ok.Load()
	var recovered time.Duration
	for deadline := backAt.Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if l.ok.Load() > okAtBack {
			recovered = time.Since(backAt)
			break
		}
	}
	faultEnd := time.Now().Add(10 * time.Second)

	at(1)
	rssEnd := rss()
	l.halt()
	halted = true
	elapsed := time.Since(start)

	if killEnd.After(faultAt) {
		killEnd = faultAt // a short soak
	}
	var killFails, faultFails, steadyFails int
	for _, f := range l.failureTimes() {
		switch {
		case !f.Before(killAt) && f.Before(killEnd):
			killFails++
		case !f.Before(faultAt) && f.Before(faultEnd):
			faultFails++
		default:
			steadyFails++
		}
	}

	var b strings.Builder
	fmt.Fprintf(&b, "soak: %v of mixed full handshakes, 8 clients, edge + 2 keyservers on one SoftHSM token\n", elapsed.Round(time.Second))
	fmt.Fprintf(&b, "handshakes: %d ok, %d failed (%.0f/s)\n", l.ok.Load(), l.failed.Load(), float64(l.ok.Load())/elapsed.Seconds())
	counts := l.countsByConfig()
	for i, n := range names {
		fmt.Fprintf(&b, "  %-20s %d\n", n, counts[i])
	}
	fmt.Fprintf(&b, "keyserver 0 SIGKILLed at %v and restarted 2 s later: %d handshakes failed (%d were in flight at the kill)\n",
		killAt.Sub(start).Round(time.Second), killFails, inflight)
	fmt.Fprintf(&b, "token directory moved away at %v for 3 s: %d handshakes failed; serving again %v after it came back\n",
		faultAt.Sub(start).Round(time.Second), faultFails, recovered.Round(time.Millisecond))
	fmt.Fprintf(&b, "failures outside those windows: %d\n", steadyFails)
	fmt.Fprintf(&b, "handshakes over 1 s: %d\n", l.slow.Load())
	fmt.Fprintf(&b, "RSS (KiB)       at 10%%   at 50%%   at end   growth 10%%->end\n")
	row := func(name string, a, m, e int64, note string) {
		fmt.Fprintf(&b, "  %-12s %8d %8d %8d   %+d (%+.1f%%)%s\n", name, a, m, e, e-a, 100*float64(e-a)/float64(max(a, 1)), note)
	}
	row("edge", rssStart.edge, rssMid.edge, rssEnd.edge, "")
	row("keyserver 1", rssStart.ks1, rssMid.ks1, rssEnd.ks1, "")
	row("keyserver 0", rssStart.ks0, rssMid.ks0, rssEnd.ks0, " (restarted at 1/3: start and end are different processes)")
	if errs := l.firstErrors(); errs != "" {
		fmt.Fprintf(&b, "first failures: %s\n", errs)
	}
	report := b.String()
	t.Log("\n" + report)
	if path := os.Getenv(envSoakReport); path != "" {
		if err := os.WriteFile(path, []byte(report), 0o644); err != nil {
			t.Error(err)
		}
	}

	if steadyFails > 0 {
		t.Errorf("%d handshakes failed outside the fault windows", steadyFails)
	}
	if int64(killFails) > inflight {
		t.Errorf("%d handshakes failed at the kill, more than the %d in flight", killFails, inflight)
	}
	if recovered == 0 {
		t.Error("handshakes did not succeed again within 60 s of the token's return")
	}
	if ok, _ := c.signs(t, 0); ok == 0 {
		t.Error("the restarted keyserver got no load")
	}
}

// failureTimes returns when each failed handshake failed, in order.
func (l *load) failureTimes() []time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.failTimes)
}

// countsByConfig returns the successful handshakes per configuration.
func (l *load) countsByConfig() map[int]int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make(map[int]int64, len(l.byCfg))
	for k, v := range l.byCfg {
		out[k] = v
	}
	return out
}
