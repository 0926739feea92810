// Package hostname holds the one set of rules both the edge and the
// keyserver use for DNS host names and the patterns that match them: how a
// name is normalized, what a pattern may be, and what a wildcard covers.
//
// A pattern is an exact name or "*." followed by a name. The wildcard
// stands for exactly one non-empty label, as in certificate matching (RFC
// 6125, section 6.4.3, without partial-label wildcards): "*.example.com"
// matches "www.example.com" but neither "example.com" nor
// "a.b.example.com". A name that is itself a wildcard, such as the name
// "*.example.com" of a wildcard certificate, matches only the same
// pattern.
package hostname

import (
	"errors"
	"fmt"
	"strings"
)

// MaxLen is the length of the longest DNS name, without the trailing dot.
const MaxLen = 253

// Normalize returns name in the form names are compared in: lower case,
// without one trailing dot.
func Normalize(name string) string {
	return strings.ToLower(strings.TrimSuffix(name, "."))
}

// Match reports whether name matches pattern. Both must be normalized.
func Match(pattern, name string) bool {
	if pattern == name {
		return true
	}
	suffix, ok := strings.CutPrefix(pattern, "*.")
	if !ok {
		return false
	}
	label, rest, found := strings.Cut(name, ".")
	return found && label != "" && label != "*" && rest == suffix
}

// Parent returns what a wildcard pattern must end with to match name:
// "example.com" for "www.example.com". ok is false for a name of a single
// label.
func Parent(name string) (parent string, ok bool) {
	label, rest, found := strings.Cut(name, ".")
	if !found || label == "" || rest == "" {
		return "", false
	}
	return rest, true
}

// Errors of [CheckPattern].
var (
	ErrEmptyPattern = errors.New("the name is empty")
	ErrBareWildcard = errors.New("nothing follows the wildcard")
	ErrWildcard     = errors.New(`a wildcard may only be the whole first label, as in "*.example.com"`)
)

// CheckPattern returns an error unless p, normalized, is an exact name or
// "*." followed by a name without wildcards. The errors are
// [ErrEmptyPattern], [ErrBareWildcard] and [ErrWildcard].
func CheckPattern(p string) error {
	if Normalize(p) == "" {
		return ErrEmptyPattern
	}
	rest, wild := strings.CutPrefix(strings.ToLower(p), "*.")
	rest = strings.TrimSuffix(rest, ".")
	if wild && rest == "" {
		return ErrBareWildcard
	}
	if strings.Contains(rest, "*") {
		return ErrWildcard
	}
	return nil
}

// CheckServerName returns an error unless name, a server name a TLS client
// sent, could be a host name: RFC 6066 sends it as an ASCII DNS name (an
// internationalized one as A-labels), so only ASCII letters, digits, '-',
// '_' and '.' are accepted, at most [MaxLen] bytes besides a trailing dot.
// crypto/tls accepts any bytes; this keeps odd ones out of certificate
// selection (strings.ToLower folds some non-ASCII letters into ASCII ones),
// audit trails, logs and headers.
func CheckServerName(name string) error {
	if n := strings.TrimSuffix(name, "."); len(n) > MaxLen {
		return fmt.Errorf("server name of %d bytes; a host name has at most %d", len(n), MaxLen)
	}
	for i := range len(name) {
		switch c := name[i]; {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_', c == '.':
		default:
			return fmt.Errorf("server name %q is not a host name (byte 0x%02x at %d; want ASCII letters, digits, '-', '_' and '.')", name, c, i)
		}
	}
	return nil
}
