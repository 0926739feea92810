package hostname

import (
	"errors"
	"strings"
	"testing"
)

func TestMatch(t *testing.T) {
	tests := []struct {
		pattern, name string
		want          bool
	}{
		{"example.com", "example.com", true},
		{"www.example.com", "api.example.com", false},
		{"*.example.com", "www.example.com", true},
		{"*.example.com", "under_score.example.com", true},
		{"*.com", "example.com", true},
		{"*.example.com", "*.example.com", true}, // a wildcard certificate's own name
		{"*.example.com", "example.com", false},
		{"*.example.com", "a.b.example.com", false}, // one label only
		{"*.example.com", ".example.com", false},    // an empty label
		{"*.example.com", "aexample.com", false},
		{"*.example.com", "www.example.org", false},
		{"*.b.example.com", "*.b.example.com", true},
		{"*.example.com", "*.b.example.com", false},   // a wildcard name is not a label
		{"www.example.com", "*.example.com", false},   // a name does not match a wildcard name
		{"*.*.example.com", "a.b.example.com", false}, // not a pattern CheckPattern admits
		{"example.com", "example.com.", false},        // callers normalize
		{"Example.com", "example.com", false},         // callers normalize
	}
	for _, tt := range tests {
		if got := Match(tt.pattern, tt.name); got != tt.want {
			t.Errorf("Match(%q, %q) = %t, want %t", tt.pattern, tt.name, got, tt.want)
		}
	}
}

func TestNormalize(t *testing.T) {
	for in, want := range map[string]string{"Example.COM.": "example.com", "a.b": "a.b", "": "", ".": "", "x..": "x."} {
		if got := Normalize(in); got != want {
			t.Errorf("Normalize(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestParent(t *testing.T) {
	tests := []struct {
		name, parent string
		ok           bool
	}{
		{"www.example.com", "example.com", true},
		{"example.com", "com", true},
		{"localhost", "", false},
		{".example.com", "", false},
		{"example.", "", false},
	}
	for _, tt := range tests {
		if p, ok := Parent(tt.name); p != tt.parent || ok != tt.ok {
			t.Errorf("Parent(%q) = %q, %t, want %q, %t", tt.name, p, ok, tt.parent, tt.ok)
		}
	}
}

func TestCheckPattern(t *testing.T) {
	tests := []struct {
		pattern string
		want    error
	}{
		{"example.com", nil},
		{"Example.COM.", nil},
		{"*.example.com", nil},
		{"", ErrEmptyPattern},
		{".", ErrEmptyPattern},
		{"*.", ErrBareWildcard},
		{"*", ErrWildcard},
		{"a.*.example.com", ErrWildcard},
		{"**.example.com", ErrWildcard},
		{"*a.example.com", ErrWildcard},
		{"*.*.example.com", ErrWildcard},
	}
	for _, tt := range tests {
		if err := CheckPattern(tt.pattern); !errors.Is(err, tt.want) {
			t.Errorf("CheckPattern(%q) = %v, want %v", tt.pattern, err, tt.want)
		}
	}
}

func TestCheckServerName(t *testing.T) {
	for _, ok := range []string{"www.example.com", "WWW.Example.com.", "under_score.example", "xn--bcher-kva.example", strings.Repeat("a", MaxLen) + "."} {
		if err := CheckServerName(ok); err != nil {
			t.Errorf("CheckServerName(%q) = %v, want nil", ok, err)
		}
	}
	for _, bad := range []string{"bad name", "a\x00b", "caf\u00e9.example", "\xff", "K\u212a.example", strings.Repeat("a", MaxLen+1)} {
		if err := CheckServerName(bad); err == nil {
			t.Errorf("CheckServerName(%q) = nil, want an error", bad)
		}
	}
}

func FuzzMatch(f *testing.F) {
	f.Add("*.example.com", "www.example.com")
	f.Add("example.com", "example.com")
	f.Fuzz(func(t *testing.T, pattern, name string) {
		if CheckPattern(pattern) != nil || CheckServerName(name) != nil {
			return
		}
		p, n := Normalize(pattern), Normalize(name)
		got := Match(p, n)
		parent, hasParent := Parent(n)
		want := p == n || hasParent && p == "*."+parent
		if got != want {
			t.Fatalf("Match(%q, %q) = %t, want %t", p, n, got, want)
		}
	})
}
