package link

import (
	"crypto/elliptic"
	"crypto/tls"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLoadMTLSCredentialsErrors(t *testing.T) {
	pki := newTestPKI(t)
	dir := t.TempDir()
	otherKey := writeFile(t, dir, "other.key", keyPEM(t, mustECDSA(elliptic.P256())))
	ek := mustECDSA(elliptic.P256())
	expired := writeFile(t, dir, "expired.pem", certPEM(pki.ca.issue(t, ek.Public(), leafOptions{client: true, notBefore: time.Now().Add(-48 * time.Hour), notAfter: time.Now().Add(-time.Hour)})))
	expiredKey := writeFile(t, dir, "expired.key", keyPEM(t, ek))
	notPEM := writeFile(t, dir, "not.pem", []byte("hello"))
	missing := filepath.Join(dir, "missing.pem")

	tests := []struct {
		name             string
		cert, key, ca    string
		wantErr, wantIn2 string // substrings of the error
	}{
		{"missing-cert", missing, pki.clientKey, pki.caFile, "certificate file", missing},
		{"missing-key", pki.clientCert, missing, pki.caFile, "key file", missing},
		{"missing-CA", pki.clientCert, pki.clientKey, missing, "CA file", missing},
		{"empty-path", "", pki.clientKey, pki.caFile, "no certificate file", ""},
		{"cert-not-PEM", notPEM, pki.clientKey, pki.caFile, "no CERTIFICATE PEM block", notPEM},
		{"key-is-a-cert", pki.clientCert, pki.clientCert, pki.caFile, "no PRIVATE KEY PEM block", pki.clientCert},
		{"key-mismatch", pki.clientCert, otherKey, pki.caFile, "does not match", otherKey},
		{"CA-is-a-key", pki.clientCert, pki.clientKey, pki.clientKey, "no CERTIFICATE PEM block", pki.clientKey},
		{"expired", expired, expiredKey, pki.caFile, "expired", expired},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := LoadMTLSCredentials(tt.cert, tt.key, tt.ca)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), tt.wantIn2) {
				t.Errorf("LoadMTLSCredentials() = %v, want an error containing %q and %q", err, tt.wantErr, tt.wantIn2)
			}
		})
	}
	if _, err := ClientMTLSConfig(pki.clientCert, pki.clientKey, pki.caFile, ""); err == nil {
		t.Error("ClientMTLSConfig() with no server name succeeded")
	}
	if _, err := ServerMTLSConfig(pki.serverCert, missing, pki.caFile); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("ServerMTLSConfig() = %v, want an error naming %s", err, missing)
	}
}

func TestMTLSConfigs(t *testing.T) {
	pki := newTestPKI(t)
	server, err := ServerMTLSConfig(pki.serverCert, pki.serverKey, pki.caFile)
	if err != nil {
		t.Fatal(err)
	}
	client, err := ClientMTLSConfig(pki.clientCert, pki.clientKey, pki.caFile, keyserverName)
	if err != nil {
		t.Fatal(err)
	}
	r := runHandshake(t, server, client, nil)
	if r.clientErr != nil || r.serverErr != nil {
		t.Fatalf("handshake errors = client %v, server %v", r.clientErr, r.serverErr)
	}
	if r.state.Version != tls.VersionTLS13 {
		t.Errorf("version = %s, want TLS 1.3", tls.VersionName(r.state.Version))
	}

	tests := []struct {
		name   string
		client *tls.Config
	}{
		{"TLS12-client", &tls.Config{RootCAs: pki.ca.pool, ServerName: keyserverName, MaxVersion: tls.VersionTLS12, GetClientCertificate: client.GetClientCertificate}},
		{"no-client-certificate", &tls.Config{RootCAs: pki.ca.pool, ServerName: keyserverName}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if r := runHandshake(t, server, tt.client, nil); r.serverErr == nil {
				t.Errorf("the keyserver accepted a handshake from a %s", tt.name)
			}
		})
	}
}

// TestMTLSReload rotates both ends' CAs and certificates through Reload.
func TestMTLSReload(t *testing.T) {
	a, b := newTestPKI(t), newTestPKI(t)
	dir := t.TempDir()
	// The server starts with a's certificate and trusts a's clients; the
	// client starts with b's certificate and trusts b's CA.
	sCert := writeFile(t, dir, "s.pem", readFile(t, a.serverCert))
	sKey := writeFile(t, dir, "s.key", readFile(t, a.serverKey))
	sCA := writeFile(t, dir, "s-ca.pem", readFile(t, a.caFile))
	cCert := writeFile(t, dir, "c.pem", readFile(t, b.clientCert))
	cKey := writeFile(t, dir, "c.key", readFile(t, b.clientKey))
	cCA := writeFile(t, dir, "c-ca.pem", readFile(t, b.caFile))

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
		r := runHandshake(t, sc, cc, nil)
		if ok := r.clientErr == nil && r.serverErr == nil; ok != wantOK {
			t.Fatalf("handshake errors = client %v, server %v; want success %t", r.clientErr, r.serverErr, wantOK)
		}
	}
	handshake(false) // the client does not trust a's server certificate

	writeFile(t, dir, "c-ca.pem", readFile(t, a.caFile))
	if err := client.Reload(); err != nil {
		t.Fatal(err)
	}
	handshake(false) // the server does not trust b's client certificate

	writeFile(t, dir, "s-ca.pem", readFile(t, b.caFile))
	if err := server.Reload(); err != nil {
		t.Fatal(err)
	}
	handshake(true)

	// A broken file keeps the credentials in use.
	writeFile(t, dir, "s.key", []byte("garbage"))
	if err := server.Reload(); err == nil {
		t.Fatal("Reload() with a broken key file succeeded")
	}
	handshake(true)
}
