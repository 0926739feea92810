package tlscore

import (
	"net/netip"
	"net/url"
	"strings"
	"testing"

	"github.com/keyless-tls/keyless/internal/hostname"
)

func mustURL(t testing.TB, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func TestNewRouteTableErrors(t *testing.T) {
	a := mustURL(t, "http://127.0.0.1:1")
	tests := []struct {
		name    string
		routes  []Route
		wantErr string // "" for none
	}{
		{"ok", []Route{{Hosts: []string{"a.example.com", "*.example.com"}, Origin: a}, {Origin: a}}, ""},
		{"none", nil, "no routes"},
		{"no origin", []Route{{Hosts: []string{"a.example"}}}, "route 1: no origin"},
		{"ftp origin", []Route{{Origin: mustURL(t, "ftp://x")}}, "route 1: origin"},
		{"credentials", []Route{{Origin: mustURL(t, "http://u:secret@x")}}, "credentials"},
		{"bad pattern", []Route{{Hosts: []string{"a.*.example"}, Origin: a}}, `route 1: host "a.*.example"`},
		{"bare wildcard", []Route{{Hosts: []string{"*."}, Origin: a}}, "nothing follows the wildcard"},
		{"not a host name", []Route{{Hosts: []string{"a b.example"}, Origin: a}}, "not a host name"},
		{"duplicate host", []Route{{Hosts: []string{"A.example"}, Origin: a}, {Hosts: []string{"a.example."}, Origin: a}}, `route 2: host "a.example." is already routed by route 1`},
		{"two defaults", []Route{{Origin: a}, {Name: "other", Origin: a}}, "route 2: a second default route"},
		{"duplicate name", []Route{{Name: "x", Hosts: []string{"a.example"}, Origin: a}, {Name: "x", Hosts: []string{"b.example"}, Origin: a}}, `name "x"`},
		{"bad host header", []Route{{Origin: a, HostHeader: "a b"}}, "host header"},
		{"host header with path", []Route{{Origin: a, HostHeader: "a.example/x"}}, "host header"},
		{"host header with port", []Route{{Origin: a, HostHeader: "a.example:8080"}}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := newRouteTable(tt.routes)
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Errorf("newRouteTable() = %v, want an error containing %q", err, tt.wantErr)
			}
			if err != nil && strings.Contains(err.Error(), "secret") {
				t.Errorf("error %q shows the origin's password", err)
			}
		})
	}
}

func TestRouteLookup(t *testing.T) {
	routes := []Route{
		{Hosts: []string{"www.example.com", "*.example.com"}, Origin: mustURL(t, "http://a")},
		{Name: "api", Hosts: []string{"API.example.com."}, Origin: mustURL(t, "http://b")},
		{Hosts: []string{"*.b.example.com"}, Origin: mustURL(t, "http://c")},
		{Origin: mustURL(t, "http://d")},
	}
	tab, err := newRouteTable(routes)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct{ host, sni, want string }{
		{"www.example.com", "", "www.example.com"},
		{"WWW.Example.COM:8443", "", "www.example.com"},
		{"x.example.com", "", "www.example.com"},
		{"api.example.com", "", "api"},               // exact beats wildcard
		{"api.example.com.", "", "api"},              // trailing dot
		{"x.b.example.com", "", "*.b.example.com"},   // the nearer wildcard
		{"b.example.com", "", "www.example.com"},     // *.example.com
		{"x.y.example.com", "", "default"},           // a wildcard covers one label
		{"example.com", "", "default"},               // and at least one
		{"", "api.example.com", "api"},               // no Host: the SNI
		{"other.test", "api.example.com", "default"}, // Host wins over SNI
		{"127.0.0.1:443", "", "default"},             // IP literal
		{"[::1]:443", "", "default"},                 // IPv6 literal
		{"[::1]", "", "default"},                     // IPv6 literal without port
		{"bad_host!.example.com", "", "default"},     // not a host name
		{"", "", "default"},
	}
	for _, tt := range tests {
		r := tab.lookup(requestHost(tt.host, tt.sni))
		if r == nil || r.Name != tt.want {
			t.Errorf("lookup(requestHost(%q, %q)) = %+v, want route %q", tt.host, tt.sni, r, tt.want)
		}
	}

	noDefault, err := newRouteTable(routes[:3])
	if err != nil {
		t.Fatal(err)
	}
	if r := noDefault.lookup(requestHost("other.test", "")); r != nil {
		t.Errorf("lookup(other.test) without a default = %q, want nil", r.Name)
	}
}

// FuzzRouteLookup checks, for any Host a client may send, that the route
// chosen is the one the matching rules of package hostname give: an exact
// pattern first, then a wildcard, then the default.
func FuzzRouteLookup(f *testing.F) {
	for _, s := range []string{"www.example.com", "a.b.example.com:443", "[::1]:1", "", "*.example.com", "X.EXAMPLE.COM.", "a..example.com", ".example.com", "example.com:", "\x00"} {
		f.Add(s, "sni.example.com")
	}
	routes := []Route{
		{Hosts: []string{"www.example.com", "*.example.com"}, Origin: &url.URL{Scheme: "http", Host: "a"}},
		{Hosts: []string{"*.b.example.com", "sni.example.com"}, Origin: &url.URL{Scheme: "http", Host: "b"}},
		{Origin: &url.URL{Scheme: "http", Host: "c"}},
	}
	tab, err := newRouteTable(routes)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, host, sni string) {
		name := requestHost(host, sni)
		if name != "" && (name != hostname.Normalize(name) || hostname.CheckServerName(name) != nil) {
			t.Fatalf("requestHost(%q, %q) = %q, not a normalized host name", host, sni, name)
		}
		got := tab.lookup(name)
		var want *Route
		for _, wild := range []bool{false, true} {
			for _, r := range tab.routes {
				for _, p := range r.Hosts {
					if want == nil && name != "" && strings.HasPrefix(p, "*.") == wild && hostname.Match(p, name) {
						want = r
					}
				}
			}
		}
		if want == nil {
			want = tab.fallback
		}
		if got != want {
			t.Fatalf("lookup(%q) = %q, want %q", name, got.Name, want.Name)
		}
	})
}

func TestParseTrustedProxies(t *testing.T) {
	tests := []struct {
		in, want string
		wantErr  string
	}{
		{"", "", ""},
		{"10.0.0.0/8, 192.0.2.7,,2001:db8::/32", "10.0.0.0/8,192.0.2.7/32,2001:db8::/32", ""},
		{"::1", "::1/128", ""},
		{"10.0.0.1/8", "", "has host bits set; did you mean 10.0.0.0/8?"},
		{"example.com", "", `"example.com" is not a CIDR prefix`},
		{"10.0.0.0/33", "", `"10.0.0.0/33"`},
		{"fe80::1%eth0", "", `"fe80::1%eth0"`},
	}
	for _, tt := range tests {
		got, err := ParseTrustedProxies(tt.in)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("ParseTrustedProxies(%q) = %v, want an error containing %q", tt.in, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got.String() != tt.want {
			t.Errorf("ParseTrustedProxies(%q) = %q, %v, want %q", tt.in, got, err, tt.want)
		}
	}
	tp, err := ParseTrustedProxies("10.0.0.0/8,2001:db8::/32")
	if err != nil {
		t.Fatal(err)
	}
	for addr, want := range map[string]bool{"10.1.2.3": true, "::ffff:10.1.2.3": true, "11.0.0.1": false, "2001:db8::5": true, "2001:db9::5": false} {
		if got := tp.Contains(netip.MustParseAddr(addr)); got != want {
			t.Errorf("Contains(%s) = %v, want %v", addr, got, want)
		}
	}
}

func TestForwardedElement(t *testing.T) {
	tests := []struct {
		client, host, want string
	}{
		{"192.0.2.60", "example.com", "for=192.0.2.60;host=example.com;proto=https"},
		{"::ffff:192.0.2.60", "example.com", "for=192.0.2.60;host=example.com;proto=https"},
		{"2001:db8:cafe::17", "example.com:8443", `for="[2001:db8:cafe::17]";host="example.com:8443";proto=https`},
		{"192.0.2.60", "", "for=192.0.2.60;proto=https"},
		{"192.0.2.60", `a"b\c`, `for=192.0.2.60;host="a\"b\\c";proto=https`},
	}
	for _, tt := range tests {
		if got := forwardedElement(netip.MustParseAddr(tt.client), tt.host, "https"); got != tt.want {
			t.Errorf("forwardedElement(%s, %q) = %s, want %s", tt.client, tt.host, got, tt.want)
		}
	}
}

// FuzzForwardedValue: any value of visible ASCII and spaces comes out of
// forwardedValue as a token equal to it or as a quoted-string that unquotes
// to it.
func FuzzForwardedValue(f *testing.F) {
	for _, s := range []string{"example.com", "example.com:8443", `a"b\c`, "", " ", "[::1]:1", "a;b,c=d"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		for i := range len(v) {
			if v[i] < ' ' || v[i] > '~' {
				return
			}
		}
		got := forwardedValue(v)
		if !strings.HasPrefix(got, `"`) {
			if got != v || v == "" || strings.IndexFunc(v, func(r rune) bool { return !isTokenChar(r) }) >= 0 {
				t.Fatalf("forwardedValue(%q) = %q, not a token equal to it", v, got)
			}
			return
		}
		if len(got) < 2 || !strings.HasSuffix(got, `"`) {
			t.Fatalf("forwardedValue(%q) = %q, not a quoted-string", v, got)
		}
		var b strings.Builder
		inner := got[1 : len(got)-1]
		for i := 0; i < len(inner); i++ {
			c := inner[i]
			switch {
			case c == '\\' && i+1 < len(inner):
				i++
				b.WriteByte(inner[i])
			case c == '"' || c == '\\':
				t.Fatalf("forwardedValue(%q) = %q: unescaped %q", v, got, c)
			default:
				b.WriteByte(c)
			}
		}
		if b.String() != v {
			t.Fatalf("forwardedValue(%q) = %q, which unquotes to %q", v, got, b.String())
		}
	})
}
