// Package e2e holds the end-to-end tests: real TLS clients against a real
// edge, a real keyserver over gRPC with mutual TLS, and SoftHSM tokens made
// at test time. It has no non-test code.
package e2e

import (
	"fmt"
	"os"
	"testing"

	"github.com/keyless-tls/keyless/hsm/hsmtest"
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
	if theChain != nil {
		theChain.stop()
	}
	hsmtest.Cleanup()
	os.Exit(code)
}

// softhsmModule returns the path of the SoftHSM module. Without one the test
// is skipped, or fails when KEYLESS_REQUIRE_SOFTHSM=1.
func softhsmModule(t testing.TB) string {
	t.Helper()
	path, reason := hsmtest.ModulePath()
	if path != "" {
		return path
	}
	if os.Getenv(hsmtest.EnvRequire) == "1" {
		t.Fatal(reason)
	}
	t.Skip(reason)
	return ""
}
