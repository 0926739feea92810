package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

// TestRefusalLogBoundedKeyserver makes 200 handshakes with each of two
// certificates with 251 names, one self-signed and one from the link CA
// naming no identity of the policy, and checks what they add to the
// keyserver's log and audit trail together.
func TestRefusalLogBoundedKeyserver(t *testing.T) {
	d := startDeployment(t)
	var names []string
	for i := range 251 {
		names = append(names, fmt.Sprintf("%s-%03d.refused.e2e.test", strings.Repeat("n", 180), i))
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	self := newTestCA(t, "self-signed")
	certs := []*x509.Certificate{
		self.issue(t, key.Public(), x509.ExtKeyUsageClientAuth, names),
		d.link.ca.issue(t, key.Public(), x509.ExtKeyUsageClientAuth, names),
	}
	size := func() int {
		fi, err := os.Stat(d.auditFile)
		if err != nil {
			t.Fatal(err)
		}
		return len(d.keyserver.out.String()) + int(fi.Size())
	}
	before := size()
	roots := d.link.ca.pool()
	for _, c := range certs {
		tc := tls.Certificate{Certificate: [][]byte{c.Raw}, PrivateKey: key}
		cfg := &tls.Config{RootCAs: roots, ServerName: d.link.serverName, MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"},
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &tc, nil }}
		for range 200 {
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			conn, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", d.keyserverAddr)
			if err == nil {
				// TLS 1.3: the refusal arrives with the first read.
				conn.SetReadDeadline(time.Now().Add(10 * time.Second))
				_, err = conn.Read(make([]byte, 1))
				conn.Close()
			}
			cancel()
			if err == nil {
				t.Fatal("a handshake with a refused certificate succeeded")
			}
		}
	}
	time.Sleep(200 * time.Millisecond) // the last refusals' lines
	added := size() - before
	if added >= 200<<10 {
		t.Errorf("400 refused handshakes added %d bytes to the keyserver's log and audit trail, want < 200 KiB", added)
	}
	t.Logf("400 refused handshakes of 251-name certificates added %d bytes to the keyserver's log and audit trail", added)
}

// TestShutdownWithStalledConnections opens 300 connections to the
// keyserver that never start their TLS handshake, with a handshake
// timeout far longer than the drain's grace: SIGTERM still stops the
// keyserver once the grace is over, closing them.
func TestShutdownWithStalledConnections(t *testing.T) {
	d := startDeploymentWith(t, []string{"-grace", "1s", "-handshake-timeout", "2m", "-max-connections-per-source", "0"}, nil)
	for range 300 {
		c, err := net.Dial("tcp", d.keyserverAddr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	time.Sleep(100 * time.Millisecond) // accepted
	start := time.Now()
	d.edge.stop(t)
	d.keyserver.stop(t) // fails the test if the keyserver takes over 10 s
	t.Logf("keyserver stopped %v after SIGTERM with 300 stalled connections (-grace 1s, -handshake-timeout 2m)", time.Since(start).Round(time.Millisecond))
}

// TestConnectionsPerSourceBounded checks that the keyserver closes, at
// accept, connections from one address beyond -max-connections-per-source.
func TestConnectionsPerSourceBounded(t *testing.T) {
	d := startDeploymentWith(t, []string{"-max-connections-per-source", "8"}, nil)
	// The edge holds two connections: its calls', and the one on which it
	// watches the keyserver's health.
	closed := 0
	for range 20 {
		c, err := net.Dial("tcp", d.keyserverAddr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); err != nil && !os.IsTimeout(err) {
			closed++
		}
	}
	if closed != 14 {
		t.Errorf("%d of 20 connections closed at accept, want 14 (8 per source, the edge holding two)", closed)
	}
}
