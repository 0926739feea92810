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

// maxHostNameLen is the length of the longest DNS name, without the
// trailing dot.
const maxHostNameLen = 253

// checkServerName returns an error unless name, the server name a client
// sent, could be a host name: RFC 6066 sends it as an ASCII DNS name (an
// internationalized one as A-labels), so only ASCII letters, digits, '-',
// '_' and '.' are accepted, at most 253 bytes besides a trailing dot.
// crypto/tls takes any bytes; this keeps odd ones out of certificate
// selection (strings.ToLower folds some non-ASCII letters into ASCII ones),
// the keyserver's audit trail, logs and headers.
func checkServerName(name string) error {
	if n := strings.TrimSuffix(name, "."); len(n) > maxHostNameLen {
		return fmt.Errorf("tlscore: server name of %d bytes; a host name has at most %d", len(n), maxHostNameLen)
	}
	for i := range len(name) {
		switch c := name[i]; {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_', c == '.':
		default:
			return fmt.Errorf("tlscore: server name %q is not a host name (byte 0x%02x at %d; want ASCII letters, digits, '-', '_' and '.')", name, c, i)
		}
	}
	return nil
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
