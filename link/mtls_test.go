package link

import (
	"crypto/elliptic"
	"crypto/tls"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/internal/pkitest"
)

func TestLoadMTLSCredentialsErrors(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	dir := t.TempDir()
	otherKey := pkitest.WriteFile(t, dir, "other.key", pkitest.KeyPEM(t, pkitest.MustECDSA(elliptic.P256())))
	ek := pkitest.MustECDSA(elliptic.P256())
	expired := pkitest.WriteFile(t, dir, "expired.pem", pkitest.CertPEM(pki.CA.Issue(t, ek.Public(), pkitest.LeafOptions{Client: true, NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-time.Hour)})))
	expiredKey := pkitest.WriteFile(t, dir, "expired.key", pkitest.KeyPEM(t, ek))
	notPEM := pkitest.WriteFile(t, dir, "not.pem", []byte("hello"))
	missing := filepath.Join(dir, "missing.pem")

	tests := []struct {
		name             string
		cert, key, ca    string
		wantErr, wantIn2 string // substrings of the error
	}{
		{"missing-cert", missing, pki.ClientKey, pki.CAFile, "certificate file", missing},
		{"missing-key", pki.ClientCert, missing, pki.CAFile, "key file", missing},
		{"missing-CA", pki.ClientCert, pki.ClientKey, missing, "CA file", missing},
		{"empty-path", "", pki.ClientKey, pki.CAFile, "no certificate file", ""},
		{"cert-not-PEM", notPEM, pki.ClientKey, pki.CAFile, "no CERTIFICATE PEM block", notPEM},
		{"key-is-a-cert", pki.ClientCert, pki.ClientCert, pki.CAFile, "no PRIVATE KEY PEM block", pki.ClientCert},
		{"key-mismatch", pki.ClientCert, otherKey, pki.CAFile, "does not match", otherKey},
		{"CA-is-a-key", pki.ClientCert, pki.ClientKey, pki.ClientKey, "no CERTIFICATE PEM block", pki.ClientKey},
		{"expired", expired, expiredKey, pki.CAFile, "expired", expired},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := LoadMTLSCredentials(tt.cert, tt.key, tt.ca)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), tt.wantIn2) {
				t.Errorf("LoadMTLSCredentials() = %v, want an error containing %q and %q", err, tt.wantErr, tt.wantIn2)
			}
		})
	}
	if _, err := ClientMTLSConfig(pki.ClientCert, pki.ClientKey, pki.CAFile, ""); err == nil {
		t.Error("ClientMTLSConfig() with no server name succeeded")
	}
	if _, err := ServerMTLSConfig(pki.ServerCert, missing, pki.CAFile); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("ServerMTLSConfig() = %v, want an error naming %s", err, missing)
	}
}

func TestMTLSConfigs(t *testing.T) {
	pki := pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	server, err := ServerMTLSConfig(pki.ServerCert, pki.ServerKey, pki.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	client, err := ClientMTLSConfig(pki.ClientCert, pki.ClientKey, pki.CAFile, keyserverName)
	if err != nil {
		t.Fatal(err)
	}
	r := pkitest.Handshake(t, server, client, nil)
	if r.ClientErr != nil || r.ServerErr != nil {
		t.Fatalf("handshake errors = client %v, server %v", r.ClientErr, r.ServerErr)
	}
	if r.State.Version != tls.VersionTLS13 {
		t.Errorf("version = %s, want TLS 1.3", tls.VersionName(r.State.Version))
	}

	tests := []struct {
		name   string
		client *tls.Config
	}{
		{"TLS12-client", &tls.Config{RootCAs: pki.CA.Pool, ServerName: keyserverName, MaxVersion: tls.VersionTLS12, GetClientCertificate: client.GetClientCertificate}},
		{"no-client-certificate", &tls.Config{RootCAs: pki.CA.Pool, ServerName: keyserverName}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if r := pkitest.Handshake(t, server, tt.client, nil); r.ServerErr == nil {
				t.Errorf("the keyserver accepted a handshake from a %s", tt.name)
			}
		})
	}
}

// TestMTLSReload rotates both ends' CAs and certificates through Reload.
func TestMTLSReload(t *testing.T) {
	a, b := pkitest.NewMTLS(t, keyserverName, edgeIdentity), pkitest.NewMTLS(t, keyserverName, edgeIdentity)
	dir := t.TempDir()
	// The server starts with a's certificate and trusts a's clients; the
	// client starts with b's certificate and trusts b's CA.
	sCert := pkitest.WriteFile(t, dir, "s.pem", readFile(t, a.ServerCert))
	sKey := pkitest.WriteFile(t, dir, "s.key", readFile(t, a.ServerKey))
	sCA := pkitest.WriteFile(t, dir, "s-ca.pem", readFile(t, a.CAFile))
	cCert := pkitest.WriteFile(t, dir, "c.pem", readFile(t, b.ClientCert))
	cKey := pkitest.WriteFile(t, dir, "c.key", readFile(t, b.ClientKey))
	cCA := pkitest.WriteFile(t, dir, "c-ca.pem", readFile(t, b.CAFile))

	server, err := LoadMTLSCredentials(sCert, sKey, sCA)
	if err != nil {
		t.Fatal(err)
	}
	client, err := LoadMTLSCredentials(cCert, cKey, cCA)
	if err != nil {
		t.Fatal(err)
	}
	sc, cc := server.ServerConfig(), client.ClientConfig(keyserverName)
	handshake := func(wantOK bool) {
		t.Helper()
		r := pkitest.Handshake(t, sc, cc, nil)
		if ok := r.ClientErr == nil && r.ServerErr == nil; ok != wantOK {
			t.Fatalf("handshake errors = client %v, server %v; want success %t", r.ClientErr, r.ServerErr, wantOK)
		}
	}
	handshake(false) // the client does not trust a's server certificate

	pkitest.WriteFile(t, dir, "c-ca.pem", readFile(t, a.CAFile))
	if err := client.Reload(); err != nil {
		t.Fatal(err)
	}
	handshake(false) // the server does not trust b's client certificate

	pkitest.WriteFile(t, dir, "s-ca.pem", readFile(t, b.CAFile))
	if err := server.Reload(); err != nil {
		t.Fatal(err)
	}
	handshake(true)

	// A broken file keeps the credentials in use.
	pkitest.WriteFile(t, dir, "s.key", []byte("garbage"))
	if err := server.Reload(); err == nil {
		t.Fatal("Reload() with a broken key file succeeded")
	}
	handshake(true)
}
