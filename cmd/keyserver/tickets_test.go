package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keyless-tls/keyless/signer"
)

func TestReadTicketSecret(t *testing.T) {
	good := strings.Repeat("ab", 32)
	dir := t.TempDir()
	for _, tt := range []struct {
		name, data string
		mode       os.FileMode
		want       string // substring of the error; "" for none
	}{
		{"good", "# made with openssl rand -hex 32\n" + good + "\n", 0o600, ""},
		{"readable by others", good, 0o644, "lets group or others read it"},
		{"short", strings.Repeat("ab", 31), 0o600, "31 bytes of secret; want at least 32"},
		{"not hex", strings.Repeat("zz", 32), 0o600, "not hexadecimal digits"},
		{"odd length", good + "a", 0o600, "not hexadecimal digits"},
		{"two lines", good + "\n" + good, 0o600, "more than one line"},
		{"empty", "\n# nothing\n", 0o600, "no secret"},
	} {
		path := filepath.Join(dir, strings.ReplaceAll(tt.name, " ", "-"))
		if err := os.WriteFile(path, []byte(tt.data), tt.mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, tt.mode); err != nil {
			t.Fatal(err)
		}
		secret, err := readTicketSecret(path)
		switch {
		case tt.want == "" && (err != nil || len(secret) != 32 || secret[0] != 0xab):
			t.Errorf("%s: readTicketSecret() = %d bytes, %v", tt.name, len(secret), err)
		case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
			t.Errorf("%s: readTicketSecret() = %v, want an error containing %q", tt.name, err, tt.want)
		case err != nil && strings.Contains(err.Error(), "abab"):
			t.Errorf("%s: error %q quotes the secret", tt.name, err)
		}
	}
}

func TestTicketFlagsCheck(t *testing.T) {
	for _, tt := range []struct {
		f    ticketFlags
		want string
	}{
		{ticketFlags{period: time.Hour, accept: 12 * time.Hour}, ""},
		{ticketFlags{period: 500 * time.Millisecond, accept: time.Hour}, "-ticket-key-period"},
		{ticketFlags{period: time.Hour, accept: -time.Second}, "-ticket-key-accept"},
		{ticketFlags{period: time.Hour, accept: 0}, "-ticket-key-accept"},
		{ticketFlags{period: time.Second, accept: time.Hour}, "-ticket-key-accept"},
	} {
		err := tt.f.check()
		if (tt.want == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), tt.want) {
			t.Errorf("check(%v, %v) = %v, want %q", tt.f.period, tt.f.accept, err, tt.want)
		}
	}
}

func TestTicketFlagsLoad(t *testing.T) {
	policy, err := signer.ParsePolicy("p.yaml", []byte("rules:\n  - name: fleet\n    identities: [edge.example]\n    operations: [tickets]\n"))
	if err != nil {
		t.Fatal(err)
	}
	var logs strings.Builder
	logger := hclog.New(&hclog.LoggerOptions{Output: &logs})
	f := ticketFlags{period: time.Hour, accept: time.Hour}
	if tk, err := f.load(logger, policy); tk != nil || err != nil || !strings.Contains(logs.String(), "-ticket-secret-file is not set") {
		t.Errorf("load() without a secret = %v, %v; log:\n%s", tk, err, logs.String())
	}
	f.secretFile = filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(f.secretFile, []byte(strings.Repeat("0f", 32)), 0o600); err != nil {
		t.Fatal(err)
	}
	logs.Reset()
	tk, err := f.load(logger, policy)
	if err != nil || tk == nil || tk.Period() != time.Hour || !strings.Contains(logs.String(), "ticket_groups=fleet") {
		t.Errorf("load() = %v, %v; log:\n%s", tk, err, logs.String())
	}
	if strings.Contains(logs.String(), "0f0f") {
		t.Error("the log quotes the secret")
	}
}
