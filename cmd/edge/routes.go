package main

import (
	"errors"
	"flag"
	"fmt"
	"slices"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/hashicorp/go-hclog"

	"github.com/keyless-tls/keyless/internal/config"
	"github.com/keyless-tls/keyless/tlscore"
)

// routesSection is the key of the -config file's list of routes.
const routesSection = "routes"

// proxyFlags are the edge's reverse-proxy settings: routes, trusted
// proxies, PROXY protocol and the origin connections.
type proxyFlags struct {
	configPath      string // -config, for reading the routes again on SIGHUP
	trustedProxies  string
	proxyProtocol   bool
	forwarded       bool
	originProxy     int
	connectTimeout  time.Duration
	responseTimeout time.Duration
	idleTimeout     time.Duration
	maxIdleConns    int

	trusted tlscore.TrustedProxies // parsed from trustedProxies
	routes  []tlscore.Route        // from the -config file
}

// define defines the proxy flags on fs.
func (p *proxyFlags) define(fs *flag.FlagSet) {
	fs.StringVar(&p.trustedProxies, "trusted-proxies", "", "comma-separated CIDRs (or addresses) of proxies and load balancers in front of the edge: their X-Forwarded-For and Forwarded values are kept and appended to (others' are replaced), and with -proxy-protocol their PROXY headers are read")
	fs.BoolVar(&p.proxyProtocol, "proxy-protocol", false, "read a PROXY protocol header (v1 or v2) at the start of each connection from -trusted-proxies, and use the client address it gives; connections from elsewhere are served as they are")
	fs.BoolVar(&p.forwarded, "forwarded", false, "also send the origin an RFC 7239 Forwarded header (for, host, proto)")
	fs.IntVar(&p.originProxy, "origin-proxy-protocol", 0, "with -tcp-origin: begin each origin connection with a PROXY protocol header of this version (1 or 2) giving the client's address (0: none)")
	fs.DurationVar(&p.connectTimeout, "origin-connect-timeout", tlscore.DefaultOriginConnectTimeout, "bound on connecting to an HTTP origin; beyond it the client gets 504")
	fs.DurationVar(&p.responseTimeout, "origin-response-timeout", tlscore.DefaultOriginResponseTimeout, "bound on waiting for an HTTP origin's response headers; beyond it the client gets 504")
	fs.DurationVar(&p.idleTimeout, "origin-idle-timeout", tlscore.DefaultOriginIdleTimeout, "close a pooled connection to an HTTP origin idle this long")
	fs.IntVar(&p.maxIdleConns, "origin-max-idle-conns", tlscore.DefaultOriginMaxIdleConns, "idle connections kept open per HTTP origin for reuse (0: none)")
}

// check reads the routes of the -config file and checks the proxy
// settings. Every error names its flag, or the file and line of a route.
func (p *proxyFlags) check(fs *flag.FlagSet, tcp bool) error {
	var err error
	if p.trusted, err = tlscore.ParseTrustedProxies(p.trustedProxies); err != nil {
		return fmt.Errorf("-trusted-proxies: %w", err)
	}
	if p.proxyProtocol && p.trusted.Empty() {
		return errors.New("-proxy-protocol needs -trusted-proxies: a PROXY header is accepted only from them")
	}
	if !slices.Contains([]int{0, 1, 2}, p.originProxy) {
		return fmt.Errorf("-origin-proxy-protocol %d: want 0 (none), 1 or 2", p.originProxy)
	}
	if p.originProxy != 0 && !tcp {
		return errors.New("-origin-proxy-protocol works with -tcp-origin only")
	}
	if p.forwarded && tcp {
		return errors.New("-forwarded works with HTTP origins only, not -tcp-origin (see -origin-proxy-protocol)")
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"-origin-connect-timeout", p.connectTimeout}, {"-origin-response-timeout", p.responseTimeout}, {"-origin-idle-timeout", p.idleTimeout}} {
		if d.v <= 0 {
			return fmt.Errorf("%s %v: must be positive", d.name, d.v)
		}
	}
	if p.maxIdleConns < 0 {
		return fmt.Errorf("-origin-max-idle-conns %d: must be 0 or more", p.maxIdleConns)
	}
	if c := fs.Lookup("config"); c != nil {
		p.configPath = c.Value.String()
	}
	p.routes, err = p.readRoutes()
	return err
}

// readRoutes reads the routes of the -config file, if any.
func (p *proxyFlags) readRoutes() ([]tlscore.Route, error) {
	if p.configPath == "" {
		return nil, nil
	}
	node, err := config.Section(p.configPath, routesSection)
	if err != nil {
		return nil, fmt.Errorf("-config %s: %w", p.configPath, err)
	}
	routes, err := parseRoutes(node)
	if err != nil {
		return nil, fmt.Errorf("-config %s: %w", p.configPath, err)
	}
	return routes, nil
}

// parseRoutes turns the routes list of the -config file into routes: each
// a mapping of name, hosts (a list), origin and host. nil gives none.
// Errors give the line. The routes are checked as a whole by
// tlscore.NewProxy.
func parseRoutes(node *yaml.Node) ([]tlscore.Route, error) {
	if node == nil || node.Kind == yaml.ScalarNode && node.Tag == "!!null" {
		return nil, nil
	}
	if node.Kind != yaml.SequenceNode {
		return nil, fmt.Errorf("line %d: %s: want a list of routes", node.Line, routesSection)
	}
	var routes []tlscore.Route
	for i, rn := range node.Content {
		if rn.Kind != yaml.MappingNode {
			return nil, fmt.Errorf("line %d: route %d: want a mapping with origin, and hosts, name or host", rn.Line, i+1)
		}
		var r tlscore.Route
		var origin string
		for j := 0; j+1 < len(rn.Content); j += 2 {
			k, v := rn.Content[j], rn.Content[j+1]
			var err error
			switch k.Value {
			case "name":
				err = scalar(v, &r.Name)
			case "origin":
				err = scalar(v, &origin)
			case "host":
				err = scalar(v, &r.HostHeader)
			case "hosts":
				if v.Kind != yaml.SequenceNode {
					err = errors.New("want a list of host names")
					break
				}
				for _, h := range v.Content {
					var s string
					if err = scalar(h, &s); err != nil {
						break
					}
					r.Hosts = append(r.Hosts, s)
				}
			default:
				err = errors.New("unknown key: want name, hosts, origin or host")
			}
			if err != nil {
				return nil, fmt.Errorf("line %d: route %d: %s: %w", k.Line, i+1, k.Value, err)
			}
		}
		if origin == "" {
			return nil, fmt.Errorf("line %d: route %d: origin is required", rn.Line, i+1)
		}
		u, err := tlscore.ParseOrigin(origin)
		if err != nil {
			return nil, fmt.Errorf("line %d: route %d: origin %w", rn.Line, i+1, err)
		}
		r.Origin = u
		routes = append(routes, r)
	}
	return routes, nil
}

// scalar sets *s to n's value if n is a single value.
func scalar(n *yaml.Node, s *string) error {
	if n.Kind != yaml.ScalarNode {
		return errors.New("want a single value")
	}
	*s = n.Value
	return nil
}

// allRoutes returns the routes of the -config file followed by -origin as
// the default route, if set.
func (f *flags) allRoutes(routes []tlscore.Route) ([]tlscore.Route, error) {
	if f.originURL == nil {
		return routes, nil
	}
	for i, r := range routes {
		if len(r.Hosts) == 0 {
			return nil, fmt.Errorf("-origin and route %d of -config (no hosts) both make a default route; keep one", i+1)
		}
	}
	return append(slices.Clip(routes), tlscore.Route{Origin: f.originURL}), nil
}

// proxyConfig returns the configuration of the edge's reverse proxy.
func (f *flags) proxyConfig(metrics *tlscore.Metrics, logger hclog.Logger) (tlscore.ProxyConfig, error) {
	routes, err := f.allRoutes(f.proxy.routes)
	if err != nil {
		return tlscore.ProxyConfig{}, err
	}
	maxIdle := f.proxy.maxIdleConns
	if maxIdle == 0 {
		maxIdle = -1 // the flag's "none"
	}
	return tlscore.ProxyConfig{
		Routes:          routes,
		TrustedProxies:  f.proxy.trusted,
		Forwarded:       f.proxy.forwarded,
		ConnectTimeout:  f.proxy.connectTimeout,
		ResponseTimeout: f.proxy.responseTimeout,
		IdleTimeout:     f.proxy.idleTimeout,
		MaxIdleConns:    maxIdle,
		Metrics:         metrics,
		Logger:          logger,
	}, nil
}

// reloadRoutes reads the routes of the -config file again and puts them in
// force in proxy; on any error, it logs it and the routes in force stay.
func reloadRoutes(f *flags, proxy *tlscore.Proxy, logger hclog.Logger) {
	routes, err := f.proxy.readRoutes()
	if err == nil {
		routes, err = f.allRoutes(routes)
	}
	if err == nil {
		err = proxy.SetRoutes(routes)
	}
	if err != nil {
		logger.Error("reload of the routes failed; the previous ones stay in force", "error", err)
		return
	}
	logger.Info("routes reloaded", "routes", len(routes))
}
