package main

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/keyless-tls/keyless/tlscore"
)

// requiredNoOrigin are the flags every edge needs, without an origin.
var requiredNoOrigin = []string{"-certs", "d", "-keyserver", "k:1", "-keyserver-ca", "ca", "-tls-cert", "c", "-tls-key", "k"}

func writeConfig(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "edge.yaml")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

const exampleRoutes = `listen: 127.0.0.1:9443
routes:
  - hosts: [www.example.com, "*.example.com"]
    origin: http://127.0.0.1:8080
  - name: api
    hosts: [api.example.com]
    origin: http://127.0.0.1:9090/v1
    host: api.internal
`

func TestParseRoutesFromConfig(t *testing.T) {
	path := writeConfig(t, exampleRoutes)
	f, err := parse(append(requiredNoOrigin, "-config", path, "-origin", "http://127.0.0.1:7070"), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	routes, err := f.allRoutes(f.proxy.routes)
	if err != nil {
		t.Fatal(err)
	}
	p, err := tlscore.NewProxy(tlscore.ProxyConfig{Routes: routes})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range p.Routes() {
		got = append(got, r.Name+"="+strings.Join(r.Hosts, ",")+">"+r.Origin.String()+"|"+r.HostHeader)
	}
	want := []string{
		"www.example.com=www.example.com,*.example.com>http://127.0.0.1:8080|",
		"api=api.example.com>http://127.0.0.1:9090/v1|api.internal",
		"default=>http://127.0.0.1:7070|",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("routes =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// Routes alone make an HTTP edge.
	if _, err := parse(append(requiredNoOrigin, "-config", path), io.Discard); err != nil {
		t.Errorf("parse with routes and no -origin = %v", err)
	}
}

func TestParseProxyErrors(t *testing.T) {
	withDefault := writeConfig(t, "routes:\n  - origin: http://a\n")
	tests := []struct {
		name, config string
		args         []string
		wantErr      string
	}{
		{"routes not a list", "routes: http://a\n", nil, "edge.yaml: line 1: routes: want a list of routes"},
		{"route not a mapping", "routes:\n  - http://a\n", nil, "line 2: route 1: want a mapping"},
		{"unknown key", "routes:\n  - origin: http://a\n    hsots: [a.example]\n", nil, "line 3: route 1: hsots: unknown key"},
		{"hosts not a list", "routes:\n  - origin: http://a\n    hosts: a.example\n", nil, "line 3: route 1: hosts: want a list"},
		{"no origin", "routes:\n  - hosts: [a.example]\n", nil, "line 2: route 1: origin is required"},
		{"bad origin", "routes:\n  - origin: ftp://a\n", nil, `line 2: route 1: origin "ftp://a": want an http:// or https:// URL`},
		{"password in origin", "routes:\n  - origin: http://u:hunter2@a\n", nil, "credentials"},
		{"routes and tcp", "routes:\n  - origin: http://a\n", []string{"-tcp-origin", "o:1"}, "set exactly one of -origin or routes"},
		{"bad trusted proxies", "", []string{"-origin", "http://o", "-trusted-proxies", "10.0.0.1/8"}, "-trusted-proxies: \"10.0.0.1/8\" has host bits set"},
		{"proxy protocol untrusted", "", []string{"-origin", "http://o", "-proxy-protocol"}, "-proxy-protocol needs -trusted-proxies"},
		{"origin proxy protocol over http", "", []string{"-origin", "http://o", "-origin-proxy-protocol", "2"}, "-origin-proxy-protocol works with -tcp-origin only"},
		{"forwarded over tcp", "", []string{"-tcp-origin", "o:1", "-forwarded"}, "-forwarded works with HTTP origins only"},
		{"origin proxy protocol version", "", []string{"-tcp-origin", "o:1", "-origin-proxy-protocol", "3"}, "-origin-proxy-protocol 3"},
		{"zero response timeout", "", []string{"-origin", "http://o", "-origin-response-timeout", "0s"}, "-origin-response-timeout 0s"},
		{"negative idle conns", "", []string{"-origin", "http://o", "-origin-max-idle-conns", "-1"}, "-origin-max-idle-conns -1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append(append([]string(nil), requiredNoOrigin...), tt.args...)
			if tt.config != "" {
				args = append(args, "-config", writeConfig(t, tt.config))
			}
			_, err := parse(args, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("parse() = %v, want an error containing %q", err, tt.wantErr)
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Errorf("error %q shows a password", err)
			}
		})
	}
	f, err := parse(append(requiredNoOrigin, "-config", withDefault, "-origin", "http://o"), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.allRoutes(f.proxy.routes); err == nil || !strings.Contains(err.Error(), "-origin and route 1 of -config (no hosts) both make a default route") {
		t.Errorf("allRoutes with two defaults = %v", err)
	}
}

// FuzzParseRoutes: any YAML under routes either fails with an error or
// gives routes that each have a valid origin; it never panics.
func FuzzParseRoutes(f *testing.F) {
	f.Add(exampleRoutes)
	f.Add("routes:\n  - origin: http://a\n    hosts: [\"*.x\", y]\n    host: h:1\n    name: n\n")
	f.Add("routes: ~\n")
	f.Add("routes: [{origin: 'http://a', hosts: [[1]]}]\n")
	f.Fuzz(func(t *testing.T, doc string) {
		var root yaml.Node
		if yaml.Unmarshal([]byte(doc), &root) != nil || len(root.Content) == 0 || root.Content[0].Kind != yaml.MappingNode {
			return
		}
		m := root.Content[0]
		for i := 0; i+1 < len(m.Content); i += 2 {
			if m.Content[i].Value != routesSection {
				continue
			}
			routes, err := parseRoutes(m.Content[i+1])
			if err != nil {
				return
			}
			for _, r := range routes {
				if _, err := tlscore.ParseOrigin(r.Origin.String()); err != nil {
					t.Fatalf("route with origin %v that ParseOrigin refuses: %v", r.Origin, err)
				}
			}
		}
	})
}
