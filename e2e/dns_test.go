package e2e

import (
	"strings"
	"testing"
)

// TestKeyserverByDNSName starts an edge whose keyserver is named by a
// dns:/// target, resolved by gRPC's DNS resolver (localhost → 127.0.0.1
// and ::1, of which only the first answers), and checks that handshakes
// through it work.
func TestKeyserverByDNSName(t *testing.T) {
	needTool(t, "curl")
	ks := freeAddr(t)
	_, port, _ := strings.Cut(ks, ":")
	d := startDeploymentWith(t, []string{"-listen", ks}, []string{"-keyserver", "dns:///localhost:" + port})
	if d.keyserverAddr != ks {
		t.Fatalf("keyserver listens on %s, want %s", d.keyserverAddr, ks)
	}
	for _, host := range []string{"ecdsa.e2e.test", "rsa.e2e.test"} {
		out, err := run(t, nil, "curl", "-sS", "--max-time", "20", "--cacert", d.caFile, "--resolve", d.resolve(host), d.url(host))
		if err != nil || !strings.Contains(out, "hostname:    "+host) {
			t.Errorf("curl %s through an edge with a dns:/// keyserver: %v\n%s", host, err, out)
		}
	}
}
