package tlscore

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"

	"golang.org/x/net/http/httpguts"

	"github.com/keyless-tls/keyless/internal/hostname"
)

// Route sends the requests for some host names to one origin. A Route is
// not modified after it is passed to [NewProxy] or [Proxy.SetRoutes].
type Route struct {
	// Name names the route in metrics and logs. Empty means the first of
	// Hosts, or "default" for the default route.
	Name string
	// Hosts are the patterns of the host names the route serves: exact
	// names or "*." wildcards of one label, as [hostname.Match] reads them.
	// No Hosts makes the route the default, which serves every host name
	// no other route names. At most one route may be the default.
	Hosts []string
	// Origin is the origin's URL: scheme http or https, a host, and
	// optionally a path prefix, as [ParseOrigin] accepts it.
	Origin *url.URL
	// HostHeader is the Host the origin receives. Empty keeps the client's
	// Host, as nginx's "proxy_set_header Host $host" does.
	HostHeader string
}

// ParseOrigin parses an origin URL: scheme http or https and a host, without
// credentials. Its error starts with s, quoted, unless s may hold a
// password; the caller adds what s is.
func ParseOrigin(s string) (*url.URL, error) {
	u, err := url.Parse(s)
	switch {
	case err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "":
		shown := fmt.Sprintf("%q", s)
		if strings.Contains(s, "@") {
			shown = "(not shown: it may hold a password)"
		}
		return nil, fmt.Errorf("%s: want an http:// or https:// URL with a host", shown)
	case u.User != nil:
		// The proxy would not send them, and argv is readable by every
		// user of the machine.
		return nil, fmt.Errorf("%q: a URL with credentials (user@ or user:password@) is not supported; the edge does not authenticate to the origin", u.Redacted())
	}
	return u, nil
}

// routeTable finds the route of a host name: an exact name first, then a
// wildcard of its parent, then the default. It is immutable.
type routeTable struct {
	exact    map[string]*Route
	wildcard map[string]*Route // by the name after "*."
	fallback *Route            // nil if no default
	routes   []*Route          // in configuration order
}

// newRouteTable checks routes and builds their table. Each error names the
// route (by its position, from 1) and what is wrong with it.
func newRouteTable(routes []Route) (*routeTable, error) {
	if len(routes) == 0 {
		return nil, errors.New("no routes")
	}
	t := &routeTable{exact: map[string]*Route{}, wildcard: map[string]*Route{}}
	seen := map[string]int{} // pattern -> route number
	names := map[string]int{}
	for i := range routes {
		r := routes[i]
		n := i + 1
		if r.Origin == nil {
			return nil, fmt.Errorf("route %d: no origin", n)
		}
		if _, err := ParseOrigin(r.Origin.String()); err != nil {
			return nil, fmt.Errorf("route %d: origin %w", n, err)
		}
		if r.HostHeader != "" && !validHostHeader(r.HostHeader) {
			return nil, fmt.Errorf("route %d: host header %q: want a host name or address, with an optional :port", n, r.HostHeader)
		}
		hosts := make([]string, 0, len(r.Hosts))
		for _, h := range r.Hosts {
			if err := hostname.CheckPattern(h); err != nil {
				return nil, fmt.Errorf("route %d: host %q: %w", n, h, err)
			}
			if err := hostname.CheckServerName(strings.TrimPrefix(h, "*.")); err != nil {
				return nil, fmt.Errorf("route %d: host %q: %w", n, h, err)
			}
			p := hostname.Normalize(h)
			if prev, dup := seen[p]; dup {
				return nil, fmt.Errorf("route %d: host %q is already routed by route %d", n, h, prev)
			}
			seen[p] = n
			hosts = append(hosts, p)
		}
		r.Hosts = hosts
		if r.Name == "" {
			r.Name = "default"
			if len(hosts) > 0 {
				r.Name = hosts[0]
			}
		}
		if prev, dup := names[r.Name]; dup {
			return nil, fmt.Errorf("route %d: name %q is already that of route %d", n, r.Name, prev)
		}
		names[r.Name] = n
		rp := &r
		if len(hosts) == 0 {
			if t.fallback != nil {
				return nil, fmt.Errorf("route %d: a second default route (no hosts); route %d is the default", n, names[t.fallback.Name])
			}
			t.fallback = rp
		}
		for _, p := range hosts {
			if parent, ok := strings.CutPrefix(p, "*."); ok {
				t.wildcard[parent] = rp
			} else {
				t.exact[p] = rp
			}
		}
		t.routes = append(t.routes, rp)
	}
	return t, nil
}

// lookup returns the route of host, a host name normalized by
// [hostname.Normalize] or "", or nil if none serves it.
func (t *routeTable) lookup(host string) *Route {
	if host != "" {
		if r := t.exact[host]; r != nil {
			return r
		}
		if parent, ok := hostname.Parent(host); ok {
			if r := t.wildcard[parent]; r != nil && hostname.Match("*."+parent, host) {
				return r
			}
		}
	}
	return t.fallback
}

// requestHost returns the host name a request is for: its Host (HTTP/2's
// :authority) without port, normalized, or, when the request has no Host,
// the TLS server name. It returns "" when neither is a host name (an IP
// literal, say), which only the default route serves.
func requestHost(host, serverName string) string {
	if host == "" {
		host = serverName
	} else if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	} else if strings.HasPrefix(host, "[") {
		return "" // an IPv6 literal
	}
	if hostname.CheckServerName(host) != nil {
		return ""
	}
	host = hostname.Normalize(host)
	if host == "" || strings.HasPrefix(host, ".") || strings.HasSuffix(host, ".") || strings.Contains(host, "..") {
		return "" // an empty label
	}
	return host
}

// validHostHeader reports whether h may be sent as a Host header: a host
// name or IP address, with an optional port.
func validHostHeader(h string) bool {
	if !httpguts.ValidHostHeader(h) || strings.ContainsAny(h, "/?#@") {
		return false
	}
	host := h
	if hh, _, err := net.SplitHostPort(h); err == nil {
		host = hh
	}
	return host != ""
}
