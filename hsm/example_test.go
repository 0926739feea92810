package hsm_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keyless-tls/keyless/hsm"
)

// ExampleOpen opens a token, generates a key in it if it has none, and
// lists its keys with the TLS signature schemes each can perform.
func ExampleOpen() {
	pin, err := os.ReadFile("/run/secrets/hsm-pin") // cmd/keyserver reads the PIN; hsm never does
	if err != nil {
		log.Fatal(err)
	}
	m, err := hsm.Open(hsm.Config{
		ModulePath:      "/usr/lib/softhsm/libsofthsm2.so",
		TokenLabel:      "keyless",
		PIN:             string(pin),
		MaxSessions:     4,
		PoolWaitTimeout: 2 * time.Second,
		Logger:          hclog.New(&hclog.LoggerOptions{Name: "keyserver"}),
	})
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	keys, err := m.Keys(ctx)
	if err != nil {
		log.Fatal(err)
	}
	if len(keys) == 0 {
		k, err := m.Generate(ctx, hsm.KeySpec{Type: hsm.KeyTypeECDSA, Curve: "P-256", Label: "edge-2025"})
		if err != nil {
			log.Fatal(err)
		}
		keys = append(keys, k)
	}
	for _, k := range keys {
		schemes := k.(interface{ SignatureSchemes() []tls.SignatureScheme }).SignatureSchemes()
		fmt.Printf("%T %v\n", k.Public(), schemes)
	}
}
