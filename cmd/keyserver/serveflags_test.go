package main

import (
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// validServe is a complete set of serve flags; parseServe reads no file.
var validServe = []string{"-tls-cert", "ks.pem", "-tls-key", "ks.key", "-client-ca", "ca.pem",
	"-policy", "policy.yaml", "-token-label", "demo"}

func TestParseServeBadSettings(t *testing.T) {
	tests := []struct {
		args []string
		want string // the flag the error must name
	}{
		{[]string{"-tls-key", "k", "-client-ca", "c", "-policy", "p", "-token-label", "d"}, "-tls-cert"},
		{[]string{"-tls-cert", "c", "-client-ca", "c", "-policy", "p", "-token-label", "d"}, "-tls-key"},
		{[]string{"-tls-cert", "c", "-tls-key", "k", "-policy", "p", "-token-label", "d"}, "-client-ca"},
		{[]string{"-tls-cert", "c", "-tls-key", "k", "-client-ca", "c", "-token-label", "d"}, "-policy"},
		{append([]string{"-listen", "nonsense"}, validServe...), "-listen"},
		{append([]string{"-metrics-listen", "9090"}, validServe...), "-metrics-listen"},
		{append([]string{"-max-concurrent", "-1"}, validServe...), "-max-concurrent"},
		{append([]string{"-max-queued", "-1"}, validServe...), "-max-queued"},
		{append([]string{"-health-interval", "0s"}, validServe...), "-health-interval"},
		{append([]string{"-grace", "-1s"}, validServe...), "-grace"},
		{append([]string{"-link-window", "1000"}, validServe...), "-link-window"},
		{append([]string{"-link-window", "134217728"}, validServe...), "-link-window"},
		{append([]string{"-log-level", "loud"}, validServe...), "-log-level"},
		{append([]string{"-rate-per-identity", "-3"}, validServe...), "-rate-per-identity"},
		{append([]string{"-max-sessions", "1"}, validServe...), "-max-sessions"},
		{append([]string{"-session-wait", "0s"}, validServe...), "-session-wait"},
		{append([]string{"-module", ""}, validServe...), "-module"},
		{append([]string{"-pin-env", ""}, validServe...), "-pin-env"},
		{append([]string{"-max-queued", "many"}, validServe...), "-max-queued"},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			_, err := parseServe(tt.args, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("parseServe(%q) = %v, want an error naming %s", tt.args, err, tt.want)
			}
		})
	}
}

func TestParseServeBadConfigFile(t *testing.T) {
	dir := t.TempDir()
	for name, body := range map[string]string{
		"unknown key":  "max-queud: 5\n",
		"bad value":    "max-queued: many\n",
		"not a map":    "- a\n- b\n",
		"nested value": "max-queued: [1, 2]\n",
	} {
		t.Run(name, func(t *testing.T) {
			file := filepath.Join(dir, strings.ReplaceAll(name, " ", "_")+".yaml")
			os.WriteFile(file, []byte(body), 0o600)
			_, err := parseServe(append([]string{"-config", file}, validServe...), io.Discard)
			if err == nil {
				t.Fatalf("parseServe with config %q = nil error", body)
			}
			if name != "not a map" && !strings.Contains(err.Error(), "max-qu") {
				t.Errorf("error %q does not name the key", err)
			}
		})
	}
}

// TestParseServeSources checks that a config file, the equivalent flags
// and the equivalent environment variables give the same configuration.
func TestParseServeSources(t *testing.T) {
	settings := [][2]string{
		{"listen", "127.0.0.1:7000"}, {"tls-cert", "/etc/keyless/ks.pem"}, {"tls-key", "/etc/keyless/ks.key"},
		{"client-ca", "/etc/keyless/ca.pem"}, {"policy", "/etc/keyless/policy.yaml"}, {"max-queued", "64"},
		{"health-interval", "5s"}, {"metrics-listen", "127.0.0.1:9443"}, {"log-json", "true"},
		{"token-label", "prod"}, {"pin-file", "/etc/keyless/pin"}, {"max-sessions", "4"},
		{"rate-per-identity", "100.5"}, {"link-window", "2097152"},
	}
	var args []string
	var yml strings.Builder
	for _, s := range settings {
		args = append(args, "-"+s[0]+"="+s[1])
		yml.WriteString(s[0] + ": " + s[1] + "\n")
	}
	fromFlags, err := parseServe(args, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "keyserver.yaml")
	os.WriteFile(file, []byte(yml.String()), 0o600)
	fromFile, err := parseServe([]string{"-config", file}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(fromFlags, fromFile) {
		t.Errorf("config file gives\n%+v\nflags give\n%+v", fromFile, fromFlags)
	}
	for _, s := range settings {
		t.Setenv("KEYSERVER_"+strings.ToUpper(strings.ReplaceAll(s[0], "-", "_")), s[1])
	}
	fromEnv, err := parseServe(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(fromFlags, fromEnv) {
		t.Errorf("environment gives\n%+v\nflags give\n%+v", fromEnv, fromFlags)
	}
	if fromFlags.service.MaxQueued != 64 || fromFlags.healthEvery != 5*time.Second || !fromFlags.logJSON || fromFlags.linkWindow != 2<<20 {
		t.Errorf("parsed %+v", fromFlags)
	}
	// Flags win over the environment, which wins over the file.
	got, err := parseServe([]string{"-config", file, "-max-queued", "7"}, io.Discard)
	if err != nil || got.service.MaxQueued != 7 {
		t.Errorf("flag over env and file: max-queued = %v (%v), want 7", got, err)
	}
}

func TestServeHelpDocumentsSources(t *testing.T) {
	var out strings.Builder
	parseServe([]string{"-h"}, &out)
	for _, want := range []string{"KEYSERVER_<NAME>", "-config", "-metrics-listen", "(default 1024)", "-metrics-allow-remote"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("serve -h does not mention %q:\n%s", want, out.String())
		}
	}
}
