package e2e

import (
	"crypto/tls"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// ticketsPolicy is clusterPolicy plus the tickets operation for the
// cluster's edges: both edges of the test present the same identity, so
// they are one ticket group.
const ticketsPolicy = clusterPolicy + `  - name: cluster-tickets
    identities: [spiffe://e2e.internal/edge/1]
    operations: [tickets]
`

// TestTicketKeysFromKeyserver runs two edges on one keyserver that hands
// out session ticket keys with a 2 s period, each accepted 2 s after its
// period. A TLS 1.3 session made on edge A resumes on edge B without a
// key operation, still after a rotation, and no longer once its key's
// acceptance window has passed.
func TestTicketKeysFromKeyserver(t *testing.T) {
	const period = 2 * time.Second
	secret := filepath.Join(t.TempDir(), "ticket-secret")
	mustWrite(t, secret, strings.Repeat("5e", 32)+"\n", 0o600)
	c := startCluster(t, clusterOptions{keyservers: 1, policy: ticketsPolicy,
		keyserver: []string{"-ticket-secret-file", secret, "-ticket-key-period", period.String(), "-ticket-key-accept", period.String()}})
	edgeB := startProc(t, nil, "edge", c.edgeArgs...)
	addrB := edgeB.waitFor(t, clusterReadyEdge)[1]
	for _, e := range []*proc{c.edge, edgeB} {
		if !strings.Contains(e.out.String(), "ticket_keys=keyserver") || !strings.Contains(e.out.String(), "session ticket keys from the keyserver") {
			t.Fatalf("an edge did not take its ticket keys from the keyserver:\n%s", e.out.String())
		}
	}

	newClient := func() *tls.Config {
		cfg := c.clientConfig(clusterECDSA)
		cfg.MinVersion = tls.VersionTLS13
		cfg.ClientSessionCache = tls.NewLRUClientSessionCache(4)
		return cfg
	}
	x, y := newClient(), newClient()

	// Sessions made early in a period, sealed with its key.
	sleepUntilPeriod(period, 200*time.Millisecond)
	if getResumed(t, c.edgeAddr, x) || getResumed(t, c.edgeAddr, y) {
		t.Fatal("a first connection resumed a session")
	}
	c.waitSigns(t, 0, 2)
	signs := func() int { ok, _ := c.signs(t, 0); return ok }

	if !getResumed(t, addrB, x) {
		t.Error("a session made on edge A did not resume on edge B in the same period")
	}
	// Across a rotation: the session's key is now the previous one.
	sleepUntilPeriod(period, 300*time.Millisecond)
	if !getResumed(t, addrB, x) {
		t.Error("a session made on edge A did not resume on edge B after a rotation")
	}
	time.Sleep(300 * time.Millisecond) // for any audit record to be written
	if n := signs(); n != 2 {
		t.Errorf("resumptions made %d key operations, want 0", n-2)
	}
	// One more period: y's key is past its acceptance window.
	sleepUntilPeriod(period, 300*time.Millisecond)
	if getResumed(t, addrB, y) {
		t.Error("a session resumed after its key's acceptance window")
	}
	c.waitSigns(t, 0, 3) // that full handshake made a key operation

	audit, err := os.ReadFile(c.keyservers[0].audit)
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`"op":"tickets".*"outcome":"OK".*"rule":"cluster-tickets"`).Match(audit) {
		t.Errorf("no OK tickets record in the audit trail:\n%s", audit)
	}
	if strings.Contains(string(audit), strings.Repeat("5e", 8)) {
		t.Error("the audit trail contains the ticket secret")
	}
}

// sleepUntilPeriod sleeps until after the next multiple of period since
// the Unix epoch, plus after.
func sleepUntilPeriod(period, after time.Duration) {
	now := time.Now()
	next := now.Truncate(period).Add(period).Add(after)
	time.Sleep(next.Sub(now))
}

// getResumed makes one HTTP request to the edge at addr with cfg and
// reports whether its TLS connection resumed a session. Reading the whole
// answer takes the session tickets the edge sends.
func getResumed(t *testing.T, addr string, cfg *tls.Config) bool {
	t.Helper()
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, "GET /tickets HTTP/1.1\r\nHost: "+cfg.ServerName+"\r\nConnection: close\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(conn)
	if err != nil || !strings.Contains(string(body), "ok /tickets") {
		t.Fatalf("GET through %s: %v\n%s", addr, err, body)
	}
	return conn.ConnectionState().DidResume
}
