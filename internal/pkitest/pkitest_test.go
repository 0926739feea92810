package pkitest

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestChainVerifies checks that a leaf issued by an intermediate that the
// root issued verifies with crypto/x509 up to the root, for the leaf's
// name and usage only, and that the CA flags and key usages are set.
func TestChainVerifies(t *testing.T) {
	root := NewCA(t, "Root")
	if !root.Cert.IsCA || !root.Cert.BasicConstraintsValid || root.Cert.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign {
		t.Errorf("root: IsCA %v, BasicConstraintsValid %v, KeyUsage %v; want a CA that signs certificates and CRLs",
			root.Cert.IsCA, root.Cert.BasicConstraintsValid, root.Cert.KeyUsage)
	}
	if root.Cert.Subject.CommonName != "Root" {
		t.Errorf("root common name = %q, want %q", root.Cert.Subject.CommonName, "Root")
	}
	if err := root.Cert.CheckSignatureFrom(root.Cert); err != nil {
		t.Errorf("root is not self-signed: %v", err)
	}

	inter := NewCA(t, "Intermediate")
	inter.Cert = root.Issue(t, inter.Key.Public(), LeafOptions{CA: true})
	if !inter.Cert.IsCA || inter.Cert.KeyUsage != x509.KeyUsageCertSign || len(inter.Cert.ExtKeyUsage) != 0 {
		t.Errorf("intermediate: IsCA %v, KeyUsage %v, ExtKeyUsage %v; want a CA that signs certificates only",
			inter.Cert.IsCA, inter.Cert.KeyUsage, inter.Cert.ExtKeyUsage)
	}
	leaf := inter.Issue(t, P256Key().Public(), LeafOptions{Names: []string{"a.example", "b.example"}})
	if leaf.IsCA {
		t.Error("leaf is a CA")
	}
	if leaf.SerialNumber.Cmp(inter.Cert.SerialNumber) <= 0 {
		t.Errorf("leaf serial %v not above the intermediate's %v", leaf.SerialNumber, inter.Cert.SerialNumber)
	}

	inters := x509.NewCertPool()
	inters.AddCert(inter.Cert)
	for _, name := range []string{"a.example", "b.example"} {
		chains, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: root.Pool, Intermediates: inters})
		if err != nil {
			t.Fatalf("Verify(%s) = %v", name, err)
		}
		if got := len(chains[0]); got != 3 {
			t.Errorf("Verify(%s) chain length = %d, want 3", name, got)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "c.example", Roots: root.Pool, Intermediates: inters}); err == nil {
		t.Error("Verify(c.example) succeeded for a leaf without that name")
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "a.example", Roots: root.Pool}); err == nil {
		t.Error("Verify without the intermediate succeeded")
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "a.example", Roots: NewCA(t, "Other").Pool, Intermediates: inters}); err == nil {
		t.Error("Verify against another CA succeeded")
	}
}

// TestIssueUsage checks server and client extended key usages, and that
// only RSA leaves may encipher keys.
func TestIssueUsage(t *testing.T) {
	ca := NewCA(t, "CA")
	tests := []struct {
		name    string
		leaf    *x509.Certificate
		eku     x509.ExtKeyUsage
		other   x509.ExtKeyUsage
		keyUses x509.KeyUsage
	}{
		{"server ECDSA", ca.Issue(t, P256Key().Public(), LeafOptions{}), x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth, x509.KeyUsageDigitalSignature},
		{"client ECDSA", ca.Issue(t, P384Key().Public(), LeafOptions{Client: true}), x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth, x509.KeyUsageDigitalSignature},
		{"server RSA", ca.Issue(t, RSAKey().Public(), LeafOptions{}), x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth, x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment},
		{"client Ed25519", ca.Issue(t, Ed25519Key().Public(), LeafOptions{Client: true}), x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth, x509.KeyUsageDigitalSignature},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.leaf.KeyUsage != tt.keyUses {
				t.Errorf("KeyUsage = %v, want %v", tt.leaf.KeyUsage, tt.keyUses)
			}
			if len(tt.leaf.ExtKeyUsage) != 1 || tt.leaf.ExtKeyUsage[0] != tt.eku {
				t.Errorf("ExtKeyUsage = %v, want [%v]", tt.leaf.ExtKeyUsage, tt.eku)
			}
			if _, err := tt.leaf.Verify(x509.VerifyOptions{Roots: ca.Pool, KeyUsages: []x509.ExtKeyUsage{tt.eku}}); err != nil {
				t.Errorf("Verify for usage %v = %v", tt.eku, err)
			}
			if _, err := tt.leaf.Verify(x509.VerifyOptions{Roots: ca.Pool, KeyUsages: []x509.ExtKeyUsage{tt.other}}); err == nil {
				t.Errorf("Verify for usage %v succeeded", tt.other)
			}
		})
	}
}

// TestIssueValidity checks that the validity window asked for is the one
// issued and the one crypto/x509 enforces, and the default window.
func TestIssueValidity(t *testing.T) {
	ca := NewCA(t, "CA")
	nb := time.Now().Add(-48 * time.Hour).Truncate(time.Second)
	na := time.Now().Add(-24 * time.Hour).Truncate(time.Second)
	expired := ca.Issue(t, P256Key().Public(), LeafOptions{Names: []string{"old.example"}, NotBefore: nb, NotAfter: na})
	if !expired.NotBefore.Equal(nb) || !expired.NotAfter.Equal(na) {
		t.Errorf("validity = %v to %v, want %v to %v", expired.NotBefore, expired.NotAfter, nb, na)
	}
	if _, err := expired.Verify(x509.VerifyOptions{DNSName: "old.example", Roots: ca.Pool}); err == nil {
		t.Error("Verify of an expired leaf succeeded")
	}
	// The CA itself is valid from an hour ago, so check inside both windows.
	ca2 := NewCA(t, "CA2")
	win := ca2.Issue(t, P256Key().Public(), LeafOptions{Names: []string{"soon.example"}, NotBefore: time.Now().Add(10 * time.Minute), NotAfter: time.Now().Add(2 * time.Hour)})
	if _, err := win.Verify(x509.VerifyOptions{DNSName: "soon.example", Roots: ca2.Pool}); err == nil {
		t.Error("Verify of a leaf not yet valid succeeded")
	}
	if _, err := win.Verify(x509.VerifyOptions{DNSName: "soon.example", Roots: ca2.Pool, CurrentTime: time.Now().Add(time.Hour)}); err != nil {
		t.Errorf("Verify inside the leaf's window = %v", err)
	}

	before := time.Now()
	def := ca.Issue(t, P256Key().Public(), LeafOptions{})
	after := time.Now()
	if def.NotBefore.Before(before.Add(-time.Hour-time.Second)) || def.NotBefore.After(after.Add(-time.Hour)) {
		t.Errorf("default NotBefore = %v, want about an hour before %v", def.NotBefore, before)
	}
	if def.NotAfter.Before(before.Add(24*time.Hour-time.Second)) || def.NotAfter.After(after.Add(24*time.Hour)) {
		t.Errorf("default NotAfter = %v, want about a day after %v", def.NotAfter, before)
	}
}

// privateKey is what the standard library's private keys have in common.
type privateKey interface {
	crypto.Signer
	Equal(crypto.PrivateKey) bool
}

// TestPEM checks that CertPEM keeps certificates in order and KeyPEM's
// key parses back to the same key.
func TestPEM(t *testing.T) {
	ca := NewCA(t, "CA")
	a := ca.Issue(t, P256Key().Public(), LeafOptions{Names: []string{"a.example"}})
	b := ca.Issue(t, P384Key().Public(), LeafOptions{Names: []string{"b.example"}})
	rest := CertPEM(a, b, ca.Cert)
	for i, want := range []*x509.Certificate{a, b, ca.Cert} {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil || blk.Type != "CERTIFICATE" || !bytes.Equal(blk.Bytes, want.Raw) {
			t.Fatalf("block %d is not certificate %d", i, i)
		}
	}
	if len(rest) != 0 {
		t.Errorf("%d bytes after the last certificate", len(rest))
	}

	for _, key := range []privateKey{P256Key(), RSAKey(), Ed25519Key()} {
		blk, _ := pem.Decode(KeyPEM(t, key))
		if blk == nil || blk.Type != "PRIVATE KEY" {
			t.Fatalf("KeyPEM(%T) is not a PRIVATE KEY block", key)
		}
		got, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
		if err != nil {
			t.Fatalf("ParsePKCS8PrivateKey(KeyPEM(%T)) = %v", key, err)
		}
		if !key.Equal(got) {
			t.Errorf("KeyPEM(%T) parsed to another key", key)
		}
	}
}

// TestWriteFile checks the file's path, content and mode.
func TestWriteFile(t *testing.T) {
	dir := t.TempDir()
	p := WriteFile(t, dir, "x.pem", []byte("a"), []byte("bc"))
	if p != filepath.Join(dir, "x.pem") {
		t.Errorf("WriteFile path = %q, want %q", p, filepath.Join(dir, "x.pem"))
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != "abc" {
		t.Errorf("content = %q, want %q", b, "abc")
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode = %v, want 0600", fi.Mode().Perm())
	}
}

// TestMTLSHandshake checks that the files NewMTLS writes make a mutual TLS
// handshake that Handshake completes, with each side's name and usage, and
// that a client the CA did not issue is refused.
func TestMTLSHandshake(t *testing.T) {
	m := NewMTLS(t, "server.test", "client.test")
	for _, f := range []string{m.CAFile, m.ServerCert, m.ServerKey, m.ClientCert, m.ClientKey} {
		if filepath.Dir(f) != m.Dir {
			t.Errorf("%s is not in %s", f, m.Dir)
		}
	}
	caPEM, err := os.ReadFile(m.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(caPEM, CertPEM(m.CA.Cert)) {
		t.Error("CAFile does not hold the CA certificate")
	}
	serverCert, err := tls.LoadX509KeyPair(m.ServerCert, m.ServerKey)
	if err != nil {
		t.Fatal(err)
	}
	clientCert, err := tls.LoadX509KeyPair(m.ClientCert, m.ClientKey)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := serverCert.PrivateKey.(*ecdsa.PrivateKey); !ok {
		t.Errorf("server key is %T, want *ecdsa.PrivateKey", serverCert.PrivateKey)
	}
	sc := &tls.Config{Certificates: []tls.Certificate{serverCert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: m.CA.Pool, MinVersion: tls.VersionTLS13}
	cc := &tls.Config{Certificates: []tls.Certificate{clientCert}, RootCAs: m.CA.Pool, ServerName: "server.test", MinVersion: tls.VersionTLS13}

	r := Handshake(t, sc, cc, nil)
	if r.ClientErr != nil || r.ServerErr != nil {
		t.Fatalf("Handshake: client %v, server %v", r.ClientErr, r.ServerErr)
	}
	if r.State.Version != tls.VersionTLS13 || len(r.State.PeerCertificates) == 0 || r.State.PeerCertificates[0].DNSNames[0] != "server.test" {
		t.Errorf("client saw version %x, peer %v; want TLS 1.3 with server.test", r.State.Version, r.State.PeerCertificates)
	}
	if r.Elapsed <= 0 {
		t.Errorf("Elapsed = %v, want > 0", r.Elapsed)
	}

	// The server's certificate is for server auth only: as a client
	// certificate it is refused, and so is the wrong server name.
	cc2 := cc.Clone()
	cc2.Certificates = []tls.Certificate{serverCert}
	if r := Handshake(t, sc, cc2, nil); r.ServerErr == nil {
		t.Error("the server accepted a server-auth certificate as a client's")
	}
	cc3 := cc.Clone()
	cc3.ServerName = "other.test"
	if r := Handshake(t, sc, cc3, nil); r.ClientErr == nil {
		t.Error("the client accepted the server for another name")
	}
	other := NewCA(t, "Other CA")
	k := MustECDSA(elliptic.P256())
	cc4 := cc.Clone()
	cc4.Certificates = []tls.Certificate{{Certificate: [][]byte{other.Issue(t, k.Public(), LeafOptions{Client: true, Names: []string{"client.test"}}).Raw}, PrivateKey: k}}
	if r := Handshake(t, sc, cc4, nil); r.ServerErr == nil {
		t.Error("the server accepted a client certificate from another CA")
	}
}
