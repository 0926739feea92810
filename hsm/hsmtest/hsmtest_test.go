package hsmtest_test

import (
	"strings"
	"testing"

	"github.com/keyless-tls/keyless/hsm/hsmtest"
)

func TestMain(m *testing.M) { hsmtest.Main(m) }

func TestNew(t *testing.T) {
	a, b := hsmtest.New(t), hsmtest.New(t)
	if a.Label == b.Label || a.PIN == b.PIN || a.Serial == b.Serial || a.Serial == "" {
		t.Fatalf("tokens are not distinct: %+v, %+v", a, b)
	}
	cfg := a.Config()
	if err := cfg.Validate(); err != nil {
		t.Fatalf("Config().Validate() = %v", err)
	}
	if hsmtest.Dir() == "" {
		t.Error("Dir() is empty after New")
	}
	m := a.Open(t)
	// A token created while a Module is open is visible to the process.
	c := hsmtest.New(t)
	c.PKCS11Tool(t, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "k", "--id", "01")
	mc := c.Open(t)
	keys, err := mc.Keys(t.Context())
	if err != nil || len(keys) != 1 {
		t.Fatalf("Keys() = %d keys, %v; want the key made by pkcs11-tool", len(keys), err)
	}
	if err := m.Check(t.Context()); err != nil {
		t.Errorf("Check() = %v", err)
	}
	if out := c.PKCS11Tool(t, "--list-objects"); !strings.Contains(out, "label:      k") {
		t.Errorf("pkcs11-tool --list-objects:\n%s", out)
	}
	if s1, s2 := c.Slot(t), c.Slot(t); s1 != s2 {
		t.Errorf("Slot() = %d, then %d", s1, s2)
	}
}
