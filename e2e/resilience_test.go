package e2e

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestKeyserverFailover runs an edge with two keyservers under a steady
// load of full handshakes. One keyserver is killed with SIGKILL: no more
// handshakes fail than were in flight at that moment, and the other
// keyserver carries the load. Restarted on the same address, it gets load
// again. Then the other keyserver is stopped with SIGTERM: it finishes what
// it was doing, and not a single handshake fails.
func TestKeyserverFailover(t *testing.T) {
	c := startCluster(t, clusterOptions{keyservers: 2})
	l := startLoad(c.edgeAddr, 8, c.clientConfig(clusterECDSA))
	halted := false
	defer func() {
		if !halted {
			l.halt()
		}
	}()
	l.waitOK(t, 50)
	c.waitSigns(t, 0, 5)
	c.waitSigns(t, 1, 5)

	// SIGKILL: the kernel resets the edge's connection at once.
	failedBefore := l.failed.Load()
	inflight := l.inflight.Load()
	c.kill(t, 0, syscall.SIGKILL)
	inflight = max(inflight, l.inflight.Load())
	ok1, _ := c.signs(t, 1)
	l.waitOK(t, 200)
	failed := l.failed.Load() - failedBefore
	t.Logf("SIGKILL: %d handshakes failed, %d were in flight", failed, inflight)
	if failed > inflight {
		t.Errorf("%d handshakes failed after the SIGKILL, more than the %d in flight: %s", failed, inflight, l.firstErrors())
	}
	if now, _ := c.signs(t, 1); now < ok1+150 {
		t.Errorf("the surviving keyserver answered %d Sign requests while the other was down, want most of 200", now-ok1)
	}

	// Back on the same address, the keyserver gets load again.
	c.startKeyserver(t, 0)
	c.waitSigns(t, 0, 20)
	ok1, _ = c.signs(t, 1)
	l.waitOK(t, 100)
	if now, _ := c.signs(t, 1); now == ok1 {
		t.Error("after the restart, the load went to the restarted keyserver only")
	}
	if failed := l.failed.Load() - failedBefore; failed > inflight {
		t.Errorf("%d handshakes failed since the SIGKILL (%d in flight then): %s", failed, inflight, l.firstErrors())
	}

	// SIGTERM: the keyserver reports NOT_SERVING, finishes its operations
	// in flight and stops; no handshake fails.
	failedBefore = l.failed.Load()
	c.kill(t, 1, syscall.SIGTERM)
	ks1 := c.keyservers[1].proc
	if ks1.err != nil || !strings.Contains(ks1.out.String(), "stopped") {
		t.Errorf("keyserver after SIGTERM: exit %v\n%s", ks1.err, ks1.out.String())
	}
	if ok, failed := c.signs(t, 1); failed > 0 {
		t.Errorf("the keyserver stopped with SIGTERM failed %d of %d Sign requests", failed, ok+failed)
	}
	l.waitOK(t, 100)
	c.startKeyserver(t, 1)
	c.waitSigns(t, 1, 20)
	l.halt()
	halted = true
	if failed := l.failed.Load() - failedBefore; failed > 0 {
		t.Errorf("%d handshakes failed across the SIGTERM and restart of a keyserver: %s", failed, l.firstErrors())
	}
	t.Logf("%d handshakes, %d failed", l.ok.Load(), l.failed.Load())
}

// TestTokenDirectoryMovedAway moves the keyserver's SoftHSM token directory
// away under load, and back. While it is away, handshakes fail fast (the
// keyserver answers Unavailable at once); once it is back, the keyserver
// initialises the library again, finds its keys and serves again within
// seconds, without a restart.
func TestTokenDirectoryMovedAway(t *testing.T) {
	c := startCluster(t, clusterOptions{keyservers: 1})
	l := startLoad(c.edgeAddr, 4, c.clientConfig(clusterECDSA))
	defer l.halt()
	l.waitOK(t, 20)

	away := c.tokenDir + ".away"
	if err := os.Rename(c.tokenDir, away); err != nil {
		t.Fatal(err)
	}
	moved := true
	defer func() {
		if moved {
			os.Rename(away, c.tokenDir)
		}
	}()
	failedBefore, slowBefore := l.failed.Load(), l.slow.Load()
	time.Sleep(2 * time.Second)
	failed := l.failed.Load() - failedBefore
	t.Logf("token away for 2 s: %d handshakes failed, %d took over a second", failed, l.slow.Load()-slowBefore)
	// Four clients waiting out a 2 s call timeout would fail a handful.
	if failed < 20 {
		t.Errorf("only %d handshakes failed in 2 s with the token gone; they should fail fast", failed)
	}
	ks := c.keyservers[0].proc
	if !strings.Contains(ks.out.String(), "token fault") {
		t.Errorf("the keyserver did not log the token fault:\n%s", ks.out.String())
	}
	if !strings.Contains(c.edge.out.String(), "code=Unavailable") {
		t.Errorf("the edge did not get Unavailable from the keyserver:\n%s", c.edge.out.String())
	}

	if err := os.Rename(away, c.tokenDir); err != nil {
		t.Fatal(err)
	}
	moved = false
	back := time.Now()
	l.waitOK(t, 1)
	t.Logf("handshakes succeed again %v after the token directory came back", time.Since(back).Round(time.Millisecond))
	l.waitOK(t, 20)
	if out := ks.out.String(); !strings.Contains(out, "reconnected to token") || !strings.Contains(out, "library_initialised_again=true") {
		t.Errorf("the keyserver did not log its reconnection:\n%s", out)
	}
}

// TestEdgeGracefulShutdown sends SIGTERM to an edge while requests are in
// flight to a slow origin: the edge stops accepting, the requests finish
// with their answers, and the edge exits cleanly.
func TestEdgeGracefulShutdown(t *testing.T) {
	c := startCluster(t, clusterOptions{keyservers: 1, slowOrigin: 2 * time.Second})
	const n = 5
	type answer struct {
		status int
		body   string
		err    error
	}
	answers := make(chan answer, n)
	for range n {
		client, _ := c.dialKeepAlive(t, clusterECDSA)
		go func() {
			resp, err := client.Get("https://" + clusterECDSA + "/slow")
			if err != nil {
				answers <- answer{err: err}
				return
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			answers <- answer{resp.StatusCode, string(body), err}
		}()
	}
	deadline := time.Now().Add(20 * time.Second)
	for c.originHits.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d requests reached the origin within 20 s, want %d", c.originHits.Load(), n)
		}
		time.Sleep(10 * time.Millisecond)
	}

	if err := c.edge.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// New connections are refused while the requests finish.
	refused := false
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		conn, err := tls.Dial("tcp", c.edgeAddr, c.clientConfig(clusterECDSA))
		if err != nil {
			refused = true
			break
		}
		conn.Close()
	}
	if !refused {
		t.Error("the edge still accepts connections after SIGTERM")
	}
	for range n {
		a := <-answers
		if a.err != nil || a.status != http.StatusOK || a.body != "ok /slow" {
			t.Errorf("request in flight at SIGTERM: %d %q, %v", a.status, a.body, a.err)
		}
	}
	select {
	case <-c.edge.done:
	case <-time.After(20 * time.Second):
		t.Fatal("the edge did not exit within 20 s of SIGTERM")
	}
	if c.edge.err != nil || !strings.Contains(c.edge.out.String(), "every request finished") {
		t.Errorf("edge exit: %v\n%s", c.edge.err, c.edge.out.String())
	}
}

// TestEdgeReload changes the edge's files and sends SIGHUP. A broken
// certificate file or link credential is rejected with an error in the log
// and the previous configuration stays in force; a valid new certificate is
// served from the next handshake on. A connection established before keeps
// working throughout.
func TestEdgeReload(t *testing.T) {
	c := startCluster(t, clusterOptions{keyservers: 1})
	client, conn := c.dialKeepAlive(t, clusterECDSA)
	get := func(what string) {
		t.Helper()
		resp, err := client.Get("https://" + clusterECDSA + "/")
		if err != nil {
			t.Fatalf("%s: GET on the established connection: %v", what, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: GET on the established connection: %s", what, resp.Status)
		}
	}
	served := func() *x509.Certificate {
		t.Helper()
		conn, err := tls.Dial("tcp", c.edgeAddr, c.clientConfig(clusterECDSA))
		if err != nil {
			t.Fatalf("new handshake: %v", err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0]
	}
	reload := func(wantLog string) {
		t.Helper()
		before := strings.Count(c.edge.out.String(), wantLog)
		if err := c.edge.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(20 * time.Second)
		for strings.Count(c.edge.out.String(), wantLog) == before {
			if time.Now().After(deadline) {
				t.Fatalf("no %q in the edge's log within 20 s of SIGHUP:\n%s", wantLog, c.edge.out.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	get("before any reload")
	orig := conn.ConnectionState().PeerCertificates[0]
	certFile := filepath.Join(c.certsDir, clusterECDSA+".pem")
	good, err := os.ReadFile(certFile)
	if err != nil {
		t.Fatal(err)
	}

	// A broken certificate file: rejected, the old certificate stays.
	mustWrite(t, certFile, "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n", 0o644)
	reload("reload of the certificates failed")
	if got := served(); !got.Equal(orig) {
		t.Errorf("after a broken reload the edge serves certificate %v, want the previous %v", got.SerialNumber, orig.SerialNumber)
	}
	if !strings.Contains(c.edge.out.String(), certFile) {
		t.Errorf("the error does not name the broken file %s:\n%s", certFile, c.edge.out.String())
	}
	get("after a broken certificate")

	// A broken link credential: rejected, the link keeps working.
	linkCert, err := os.ReadFile(c.link.edgeCert)
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, c.link.edgeCert, "not PEM", 0o644)
	mustWrite(t, certFile, string(good), 0o644)
	reload("reload of the keyserver link credentials failed")
	if got := served(); !got.Equal(orig) {
		t.Errorf("after a broken link credential the edge serves certificate %v, want %v", got.SerialNumber, orig.SerialNumber)
	}
	mustWrite(t, c.link.edgeCert, string(linkCert), 0o644)

	// A new certificate for the same key: served from the next handshake.
	renewed := c.webCA.issue(t, orig.PublicKey, x509.ExtKeyUsageServerAuth, orig.DNSNames)
	mustWrite(t, certFile, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: renewed.Raw})), 0o644)
	reload("reload complete")
	if got := served(); !bytes.Equal(got.Raw, renewed.Raw) {
		t.Errorf("after the reload the edge serves certificate %v, want the new %v", got.SerialNumber, renewed.SerialNumber)
	}
	get("after the reload")
	if got := conn.ConnectionState().PeerCertificates[0]; !got.Equal(orig) {
		t.Error("the established connection changed certificate")
	}
}
