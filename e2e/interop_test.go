package e2e

import (
	"os/exec"
	"strings"
	"testing"
)

// These tests drive the edge, running as its own process in front of a
// keyserver process and SoftHSM, with the TLS clients that users run.

func needTool(t *testing.T, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Fatalf("%s is not installed (make test installs it; on Debian: apt-get install %s)", name, map[string]string{
			"openssl": "openssl", "curl": "curl", "nghttp": "nghttp2-client", "haproxy": "haproxy",
		}[name])
	}
}

func TestInteropOpenSSL(t *testing.T) {
	needTool(t, "openssl")
	d := startDeployment(t)
	tests := []struct {
		name, host string
		args       []string
		want       []string
	}{
		{"TLS1.3/ECDSA-P256", "ecdsa.e2e.test", []string{"-tls1_3"}, []string{"Protocol version: TLSv1.3", "Signature type: ECDSA", "Hash used: SHA256"}},
		{"TLS1.3/ECDSA-P384", "p384.e2e.test", []string{"-tls1_3"}, []string{"Protocol version: TLSv1.3", "Signature type: ECDSA", "Hash used: SHA384"}},
		{"TLS1.3/RSA-PSS", "rsa.e2e.test", []string{"-tls1_3"}, []string{"Protocol version: TLSv1.3", "Signature type: RSA-PSS", "Hash used: SHA256"}},
		{"TLS1.3/Ed25519", "ed25519.e2e.test", []string{"-tls1_3"}, []string{"Protocol version: TLSv1.3", "Signature type: ed25519"}},
		{"TLS1.2/ECDHE-ECDSA", "ecdsa.e2e.test", []string{"-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"}, []string{"Protocol version: TLSv1.2", "Ciphersuite: ECDHE-ECDSA-AES128-GCM-SHA256"}},
		{"TLS1.2/ECDHE-RSA", "rsa.e2e.test", []string{"-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384"}, []string{"Protocol version: TLSv1.2", "Ciphersuite: ECDHE-RSA-AES256-GCM-SHA384"}},
		{"TLS1.2/ECDHE-RSA-PKCS1", "rsa.e2e.test", []string{"-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256", "-sigalgs", "RSA+SHA256"}, []string{"Protocol version: TLSv1.2", "Signature type: RSA\n", "Hash used: SHA256"}},
		{"TLS1.2/RSA-key-exchange", "rsa.e2e.test", []string{"-tls1_2", "-cipher", "AES128-GCM-SHA256"}, []string{"Protocol version: TLSv1.2", "Ciphersuite: AES128-GCM-SHA256"}},
		{"TLS1.2/Ed25519", "ed25519.e2e.test", []string{"-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"}, []string{"Protocol version: TLSv1.2", "Signature type: ed25519"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"s_client", "-brief", "-ign_eof", "-connect", d.edgeAddr,
				"-servername", tt.host, "-verify_hostname", tt.host, "-CAfile", d.caFile, "-verify_return_error"}, tt.args...)
			cmd := exec.Command("openssl", args...)
			cmd.Stdin = strings.NewReader("GET / HTTP/1.1\r\nHost: " + tt.host + "\r\nConnection: close\r\n\r\n")
			outb, err := cmd.CombinedOutput()
			out := string(outb)
			if err != nil {
				t.Fatalf("openssl %s: %v\n%s", strings.Join(args, " "), err, out)
			}
			for _, w := range append(tt.want, "Verification: OK", "HTTP/1.1 200 OK", "hostname:    "+tt.host) {
				if !strings.Contains(out, w) {
					t.Errorf("openssl s_client output lacks %q:\n%s", w, out)
				}
			}
		})
	}
}

func TestInteropCurl(t *testing.T) {
	needTool(t, "curl")
	d := startDeployment(t)
	tests := []struct {
		name, host string
		args       []string
		wantTLS    string
		wantHTTP   string
	}{
		{"HTTP1.1/TLS1.3/ECDSA", "ecdsa.e2e.test", []string{"--http1.1", "--tlsv1.3"}, "TLS 1.3", "1.1"},
		{"HTTP2/TLS1.3/ECDSA", "ecdsa.e2e.test", []string{"--http2", "--tlsv1.3"}, "TLS 1.3", "2"},
		{"HTTP1.1/TLS1.2/RSA", "rsa.e2e.test", []string{"--http1.1", "--tlsv1.2", "--tls-max", "1.2"}, "TLS 1.2", "1.1"},
		{"HTTP2/TLS1.2/RSA", "rsa.e2e.test", []string{"--http2", "--tlsv1.2", "--tls-max", "1.2"}, "TLS 1.2", "2"},
		{"HTTP2/TLS1.3/RSA", "rsa.e2e.test", []string{"--http2", "--tlsv1.3"}, "TLS 1.3", "2"},
		{"HTTP2/TLS1.3/Ed25519", "ed25519.e2e.test", []string{"--http2", "--tlsv1.3"}, "TLS 1.3", "2"},
		{"HTTP1.1/TLS1.2/RSA-key-exchange", "rsa.e2e.test", []string{"--http1.1", "--tlsv1.2", "--tls-max", "1.2", "--ciphers", "AES128-GCM-SHA256"}, "TLS 1.2", "1.1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"-sS", "--fail-with-body", "--max-time", "20", "--cacert", d.caFile,
				"--resolve", d.resolve(tt.host), "-w", "\nhttp_version=%{http_version}\n"}, tt.args...)
			args = append(args, d.url(tt.host)+"path?q=1")
			out, err := run(t, nil, "curl", args...)
			if err != nil {
				t.Fatalf("curl %s: %v\n%s", strings.Join(args, " "), err, out)
			}
			for _, w := range []string{"hostname:    " + tt.host, "tls version: " + tt.wantTLS,
				"request:     GET /path?q=1", "client:      127.0.0.1", "http_version=" + tt.wantHTTP} {
				if !strings.Contains(out, w) {
					t.Errorf("curl output lacks %q:\n%s", w, out)
				}
			}
		})
	}
}

func TestInteropNghttp(t *testing.T) {
	needTool(t, "nghttp")
	d := startDeployment(t)
	// nghttp sends no SNI to an IP address: the edge serves its default
	// certificate (ecdsa.e2e.test) over HTTP/2.
	out, err := run(t, nil, "nghttp", "-v", "https://"+d.edgeAddr+"/h2")
	if err != nil {
		t.Fatalf("nghttp: %v\n%s", err, out)
	}
	for _, w := range []string{":status: 200", "tls version: TLS 1.3", "request:     GET /h2"} {
		if !strings.Contains(out, w) {
			t.Errorf("nghttp output lacks %q:\n%s", w, out)
		}
	}
}
