package tlscore

import (
	"crypto/tls"
	"slices"
	"strings"
	"testing"

	"github.com/keyless-tls/keyless/internal/pkitest"
)

func TestServerConfigValidate(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	store := env.newStore(t, CertStoreConfig{})
	tests := []struct {
		name    string
		cfg     ServerConfig
		wantErr string
	}{
		{"ok", ServerConfig{Certificates: store, RSAKeyExchange: []string{"a.example.com", "*.example.org"}}, ""},
		{"no-store", ServerConfig{}, "Certificates is nil"},
		{"empty-pattern", ServerConfig{Certificates: store, RSAKeyExchange: []string{""}}, "empty"},
		{"bad-wildcard", ServerConfig{Certificates: store, RSAKeyExchange: []string{"a.*.example.com"}}, "wildcard"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewServerTLSConfig(tt.cfg)
			if tt.wantErr == "" && err != nil {
				t.Fatalf("NewServerTLSConfig() = %v", err)
			}
			if tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Errorf("NewServerTLSConfig() = %v, want an error containing %q", err, tt.wantErr)
			}
		})
	}
}

// TestNewServerTLSConfig checks the configurations themselves; the
// handshake tests check their effect.
func TestNewServerTLSConfig(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	store := env.newStore(t, CertStoreConfig{})

	plain, err := NewServerTLSConfig(ServerConfig{Certificates: store})
	if err != nil {
		t.Fatal(err)
	}
	if plain.MinVersion != tls.VersionTLS12 || plain.MaxVersion != 0 {
		t.Errorf("versions = %x..%x, want TLS 1.2 to the newest", plain.MinVersion, plain.MaxVersion)
	}
	if plain.SessionTicketsDisabled {
		t.Error("session tickets are disabled")
	}
	if !slices.Equal(plain.NextProtos, []string{"h2", "http/1.1"}) {
		t.Errorf("NextProtos = %v, want h2, http/1.1", plain.NextProtos)
	}
	if plain.GetConfigForClient != nil {
		t.Error("GetConfigForClient is set without RSAKeyExchange")
	}
	for _, s := range plain.CipherSuites {
		name := tls.CipherSuiteName(s)
		if !strings.HasPrefix(name, "TLS_ECDHE_") || !(strings.Contains(name, "GCM") || strings.Contains(name, "CHACHA20")) {
			t.Errorf("cipher suite %s is not ECDHE with an AEAD", name)
		}
	}

	tcp, err := NewServerTLSConfig(ServerConfig{Certificates: store, NextProtos: []string{}})
	if err != nil {
		t.Fatal(err)
	}
	if len(tcp.NextProtos) != 0 {
		t.Errorf("NextProtos = %v with an empty list configured, want none", tcp.NextProtos)
	}

	cfg, err := NewServerTLSConfig(ServerConfig{Certificates: store, RSAKeyExchange: []string{"Legacy.Example.com.", "*.legacy-wild.example.com", "*.old.example.com"}})
	if err != nil {
		t.Fatal(err)
	}
	modern := []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, tls.TLS_RSA_WITH_AES_128_GCM_SHA256}
	rsaOnly := []uint16{tls.TLS_RSA_WITH_AES_128_GCM_SHA256}
	tls12 := []uint16{tls.VersionTLS12}
	tests := []struct {
		name       string
		hello      tls.ClientHelloInfo
		wantNil    bool
		wantProtos []string
	}{
		{"other-name", tls.ClientHelloInfo{ServerName: "rsa.example.com", CipherSuites: rsaOnly, SupportedVersions: tls12}, true, nil},
		{"no-SNI", tls.ClientHelloInfo{CipherSuites: rsaOnly, SupportedVersions: tls12}, true, nil},
		{"wildcard-too-deep", tls.ClientHelloInfo{ServerName: "a.b.legacy-wild.example.com", CipherSuites: rsaOnly, SupportedVersions: tls12}, true, nil},
		// Listed, but the store holds no certificate of the name.
		{"no-certificate", tls.ClientHelloInfo{ServerName: "a.old.example.com", CipherSuites: rsaOnly, SupportedVersions: tls12}, true, nil},
		{"exact/modern-client", tls.ClientHelloInfo{ServerName: "legacy.example.com", CipherSuites: modern, SupportedVersions: tls12}, false, []string{"h2", "http/1.1"}},
		{"exact/TLS13-client", tls.ClientHelloInfo{ServerName: "LEGACY.example.com", CipherSuites: rsaOnly, SupportedVersions: []uint16{tls.VersionTLS13, tls.VersionTLS12}}, false, []string{"h2", "http/1.1"}},
		{"exact/RSA-only-client", tls.ClientHelloInfo{ServerName: "legacy.example.com", CipherSuites: rsaOnly, SupportedVersions: tls12}, false, []string{"http/1.1"}},
		{"wildcard/RSA-only-client", tls.ClientHelloInfo{ServerName: "a.legacy-wild.example.com", CipherSuites: rsaOnly, SupportedVersions: tls12}, false, []string{"http/1.1"}},
	}
	seen := make(map[string]*tls.Config)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := cfg.GetConfigForClient(&tt.hello)
			if err != nil {
				t.Fatal(err)
			}
			if tt.wantNil {
				if got != nil {
					t.Errorf("GetConfigForClient() = a config, want nil (the base config)")
				}
				return
			}
			if got == nil {
				t.Fatal("GetConfigForClient() = nil, want the RSA key-exchange config")
			}
			if !slices.Equal(got.NextProtos, tt.wantProtos) {
				t.Errorf("NextProtos = %v, want %v", got.NextProtos, tt.wantProtos)
			}
			for _, s := range rsaKexSuites {
				if !slices.Contains(got.CipherSuites, s) {
					t.Errorf("CipherSuites lack %s", tls.CipherSuiteName(s))
				}
			}
			if got.GetConfigForClient != nil || got.WrapSession == nil || got.UnwrapSession == nil || got.GetCertificate == nil {
				t.Error("the per-client config lacks the base config's callbacks, or has GetConfigForClient")
			}
			// Built once: the same config for the same kind of client.
			key := strings.Join(tt.wantProtos, ",")
			if prev, ok := seen[key]; ok && prev != got {
				t.Error("GetConfigForClient() built a new config; it must return a precomputed one")
			}
			seen[key] = got
		})
	}
	for _, s := range rsaKexSuites {
		if slices.Contains(cfg.CipherSuites, s) {
			t.Errorf("the base config enables %s", tls.CipherSuiteName(s))
		}
	}
}

// TestRSAKeyExchangeALPN checks that a client limited to RSA key exchange
// is not offered HTTP/2, which forbids those suites, while a client that can
// do ECDHE still is.
func TestRSAKeyExchangeALPN(t *testing.T) {
	env := newTestEnv(t, envOptions{})
	sc := env.serverConfig(t, legacyName)
	tests := []struct {
		name      string
		suites    []uint16
		wantProto string
	}{
		{"RSA-only", []uint16{rsaKexSuite}, "http/1.1"},
		{"ECDHE", []uint16{rsaKexSuite, tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256}, "h2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cc := env.clientConfig(legacyName, 0, tls.VersionTLS12)
			cc.CipherSuites = tt.suites
			cc.NextProtos = []string{"h2", "http/1.1"}
			r := pkitest.Handshake(t, sc, cc, nil)
			if r.ClientErr != nil || r.ServerErr != nil {
				t.Fatalf("handshake errors = client %v, server %v", r.ClientErr, r.ServerErr)
			}
			if r.State.NegotiatedProtocol != tt.wantProto {
				t.Errorf("ALPN = %q, want %q", r.State.NegotiatedProtocol, tt.wantProto)
			}
		})
	}
}
