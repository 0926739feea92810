package tlscore

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// TrustedProxies is a set of networks whose peers are proxies the edge
// trusts: their X-Forwarded-For and Forwarded headers are extended rather
// than replaced ([ProxyConfig.TrustedProxies]), and their PROXY protocol
// headers are read ([ProxyProtocolListener]). The zero value trusts nobody.
// It is immutable and safe for concurrent use.
type TrustedProxies struct {
	prefixes []netip.Prefix
}

// ParseTrustedProxies parses a comma-separated list of CIDR prefixes
// ("10.0.0.0/8") or single addresses ("192.0.2.7"), IPv4 or IPv6. Blank
// items are skipped. The error names the item that is not one.
func ParseTrustedProxies(s string) (TrustedProxies, error) {
	var t TrustedProxies
	for item := range strings.SplitSeq(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		var p netip.Prefix
		var err error
		if strings.Contains(item, "/") {
			p, err = netip.ParsePrefix(item)
		} else {
			var a netip.Addr
			if a, err = netip.ParseAddr(item); err == nil && a.Zone() != "" {
				err = errors.New("zone")
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		if err != nil {
			return TrustedProxies{}, fmt.Errorf("%q is not a CIDR prefix (such as 10.0.0.0/8) or an IP address", item)
		}
		if p.Masked() != p {
			return TrustedProxies{}, fmt.Errorf("%q has host bits set; did you mean %s?", item, p.Masked())
		}
		t.prefixes = append(t.prefixes, p)
	}
	return t, nil
}

// Empty reports whether t trusts nobody.
func (t TrustedProxies) Empty() bool { return len(t.prefixes) == 0 }

// String returns t as ParseTrustedProxies reads it.
func (t TrustedProxies) String() string {
	s := make([]string, len(t.prefixes))
	for i, p := range t.prefixes {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

// Contains reports whether a, an IPv4 address in IPv6 form included, is in
// one of t's networks.
func (t TrustedProxies) Contains(a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range t.prefixes {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// containsAddr is Contains for a net.Addr; false for one without an IP.
func (t TrustedProxies) containsAddr(addr net.Addr) bool {
	if len(t.prefixes) == 0 || addr == nil {
		return false
	}
	ap, err := netip.ParseAddrPort(addr.String())
	if err != nil {
		return false
	}
	return t.Contains(ap.Addr())
}

// forwardedElement returns one RFC 7239 forwarded-element saying that a
// request from client for host came over proto: for=…;host=…;proto=….
func forwardedElement(client netip.Addr, host, proto string) string {
	var b strings.Builder
	b.WriteString("for=")
	if client.Is6() && !client.Is4In6() {
		// An IPv6 node is bracketed and quoted (RFC 7239, section 6).
		b.WriteString(`"[` + client.String() + `]"`)
	} else {
		b.WriteString(client.Unmap().String())
	}
	if host != "" {
		b.WriteString(";host=")
		b.WriteString(forwardedValue(host))
	}
	b.WriteString(";proto=")
	b.WriteString(forwardedValue(proto))
	return b.String()
}

// forwardedValue returns v as an RFC 7239 value: a token if it is one, else
// a quoted-string.
func forwardedValue(v string) string {
	if v != "" && strings.IndexFunc(v, func(r rune) bool { return !isTokenChar(r) }) < 0 {
		return v
	}
	var b strings.Builder
	b.WriteByte('"')
	for i := range len(v) {
		c := v[i]
		if c == '"' || c == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(c)
	}
	b.WriteByte('"')
	return b.String()
}

// isTokenChar reports whether r may appear in an RFC 9110 token.
func isTokenChar(r rune) bool {
	switch {
	case 'a' <= r && r <= 'z', 'A' <= r && r <= 'Z', '0' <= r && r <= '9':
		return true
	}
	return strings.ContainsRune("!#$%&'*+-.^_`|~", r)
}
