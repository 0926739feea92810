package tlscore

import (
	"fmt"
	"strings"
)

// normalizeName returns a DNS name in the form used for matching: lower case,
// without one trailing dot.
func normalizeName(name string) string {
	return strings.ToLower(strings.TrimSuffix(name, "."))
}

// checkPattern reports whether p is a usable host name pattern: an exact name
// or "*." followed by a name. A wildcard stands for exactly one label.
func checkPattern(p string) error {
	n := normalizeName(p)
	if n == "" {
		return fmt.Errorf("tlscore: host name pattern %q is empty", p)
	}
	rest, wild := strings.CutPrefix(n, "*.")
	if wild && rest == "" {
		return fmt.Errorf("tlscore: host name pattern %q has nothing after the wildcard", p)
	}
	if strings.Contains(rest, "*") || (!wild && strings.Contains(n, "*")) {
		return fmt.Errorf("tlscore: host name pattern %q: a wildcard may only be the whole first label (\"*.example.com\")", p)
	}
	return nil
}

// matchName reports whether name matches pattern. Both must be normalized.
// "*.example.com" matches "a.example.com" but neither "example.com" nor
// "a.b.example.com".
func matchName(pattern, name string) bool {
	if pattern == name {
		return true
	}
	suffix, ok := strings.CutPrefix(pattern, "*.")
	if !ok {
		return false
	}
	label, rest, found := strings.Cut(name, ".")
	return found && label != "" && rest == suffix
}

// parentOf returns what a wildcard must stand in front of to match name:
// "example.com" for "a.example.com". ok is false for a single-label name.
func parentOf(name string) (parent string, ok bool) {
	label, rest, found := strings.Cut(name, ".")
	if !found || label == "" || rest == "" {
		return "", false
	}
	return rest, true
}
