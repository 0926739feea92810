package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
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
