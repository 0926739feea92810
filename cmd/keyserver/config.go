package main

import (
	"flag"

	"github.com/keyless-tls/keyless/internal/config"
)

// parseConfig parses args into fs from flags, prefix_* environment
// variables and a YAML -config file; see [config.Parse].
func parseConfig(fs *flag.FlagSet, args []string, prefix string) error {
	return config.Parse(fs, args, prefix)
}
