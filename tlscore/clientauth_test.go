package tlscore

import (
	"context"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/internal/pkitest"
)

// clientCert returns a client certificate issued by ca with the given
// subject.
func clientCert(t *testing.T, ca *pkitest.CA, subject pkix.Name) tls.Certificate {
	t.Helper()
	key := pkitest.MustECDSA(elliptic.P256())
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: subject,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func TestClientAuth(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	clientCA := pkitest.NewCA(t, "Client CA")
	caFile := pkitest.WriteFile(t, t.TempDir(), "client-ca.pem", pkitest.CertPEM(clientCA.Cert))
	policies, err := ParseClientAuth("p256.example.com=require:" + caFile + ", *.wild.example.com=request:" + caFile)
	if err != nil {
		t.Fatal(err)
	}
	sc, err := NewServerTLSConfig(ServerConfig{Certificates: env.newStore(t, CertStoreConfig{}), ClientAuth: policies, RSAKeyExchange: []string{"rsa.example.com"}})
	if err != nil {
		t.Fatal(err)
	}
	addr, _ := startHTTPEdge(t, sc, ClientAuthHandler(policies, mustProxy(t, ProxyConfig{Routes: []Route{{Origin: newEchoOrigin(t)}}})), time.Second)
	alice := clientCert(t, clientCA, pkix.Name{CommonName: "alice", Organization: []string{"Example"}})
	mallory := clientCert(t, pkitest.NewCA(t, "Other CA"), pkix.Name{CommonName: "mallory"})

	get := func(t *testing.T, sni, host string, cert *tls.Certificate) (int, originSeen, error) {
		t.Helper()
		cc := &tls.Config{RootCAs: env.pki.CA.Pool, ServerName: sni}
		if cert != nil {
			// Sent whatever CAs the server names, as a client that
			// tries its luck would.
			cc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
		}
		tr := &http.Transport{TLSClientConfig: cc, DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		}}
		t.Cleanup(tr.CloseIdleConnections)
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, "https://"+host+"/", nil)
		req.Header.Set(HeaderClientSubject, "CN=forged")
		resp, err := (&http.Client{Transport: tr, Timeout: defaultTestTimeout}).Do(req)
		if err != nil {
			return 0, originSeen{}, err
		}
		defer resp.Body.Close()
		var seen originSeen
		if resp.StatusCode == http.StatusOK {
			if err := json.NewDecoder(resp.Body).Decode(&seen); err != nil {
				t.Fatal(err)
			}
		}
		return resp.StatusCode, seen, nil
	}
	tests := []struct {
		name        string
		sni, host   string
		cert        *tls.Certificate
		wantStatus  int // 0: the handshake fails
		wantSubject string
	}{
		{"require/none", "p256.example.com", "p256.example.com", nil, 0, ""},
		{"require/other-ca", "p256.example.com", "p256.example.com", &mallory, 0, ""},
		{"require/valid", "p256.example.com", "p256.example.com", &alice, 200, "CN=alice,O=Example"},
		{"request/none", "a.wild.example.com", "a.wild.example.com", nil, 200, ""},
		{"request/valid", "a.wild.example.com", "a.wild.example.com", &alice, 200, "CN=alice,O=Example"},
		{"request/other-ca", "a.wild.example.com", "a.wild.example.com", &mallory, 0, ""},
		{"no-policy/forged-header-dropped", "rsa.example.com", "rsa.example.com", nil, 200, ""},
		{"host-under-another-policy", "rsa.example.com", "p256.example.com", nil, http.StatusMisdirectedRequest, ""},
		{"host-under-another-policy-with-cert", "a.wild.example.com", "p256.example.com", &alice, http.StatusMisdirectedRequest, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, seen, err := get(t, tt.sni, tt.host, tt.cert)
			if tt.wantStatus == 0 {
				if err == nil {
					t.Fatalf("request succeeded with status %d, want the handshake refused", status)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if status != tt.wantStatus {
				t.Fatalf("status %d, want %d", status, tt.wantStatus)
			}
			if got := seen.Headers[HeaderClientSubject]; status == 200 && got != tt.wantSubject {
				t.Errorf("origin saw %s %q, want %q", HeaderClientSubject, got, tt.wantSubject)
			}
		})
	}
}

func TestParseClientAuth(t *testing.T) {
	dir := t.TempDir()
	ca := pkitest.WriteFile(t, dir, "ca.pem", pkitest.CertPEM(pkitest.NewCA(t, "CA").Cert))
	junk := pkitest.WriteFile(t, dir, "junk.pem", []byte("junk"))
	for _, tt := range []struct{ spec, wantErr string }{
		{"", ""},
		{"a.example.com=require:" + ca + ",*.b.example.com=request:" + ca, ""},
		{"a.example.com", "want NAME=MODE:CAFILE"},
		{"a.example.com=require", "want NAME=MODE:CAFILE"},
		{"a.example.com=maybe:" + ca, `mode "maybe"`},
		{"*.*.example.com=require:" + ca, "host name pattern"},
		{"a.example.com=require:" + filepath.Join(dir, "absent.pem"), "CA file"},
		{"a.example.com=require:" + junk, "holds no PEM certificate"},
		{"a.example.com=require:" + ca + ",A.example.com=request:" + ca, "has a client-certificate policy already"},
	} {
		p, err := ParseClientAuth(tt.spec)
		switch {
		case tt.wantErr == "" && err != nil:
			t.Errorf("ParseClientAuth(%q) = %v", tt.spec, err)
		case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
			t.Errorf("ParseClientAuth(%q) = %v, %v; want an error containing %q", tt.spec, p, err, tt.wantErr)
		}
	}
	if _, err := os.Stat(ca); err != nil {
		t.Fatal(err)
	}
}
