package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"math/big"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keyless-tls/keyless/tlscore"
)

func TestRunFlagErrors(t *testing.T) {
	required := []string{"-certs", "d", "-keyserver", "k:1", "-keyserver-ca", "ca", "-tls-cert", "c", "-tls-key", "k"}
	with := func(extra ...string) []string { return append(append([]string{}, required...), extra...) }
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"no certs", []string{"-origin", "http://o"}, "-certs is required"},
		{"no origin", required, "set exactly one of -origin"},
		{"two origins", with("-origin", "http://o", "-tcp-origin", "o:1"), "set exactly one of -origin"},
		{"bad origin scheme", with("-origin", "ftp://o"), `-origin "ftp://o"`},
		{"origin without host", with("-origin", "http://"), `-origin "http://"`},
		{"bad log level", with("-origin", "http://o", "-log-level", "chatty"), `-log-level "chatty"`},
		{"zero call timeout", with("-origin", "http://o", "-call-timeout", "0s"), "-call-timeout"},
		{"keepalive too short", with("-origin", "http://o", "-keepalive", "1s"), "-keepalive"},
		{"zero reconnect backoff", with("-origin", "http://o", "-reconnect-backoff", "0s"), "-reconnect-backoff"},
		{"extra argument", with("-origin", "http://o", "extra"), "unexpected arguments"},
		{"missing client certificate", with("-origin", "http://o"), "no such file"},
		{"several keyservers without a name", append(with("-origin", "http://o"), "-keyserver", "a:1,b:2"), "-keyserver-name is required"},
		{"dns name among others", append(with("-origin", "http://o"), "-keyserver", "dns:///ks:1,b:2", "-keyserver-name", "ks"), "must be the only keyserver address"},
		{"dns name without port", append(with("-origin", "http://o"), "-keyserver", "dns:///ks"), `-keyserver "dns:///ks"`},
		{"keyserver without port", append(with("-origin", "http://o"), "-keyserver", "a"), `-keyserver "a"`},
		{"unknown flag", []string{"-frobnicate"}, "frobnicate"},
		{"bad client-auth mode", with("-origin", "http://o", "-client-auth", "a.example=maybe:ca.pem"), `-client-auth "a.example=maybe:ca.pem": mode "maybe"`},
		{"client-auth CA missing", with("-origin", "http://o", "-client-auth", "a.example=require:/nonexistent/ca.pem"), "-client-auth \"a.example=require:/nonexistent/ca.pem\": CA file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			err := run(t.Context(), tt.args, &stderr, nil)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("run(%q) = %v, want an error containing %q", tt.args, err, tt.wantErr)
			}
		})
	}
	var stderr bytes.Buffer
	if err := run(t.Context(), []string{"-h"}, &stderr, nil); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("run(-h) = %v, want flag.ErrHelp", err)
	}
	for _, f := range []string{"-listen", "-certs", "-default-cert", "-rsa-key-exchange", "-origin", "-tcp-origin", "-keyserver", "-call-timeout", "-keepalive", "-reconnect-backoff", "-grace"} {
		if !strings.Contains(stderr.String(), f) {
			t.Errorf("edge -h does not document %s", f)
		}
	}
}

func TestSplitList(t *testing.T) {
	got := splitList(" a:1, ,b:2,")
	if len(got) != 2 || got[0] != "a:1" || got[1] != "b:2" {
		t.Errorf("splitList = %q", got)
	}
}

// TestLoadCertificatesWaitsForKeyservers: while no keyserver answers, the
// edge keeps trying, logging each attempt, until its context ends; an
// error that waiting cannot mend is returned at once.
func TestLoadCertificatesWaitsForKeyservers(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nobody listens there
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	clientTLS := &tls.Config{MinVersion: tls.VersionTLS13, ServerName: "keyserver.test", Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
	client, err := tlscore.Dial(tlscore.ClientConfig{Addresses: []string{addr}, TLS: clientTLS})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	certs, err := tlscore.NewCertStore(tlscore.CertStoreConfig{Client: client})
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	logger := hclog.New(&hclog.LoggerOptions{Output: &logs})

	ctx, cancel := context.WithTimeout(t.Context(), 2500*time.Millisecond)
	defer cancel()
	err = loadCertificates(ctx, certs, t.TempDir(), logger)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("loadCertificates() = %v, want the context's error once it ended", err)
	}
	// Attempts at 0 s and 1 s, then a wait of 2 s that the context cuts.
	if n := strings.Count(logs.String(), "no keyserver answered"); n < 2 {
		t.Errorf("%d attempts logged, want 2:\n%s", n, logs.String())
	}

	logs.Reset()
	start := time.Now()
	err = loadCertificates(t.Context(), certs, filepath.Join(t.TempDir(), "missing"), logger)
	if err == nil || time.Since(start) > time.Second || logs.Len() != 0 {
		t.Errorf("loadCertificates(missing directory) = %v after %v, log %q; want an error at once", err, time.Since(start), logs.String())
	}

	// A keyserver whose certificate the edge does not trust: waiting would
	// not mend it.
	tln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: clientTLS.Certificates})
	if err != nil {
		t.Fatal(err)
	}
	defer tln.Close()
	go func() {
		for {
			c, err := tln.Accept()
			if err != nil {
				return
			}
			go func() { c.(*tls.Conn).Handshake(); c.Close() }()
		}
	}()
	untrusted, err := tlscore.Dial(tlscore.ClientConfig{Addresses: []string{tln.Addr().String()}, TLS: clientTLS})
	if err != nil {
		t.Fatal(err)
	}
	defer untrusted.Close()
	certs, err = tlscore.NewCertStore(tlscore.CertStoreConfig{Client: untrusted})
	if err != nil {
		t.Fatal(err)
	}
	logs.Reset()
	start = time.Now()
	err = loadCertificates(t.Context(), certs, t.TempDir(), logger)
	if err == nil || !strings.Contains(err.Error(), "certificate") || time.Since(start) > 5*time.Second || logs.Len() != 0 {
		t.Errorf("loadCertificates(untrusted keyserver) = %v after %v, log %q; want the handshake error at once", err, time.Since(start), logs.String())
	}
	if hs := (*tlscore.LinkHandshakeError)(nil); !errors.As(err, &hs) {
		t.Errorf("loadCertificates(untrusted keyserver) = %v, want a *tlscore.LinkHandshakeError", err)
	}
}
