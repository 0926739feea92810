package main

import (
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/keyless-tls/keyless/tlscore"
)

// validEdge is a complete set of edge flags; parse reads no file.
var validEdge = []string{"-certs", "d", "-keyserver", "k:1", "-keyserver-ca", "ca", "-tls-cert", "c", "-tls-key", "k", "-origin", "http://o"}

func TestParseBadSettings(t *testing.T) {
	with := func(extra ...string) []string { return append(append([]string{}, validEdge...), extra...) }
	tests := []struct {
		args []string
		want string // the flag the error must name
	}{
		{[]string{"-keyserver", "k:1", "-keyserver-ca", "ca", "-tls-cert", "c", "-tls-key", "k", "-origin", "http://o"}, "-certs"},
		{[]string{"-certs", "d", "-keyserver-ca", "ca", "-tls-cert", "c", "-tls-key", "k", "-origin", "http://o"}, "-keyserver"},
		{[]string{"-certs", "d", "-keyserver", "k:1", "-tls-cert", "c", "-tls-key", "k", "-origin", "http://o"}, "-keyserver-ca"},
		{[]string{"-certs", "d", "-keyserver", "k:1", "-keyserver-ca", "ca", "-tls-key", "k", "-origin", "http://o"}, "-tls-cert"},
		{[]string{"-certs", "d", "-keyserver", "k:1", "-keyserver-ca", "ca", "-tls-cert", "c", "-origin", "http://o"}, "-tls-key"},
		{with("-listen", "nonsense"), "-listen"},
		{with("-origin", "ftp://o"), "-origin"},
		{with("-origin", "http://user:hunter2@o"), "-origin"},
		{with("-origin", "http://user:hunter2@o:bad"), "-origin"},
		{with("-tcp-origin", "o:1"), "-tcp-origin"},
		{append(validEdge[:len(validEdge)-2:len(validEdge)-2], "-tcp-origin", "o"), "-tcp-origin"},
		{append(validEdge[:len(validEdge)-2:len(validEdge)-2], "-tcp-origin", "o:1", "-tcp-idle-timeout", "-1s"), "-tcp-idle-timeout"},
		{with("-keyserver", "a"), "-keyserver"},
		{with("-keyserver", "a:1,b:2"), "-keyserver-name"},
		{with("-call-timeout", "0s"), "-call-timeout"},
		{with("-keepalive", "1s"), "-keepalive"},
		{with("-reconnect-backoff", "0s"), "-reconnect-backoff"},
		{with("-link-window", "65535"), "-link-window"},
		{with("-link-window", "67108865"), "-link-window"},
		{with("-grace", "-1s"), "-grace"},
		{with("-drain-delay", "-1s"), "-drain-delay"},
		{with("-handshakes-per-client", "-1"), "-handshakes-per-client"},
		{with("-handshakes-per-client", "1e19"), "-handshakes-per-client"},
		{with("-handshakes-per-client", "NaN"), "-handshakes-per-client"},
		{with("-handshake-burst", "-1"), "-handshake-burst"},
		{with("-max-key-operations", "-1"), "-max-key-operations"},
		{with("-max-key-operations", "16777217"), "-max-key-operations"},
		{with("-max-key-operations", "many"), "-max-key-operations"},
		{with("-grace", "soon"), "-grace"},
		{with("-log-level", "chatty"), "-log-level"},
		{with("-metrics-listen", "9090"), "-metrics-listen"},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			_, err := parse(tt.args, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("parse(%q) = %v, want an error naming %s", tt.args, err, tt.want)
			}
			if err != nil && strings.Contains(err.Error(), "hunter2") {
				t.Errorf("parse(%q) = %v, which shows the password", tt.args, err)
			}
		})
	}
}

func TestParseBadConfigFile(t *testing.T) {
	dir := t.TempDir()
	for name, body := range map[string]string{
		"unknown key":  "call-timeot: 5s\n",
		"bad value":    "call-timeout: soon\n",
		"nested value": "call-timeout: [1, 2]\n",
	} {
		t.Run(name, func(t *testing.T) {
			file := filepath.Join(dir, strings.ReplaceAll(name, " ", "_")+".yaml")
			os.WriteFile(file, []byte(body), 0o600)
			_, err := parse(append([]string{"-config", file}, validEdge...), io.Discard)
			if err == nil || !strings.Contains(err.Error(), "call-time") {
				t.Errorf("parse with config %q = %v, want an error naming the key", body, err)
			}
		})
	}
}

// TestParseSources checks that a config file, the equivalent flags and the
// equivalent environment variables give the same configuration.
func TestParseSources(t *testing.T) {
	settings := [][2]string{
		{"listen", "127.0.0.1:7443"}, {"certs", "/etc/keyless/certs"}, {"default-cert", "www.example.com"},
		{"rsa-key-exchange", "legacy.example.com"}, {"origin", "http://127.0.0.1:8080"},
		{"keyserver", "ks1.internal:7000,ks2.internal:7000"}, {"keyserver-name", "keyserver.internal"},
		{"keyserver-ca", "/etc/keyless/ca.pem"}, {"tls-cert", "/etc/keyless/edge.pem"}, {"tls-key", "/etc/keyless/edge.key"},
		{"call-timeout", "3s"}, {"keepalive", "20s"}, {"link-window", "4194304"}, {"reconnect-backoff", "1s"}, {"grace", "5s"},
		{"log-level", "debug"}, {"log-json", "true"}, {"metrics-listen", "127.0.0.1:9444"},
		{"max-key-operations", "512"}, {"handshakes-per-client", "50"}, {"handshake-burst", "120"},
		{"trusted-proxies", "10.0.0.0/8,192.0.2.7"}, {"proxy-protocol", "true"}, {"forwarded", "true"},
		{"origin-response-timeout", "30s"}, {"origin-max-idle-conns", "8"},
	}
	var args []string
	var yml strings.Builder
	for _, s := range settings {
		args = append(args, "-"+s[0]+"="+s[1])
		yml.WriteString(s[0] + ": " + s[1] + "\n")
	}
	fromFlags, err := parse(args, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "edge.yaml")
	os.WriteFile(file, []byte(yml.String()), 0o600)
	fromFile, err := parse([]string{"-config", file}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	fromFile.proxy.configPath = "" // kept to read the routes again
	if !reflect.DeepEqual(fromFlags, fromFile) {
		t.Errorf("config file gives\n%+v\nflags give\n%+v", fromFile, fromFlags)
	}
	for _, s := range settings {
		t.Setenv("EDGE_"+strings.ToUpper(strings.ReplaceAll(s[0], "-", "_")), s[1])
	}
	fromEnv, err := parse(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(fromFlags, fromEnv) {
		t.Errorf("environment gives\n%+v\nflags give\n%+v", fromEnv, fromFlags)
	}
	if fromFlags.callTimeout != 3*time.Second || len(fromFlags.keyserverList) != 2 || !fromFlags.logJSON || fromFlags.maxKeyOps != 512 || fromFlags.handshakeRate != 50 || fromFlags.handshakeBurst != 120 || fromFlags.linkWindow != 4<<20 {
		t.Errorf("parsed %+v", fromFlags)
	}
	// Flags win over the environment, which wins over the file.
	got, err := parse([]string{"-config", file, "-call-timeout", "7s"}, io.Discard)
	if err != nil || got.callTimeout != 7*time.Second {
		t.Errorf("flag over env and file: call-timeout = %v (%v), want 7s", got, err)
	}
	t.Setenv("EDGE_GRACE", "9s")
	got, err = parse([]string{"-config", file}, io.Discard)
	if err != nil || got.grace != 9*time.Second {
		t.Errorf("env over file: grace = %v (%v), want 9s", got, err)
	}
}

func TestHelpDocumentsSources(t *testing.T) {
	var out strings.Builder
	parse([]string{"-h"}, &out)
	for _, want := range []string{"EDGE_<NAME>", "-config", "-metrics-listen", "-metrics-allow-remote", `(default "127.0.0.1:8443")`, "(default 2s)"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("edge -h does not mention %q:\n%s", want, out.String())
		}
	}
}

// TestServerConfigBounds: by default the edge bounds its key operations in
// flight and each client's full handshakes; the flags set the bounds, and
// 0 removes them.
func TestServerConfigBounds(t *testing.T) {
	tests := []struct {
		args          []string
		wantMaxKeyOps int // as tlscore.ServerConfig takes it
		wantRate      float64
		wantBurst     int
	}{
		{nil, tlscore.DefaultMaxKeyOperations, tlscore.DefaultHandshakesPerClient, tlscore.DefaultHandshakeBurst},
		{[]string{"-max-key-operations", "64", "-handshakes-per-client", "100", "-handshake-burst", "300"}, 64, 100, 300},
		{[]string{"-max-key-operations", "0", "-handshakes-per-client", "0"}, -1, 0, tlscore.DefaultHandshakeBurst},
	}
	for _, tt := range tests {
		f, err := parse(append(append([]string{}, validEdge...), tt.args...), io.Discard)
		if err != nil {
			t.Fatalf("parse(%q) = %v", tt.args, err)
		}
		cfg := f.serverConfig(nil, nil, nil)
		if cfg.MaxKeyOperations != tt.wantMaxKeyOps || cfg.HandshakesPerClient != tt.wantRate || cfg.HandshakeBurst != tt.wantBurst {
			t.Errorf("with %q: MaxKeyOperations %d, HandshakesPerClient %v, HandshakeBurst %d; want %d, %v, %d", tt.args,
				cfg.MaxKeyOperations, cfg.HandshakesPerClient, cfg.HandshakeBurst, tt.wantMaxKeyOps, tt.wantRate, tt.wantBurst)
		}
	}
}
