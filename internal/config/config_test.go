package config

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func newFlags() (*flag.FlagSet, *string, *time.Duration, *int) {
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	fs.SetOutput(new(strings.Builder))
	listen := fs.String("listen", "127.0.0.1:1", "")
	grace := fs.Duration("grace", time.Second, "")
	n := fs.Int("max-queued", 1, "")
	return fs, listen, grace, n
}

func writeFile(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestParsePrecedence(t *testing.T) {
	file := writeFile(t, "listen: 127.0.0.1:3\ngrace: 3s\nmax-queued: 3\n")
	t.Setenv("TEST_GRACE", "2s")
	t.Setenv("TEST_MAX_QUEUED", "2")
	fs, listen, grace, n := newFlags()
	if err := Parse(fs, []string{"-config", file, "-max-queued", "1"}, "TEST"); err != nil {
		t.Fatal(err)
	}
	// Flags over the environment over the file.
	if *listen != "127.0.0.1:3" || *grace != 2*time.Second || *n != 1 {
		t.Errorf("got listen %q, grace %v, max-queued %d; want the file's listen, the environment's grace, the flag's max-queued", *listen, *grace, *n)
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct {
		file, want string
	}{
		{"frobnicate: 1\n", "frobnicate"},
		{"grace: soon\n", "grace"},
		{"- a\n- b\n", "want a mapping"},
		{"listen: [a, b]\n", "want a single value"},
		{"listen: : :\n", "config file"},
	}
	for _, tt := range tests {
		fs, _, _, _ := newFlags()
		err := Parse(fs, []string{"-config", writeFile(t, tt.file)}, "TEST")
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("config %q: Parse() = %v, want an error containing %q", tt.file, err, tt.want)
		}
	}
	fs, _, _, _ := newFlags()
	t.Setenv("TEST_GRACE", "whenever")
	if err := Parse(fs, nil, "TEST"); err == nil || !strings.Contains(err.Error(), "grace") {
		t.Errorf("bad environment value: Parse() = %v, want an error naming grace", err)
	}
}

// TestSection: a section's list is skipped by Parse, which still sets the
// flags around it, and read by Section; without the section named, Parse
// refuses the list.
func TestSection(t *testing.T) {
	path := writeFile(t, "max-queued: 7\nroutes:\n  - hosts: [a.example]\n    origin: http://a\n")
	fs, _, _, n := newFlags()
	if err := Parse(fs, []string{"-config", path}, "T", "routes"); err != nil || *n != 7 {
		t.Fatalf("Parse with section routes = %v, max-queued %d; want nil, 7", err, *n)
	}
	fs, _, _, _ = newFlags()
	if err := Parse(fs, []string{"-config", path}, "T"); err == nil || !strings.Contains(err.Error(), "line 3: routes: want a single value") {
		t.Errorf("Parse without section routes = %v, want a single-value error", err)
	}
	node, err := Section(path, "routes")
	if err != nil || node == nil || len(node.Content) != 1 || node.Line != 3 {
		t.Fatalf("Section(routes) = %+v, %v; want a list of 1 at line 3", node, err)
	}
	if node, err := Section(path, "other"); node != nil || err != nil {
		t.Errorf("Section(other) = %v, %v; want nil, nil", node, err)
	}
	if _, err := Section(filepath.Join(t.TempDir(), "missing.yaml"), "routes"); err == nil {
		t.Error("Section of a missing file succeeded")
	}
}
