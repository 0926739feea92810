// Package e2e holds the end-to-end tests: real TLS clients against a real
// edge, a real keyserver over gRPC with mutual TLS, and SoftHSM tokens made
// at test time. It has no non-test code.
package e2e

import (
	"fmt"
	"os"
	"testing"
)

func TestMain(m *testing.M) {
	dir, err := buildCommands()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// softhsmModule returns the path of the SoftHSM module. Without one the test
// is skipped, or fails when KEYLESS_REQUIRE_SOFTHSM=1.
func softhsmModule(t testing.TB) string {
	t.Helper()
	candidates := []string{os.Getenv("KEYLESS_SOFTHSM_MODULE"),
		"/usr/lib/softhsm/libsofthsm2.so",
		"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
		"/usr/local/lib/softhsm/libsofthsm2.so"}
	for _, c := range candidates {
		if c != "" && fileExists(c) {
			return c
		}
	}
	msg := "SoftHSM2 is not installed (apt-get install softhsm2, or set KEYLESS_SOFTHSM_MODULE)"
	if os.Getenv("KEYLESS_REQUIRE_SOFTHSM") == "1" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}
